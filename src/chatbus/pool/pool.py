"""The pool: several Ollama servers behind one worker, a request's call leased to one of them.

```python
async with pool.lease(model, exclude=tried, timeout=first_token_timeout) as lease:
    stream = await lease.client.chat(model=model, ...)   # lease.server names the server
    ...                                                  # lease.answered() at the first part
```

A lease holds one of the server's `parallel` slots until the block ends, so a server never
runs more of the pool's calls than it is set to; when every server that could take the
request is busy, `lease` waits for a slot (for `timeout` seconds at most) rather than
overload one. What the call told about the server is recorded: `lease.answered()`,
`lease.failed(error)`, or the exception leaving the block. The server's own failures
(unreachable, busy, timed out) feed its circuit breaker; a model's failures there (500, an
error line) make it the last choice for that model for a cooldown, and leave its other
models alone; a 404 corrects what the pool believes the server has.

In the background each server is asked for its version, models and loaded models every
`refresh_interval` seconds, at the end of an open circuit's cooldown, after a call that made
it load a model, after a 404, and when a request names a model no server lists (it may have
been pulled a moment ago).
"""

import asyncio
import contextlib
import logging
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

import ollama

from chatbus.pool.backend import Backend, CallOutcome, classify
from chatbus.pool.breaker import CircuitBreaker, CircuitState
from chatbus.pool.routing import Verdict, choose
from chatbus.pool.servers import ServerSpec, canonical_model

logger = logging.getLogger("chatbus.pool")


@dataclass(frozen=True)
class PoolOptions:
    failure_threshold: int = 3
    """Failures in a row that open a server's circuit."""
    cooldown: float = 5.0
    """Seconds an open circuit sends nothing before the server is checked again."""
    refresh_interval: float = 10.0
    """Seconds between checks of a server's health, models and loaded models."""
    check_timeout: float = 2.0
    """Seconds one check may take."""


class PoolError(Exception):
    """No server can take the request now."""


class ModelNotInPool(PoolError):
    """No server has the model."""


class NoServerAvailable(PoolError):
    """Every server that has the model is down, or was tried by this request already."""

    def __init__(self, message: str, down: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.down = down
        """The servers that may have the model and were not tried: their circuit is open."""


class NoFreeSlot(PoolError):
    """Every server that could take the request stayed busy for the whole timeout."""


class Abandoned(PoolError):
    """The caller gave up waiting for a slot (its `abandon` event was set)."""


@dataclass(frozen=True)
class ServerStatus:
    id: str
    capacity: int
    in_flight: int
    circuit: CircuitState
    healthy: bool
    """It answered its last check, and its circuit is not open."""
    problem: str | None
    """What is wrong with it; None when nothing is."""
    models: tuple[str, ...] | None
    """What it has; None until it has answered."""
    loaded: tuple[str, ...]
    calls: dict[CallOutcome, int]
    loads_caused: int
    """Calls sent to it for a model it did not have loaded."""


@dataclass(frozen=True)
class PooledModel:
    name: str
    details: ollama.ListResponse.Model
    """As the first server that lists it describes it."""
    servers: tuple[str, ...]
    loaded_on: tuple[str, ...]


class Lease:
    """One call's slot on one server."""

    def __init__(self, pool: "OllamaPool", backend: Backend, model: str, cold: bool) -> None:
        self._pool = pool
        self._backend = backend
        self.server = backend.id
        """The server's short id (host:port), fit for logs and replies."""
        self.client = backend.client
        self.model = model
        self.cold = cold
        """The server had not loaded the model: this call makes it load it."""
        self.outcome: CallOutcome | None = None

    def answered(self) -> None:
        """The server sent (the start of) an answer. Call it at the first part."""
        if self.outcome is None:
            self.outcome = CallOutcome.ANSWERED
            self._pool._answered(self)

    def failed(self, error: BaseException) -> None:
        """The call failed with `error` (as the `ollama` client raised it); a timeout of the
        worker's own is a `TimeoutError`."""
        outcome = classify(error)
        if outcome is None:
            return
        self.outcome = outcome
        self._pool._failed(self, self._backend, outcome, error)


class _Leasing:
    def __init__(
        self,
        pool: "OllamaPool",
        model: str,
        exclude: frozenset[str],
        timeout: float | None,
        abandon: asyncio.Event | None,
    ) -> None:
        self._pool = pool
        self._model = model
        self._exclude = exclude
        self._timeout = timeout
        self._abandon = abandon
        self._lease: Lease | None = None

    async def __aenter__(self) -> Lease:
        self._lease = await self._pool._acquire(
            self._model, self._exclude, self._timeout, self._abandon
        )
        return self._lease

    async def __aexit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        assert self._lease is not None
        if self._lease.outcome is None and exc is not None:
            self._lease.failed(exc)
        self._pool._release(self._lease)


@dataclass
class _Waiter:
    requested: str
    model: str
    exclude: frozenset[str]
    lease: "asyncio.Future[Lease]"


class OllamaPool:
    def __init__(
        self,
        servers: Sequence[ServerSpec],
        client_for: Callable[[ServerSpec], ollama.AsyncClient],
        options: PoolOptions = PoolOptions(),
    ) -> None:
        self._options = options
        self._backends = [
            Backend(
                spec,
                client_for(spec),
                CircuitBreaker(options.failure_threshold, options.cooldown),
                options.check_timeout,
            )
            for spec in servers
        ]
        self._by_id = {backend.id: backend for backend in self._backends}
        self._waiters: list[_Waiter] = []
        # A server's watcher sleeps until its next check is due, or until woken: to check at
        # once (asked), or to reckon its due time again (its circuit opened).
        self._wake = {backend.id: asyncio.Event() for backend in self._backends}
        self._check_asked: set[str] = set()
        self._checked = asyncio.Event()
        self._watchers: list[asyncio.Task[None]] = []

    @property
    def capacity(self) -> int:
        """Calls the pool runs at once: the sum of the servers' `parallel`."""
        return sum(backend.spec.parallel for backend in self._backends)

    @property
    def waiting(self) -> int:
        """Requests waiting for a slot."""
        return len(self._waiters)

    async def start(self) -> None:
        """Start checking the servers in the background (the first check at once)."""
        self._watchers = [
            asyncio.create_task(self._watch(backend), name=f"pool check {backend.id}")
            for backend in self._backends
        ]

    async def close(self) -> None:
        for watcher in self._watchers:
            watcher.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)
        for waiter in self._waiters:
            waiter.lease.cancel()
        self._waiters.clear()
        for backend in self._backends:
            await backend.close()

    def lease(
        self,
        model: str,
        *,
        exclude: Collection[str] = (),
        timeout: float | None = None,
        abandon: asyncio.Event | None = None,
    ) -> contextlib.AbstractAsyncContextManager[Lease]:
        """A slot for one call for `model` on the best server for it (`routing.choose`),
        not on one of `exclude` (ids). Waits at most `timeout` seconds for a free slot, and
        no longer once `abandon` is set.

        Raises `ModelNotInPool`, `NoServerAvailable`, `NoFreeSlot` or `Abandoned`."""
        return _Leasing(self, model, frozenset(exclude), timeout, abandon)

    def statuses(self) -> list[ServerStatus]:
        return [
            ServerStatus(
                id=backend.id,
                capacity=backend.spec.parallel,
                in_flight=backend.in_flight,
                circuit=backend.breaker.state,
                healthy=backend.healthy,
                problem=backend.problem(),
                models=None if backend.listing is None else tuple(sorted(backend.listing)),
                loaded=tuple(sorted(backend.loaded)),
                calls=dict(backend.calls),
                loads_caused=backend.loads_caused,
            )
            for backend in self._backends
        ]

    async def models(self) -> list[PooledModel]:
        """Every model of every server that answers, with where it is and is loaded.

        Raises `NoServerAvailable` when no server has ever answered."""
        await self.refresh(0)
        listed = [backend for backend in self._backends if backend.listing is not None]
        if not listed:
            raise NoServerAvailable(self._unavailable_message(None, frozenset()))
        names = sorted({name for backend in listed for name in backend.listing or {}})
        return [
            PooledModel(
                name=name,
                details=next(
                    backend.listing[name]
                    for backend in listed
                    if backend.listing and name in backend.listing
                ),
                servers=tuple(b.id for b in listed if b.listing and name in b.listing),
                loaded_on=tuple(b.id for b in listed if name in b.loaded),
            )
            for name in names
        ]

    # ------------------------------------------------------------------ leasing

    async def _acquire(
        self,
        requested: str,
        exclude: frozenset[str],
        timeout: float | None,
        abandon: asyncio.Event | None,
    ) -> Lease:
        model = canonical_model(requested)
        if not any(backend.may_have(model) for backend in self._backends):
            await self.refresh(0)
        verdict = self._choose(model, exclude)
        if isinstance(verdict, Backend):
            return self._take(verdict, model)
        if verdict is not Verdict.WAIT:
            raise self._no_server(verdict, requested, exclude)
        waiter = _Waiter(requested, model, exclude, asyncio.get_running_loop().create_future())
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(timeout):
                return await _unless_set(waiter.lease, abandon)
        except BaseException as error:
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)
            handed = waiter.lease
            if handed.done() and not handed.cancelled() and handed.exception() is None:
                # Handed a slot in the same instant as it gave up: give the slot back.
                self._release(handed.result())
            handed.cancel()
            if isinstance(error, TimeoutError):
                raise NoFreeSlot(
                    f"every Ollama server that can take {model} stayed busy for {timeout:g}s"
                ) from None
            raise

    def _choose(self, model: str, exclude: frozenset[str]) -> Backend | Verdict:
        now = asyncio.get_running_loop().time()
        candidates = [backend.candidate(model, now) for backend in self._backends]
        verdict = choose(candidates, model, exclude)
        return self._by_id[verdict] if isinstance(verdict, str) else verdict

    def _take(self, backend: Backend, model: str) -> Lease:
        cold = model not in backend.loaded_now()
        backend.in_flight += 1
        backend.loading[model] += 1
        backend.breaker.leased()
        return Lease(self, backend, model, cold)

    def _release(self, lease: Lease) -> None:
        backend = self._by_id[lease.server]
        if lease.outcome is None:
            lease.outcome = CallOutcome.ABANDONED
            backend.breaker.abandoned()
        backend.in_flight -= 1
        backend.loading[lease.model] -= 1
        backend.calls[lease.outcome] += 1
        self._dispatch()

    def _dispatch(self) -> None:
        """Hand free slots to the waiting requests, in the order they came."""
        for waiter in list(self._waiters):
            if waiter.lease.done():  # cancelled by `close`
                self._waiters.remove(waiter)
                continue
            verdict = self._choose(waiter.model, waiter.exclude)
            if verdict is Verdict.WAIT:
                continue
            self._waiters.remove(waiter)
            if isinstance(verdict, Backend):
                waiter.lease.set_result(self._take(verdict, waiter.model))
            else:
                error = self._no_server(verdict, waiter.requested, waiter.exclude)
                waiter.lease.set_exception(error)

    def _no_server(self, verdict: Verdict, requested: str, exclude: frozenset[str]) -> PoolError:
        if verdict is Verdict.NOT_FOUND:
            # Worded as Ollama words its 404, which requesters may know.
            return ModelNotInPool(f'model "{requested}" not found, try pulling it first')
        model = canonical_model(requested)
        down = tuple(
            backend.id
            for backend in self._backends
            if backend.may_have(model) and backend.id not in exclude
        )
        return NoServerAvailable(self._unavailable_message(model, exclude), down)

    def _unavailable_message(self, model: str | None, exclude: frozenset[str]) -> str:
        reasons = [
            f"{backend.id}: {'tried' if backend.id in exclude else backend.problem() or 'busy'}"
            for backend in self._backends
            if model is None or backend.may_have(model)
        ]
        subject = "no Ollama server" if model is None else f"no Ollama server with {model}"
        return f"{subject} is available ({'; '.join(reasons)})"

    # ------------------------------------------------------------------ outcomes

    def _answered(self, lease: Lease) -> None:
        backend = self._by_id[lease.server]
        self._record(backend, backend.breaker.succeeded)
        backend.model_failed_at.pop(lease.model, None)
        backend.answered_at[lease.model] = asyncio.get_running_loop().time()
        if lease.cold:
            backend.loads_caused += 1
            backend.loaded.add(lease.model)
            # Learn what the load made the server unload.
            self._ask_check(backend)

    def _failed(
        self, lease: Lease, backend: Backend, outcome: CallOutcome, error: BaseException
    ) -> None:
        now = asyncio.get_running_loop().time()
        if outcome is CallOutcome.FAILED:
            backend.last_error = backend.describe(error)
            self._record(backend, lambda: backend.breaker.failed(now))
            return
        self._record(backend, backend.breaker.succeeded)  # it answered: it is up
        if outcome is CallOutcome.MODEL_FAILED:
            backend.model_failed_at[lease.model] = now
        if outcome is CallOutcome.MODEL_MISSING:
            if backend.listing is not None:
                backend.listing.pop(lease.model, None)
            backend.loaded.discard(lease.model)
            self._ask_check(backend)

    def _record(self, backend: Backend, change: Callable[[], None]) -> None:
        """Apply a change to the server's circuit; log it, and let waiting requests in when
        it opened or closed."""
        before = backend.breaker.state
        change()
        after = backend.breaker.state
        if after is before:
            return
        if after is CircuitState.OPEN:
            self._wake[backend.id].set()  # its next check is at the end of the cooldown
            logger.warning(
                "Ollama server %s: circuit open: %s",
                backend.id,
                backend.last_error,
                extra={"server": backend.id, "circuit": after.value},
            )
        else:
            logger.info(
                "Ollama server %s: circuit %s",
                backend.id,
                after.value,
                extra={"server": backend.id, "circuit": after.value},
            )
        self._dispatch()

    # ------------------------------------------------------------------ checks

    def _ask_check(self, backend: Backend) -> None:
        self._check_asked.add(backend.id)
        self._wake[backend.id].set()

    async def _watch(self, backend: Backend) -> None:
        loop = asyncio.get_running_loop()
        wake = self._wake[backend.id]
        interval = self._options.refresh_interval
        while True:
            due = backend.breaker.next_check_at(backend.last_check_at, interval)
            if backend.id not in self._check_asked and loop.time() < due:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout_at(due):
                        await wake.wait()
                wake.clear()
                continue
            self._check_asked.discard(backend.id)
            await self._check(backend)

    async def _check(self, backend: Backend) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        error = await backend.check(started)
        now = loop.time()
        # What the check learnt is as fresh as its start.
        backend.last_check_at = started
        self._record(backend, lambda: backend.breaker.checked(error is None, now))
        checked, self._checked = self._checked, asyncio.Event()
        checked.set()
        self._dispatch()

    async def refresh(self, max_age: float) -> None:
        """Check now every server whose last check began more than `max_age` seconds ago,
        and wait for those checks (at most the check timeout)."""
        since = asyncio.get_running_loop().time() - max_age
        for backend in self._backends:
            if backend.last_check_at < since:
                self._ask_check(backend)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._options.check_timeout):
                while any(backend.last_check_at < since for backend in self._backends):
                    await self._checked.wait()


async def _unless_set(lease: "asyncio.Future[Lease]", abandon: asyncio.Event | None) -> Lease:
    """The lease, once handed; `Abandoned` once `abandon` is set first."""
    if abandon is None:
        return await lease
    given_up: asyncio.Future[Any] = asyncio.ensure_future(abandon.wait())
    waits: list[asyncio.Future[Any]] = [lease, given_up]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        given_up.cancel()
    if abandon.is_set():
        raise Abandoned("gave up waiting for a free Ollama server")
    return lease.result()
