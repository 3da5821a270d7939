"""Optional API keys: with `GATEWAY_API_KEYS` set, every API request needs
`Authorization: Bearer KEY`, and the key names the tenant the request is made for."""

import hmac
from collections.abc import Awaitable, Callable, Mapping

from fastapi import Request

from chatbus.gateway.errors import Failure, Refused
from chatbus.gateway.operations import request_log

Authenticate = Callable[[Request], Awaitable[str | None]]


def authenticator(api_keys: Mapping[str, str]) -> Authenticate:
    """A FastAPI dependency giving the request's tenant: None when no keys are set, else
    the tenant of the request's key; 401 without a valid key."""
    keys = [(key.encode(), tenant) for key, tenant in api_keys.items()]

    async def tenant(request: Request) -> str | None:
        if not keys:
            return None
        scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
        given = credentials.strip().encode()
        found = None
        # Every key compared in constant time, so the time taken tells nothing about them.
        for key, key_tenant in keys:
            if hmac.compare_digest(key, given) and scheme.lower() == "bearer":
                found = key_tenant
        if found is None:
            raise Refused(
                Failure(
                    401, "invalid_api_key", "a valid API key is needed: Authorization: Bearer KEY"
                )
            )
        request_log(request)["tenant"] = found
        return found

    return tenant
