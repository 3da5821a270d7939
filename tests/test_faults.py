"""The fault suite: every accepted request ends in exactly one terminal reply per attempt, or
in the dead-letter queue; nothing is lost, nothing loops, the worker keeps serving.

Each test runs a worker of its own (in this process, or as a real process where the test
kills it) on queues of its own, and checks what the requester received and where the
request ended: acknowledged (the request queue is empty once the worker has stopped, so
nothing was left unacknowledged), redelivered (`attempt` 2), or dead-lettered.
"""

import asyncio
import json
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractRobustConnection

from chatbus.settings import Settings
from chatbus.testing import FakeOllama, WorkerProcess, running_worker
from chatbus.testing.cluster import RabbitCluster
from chatbus.testing.cluster import available as nodes_unavailable
from tests.support import (
    Replies,
    Requester,
    assert_well_formed,
    close_connection_named,
    consumer_count,
    dead_letters,
    free_port,
    model,
    needs_rabbitmqctl,
    queue_depths,
    requests_for,
    streamed_text,
    user,
)

MakeSettings = Callable[..., Settings]


@asynccontextmanager
async def worker_and_requester(
    make_settings: MakeSettings, amqp: AbstractRobustConnection, **overrides: Any
) -> AsyncIterator[Requester]:
    settings = make_settings(**overrides)
    async with running_worker(settings), Requester(amqp, settings) as requester:
        yield requester


async def ended_acked(amqp: AbstractRobustConnection, settings: Settings) -> None:
    """Call after the worker stopped: nothing left in the request queue nor dead-lettered."""
    assert await queue_depths(amqp, settings) == (0, 0)


async def publish_cancel(amqp: AbstractRobustConnection, settings: Settings, cid: str) -> None:
    channel = await amqp.channel()
    exchange = await channel.get_exchange(settings.cancel_exchange)
    await exchange.publish(
        aio_pika.Message(json.dumps({"correlation_id": cid}).encode()), routing_key=""
    )
    await channel.close()


# --- Ollama faults -------------------------------------------------------------------


async def test_happy_path_is_acked(
    make_settings: MakeSettings, amqp: AbstractRobustConnection
) -> None:
    async with worker_and_requester(make_settings, amqp) as requester:
        replies = await requester.chat(user())
    assert_well_formed(replies)
    assert replies[-1]["type"] == "done"
    await ended_acked(amqp, requester.settings)


async def test_ollama_refusing_connections_is_upstream_unavailable(
    make_settings: MakeSettings, amqp: AbstractRobustConnection
) -> None:
    nowhere = f"http://127.0.0.1:{free_port()}"
    async with worker_and_requester(make_settings, amqp, ollama_host=nowhere) as requester:
        replies = await requester.chat(user())
    assert replies[-1]["code"] == "upstream_unavailable"
    assert replies[-1]["retryable"] is True
    assert "unreachable" in replies[-1]["message"]
    await ended_acked(amqp, requester.settings)


async def test_model_not_found_is_not_retried(
    make_settings: MakeSettings, amqp: AbstractRobustConnection, fake_ollama: FakeOllama
) -> None:
    async with worker_and_requester(make_settings, amqp) as requester:
        replies = await requester.chat(user(model="missing-model"))
    assert [r["type"] for r in replies] == ["error"]
    assert replies[0]["code"] == "model_not_found"
    assert replies[0]["retryable"] is False
    # The worker knows the fake's models (/api/tags): it need not ask, and never asks twice.
    assert requests_for(fake_ollama, "missing-model") <= 1
    await ended_acked(amqp, requester.settings)


async def test_ollama_500_is_retried_then_upstream_unavailable(
    make_settings: MakeSettings, amqp: AbstractRobustConnection, fake_ollama: FakeOllama
) -> None:
    failing = model(fake_ollama, status=500)
    async with worker_and_requester(make_settings, amqp, retry_budget=0.5) as requester:
        replies = await requester.chat(user(model=failing))
    assert replies[-1]["code"] == "upstream_unavailable"
    assert "500" in replies[-1]["message"]
    assert requests_for(fake_ollama, failing) > 1
    await ended_acked(amqp, requester.settings)


async def test_ollama_busy_503_then_recovered_completes(
    make_settings: MakeSettings, amqp: AbstractRobustConnection, fake_ollama: FakeOllama
) -> None:
    busy_twice = model(fake_ollama, status=503, fail_times=2)
    async with worker_and_requester(make_settings, amqp, retry_budget=5) as requester:
        replies = await requester.chat(user(model=busy_twice))
    assert_well_formed(replies)
    assert replies[-1]["type"] == "done"
    assert requests_for(fake_ollama, busy_twice) == 3
    await ended_acked(amqp, requester.settings)


async def test_stall_mid_stream_is_an_idle_timeout_and_closes_the_stream(
    make_settings: MakeSettings, amqp: AbstractRobustConnection, fake_ollama: FakeOllama
) -> None:
    stalling = model(fake_ollama, stall_after=2)
    aborted = fake_ollama.aborted_streams
    async with worker_and_requester(make_settings, amqp, idle_timeout=0.3) as requester:
        replies = await requester.chat(user(model=stalling))
        await fake_ollama.wait_for(lambda: fake_ollama.aborted_streams > aborted)
    assert_well_formed(replies)
    assert streamed_text(replies) == "The sky"
    assert replies[-1]["code"] == "timeout"
    assert "idle" in replies[-1]["message"]
    await ended_acked(amqp, requester.settings)


async def test_slow_first_token_is_a_first_token_timeout(
    make_settings: MakeSettings, amqp: AbstractRobustConnection, fake_ollama: FakeOllama
) -> None:
    cold = model(fake_ollama, first_token_delay=30)
    aborted = fake_ollama.aborted_streams
    async with worker_and_requester(make_settings, amqp, first_token_timeout=0.3) as requester:
        replies = await requester.chat(user(model=cold))
        await fake_ollama.wait_for(lambda: fake_ollama.aborted_streams > aborted)
    assert [r["type"] for r in replies] == ["error"]
    assert replies[0]["code"] == "timeout"
    assert "first token" in replies[0]["message"]
    await ended_acked(amqp, requester.settings)


async def test_total_timeout_ends_a_slow_generation(
    make_settings: MakeSettings, amqp: AbstractRobustConnection, fake_ollama: FakeOllama
) -> None:
    slow = model(fake_ollama, token_delay=0.1, tokens=["tok "] * 50)
    async with worker_and_requester(make_settings, amqp, total_timeout=0.5) as requester:
        replies = await requester.chat(user(model=slow))
    assert_well_formed(replies)
    assert replies[-1]["code"] == "timeout"
    assert "total" in replies[-1]["message"]
    await ended_acked(amqp, requester.settings)


async def test_error_line_mid_stream_is_upstream_error_and_acked(
    make_settings: MakeSettings, amqp: AbstractRobustConnection, fake_ollama: FakeOllama
) -> None:
    breaking = model(fake_ollama, error_after=3)
    async with worker_and_requester(make_settings, amqp) as requester:
        replies = await requester.chat(user(model=breaking))
    assert_well_formed(replies)
    assert streamed_text(replies) == "The sky appears"
    assert replies[-1]["code"] == "upstream_error"
    assert requests_for(fake_ollama, breaking) == 1
    await ended_acked(amqp, requester.settings)


async def test_disconnect_mid_stream_is_upstream_error_and_acked(
    make_settings: MakeSettings, amqp: AbstractRobustConnection, fake_ollama: FakeOllama
) -> None:
    dropping = model(fake_ollama, disconnect_after=3)
    async with worker_and_requester(make_settings, amqp) as requester:
        replies = await requester.chat(user(model=dropping))
    assert_well_formed(replies)
    assert replies[-1]["code"] == "upstream_error"
    assert "mid-stream" in replies[-1]["message"]
    assert requests_for(fake_ollama, dropping) == 1
    await ended_acked(amqp, requester.settings)


# --- Bad input -------------------------------------------------------------------------


async def invalid_and_dead_lettered(
    make_settings: MakeSettings,
    amqp: AbstractRobustConnection,
    body: bytes,
    **overrides: Any,
) -> dict[str, Any]:
    async with worker_and_requester(make_settings, amqp, **overrides) as requester:
        replies = await requester.chat(body)
    assert [r["type"] for r in replies] == ["error"]
    assert replies[0]["code"] == "invalid_request"
    assert replies[0]["retryable"] is False
    assert await dead_letters(amqp, requester.settings) == [body]
    assert await queue_depths(amqp, requester.settings) == (0, 0)
    return replies[0]


async def test_malformed_json_is_answered_and_dead_lettered(
    make_settings: MakeSettings, amqp: AbstractRobustConnection
) -> None:
    error = await invalid_and_dead_lettered(make_settings, amqp, b"{not json")
    assert "not valid JSON" in error["message"]


async def test_schema_violation_is_answered_and_dead_lettered(
    make_settings: MakeSettings, amqp: AbstractRobustConnection
) -> None:
    body = json.dumps({"messages": [{"role": "user", "content": 42}]}).encode()
    error = await invalid_and_dead_lettered(make_settings, amqp, body)
    assert "messages.0.content" in error["message"]


async def test_oversize_request_names_the_limit(
    make_settings: MakeSettings, amqp: AbstractRobustConnection
) -> None:
    body = json.dumps(user("x" * 2000)).encode()
    error = await invalid_and_dead_lettered(make_settings, amqp, body, max_request_bytes=1000)
    assert "max_request_bytes=1000" in error["message"]


async def test_too_many_tokens_requested_names_the_limit(
    make_settings: MakeSettings, amqp: AbstractRobustConnection
) -> None:
    body = json.dumps(user(options={"num_predict": 100_000})).encode()
    error = await invalid_and_dead_lettered(make_settings, amqp, body)
    assert "max_num_predict" in error["message"]


async def test_model_outside_the_allow_list_is_refused(
    make_settings: MakeSettings, amqp: AbstractRobustConnection
) -> None:
    body = json.dumps(user(model="other")).encode()
    error = await invalid_and_dead_lettered(make_settings, amqp, body, allowed_models=["llama3.2"])
    assert "allowed_models" in error["message"]


async def test_expired_deadline_is_answered_without_calling_ollama(
    make_settings: MakeSettings, amqp: AbstractRobustConnection, fake_ollama: FakeOllama
) -> None:
    untouched = model(fake_ollama)
    async with worker_and_requester(make_settings, amqp) as requester:
        by_header = await requester.chat(
            user(model=untouched), headers={"x-deadline": int(time.time()) - 1}
        )
        by_decimal_string = await requester.chat(
            user(model=untouched), headers={"x-deadline": f"{time.time() - 1:.3f}"}
        )
        # RabbitMQ counts the expiration from enqueueing; the worker from the timestamp.
        by_expiration = await requester.chat(
            user(model=untouched),
            expiration=60,
            timestamp=time.time() - 120,
        )
    for replies in (by_header, by_decimal_string, by_expiration):
        assert [r["type"] for r in replies] == ["error"]
        assert replies[0]["code"] == "deadline_exceeded"
        assert replies[0]["retryable"] is False
    assert requests_for(fake_ollama, untouched) == 0
    await ended_acked(amqp, requester.settings)


# --- Cancellation and a gone requester ---------------------------------------------------


async def test_cancel_during_a_stream_stops_ollama_and_ends_done_cancelled(
    make_settings: MakeSettings, amqp: AbstractRobustConnection, fake_ollama: FakeOllama
) -> None:
    slow = model(fake_ollama, token_delay=0.05, tokens=["tok "] * 200)
    aborted = fake_ollama.aborted_streams
    cid = uuid.uuid4().hex
    async with worker_and_requester(make_settings, amqp) as requester:
        replies = await requester.send(user(model=slow), correlation_id=cid)
        first = await replies.next()
        await publish_cancel(amqp, requester.settings, cid)
        rest = await replies.until_terminal()
        await fake_ollama.wait_for(lambda: fake_ollama.aborted_streams > aborted)
    received = [first, *rest]
    assert_well_formed(received, cid)
    done = received[-1]
    assert done["type"] == "done"
    assert done["done_reason"] == "cancelled"
    assert done["message"]["content"] == streamed_text(received)
    assert len(done["message"]["content"]) < len("tok ") * 200
    await ended_acked(amqp, requester.settings)


async def test_cancel_before_the_request_starts_skips_it(
    make_settings: MakeSettings, amqp: AbstractRobustConnection, fake_ollama: FakeOllama
) -> None:
    untouched = model(fake_ollama)
    cid = uuid.uuid4().hex
    async with worker_and_requester(make_settings, amqp) as requester:
        await publish_cancel(amqp, requester.settings, cid)
        # The cancel and the request travel different routes: wait until the worker has
        # the cancel, by way of a request published after it, which is then answered.
        await requester.chat(user())
        replies = await requester.chat(user(model=untouched), correlation_id=cid)
    assert [(r["type"], r["done_reason"]) for r in replies] == [("done", "cancelled")]
    assert requests_for(fake_ollama, untouched) == 0
    await ended_acked(amqp, requester.settings)


async def test_requester_gone_stops_the_generation(
    make_settings: MakeSettings, amqp: AbstractRobustConnection, fake_ollama: FakeOllama
) -> None:
    slow = model(fake_ollama, token_delay=0.05, tokens=["tok "] * 200)
    aborted = fake_ollama.aborted_streams
    settings = make_settings()
    async with running_worker(settings):
        channel = await amqp.channel()
        # Nobody binds a queue for this correlation id: every reply comes back unroutable.
        await channel.default_exchange.publish(
            aio_pika.Message(
                json.dumps(user(model=slow)).encode(),
                content_type="application/json",
                correlation_id=uuid.uuid4().hex,
            ),
            routing_key=settings.requests_queue,
        )
        await channel.close()
        await fake_ollama.wait_for(lambda: fake_ollama.aborted_streams > aborted)
    assert requests_for(fake_ollama, slow) == 1
    await ended_acked(amqp, settings)


# --- Capacity ---------------------------------------------------------------------------------


async def test_burst_of_200_requests_never_exceeds_the_prefetch(
    make_settings: MakeSettings, amqp: AbstractRobustConnection, fake_ollama: FakeOllama
) -> None:
    paced = model(fake_ollama, token_delay=0.002, tokens=["a", "b", "c"])
    fake_ollama.max_active_streams = fake_ollama.active_streams
    async with worker_and_requester(make_settings, amqp, prefetch=4) as requester:
        pending = [await requester.send(user(model=paced)) for _ in range(200)]
        results = await asyncio.gather(*(r.until_terminal(60) for r in pending))
    assert all(replies[-1]["type"] == "done" for replies in results)
    assert all(streamed_text(replies) == "abc" for replies in results)
    assert requests_for(fake_ollama, paced) == 200
    assert fake_ollama.max_active_streams <= 4
    await ended_acked(amqp, requester.settings)


# --- Worker faults ------------------------------------------------------------------------


async def wait_for_requests(fake: FakeOllama, model_name: str, count: int) -> None:
    await fake.wait_for(lambda: requests_for(fake, model_name) >= count, timeout=30)


async def test_worker_killed_mid_stream_is_redelivered_as_attempt_2(
    make_settings: MakeSettings, amqp: AbstractRobustConnection, fake_ollama: FakeOllama
) -> None:
    slow = model(fake_ollama, token_delay=0.02, tokens=[f"t{i} " for i in range(50)])
    settings = make_settings()
    first_worker = await WorkerProcess(settings).start()
    async with Requester(amqp, settings) as requester:
        replies = await requester.send(user(model=slow))
        first = await replies.next()
        await first_worker.kill()
        second_worker = await WorkerProcess(settings).start()
        rest = await replies.until_terminal(30)
        await second_worker.signal(signal.SIGTERM)
        assert await second_worker.wait() == 0
    assert first["attempt"] == 1
    assert first["seq"] == 0
    second_attempt = [r for r in rest if r["attempt"] == 2]
    assert_well_formed(second_attempt)
    assert second_attempt[-1]["type"] == "done"
    assert streamed_text(second_attempt) == "".join(f"t{i} " for i in range(50))
    await ended_acked(amqp, settings)


async def test_sigterm_lets_a_stream_in_flight_finish(
    make_settings: MakeSettings, amqp: AbstractRobustConnection, fake_ollama: FakeOllama
) -> None:
    slow = model(fake_ollama, token_delay=0.02, tokens=[f"t{i} " for i in range(30)])
    settings = make_settings(graceful_timeout=10)
    worker = await WorkerProcess(settings).start()
    async with Requester(amqp, settings) as requester:
        replies = await requester.send(user(model=slow))
        first = await replies.next()
        await worker.signal(signal.SIGTERM)
        rest = await replies.until_terminal(30)
        assert await worker.wait() == 0
    received = [first, *rest]
    assert_well_formed(received)
    assert received[-1]["type"] == "done"
    assert {r["attempt"] for r in received} == {1}
    await ended_acked(amqp, settings)


async def test_sigterm_past_the_grace_period_redelivers_the_stream(
    make_settings: MakeSettings, amqp: AbstractRobustConnection, fake_ollama: FakeOllama
) -> None:
    slow = model(fake_ollama, token_delay=0.05, tokens=[f"t{i} " for i in range(60)])
    settings = make_settings(graceful_timeout=0.3)
    worker = await WorkerProcess(settings).start()
    async with Requester(amqp, settings) as requester:
        replies = await requester.send(user(model=slow))
        await replies.next()
        await worker.signal(signal.SIGTERM)
        await worker.wait()
        async with running_worker(settings):
            received: list[dict[str, Any]] = []
            while not received or received[-1]["type"] == "chunk" or received[-1]["attempt"] < 2:
                received.append(await replies.next(30))
    second_attempt = [r for r in received if r["attempt"] == 2]
    assert_well_formed(second_attempt)
    assert second_attempt[-1]["type"] == "done"
    assert [r for r in received if r["attempt"] == 1 and r["type"] != "chunk"] == []
    await ended_acked(amqp, settings)


async def test_a_request_that_always_kills_its_worker_ends_in_the_dead_letter_queue(
    make_settings: MakeSettings, amqp: AbstractRobustConnection, fake_ollama: FakeOllama
) -> None:
    poison = model(fake_ollama, stall_after=1)
    settings = make_settings(delivery_limit=2)
    body = json.dumps(user(model=poison)).encode()
    async with Requester(amqp, settings) as requester:
        # A worker must have declared the queues before the request can be published.
        worker = await WorkerProcess(settings).start()
        await requester.send(body)
        deliveries = 0
        while True:
            deliveries += 1
            await wait_for_requests(fake_ollama, poison, deliveries)
            await worker.kill()
            if deliveries > settings.delivery_limit:
                break
            worker = await WorkerProcess(settings).start()
    assert deliveries == settings.delivery_limit + 1
    assert await dead_letters(amqp, settings) == [body]
    assert await queue_depths(amqp, settings) == (0, 0)


async def test_a_worker_bug_is_retried_then_answered_internal_error_and_dead_lettered(
    make_settings: MakeSettings,
    amqp: AbstractRobustConnection,
    fake_ollama: FakeOllama,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import chatbus.worker

    calls = 0

    def broken_parse(*args: object) -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("a bug")

    monkeypatch.setattr(chatbus.worker, "parse_request", broken_parse)
    body = json.dumps(user()).encode()
    async with worker_and_requester(make_settings, amqp, delivery_limit=2) as requester:
        replies = await requester.chat(body)
    assert calls == 3
    assert [(r["type"], r["code"], r["attempt"]) for r in replies] == [
        ("error", "internal_error", 3)
    ]
    assert await dead_letters(amqp, requester.settings) == [body]


# --- Broker faults ---------------------------------------------------------------------------


@needs_rabbitmqctl
async def test_connection_loss_mid_stream_recovers_and_keeps_serving(
    make_settings: MakeSettings, amqp: AbstractRobustConnection, fake_ollama: FakeOllama
) -> None:
    slow = model(fake_ollama, token_delay=0.02, tokens=[f"t{i} " for i in range(50)])
    settings = make_settings(connection_name=f"fault-test-{uuid.uuid4().hex[:8]}")
    async with running_worker(settings), Requester(amqp, settings) as requester:
        replies = await requester.send(user(model=slow))
        await replies.next()
        await close_connection_named(settings.connection_name)
        received = await until_done_of_any_attempt(replies)
        assert received[-1]["type"] in ("done", "error")
        await wait_for_consumers(settings, 1)
        assert (await requester.chat(user()))[-1]["type"] == "done"
    await ended_acked(amqp, settings)


async def until_done_of_any_attempt(replies: Replies) -> list[dict[str, Any]]:
    """Replies until a terminal one: of attempt 1 if the worker could finish it, or of a
    later attempt if the request was redelivered."""
    received = [await replies.next(30)]
    while received[-1]["type"] == "chunk":
        received.append(await replies.next(30))
    return received


async def wait_for_consumers(settings: Settings, count: int) -> None:
    """Poll the consumer count until it is back: RabbitMQ has no event for it."""
    async with asyncio.timeout(30):
        while await consumer_count(settings.rabbitmq_url, settings.requests_queue) != count:  # noqa: ASYNC110
            await asyncio.sleep(0.1)


@pytest.mark.slow
async def test_broker_restart_is_survived(make_settings: MakeSettings) -> None:
    # A node of its own: restarting the shared broker would cut every other suite off.
    if (reason := nodes_unavailable()) is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    async with RabbitCluster(1) as broker:
        node = broker.nodes[0]
        settings = make_settings(rabbitmq_url=node.url)
        async with running_worker(settings):
            await wait_for_consumers(settings, 1)
            await node.stop()
            await node.start()
            await wait_for_consumers(settings, 1)
            async with (
                await aio_pika.connect_robust(node.url) as connection,
                Requester(connection, settings) as requester,
            ):
                replies = await requester.chat(user())
            assert replies[-1]["type"] == "done"
        async with await aio_pika.connect_robust(node.url) as connection:
            await ended_acked(connection, settings)


async def test_two_requests_sharing_a_correlation_id_are_both_answered(
    make_settings: MakeSettings, amqp: AbstractRobustConnection, fake_ollama: FakeOllama
) -> None:
    fast = model(fake_ollama, tokens=["a", "b"])
    slow = model(fake_ollama, token_delay=0.05, tokens=["c"] * 10)
    cid = uuid.uuid4().hex
    async with worker_and_requester(make_settings, amqp) as requester:
        replies = await requester.send(user(model=slow), correlation_id=cid)
        channel = await amqp.channel()
        await channel.default_exchange.publish(
            aio_pika.Message(
                json.dumps(user(model=fast)).encode(),
                content_type="application/json",
                correlation_id=cid,
            ),
            routing_key=requester.settings.requests_queue,
        )
        await channel.close()
        terminals: list[dict[str, Any]] = []
        while len(terminals) < 2:
            reply = await replies.next()
            if reply["type"] != "chunk":
                terminals.append(reply)
    assert [(t["type"], t["model"], t["attempt"]) for t in terminals] == [
        ("done", fast, 1),
        ("done", slow, 1),
    ]
    await ended_acked(amqp, requester.settings)
