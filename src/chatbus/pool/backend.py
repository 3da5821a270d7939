"""One server of the pool: its client, what it has and has loaded, its health and its load."""

import asyncio
import math
from collections import Counter
from enum import StrEnum

import httpx
import ollama

from chatbus.pool.breaker import CircuitBreaker, CircuitState
from chatbus.pool.routing import Candidate
from chatbus.pool.servers import ServerSpec, canonical_model


class CallOutcome(StrEnum):
    ANSWERED = "answered"
    """The server streamed (the start of) an answer."""
    FAILED = "failed"
    """Unreachable, 5xx or busy, a broken or stalled stream: the server's failure."""
    MODEL_MISSING = "model_missing"
    """404: the server does not have the model."""
    REJECTED = "rejected"
    """Another 4xx: the request's fault, not the server's."""
    ABANDONED = "abandoned"
    """The worker ended the call before it told anything (a cancel, a requester gone)."""


# Client errors that say the server is overloaded rather than that the request is wrong.
_BUSY_STATUSES = frozenset({408, 429})


def classify(error: BaseException) -> CallOutcome | None:
    """What a failed call says about the server; None when the error is not the server's."""
    if isinstance(error, ollama.ResponseError):
        status = error.status_code
        if status == 404:
            return CallOutcome.MODEL_MISSING
        if 400 <= status < 500 and status not in _BUSY_STATUSES:
            return CallOutcome.REJECTED
        return CallOutcome.FAILED  # 5xx, or an error line mid-stream (-1)
    # A ValueError is a response that is not Ollama's JSON.
    if isinstance(error, httpx.TransportError | ConnectionError | TimeoutError | ValueError):
        return CallOutcome.FAILED
    return None


class Backend:
    def __init__(
        self,
        spec: ServerSpec,
        client: ollama.AsyncClient,
        breaker: CircuitBreaker,
        check_timeout: float,
    ) -> None:
        self.spec = spec
        self.id = spec.id
        self.client = client
        self.breaker = breaker
        # Health checks get their own connection: they must not queue behind generations.
        self._http = httpx.AsyncClient(base_url=spec.base_url, timeout=check_timeout)
        self._check_timeout = check_timeout
        self.in_flight = 0
        self.listing: dict[str, ollama.ListResponse.Model] | None = None
        """Its models by name (`/api/tags`); None until it has answered once."""
        self.loaded: set[str] = set()
        self.loading: Counter[str] = Counter()
        """Models of the calls in flight: loaded, or being loaded for them."""
        self.calls: Counter[CallOutcome] = Counter()
        self.loads_caused = 0
        self.last_error: str | None = None
        self.last_check_at = -math.inf

    def candidate(self) -> Candidate:
        return Candidate(
            id=self.id,
            capacity=self.spec.parallel,
            in_flight=self.in_flight,
            admits=self.breaker.admits(),
            awaits_probe=self.breaker.awaits_probe,
            failing=self.breaker.failures > 0,
            models=None if self.listing is None else frozenset(self.listing),
            loaded=self.loaded_now(),
        )

    def loaded_now(self) -> frozenset[str]:
        return frozenset(self.loaded).union(+self.loading)

    def problem(self) -> str | None:
        """Why the server is not healthy, or None when it is."""
        breaker = self.breaker
        if breaker.state is CircuitState.CLOSED:
            return None
        if breaker.state is CircuitState.HALF_OPEN:
            return "recovering: " + ("probe in flight" if breaker.probing else "awaiting a probe")
        return f"circuit open after {breaker.failures} failures in a row: {self.last_error}"

    def describe(self, error: BaseException) -> str:
        """The error for logs and statuses, with the server's id where its URL was."""
        if isinstance(error, ollama.ResponseError):
            text = f"HTTP {error.status_code}: {error.error}"
        else:
            text = f"{type(error).__name__}: {error}".rstrip(": ")
        return text.replace(self.spec.base_url, self.id)

    async def check(self) -> BaseException | None:
        """Ask the server for its version, its models and what it has loaded. Returns the
        error when it failed; what it had is kept then."""
        try:
            async with asyncio.timeout(self._check_timeout):
                version = await self._http.get("/api/version")
                version.raise_for_status()
                listing = await self.client.list()
                running = await self.client.ps()
        except (
            httpx.HTTPError,
            ollama.ResponseError,
            ConnectionError,
            TimeoutError,
            ValueError,  # an answer that is not Ollama's JSON
        ) as error:
            self.last_error = self.describe(error)
            return error
        self.listing = {canonical_model(m.model or ""): m for m in listing.models if m.model}
        self.loaded = {canonical_model(m.model or "") for m in running.models if m.model}
        return None

    async def close(self) -> None:
        await self._http.aclose()
        await self.client.close()  # type: ignore[no-untyped-call]  # unannotated in ollama
