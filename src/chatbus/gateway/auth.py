"""Optional API keys: with `GATEWAY_API_KEYS` set, every API request needs
`Authorization: Bearer KEY`, and the key names the tenant the request is made for."""

import hmac
from collections.abc import Awaitable, Callable, Mapping

from fastapi import Request

from chatbus.gateway.errors import Failure, Refused
from chatbus.gateway.operations import request_log

Authenticate = Callable[[Request], Awaitable[str | None]]

TenantOf = Callable[[str | None], str | None]
"""The tenant of a request's `Authorization` header (None: the request has none); None
when it gives no valid key. Without API keys every request is of one tenant, ""."""

NO_VALID_KEY = Failure(
    401, "invalid_api_key", "a valid API key is needed: Authorization: Bearer KEY"
)


def tenant_lookup(api_keys: Mapping[str, str]) -> TenantOf:
    """The tenant of an `Authorization` header, given the keys and their tenants."""
    keys = [(key.encode(), tenant) for key, tenant in api_keys.items()]

    def tenant_of(authorization: str | None) -> str | None:
        if not keys:
            return ""
        scheme, _, credentials = (authorization or "").partition(" ")
        given = credentials.strip().encode()
        found = None
        # Every key compared in constant time, so the time taken tells nothing about them.
        for key, key_tenant in keys:
            if hmac.compare_digest(key, given) and scheme.lower() == "bearer":
                found = key_tenant
        return found

    return tenant_of


def authenticator(tenant_of: TenantOf) -> Authenticate:
    """A FastAPI dependency giving the request's tenant: None when no keys are set, else
    the tenant of the request's key; 401 without a valid key."""

    async def tenant(request: Request) -> str | None:
        found = tenant_of(request.headers.get("authorization"))
        if found is None:
            raise Refused(NO_VALID_KEY)
        if not found:
            return None
        request_log(request)["tenant"] = found
        return found

    return tenant
