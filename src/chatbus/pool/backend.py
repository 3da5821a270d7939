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
    """Unreachable, busy (503, 429), timed out, dropped or unreadable: the server failed."""
    MODEL_FAILED = "model_failed"
    """500 or an error line mid-stream: the model's runner failed, the server answers."""
    MODEL_MISSING = "model_missing"
    """404: the server does not have the model."""
    REJECTED = "rejected"
    """Another 4xx: the request's fault, not the server's."""
    ABANDONED = "abandoned"
    """The worker ended the call before it told anything (a cancel, a requester gone)."""


# Statuses of a server (or the proxy before it) that cannot take the request now, whatever
# the model: Ollama answers 503 when its queue is full. Other 5xx, and error lines in a
# stream (-1), come from one model's runner: Ollama answers 500 when a model fails to load
# or its runner dies.
_SERVER_STATUSES = frozenset({408, 429, 502, 503, 504})


def classify(error: BaseException) -> CallOutcome | None:
    """What a failed call says about the server; None when the error is not the server's."""
    if isinstance(error, ollama.ResponseError):
        status = error.status_code
        if status == 404:
            return CallOutcome.MODEL_MISSING
        if status in _SERVER_STATUSES:
            return CallOutcome.FAILED
        if 400 <= status < 500:
            return CallOutcome.REJECTED
        return CallOutcome.MODEL_FAILED
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
        # Made at the first check: a client loads the CA bundle, which takes a while.
        self._http: httpx.AsyncClient | None = None
        self._check_timeout = check_timeout
        self.in_flight = 0
        self.listing: dict[str, ollama.ListResponse.Model] | None = None
        """Its models by name (`/api/tags`); None until it has answered once."""
        self.loaded: set[str] = set()
        self.answered_at: dict[str, float] = {}
        """When each model last answered here: loaded then, whatever an older `/api/ps`
        says."""
        self.loading: Counter[str] = Counter()
        """Models of the calls in flight: loaded, or being loaded for them."""
        self.model_failed_at: dict[str, float] = {}
        """When each model last failed here (MODEL_FAILED), until it answers again."""
        self.calls: Counter[CallOutcome] = Counter()
        self.loads_caused = 0
        self.last_error: str | None = None
        """The last failure of a call or a check."""
        self.check_problem: str | None = None
        """What the last check found wrong; None when it passed."""
        self.last_check_at = -math.inf
        """When the last check began."""

    def candidate(self, model: str, now: float) -> Candidate:
        """The server as the routing sees it for a request for `model`."""
        model_failed_at = self.model_failed_at.get(model, -math.inf)
        return Candidate(
            id=self.id,
            capacity=self.spec.parallel,
            in_flight=self.in_flight,
            admits=self.breaker.admits(),
            awaits_probe=self.breaker.awaits_probe,
            failing=self.breaker.failures > 0 or now < model_failed_at + self.breaker.cooldown,
            models=None if self.listing is None else frozenset(self.listing),
            loaded=self.loaded_now(),
        )

    def may_have(self, model: str) -> bool:
        return self.listing is None or model in self.listing

    def loaded_now(self) -> frozenset[str]:
        return frozenset(self.loaded).union(+self.loading)

    @property
    def healthy(self) -> bool:
        """It answered its last check, and its circuit is not open."""
        return self.breaker.state is not CircuitState.OPEN and self.check_problem is None

    def problem(self) -> str | None:
        """What is wrong with the server, or None when nothing is."""
        breaker = self.breaker
        if breaker.state is CircuitState.OPEN:
            return f"circuit open after {breaker.failures} failures in a row: {self.last_error}"
        if self.check_problem is not None:
            return self.check_problem
        if breaker.state is CircuitState.HALF_OPEN:
            return "recovering: " + ("probe in flight" if breaker.probing else "awaiting a probe")
        return None

    def describe(self, error: BaseException) -> str:
        """The error for logs and statuses, with the server's id where its URL was."""
        if isinstance(error, ollama.ResponseError):
            text = f"HTTP {error.status_code}: {error.error}"
        else:
            text = f"{type(error).__name__}: {error}".rstrip(": ")
        return text.replace(self.spec.base_url, self.id)

    async def check(self, started: float) -> BaseException | None:
        """Ask the server for its version, its models and what it has loaded (a check that
        began at `started`, on the event loop's clock). Returns the error when it failed;
        what it had is kept then."""
        if self._http is None:
            self._http = httpx.AsyncClient(base_url=self.spec.base_url, timeout=self._check_timeout)
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
            if isinstance(error, httpx.HTTPStatusError):
                self.check_problem = (
                    f"Ollama answered {error.request.url.path} with {error.response.status_code}"
                )
            else:
                self.check_problem = f"Ollama unreachable: {self.last_error}"
            return error
        self.check_problem = None
        self.listing = {canonical_model(m.model or ""): m for m in listing.models if m.model}
        answered_since = {model for model, at in self.answered_at.items() if at >= started}
        running_models = {canonical_model(m.model or "") for m in running.models if m.model}
        self.loaded = running_models | answered_since
        return None

    async def close(self) -> None:
        if self._http is not None:
            await self._http.aclose()
        await self.client.close()  # type: ignore[no-untyped-call]  # unannotated in ollama
