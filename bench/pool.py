"""The figures of a worker in front of several Ollama servers: the first token while one of
two servers is killed, model-aware routing against plain round-robin when each server holds
one model at a time, and the throughput of two servers against one."""

import asyncio
import contextlib
import itertools
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

from aio_pika.abc import AbstractRobustConnection

from bench.processes import FakeOllamaProcess, worker_process
from bench.requester import Requester, Stream, all_ended
from bench.scenarios import MESSAGES, MODEL, service_streams, summary
from chatbus.settings import Settings, Timeouts
from chatbus.upstream import create_ollama_client

SettingsFor = Callable[..., Settings]
"""The worker's settings with the run's queue names, and these values."""

ROUTED_MODELS = ("m1", "m2")


def _hosts(fakes: Sequence[FakeOllamaProcess]) -> str:
    return ",".join(fake.url for fake in fakes)


async def _ask(requester: Requester, model: str, timeout: float = 60) -> Stream:
    [stream] = await requester.prepare(1)
    await requester.send(stream, {"model": model, "messages": MESSAGES})
    await all_ended([stream], timeout)
    return stream


async def _ask_until(requester: Requester, stop: asyncio.Event, streams: list[Stream]) -> None:
    """One requester: a request, its answer, the next one, until `stop` is set."""
    while not stop.is_set():
        streams.append(await _ask(requester, MODEL))


def _first_token_seconds(streams: Sequence[Stream]) -> list[float]:
    return [
        stream.first_chunk_at - stream.sent_at
        for stream in streams
        if any(reply["type"] == "chunk" for _, reply in stream.replies)
    ]


async def failover(
    settings_for: SettingsFor, connection: AbstractRobustConnection, *, requesters: int = 8
) -> dict[str, Any]:
    """`requesters` requesters ask one after the other, 5 tokens 20 ms apart each, for
    `seconds` with both servers up, as long again (what the first token does between two
    runs with nothing changed: this machine's noise), then as long again after the server
    that takes the traffic (the first: it has the model loaded) is killed. Each server can
    take every request, so what the kill adds is the failover, not a lack of capacity."""
    seconds = 4.0
    async with (
        FakeOllamaProcess(5, 0.02) as first,
        FakeOllamaProcess(5, 0.02) as second,
    ):
        settings = settings_for(
            ollama_hosts=_hosts([first, second]), ollama_num_parallel=requesters
        )
        async with worker_process(settings), Requester(connection, settings) as requester:
            for _ in range(20):  # warm-up: the worker's connections, the model loaded
                await _ask(requester, MODEL)
            stop = asyncio.Event()
            streams: list[Stream] = []
            asking = [
                asyncio.create_task(_ask_until(requester, stop, streams)) for _ in range(requesters)
            ]
            await asyncio.sleep(seconds)  # the run's length
            again_at = time.perf_counter()
            await asyncio.sleep(seconds)
            killed_at = time.perf_counter()
            await first.kill()
            await asyncio.sleep(seconds)
            stop.set()
            await asyncio.gather(*asking)
    up = [s for s in streams if s.sent_at < again_at]
    up_again = [s for s in streams if again_at <= s.sent_at < killed_at]
    down = [s for s in streams if s.sent_at >= killed_at]
    both_up, both_up_again, one_down = (
        summary(_first_token_seconds(phase)) for phase in (up, up_again, down)
    )
    killed = first.url.removeprefix("http://")
    return {
        "requesters": requesters,
        "first_token_ms_both_up": both_up,
        "first_token_ms_both_up_again": both_up_again,
        "first_token_ms_one_down": one_down,
        "added_first_token_p99_ms": one_down["p99"] - both_up_again["p99"],
        "unchanged_first_token_p99_ms": both_up_again["p99"] - both_up["p99"],
        "answered_by_the_killed_server_before": sum(
            s.terminal.get("server") == killed for s in up + up_again
        ),
        "requests_before": len(up) + len(up_again),
        "cut_off_by_the_kill": sum(s.terminal["type"] == "error" for s in up + up_again),
        "requests_after": len(down),
        "failed_after_the_kill": sum(s.terminal["type"] == "error" for s in down),
    }


def _orders(requests: int) -> dict[str, list[str]]:
    """Requests that take turns between the two models, and the same 50/50 mix shuffled (a
    fixed seed). Strict turns happen to line up with a rotation over two servers: each
    model lands on one server, so round-robin swaps nothing there; a mix is what traffic is."""
    alternating = [ROUTED_MODELS[i % 2] for i in range(requests)]
    mixed = list(alternating)
    random.Random(11).shuffle(mixed)
    return {"alternating": alternating, "mixed": mixed}


def _one_model_each(load_time: float) -> list[FakeOllamaProcess]:
    """Two servers that have both models and hold one loaded at a time."""
    return [
        FakeOllamaProcess(10, models=ROUTED_MODELS, load_time=load_time, max_loaded_models=1)
        for _ in range(2)
    ]


async def _started(
    stack: contextlib.AsyncExitStack, fakes: list[FakeOllamaProcess]
) -> list[FakeOllamaProcess]:
    return [await stack.enter_async_context(fake) for fake in fakes]


async def _round_robin(order: Sequence[str], requesters: int, load_time: float) -> dict[str, Any]:
    """The `ollama` client straight to the servers, each request to the next one in turn."""
    fakes = _one_model_each(load_time)
    async with contextlib.AsyncExitStack() as stack:
        await _started(stack, fakes)
        clients = [create_ollama_client(f.url, Timeouts(), requesters + 1) for f in fakes]
        rotation = itertools.cycle(clients)
        todo = iter(order)

        async def ask_in_turn() -> None:
            for model in todo:
                await next(rotation).chat(model=model, messages=MESSAGES)

        started = time.perf_counter()
        await asyncio.gather(*(ask_in_turn() for _ in range(requesters)))
        seconds = time.perf_counter() - started
        for client in clients:
            await client.close()  # type: ignore[no-untyped-call]
    return {"seconds": seconds, "model_loads": sum(f.stats["model_loads"] for f in fakes)}


async def _through_the_pool(
    order: Sequence[str],
    requesters: int,
    load_time: float,
    settings_for: SettingsFor,
    connection: AbstractRobustConnection,
) -> dict[str, Any]:
    """The service: one worker with both servers in its pool, as many slots as requesters."""
    fakes = _one_model_each(load_time)
    async with contextlib.AsyncExitStack() as stack:
        await _started(stack, fakes)
        settings = settings_for(
            ollama_hosts=_hosts(fakes), ollama_num_parallel=requesters // len(fakes)
        )
        async with worker_process(settings), Requester(connection, settings) as requester:
            todo = iter(order)

            async def ask_in_turn() -> None:
                for model in todo:
                    await _ask(requester, model)

            started = time.perf_counter()
            await asyncio.gather(*(ask_in_turn() for _ in range(requesters)))
            seconds = time.perf_counter() - started
    return {"seconds": seconds, "model_loads": sum(f.stats["model_loads"] for f in fakes)}


async def routing(
    settings_for: SettingsFor,
    connection: AbstractRobustConnection,
    *,
    requests: int = 200,
    requesters: int = 8,
    load_time: float = 0.5,
) -> dict[str, Any]:
    """Two servers that each hold one of two models at a time (a load takes `load_time`):
    `requests` requests for the two models, `requesters` at a time, through the service's
    pool and through plain round-robin over the same servers."""
    results: dict[str, Any] = {"requests": requests, "load_time_s": load_time}
    for name, order in _orders(requests).items():
        results[name] = {
            "round_robin": await _round_robin(order, requesters, load_time),
            "pool": await _through_the_pool(order, requesters, load_time, settings_for, connection),
        }
    return results


async def scale(
    settings_for: SettingsFor,
    connection: AbstractRobustConnection,
    *,
    streams: int = 64,
    tokens: int = 100,
    token_delay: float = 0.02,
    parallel: int = 8,
) -> dict[str, Any]:
    """`streams` requests at once, each `tokens` tokens `token_delay` apart (50 tokens/s, a
    GPU's pace), against one server, then two; each server runs `parallel` generations at
    once, so one server does `parallel` times 50 tokens/s at best."""
    rates = []
    for count in (1, 2):
        async with contextlib.AsyncExitStack() as stack:
            fakes = await _started(
                stack, [FakeOllamaProcess(tokens, token_delay) for _ in range(count)]
            )
            settings = settings_for(ollama_hosts=_hosts(fakes), ollama_num_parallel=parallel)
            async with worker_process(settings), Requester(connection, settings) as requester:
                await service_streams(requester, parallel * count, timeout=60)  # warm-up
                run = await service_streams(requester, streams, timeout=120)
            rates.append(run.tokens / run.seconds)
    return {
        "streams": streams,
        "parallel_per_server": parallel,
        "one_server_tokens_per_second": rates[0],
        "two_servers_tokens_per_second": rates[1],
        "ratio": rates[1] / rates[0],
    }
