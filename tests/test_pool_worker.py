"""The worker in front of several Ollama servers: routing, failover, circuits and capacity,
through the real broker and several fake Ollama servers."""

import asyncio
import contextlib
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from aio_pika.abc import AbstractRobustConnection

from chatbus.client import ChatClient
from chatbus.settings import Settings
from chatbus.testing import Behaviour, FakeOllama, running_worker
from tests.support import Replies, Requester, http, preload, samples, until, user, value

pytestmark = pytest.mark.rabbitmq

MakeSettings = Callable[..., Settings]


@dataclass
class Pooled:
    requester: Requester
    http: httpx.AsyncClient
    settings: Settings

    async def ask(self, model: str = "m", **fields: Any) -> dict[str, Any]:
        """The terminal reply of one request."""
        return (await self.requester.chat(user(model=model, **fields)))[-1]

    async def servers(self) -> dict[str, str]:
        """What /readyz says of each Ollama server."""
        body: dict[str, Any] = (await self.http.get("/readyz")).json()
        servers: dict[str, str] = body["ollama_servers"]
        return servers


@contextlib.asynccontextmanager
async def pooled_worker(
    make_settings: MakeSettings,
    amqp: AbstractRobustConnection,
    *fakes: FakeOllama,
    **overrides: Any,
) -> AsyncIterator[Pooled]:
    values: dict[str, Any] = {
        "ollama_hosts": ",".join(fake.url for fake in fakes),
        "ollama_num_parallel": 2,
        "ollama_refresh_interval": 0.5,
        "ready_ollama_cache_seconds": 60,  # /readyz reports what the pool knows
        "retry_budget": 3.0,
    }
    settings = make_settings(**(values | overrides))
    async with (
        running_worker(settings) as app,
        http(app) as client,
        Requester(amqp, settings) as requester,
    ):
        pooled = Pooled(requester, client, settings)

        async def all_checked() -> bool:
            return set((await pooled.servers()).values()) == {"ok"}

        await until(all_checked, what="the first check of every server")
        yield pooled


def sid(fake: FakeOllama) -> str:
    return f"127.0.0.1:{fake.port}"


async def test_a_request_goes_to_the_server_that_has_its_model(
    make_settings: MakeSettings, amqp: AbstractRobustConnection
) -> None:
    async with (
        FakeOllama(models={"a": Behaviour()}) as has_a,
        FakeOllama(models={"b": Behaviour()}) as has_b,
        pooled_worker(make_settings, amqp, has_a, has_b) as pooled,
    ):
        answered_a, answered_b = await pooled.ask("a"), await pooled.ask("b")
    assert (answered_a["type"], answered_a["server"]) == ("done", sid(has_a))
    assert (answered_b["type"], answered_b["server"]) == ("done", sid(has_b))
    assert [r["model"] for r in has_a.requests] == ["a"]
    assert [r["model"] for r in has_b.requests] == ["b"]


async def test_the_server_with_the_model_loaded_is_preferred(
    make_settings: MakeSettings,
    amqp: AbstractRobustConnection,
    two_ollamas: tuple[FakeOllama, FakeOllama],
) -> None:
    cold, warm = two_ollamas
    await preload(warm)
    async with pooled_worker(make_settings, amqp, cold, warm) as pooled:
        answers = [await pooled.ask() for _ in range(4)]
    assert {answer["server"] for answer in answers} == {sid(warm)}
    assert cold.requests == []
    assert (cold.model_loads, warm.model_loads) == (0, 1)


async def test_load_is_spread_and_no_server_gets_more_than_its_parallel(
    make_settings: MakeSettings,
    amqp: AbstractRobustConnection,
    two_ollamas: tuple[FakeOllama, FakeOllama],
) -> None:
    for fake in two_ollamas:
        fake.models["m"] = Behaviour(tokens=["x"] * 4, token_delay=0.05)
        await preload(fake)
    # A prefetch over the capacity (2 servers, 2 each): the rest wait in the worker for a slot.
    async with pooled_worker(make_settings, amqp, *two_ollamas, prefetch=12) as pooled:
        answers = await asyncio.gather(*(pooled.ask() for _ in range(12)))
    assert [answer["type"] for answer in answers] == ["done"] * 12
    assert {answer["server"] for answer in answers} == {sid(two_ollamas[0]), sid(two_ollamas[1])}
    assert [fake.max_active_streams for fake in two_ollamas] == [2, 2]


async def test_a_server_killed_mid_run(
    make_settings: MakeSettings,
    amqp: AbstractRobustConnection,
    two_ollamas: tuple[FakeOllama, FakeOllama],
) -> None:
    doomed, survivor = two_ollamas
    port = doomed.port
    for fake in two_ollamas:
        fake.models["m"] = Behaviour(tokens=["x"] * 40, token_delay=0.05)
        await preload(fake)
    async with pooled_worker(make_settings, amqp, *two_ollamas, ollama_cooldown=0.5) as pooled:
        running = [await pooled.requester.send(user(model="m")) for _ in range(4)]
        await doomed.wait_for(lambda: doomed.active_streams == 2)
        await survivor.wait_for(lambda: survivor.active_streams == 2)
        firsts = [await replies.next() for replies in running]
        assert [first["type"] for first in firsts] == ["chunk"] * 4

        await doomed.stop()
        ends = [(await replies.until_terminal(timeout=15))[-1] for replies in running]
        # Cut off after the answer started: upstream_error, as the contract says, not retried.
        assert Counter((end["type"], end.get("code")) for end in ends) == {
            ("error", "upstream_error"): 2,
            ("done", None): 2,
        }
        assert all(end["retryable"] for end in ends if end["type"] == "error")

        survivor.models["m"] = Behaviour()
        after = [await pooled.ask() for _ in range(3)]
        assert [(a["type"], a["server"]) for a in after] == [("done", sid(survivor))] * 3

        async def circuit_open() -> bool:
            return (await pooled.servers())[sid(doomed)].startswith("circuit open")

        await until(circuit_open, what="the killed server's circuit opens")

        async with FakeOllama(port=port, models={"m": Behaviour()}) as back:

            async def recovering() -> bool:
                return (await pooled.servers())[sid(back)].startswith("recovering")

            await until(recovering, what="the server back is checked after the cooldown")
            probe = await pooled.ask()
            assert probe["server"] == sid(back)  # the probe goes first
            assert (await pooled.servers())[sid(back)] == "ok"


async def test_a_server_answering_503_at_once_does_not_take_the_traffic(
    make_settings: MakeSettings,
    amqp: AbstractRobustConnection,
    two_ollamas: tuple[FakeOllama, FakeOllama],
) -> None:
    busy, good = two_ollamas
    busy.models["m"] = Behaviour(status=503)
    good.models["m"] = Behaviour(tokens=["x"] * 3, token_delay=0.02)
    # No cooldown ends within the test: what reaches the busy server is what the breaker let.
    async with pooled_worker(
        make_settings, amqp, busy, good, prefetch=6, ollama_cooldown=60
    ) as pooled:
        answers = await asyncio.gather(*(pooled.ask() for _ in range(30)))
        servers = await pooled.servers()
    assert {(answer["type"], answer["server"]) for answer in answers} == {("done", sid(good))}
    assert servers[sid(busy)].startswith("circuit open after")
    assert "HTTP 503" in servers[sid(busy)]
    # Its 2 slots at once, sent before its failures came back; then nothing.
    threshold = Settings.model_fields["ollama_failure_threshold"].default
    assert len(busy.requests) <= threshold - 1 + 2


async def test_a_404_on_one_server_is_answered_by_another(
    make_settings: MakeSettings,
    amqp: AbstractRobustConnection,
    two_ollamas: tuple[FakeOllama, FakeOllama],
) -> None:
    lying, good = two_ollamas
    lying.models["m"] = Behaviour(status=404)  # listed, yet not found
    async with pooled_worker(make_settings, amqp, lying, good) as pooled:
        # Both idle, neither loaded: the first in the list is asked first.
        answer = await pooled.ask()
    assert (answer["type"], answer["server"]) == ("done", sid(good))
    assert len(lying.requests) == 1


async def test_a_model_no_server_has_is_model_not_found(
    make_settings: MakeSettings,
    amqp: AbstractRobustConnection,
    two_ollamas: tuple[FakeOllama, FakeOllama],
) -> None:
    async with pooled_worker(make_settings, amqp, *two_ollamas) as pooled:
        error = await pooled.ask("nowhere")
    assert (error["type"], error["code"], error["retryable"]) == ("error", "model_not_found", False)
    assert error["message"] == 'model "nowhere" not found, try pulling it first'
    assert [fake.requests for fake in two_ollamas] == [[], []]  # their /api/tags said so


async def test_a_model_every_server_lists_but_none_has_is_model_not_found(
    make_settings: MakeSettings,
    amqp: AbstractRobustConnection,
    two_ollamas: tuple[FakeOllama, FakeOllama],
) -> None:
    for fake in two_ollamas:
        fake.models["m"] = Behaviour(status=404)
    async with pooled_worker(make_settings, amqp, *two_ollamas) as pooled:
        error = await pooled.ask()
    assert (error["code"], error["retryable"]) == ("model_not_found", False)
    assert [len(fake.requests) for fake in two_ollamas] == [1, 1]


async def test_all_servers_down_is_upstream_unavailable_after_the_budget(
    make_settings: MakeSettings,
    amqp: AbstractRobustConnection,
    two_ollamas: tuple[FakeOllama, FakeOllama],
) -> None:
    async with pooled_worker(make_settings, amqp, *two_ollamas, retry_budget=1.0) as pooled:
        for fake in two_ollamas:
            await fake.stop()
        started = asyncio.get_running_loop().time()
        error = await pooled.ask()
        waited = asyncio.get_running_loop().time() - started
        ready = (await pooled.http.get("/readyz")).status_code
    assert (error["code"], error["retryable"]) == ("upstream_unavailable", True)
    assert "unreachable" in error["message"]
    # It backed off and tried again: the last wait would have ended past the 1 s budget.
    assert waited >= 0.5
    assert ready == 503


async def test_models_are_the_union_with_where_each_is_loaded(
    make_settings: MakeSettings,
    amqp: AbstractRobustConnection,
    two_ollamas: tuple[FakeOllama, FakeOllama],
) -> None:
    first, second = two_ollamas
    first.models["only-here:7b"] = Behaviour()
    await preload(second)
    async with (
        pooled_worker(make_settings, amqp, *two_ollamas) as pooled,
        ChatClient(pooled.settings.rabbitmq_url, names=pooled.settings.names) as client,
    ):
        models = {model.name: model for model in await client.models()}
    assert models.keys() == {"m:latest", "only-here:7b"}
    assert models["m:latest"].servers == [sid(first), sid(second)]
    assert models["m:latest"].loaded_on == [sid(second)]
    assert (models["only-here:7b"].servers, models["only-here:7b"].loaded_on) == ([sid(first)], [])


async def test_metrics_and_log_line_name_the_server(
    make_settings: MakeSettings,
    amqp: AbstractRobustConnection,
    two_ollamas: tuple[FakeOllama, FakeOllama],
    caplog: pytest.LogCaptureFixture,
) -> None:
    busy, first = two_ollamas
    busy.models["m"] = Behaviour(status=503)
    correlation_id = uuid.uuid4().hex
    with caplog.at_level("INFO", logger="chatbus.worker"):
        async with pooled_worker(make_settings, amqp, busy, first) as pooled:
            replies: Replies = await pooled.requester.send(
                user(model="m"), correlation_id=correlation_id
            )
            done = (await replies.until_terminal())[-1]
            metrics = samples((await pooled.http.get("/metrics")).text)
    assert done["server"] == sid(first)
    (line,) = [r for r in caplog.records if getattr(r, "correlation_id", None) == correlation_id]
    assert vars(line)["server"] == sid(first)
    for fake in two_ollamas:
        assert value(metrics, "chatbus_ollama_server_capacity", server=sid(fake)) == 2
        assert value(metrics, "chatbus_ollama_server_in_flight", server=sid(fake)) == 0
    answered = value(
        metrics, "chatbus_ollama_server_calls_total", server=sid(first), outcome="answered"
    )
    assert answered == 1
    assert value(metrics, "chatbus_ollama_server_model_loads_total", server=sid(first)) == 1
    failed = value(metrics, "chatbus_ollama_server_calls_total", server=sid(busy), outcome="failed")
    assert failed == len(busy.requests) == 1
    circuit = value(metrics, "chatbus_ollama_server_circuit", server=sid(busy), state="closed")
    assert circuit == 1
