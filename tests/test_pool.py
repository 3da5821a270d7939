"""The pool against several fake Ollama servers, through the real `ollama` client; no broker."""

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import ollama
import pytest

from chatbus.pool import (
    Abandoned,
    CallOutcome,
    CircuitState,
    ModelNotInPool,
    NoFreeSlot,
    NoServerAvailable,
    OllamaPool,
    PoolOptions,
    ServerSpec,
    ServerStatus,
    parse_hosts,
)
from chatbus.testing import Behaviour, FakeOllama
from tests.support import preload

MESSAGES = [{"role": "user", "content": "Why is the sky blue?"}]
OPTIONS = PoolOptions(failure_threshold=2, cooldown=0.3, refresh_interval=0.5, check_timeout=1.0)
UPSTREAM_ERRORS = (ollama.ResponseError, httpx.TransportError, ConnectionError)


def client_for(spec: ServerSpec) -> ollama.AsyncClient:
    return ollama.AsyncClient(host=spec.base_url, timeout=httpx.Timeout(5.0))


@contextlib.asynccontextmanager
async def running_pool(
    *fakes: FakeOllama, parallel: int = 2, options: PoolOptions = OPTIONS
) -> AsyncIterator[OllamaPool]:
    hosts = ",".join(fake.url for fake in fakes)
    pool = OllamaPool(parse_hosts(hosts, default_parallel=parallel), client_for, options)
    await pool.start()
    try:
        await until(lambda: all(status.models is not None for status in pool.statuses()))
        yield pool
    finally:
        await pool.close()


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait for `condition`, checking it every 10 ms (the pool signals no status change)."""
    async with asyncio.timeout(timeout):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


def sid(fake: FakeOllama) -> str:
    return f"127.0.0.1:{fake.port}"


def status(pool: OllamaPool, fake: FakeOllama) -> ServerStatus:
    return next(s for s in pool.statuses() if s.id == sid(fake))


async def ask(pool: OllamaPool, model: str = "m", timeout: float = 5.0) -> str:
    """One request as the worker makes it: a call, then the next server after a failure
    before the first token. Returns the id of the server that answered."""
    tried: set[str] = set()
    while True:
        async with pool.lease(model, exclude=tried, timeout=timeout) as lease:
            try:
                async for _ in await lease.client.chat(model, MESSAGES, stream=True):
                    lease.answered()
                return lease.server
            except UPSTREAM_ERRORS as error:
                lease.failed(error)
                tried.add(lease.server)


async def test_routes_to_the_server_that_has_the_model() -> None:
    async with (
        FakeOllama(models={"a": Behaviour()}) as has_a,
        FakeOllama(models={"b": Behaviour(), "c:7b": Behaviour()}) as has_b,
        running_pool(has_a, has_b) as pool,
    ):
        assert await ask(pool, "b") == sid(has_b)
        assert await ask(pool, "a:latest") == sid(has_a)
        assert await ask(pool, "c:7b") == sid(has_b)
        assert [r["model"] for r in has_a.requests] == ["a:latest"]
        assert [r["model"] for r in has_b.requests] == ["b", "c:7b"]


async def test_prefers_the_server_with_the_model_loaded(
    two_ollamas: tuple[FakeOllama, FakeOllama],
) -> None:
    cold, warm = two_ollamas
    await preload(warm, "m")
    async with running_pool(cold, warm) as pool:
        assert status(pool, warm).loaded == ("m:latest",)
        assert {await ask(pool) for _ in range(5)} == {sid(warm)}
    assert cold.requests == []
    assert warm.model_loads == 1


async def test_spreads_by_load_and_never_over_capacity(
    two_ollamas: tuple[FakeOllama, FakeOllama],
) -> None:
    for fake in two_ollamas:
        await preload(fake, "m")
    async with running_pool(*two_ollamas, parallel=2) as pool, contextlib.AsyncExitStack() as held:
        servers = [(await held.enter_async_context(pool.lease("m"))).server for _ in range(4)]
        assert Counter(servers) == {sid(two_ollamas[0]): 2, sid(two_ollamas[1]): 2}
        assert [s.in_flight for s in pool.statuses()] == [2, 2]
        assert pool.capacity == 4

        with pytest.raises(NoFreeSlot, match=r"stayed busy for 0\.1s"):
            async with pool.lease("m", timeout=0.1):
                pass

        waiting = asyncio.create_task(ask(pool))
        await until(lambda: pool.waiting == 1)
        await held.aclose()
        assert await waiting in {sid(two_ollamas[0]), sid(two_ollamas[1])}
    assert [s.in_flight for s in pool.statuses()] == [0, 0]


async def test_capacity_is_never_exceeded_under_load(
    two_ollamas: tuple[FakeOllama, FakeOllama],
) -> None:
    for fake in two_ollamas:
        fake.models["m"] = Behaviour(tokens=["x"] * 5, token_delay=0.01)
    async with running_pool(*two_ollamas, parallel=3) as pool:
        answered = await asyncio.gather(*(ask(pool, timeout=10) for _ in range(30)))
    assert Counter(answered).keys() == {sid(two_ollamas[0]), sid(two_ollamas[1])}
    assert [fake.max_active_streams for fake in two_ollamas] == [3, 3]
    assert sum(fake.completed_streams for fake in two_ollamas) == 30


async def test_a_request_that_gives_up_waiting_takes_no_slot(
    two_ollamas: tuple[FakeOllama, FakeOllama],
) -> None:
    async with running_pool(two_ollamas[0], parallel=1) as pool:
        async with pool.lease("m"):
            waiting = asyncio.create_task(ask(pool))
            await until(lambda: pool.waiting == 1)
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
        assert (pool.statuses()[0].in_flight, pool.waiting) == (0, 0)
        assert await ask(pool) == sid(two_ollamas[0])


async def test_a_request_that_abandons_its_wait_takes_no_slot(
    two_ollamas: tuple[FakeOllama, FakeOllama],
) -> None:
    abandon = asyncio.Event()
    async with running_pool(two_ollamas[0], parallel=1) as pool:
        async with pool.lease("m"):

            async def wait_for_a_slot() -> None:
                async with pool.lease("m", timeout=30, abandon=abandon):
                    pass

            waiting = asyncio.create_task(wait_for_a_slot())
            await until(lambda: pool.waiting == 1)
            abandon.set()
            with pytest.raises(Abandoned):
                await waiting
        assert (pool.statuses()[0].in_flight, pool.waiting) == (0, 0)


async def test_a_dead_server_opens_its_circuit_and_closes_it_when_back(
    two_ollamas: tuple[FakeOllama, FakeOllama],
) -> None:
    first, second = two_ollamas
    port = first.port
    async with running_pool(first, second) as pool:
        await first.stop()
        answered = [await ask(pool) for _ in range(5)]
        assert answered == [sid(second)] * 5
        await until(lambda: status(pool, first).circuit is CircuitState.OPEN)
        assert not status(pool, first).healthy
        assert "circuit open" in (status(pool, first).problem or "")
        assert status(pool, first).calls.get(CallOutcome.FAILED, 0) <= 1

        async with FakeOllama(port=port, models={"m": Behaviour()}) as back:
            await until(lambda: status(pool, first).circuit is CircuitState.HALF_OPEN)
            assert await ask(pool) == sid(back)  # the probe goes first
            assert status(pool, first).circuit is CircuitState.CLOSED
            assert status(pool, first).problem is None


async def test_an_open_circuit_is_checked_at_the_end_of_its_cooldown(
    two_ollamas: tuple[FakeOllama, FakeOllama],
) -> None:
    busy = two_ollamas[0]
    busy.models["m"] = Behaviour(status=503)
    # Checks are far apart: what brings the next one forward is the circuit opening.
    options = PoolOptions(failure_threshold=2, cooldown=0.2, refresh_interval=60)
    async with running_pool(busy, options=options) as pool:
        for _ in range(2):
            with pytest.raises(NoServerAvailable):
                await ask(pool)
        assert status(pool, busy).circuit is CircuitState.OPEN
        await until(lambda: status(pool, busy).circuit is CircuitState.HALF_OPEN, timeout=2)


async def test_a_server_failing_at_once_does_not_take_the_traffic(
    two_ollamas: tuple[FakeOllama, FakeOllama],
) -> None:
    busy, good = two_ollamas
    busy.models["m"] = Behaviour(status=503)
    # No probe within the test: what reaches the failing server is what the breaker let by.
    options = PoolOptions(failure_threshold=2, cooldown=60, refresh_interval=60)
    async with running_pool(busy, good, parallel=4, options=options) as pool:
        answered = await asyncio.gather(*(ask(pool, timeout=10) for _ in range(40)))
        assert status(pool, busy).circuit is CircuitState.OPEN
    assert answered == [sid(good)] * 40
    # Sent to it before its second failure came back: at most its 4 slots at once.
    assert len(busy.requests) <= options.failure_threshold - 1 + 4


async def test_a_404_on_one_server_is_answered_by_another(
    two_ollamas: tuple[FakeOllama, FakeOllama],
) -> None:
    lying, good = two_ollamas
    lying.models["m"] = Behaviour(status=404)  # listed by /api/tags, yet not found
    async with running_pool(lying, good) as pool:
        assert await ask(pool) == sid(good)
        assert len(lying.requests) == 1
        assert status(pool, lying).calls == {CallOutcome.MODEL_MISSING: 1}
        assert status(pool, lying).circuit is CircuitState.CLOSED


async def test_no_server_has_the_model(two_ollamas: tuple[FakeOllama, FakeOllama]) -> None:
    # No background refresh: what a request finds, it finds by asking the servers.
    options = PoolOptions(refresh_interval=60)
    async with running_pool(*two_ollamas, options=options) as pool:
        with pytest.raises(ModelNotInPool, match='model "nope" not found, try pulling it first'):
            await ask(pool, "nope")
        two_ollamas[1].models["nope"] = Behaviour()  # pulled meanwhile: found at the next request
        assert await ask(pool, "nope") == sid(two_ollamas[1])
    first, second = two_ollamas
    assert (first.requests, [r["model"] for r in second.requests]) == ([], ["nope"])


async def test_all_servers_down(two_ollamas: tuple[FakeOllama, FakeOllama]) -> None:
    async with running_pool(*two_ollamas) as pool:
        for fake in two_ollamas:
            await fake.stop()
        with pytest.raises(NoServerAvailable) as info:
            await ask(pool)
        assert str(info.value) == (
            f"no Ollama server with m:latest is available "
            f"({sid(two_ollamas[0])}: tried; {sid(two_ollamas[1])}: tried)"
        )
        await until(lambda: not any(s.healthy for s in pool.statuses()))
        with pytest.raises(NoServerAvailable, match="circuit open"):
            await ask(pool)


async def test_a_cold_call_counts_the_load_it_causes() -> None:
    async with (
        FakeOllama(models={"m": Behaviour()}, load_time=0.05) as fake,
        running_pool(fake) as pool,
    ):
        async with pool.lease("m") as lease:
            assert lease.cold
            async for _ in await lease.client.chat("m", MESSAGES, stream=True):
                lease.answered()
        async with pool.lease("m") as lease:
            assert not lease.cold
        assert status(pool, fake).loads_caused == 1
        assert status(pool, fake).calls == {CallOutcome.ANSWERED: 1, CallOutcome.ABANDONED: 1}
    assert fake.model_loads == 1


LOADS: dict[str, Any] = {"load_time": 0.05, "max_loaded_models": 1}


async def test_alternating_models_do_not_swap() -> None:
    async with (
        FakeOllama(models={"m1": Behaviour(), "m2": Behaviour()}, **LOADS) as first,
        FakeOllama(models={"m1": Behaviour(), "m2": Behaviour()}, **LOADS) as second,
        running_pool(first, second, parallel=2) as pool,
    ):
        queue = asyncio.Queue[str]()
        for index in range(40):
            queue.put_nowait(f"m{index % 2 + 1}")

        async def requester() -> None:
            while not queue.empty():
                await ask(pool, queue.get_nowait(), timeout=10)

        await asyncio.gather(*(requester() for _ in range(4)))
    assert first.model_loads + second.model_loads == 2
    assert {first.loaded_models()[0], second.loaded_models()[0]} == {"m1:latest", "m2:latest"}


async def test_models_are_the_union(two_ollamas: tuple[FakeOllama, FakeOllama]) -> None:
    first, second = two_ollamas
    first.models.update({"a": Behaviour()})
    second.models.update({"b:7b": Behaviour()})
    await preload(second, "m")
    async with running_pool(*two_ollamas) as pool:
        models = await pool.models()
    assert [(m.name, m.servers, m.loaded_on) for m in models] == [
        ("a:latest", (sid(first),), ()),
        ("b:7b", (sid(second),), ()),
        ("m:latest", (sid(first), sid(second)), (sid(second),)),
    ]
    assert models[0].details.size == 2019393189


async def test_lease_outcomes_from_the_exception_leaving_the_block(
    two_ollamas: tuple[FakeOllama, FakeOllama],
) -> None:
    async with running_pool(two_ollamas[0]) as pool:
        with pytest.raises(httpx.ConnectError):
            async with pool.lease("m"):
                raise httpx.ConnectError("refused")
        with pytest.raises(KeyError):
            async with pool.lease("m"):
                raise KeyError("a bug of ours says nothing about the server")
        assert pool.statuses()[0].calls == {CallOutcome.FAILED: 1, CallOutcome.ABANDONED: 1}


async def test_checks_follow_the_server(two_ollamas: tuple[FakeOllama, FakeOllama]) -> None:
    fake = two_ollamas[0]
    async with running_pool(fake) as pool:
        fake.models["new"] = Behaviour()
        await until(lambda: "new:latest" in (pool.statuses()[0].models or ()))
        await preload(fake, "new")
        await until(lambda: "new:latest" in pool.statuses()[0].loaded)


async def test_a_failing_model_does_not_close_the_server_to_its_other_models(
    two_ollamas: tuple[FakeOllama, FakeOllama],
) -> None:
    broken, good = two_ollamas
    broken.models.update({"m": Behaviour(status=500), "other": Behaviour()})
    async with running_pool(broken, good) as pool:
        assert [await ask(pool) for _ in range(5)] == [sid(good)] * 5
        assert await ask(pool, "other") == sid(broken)
        assert status(pool, broken).circuit is CircuitState.CLOSED
        assert status(pool, broken).calls == {
            CallOutcome.MODEL_FAILED: 1,
            CallOutcome.ANSWERED: 1,
        }
