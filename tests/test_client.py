"""The client library against the real broker: the real worker with the fake Ollama, or, for
replies a real worker only sends under faults, the worker's side played by the test."""

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from chatbus.client import ChatClient, ChatEvent, Restarted
from chatbus.contract import DEADLINE_HEADER, ChatRequest, ChunkReply, DoneReply, ErrorCode
from chatbus.conversation import Conversation
from chatbus.errors import (
    ChatError,
    ChatTimeoutError,
    DeadlineExceededError,
    InvalidRequestError,
    ModelNotFoundError,
    ServiceUnavailableError,
    UpstreamError,
    UpstreamUnavailableError,
)
from chatbus.settings import Settings
from chatbus.testing import FakeOllama, WorkerProcess, running_worker
from chatbus.testing.fake_ollama import DEFAULT_THINKING, DEFAULT_TOKENS
from tests.support import (
    close_connection_named,
    free_port,
    how_it_ended,
    model,
    needs_rabbitmqctl,
    observing,
)

MakeSettings = Callable[..., Settings]
ANSWER = "".join(DEFAULT_TOKENS)


def client_for(settings: Settings, **options: Any) -> ChatClient:
    return ChatClient(settings.rabbitmq_url, names=settings.names, **options)


@pytest.fixture
async def client(worker: Settings) -> AsyncIterator[ChatClient]:
    async with client_for(worker) as client:
        yield client


class PlayedWorker:
    """The worker's side of the contract, played by the test: requests arrive here and the
    test publishes the replies."""

    def __init__(self, channel: aio_pika.abc.AbstractChannel, settings: Settings) -> None:
        self._channel = channel
        self.settings = settings
        self._requests: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()

    async def start(self) -> None:
        queue = await self._channel.declare_queue(
            self.settings.requests_queue, exclusive=True, auto_delete=True
        )
        await queue.consume(self._requests.put, no_ack=True)

    async def next_request(self) -> AbstractIncomingMessage:
        async with asyncio.timeout(10):
            return await self._requests.get()

    async def reply(self, request: AbstractIncomingMessage, **fields: Any) -> None:
        correlation_id = request.correlation_id
        assert correlation_id is not None
        exchange = await self._channel.get_exchange(self.settings.replies_exchange)
        await exchange.publish(
            aio_pika.Message(
                json.dumps({"correlation_id": correlation_id, **fields}).encode(),
                content_type="application/json",
                correlation_id=correlation_id,
            ),
            routing_key=correlation_id,
        )


@pytest.fixture
async def played(
    make_settings: MakeSettings, amqp: AbstractRobustConnection
) -> AsyncIterator[tuple[PlayedWorker, ChatClient]]:
    """A client whose requests go to a worker played by the test."""
    settings = make_settings()
    channel = await amqp.channel()
    worker = PlayedWorker(channel, settings)
    await worker.start()
    async with client_for(settings) as client:
        yield worker, client
    await channel.close()


def chunk(seq: int, content: str, attempt: int = 1) -> dict[str, Any]:
    return {"type": "chunk", "attempt": attempt, "seq": seq, "content": content}


def done(seq: int, content: str, attempt: int = 1) -> dict[str, Any]:
    return {
        "type": "done",
        "attempt": attempt,
        "seq": seq,
        "done_reason": "stop",
        "model": "llama3.2",
        "message": {"role": "assistant", "content": content},
        "usage": {"prompt_tokens": 1, "completion_tokens": 1},
        "timings": {},
    }


async def collect(stream: AsyncIterator[ChatEvent], events: list[ChatEvent]) -> None:
    async for event in stream:
        events.append(event)


def text(events: list[ChatEvent]) -> str:
    return "".join(event.content for event in events if isinstance(event, ChunkReply))


# --- streaming and results ----------------------------------------------------------------


async def test_stream_yields_the_chunks_in_order_then_done(client: ChatClient) -> None:
    events = [event async for event in client.stream("Why is the sky blue?")]

    *chunks, last = events
    assert [type(event) for event in chunks] == [ChunkReply] * len(chunks)
    # The test worker's flush window is 0: one chunk per Ollama token.
    assert [c.content for c in chunks if isinstance(c, ChunkReply)] == list(DEFAULT_TOKENS)
    assert [event.seq for event in chunks if isinstance(event, ChunkReply)] == list(
        range(len(chunks))
    )
    assert isinstance(last, DoneReply)
    assert last.seq == len(chunks)
    assert last.message.content == ANSWER
    assert len({event.correlation_id for event in events}) == 1


async def test_chat_returns_the_whole_result(client: ChatClient, fake_ollama: FakeOllama) -> None:
    call = {"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}
    name = model(fake_ollama, tool_calls=[call])
    tools = [{"type": "function", "function": {"name": "get_weather"}}]

    result = await client.chat(
        [{"role": "user", "content": "Weather in Oslo?"}], model=name, think=True, tools=tools
    )

    assert result.done_reason == "stop"
    assert result.model == name
    assert result.message.content == ANSWER
    assert result.message.thinking == "".join(DEFAULT_THINKING)
    assert [c.model_dump() for c in result.message.tool_calls or []] == [call]
    assert result.usage.completion_tokens == len(DEFAULT_TOKENS) + len(DEFAULT_THINKING)
    assert result.usage.prompt_tokens > 0
    assert result.timings.eval_duration


async def test_request_fields_and_options_reach_ollama(
    client: ChatClient, fake_ollama: FakeOllama
) -> None:
    question = f"Fields {uuid.uuid4().hex}"
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}}

    await client.chat(
        question, options={"temperature": 0.1, "seed": 7}, format=schema, keep_alive="1m"
    )

    sent = next(r for r in fake_ollama.requests if r["messages"][-1]["content"] == question)
    assert sent["options"]["temperature"] == 0.1
    assert sent["options"]["seed"] == 7
    assert sent["format"] == schema
    assert sent["keep_alive"] == "1m"


async def test_fifty_concurrent_streams_on_one_client_each_get_their_own_answer(
    client: ChatClient, fake_ollama: FakeOllama
) -> None:
    answers = {
        model(fake_ollama, tokens=[f"{i}.{j} " for j in range(5)], token_delay=0.01): i
        for i in range(50)
    }

    async def ask(name: str) -> list[ChatEvent]:
        return [event async for event in client.stream("Who are you?", model=name)]

    results = await asyncio.gather(*(ask(name) for name in answers))

    correlation_ids = set()
    for name, events in zip(answers, results, strict=True):
        expected = "".join(f"{answers[name]}.{j} " for j in range(5))
        assert text(events) == expected
        assert isinstance(events[-1], DoneReply)
        assert events[-1].message.content == expected
        assert len({event.correlation_id for event in events}) == 1
        correlation_ids.add(events[0].correlation_id)
    assert len(correlation_ids) == 50


# --- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("behaviour", "request_fields", "error", "retryable"),
    [
        ({}, {"model": "no-such-model"}, ModelNotFoundError, False),
        ({}, {"options": {"num_predict": 1_000_000}}, InvalidRequestError, False),
        ({"status": 400}, {}, InvalidRequestError, False),
        ({"status": 503}, {}, UpstreamUnavailableError, True),
        ({"error_after": 2}, {}, UpstreamError, True),
        ({"stall_after": 1}, {}, ChatTimeoutError, True),
    ],
    ids=["404", "over-a-limit", "400", "503", "error-mid-stream", "stall"],
)
async def test_error_replies_raise_the_matching_exception(
    client: ChatClient,
    fake_ollama: FakeOllama,
    behaviour: dict[str, Any],
    request_fields: dict[str, Any],
    error: type[ChatError],
    retryable: bool,
) -> None:
    fields = {"model": model(fake_ollama, **behaviour)} | request_fields
    correlation_id = uuid.uuid4().hex

    with pytest.raises(error) as raised:
        await client.chat("Why is the sky blue?", correlation_id=correlation_id, **fields)

    assert raised.value.code == error.code
    assert raised.value.retryable is retryable
    assert raised.value.correlation_id == correlation_id
    assert raised.value.message


async def test_an_error_after_chunks_ends_the_stream_with_the_exception(
    client: ChatClient, fake_ollama: FakeOllama
) -> None:
    events: list[ChatEvent] = []
    stream = client.stream("hi", model=model(fake_ollama, error_after=3))
    with pytest.raises(UpstreamError):
        await collect(stream, events)

    assert text(events) == "".join(DEFAULT_TOKENS[:3])


@pytest.mark.parametrize("code", list(ErrorCode))
async def test_every_error_code_has_its_exception(
    played: tuple[PlayedWorker, ChatClient], code: ErrorCode
) -> None:
    worker, client = played
    answer = asyncio.create_task(client.chat("hi"))
    request = await worker.next_request()
    error = {"type": "error", "seq": 0, "code": code, "message": "what failed", "retryable": True}
    await worker.reply(request, **error)

    with pytest.raises(ChatError) as raised:
        await answer

    assert raised.value.code == code
    assert raised.value.message == "what failed"
    assert raised.value.retryable is True
    assert raised.value.correlation_id == request.correlation_id


async def test_an_invalid_request_is_refused_before_it_is_sent(client: ChatClient) -> None:
    with pytest.raises(InvalidRequestError, match="role"):
        client.stream([{"role": "robot", "content": "hi"}])


async def test_a_request_queue_nobody_declared_is_service_unavailable(
    make_settings: MakeSettings,
) -> None:
    async with client_for(make_settings()) as client:
        with pytest.raises(ServiceUnavailableError, match="no worker") as raised:
            await client.chat("hi")

    assert raised.value.retryable is True


# --- the wire, duplicates and redeliveries --------------------------------------------------


async def test_the_request_on_the_wire_follows_the_contract(
    played: tuple[PlayedWorker, ChatClient],
) -> None:
    worker, client = played
    sent_at = time.time()
    answer = asyncio.create_task(
        client.chat("Why is the sky blue?", model="llama3.2", timeout=60, correlation_id="c-1")
    )
    request = await worker.next_request()
    await worker.reply(request, **done(0, "Blue."))
    await answer

    assert request.correlation_id == "c-1"
    assert request.content_type == "application/json"
    deadline = (request.headers or {})[DEADLINE_HEADER]
    assert isinstance(deadline, str)
    assert sent_at + 60 - 0.001 <= float(deadline) <= time.time() + 60
    assert ChatRequest.model_validate_json(request.body) == ChatRequest(
        messages=[{"role": "user", "content": "Why is the sky blue?"}],
        model="llama3.2",
        stream=False,
    )


async def stream_of(
    played: tuple[PlayedWorker, ChatClient], replies: list[dict[str, Any]]
) -> list[ChatEvent]:
    """What `stream()` yields when the played worker sends these replies."""
    worker, client = played
    stream = client.stream("hi")
    first = asyncio.create_task(anext(stream))
    request = await worker.next_request()
    for reply in replies:
        await worker.reply(request, **reply)
    return [await first] + [event async for event in stream]


async def test_duplicates_are_dropped_and_a_new_attempt_restarts_the_stream(
    played: tuple[PlayedWorker, ChatClient],
) -> None:
    replies = [
        chunk(0, "a"),
        chunk(1, "b"),
        chunk(1, "b"),  # a duplicate
        chunk(0, "x", attempt=2),  # a worker died: the request is answered again
        chunk(2, "c"),  # late, from the attempt that was superseded
        chunk(1, "y", attempt=2),
        chunk(1, "y", attempt=2),
        done(2, "xy", attempt=2),
    ]

    events = await stream_of(played, replies)

    assert [(type(e).__name__, e.attempt, getattr(e, "content", None)) for e in events] == [
        ("ChunkReply", 1, "a"),
        ("ChunkReply", 1, "b"),
        ("Restarted", 2, None),
        ("ChunkReply", 2, "x"),
        ("ChunkReply", 2, "y"),
        ("DoneReply", 2, None),
    ]


async def test_a_later_attempt_with_nothing_shown_before_needs_no_restart(
    played: tuple[PlayedWorker, ChatClient],
) -> None:
    events = await stream_of(played, [chunk(0, "x", attempt=2), done(1, "x", attempt=2)])

    assert [type(event) for event in events] == [ChunkReply, DoneReply]


async def test_a_worker_killed_mid_stream_restarts_the_answer(
    make_settings: MakeSettings, fake_ollama: FakeOllama
) -> None:
    settings = make_settings()
    tokens = [f"t{i} " for i in range(30)]
    name = model(fake_ollama, tokens=tokens, token_delay=0.1)
    doomed = await WorkerProcess(settings).start()
    events: list[ChatEvent] = []
    async with contextlib.AsyncExitStack() as stack:
        client = await stack.enter_async_context(client_for(settings))
        async for event in client.stream("hi", model=name):
            events.append(event)
            if len(events) == 3:
                await doomed.kill()
                await stack.enter_async_context(running_worker(settings))

    restart = next(i for i, event in enumerate(events) if isinstance(event, Restarted))
    assert restart >= 3
    assert [event.attempt for event in events[restart:]] == [2] * len(events[restart:])
    assert text(events[restart:]) == "".join(tokens)
    assert isinstance(events[-1], DoneReply)
    assert not any(isinstance(event, Restarted) for event in events[restart + 1 :])


# --- cancellation and timeouts ---------------------------------------------------------------


async def test_breaking_out_of_the_stream_cancels_the_generation(
    client: ChatClient,
    fake_ollama: FakeOllama,
    amqp: AbstractRobustConnection,
    worker: Settings,
) -> None:
    name = model(fake_ollama, tokens=["x"] * 200, token_delay=0.05)
    aborted = fake_ollama.aborted_streams
    correlation_id = uuid.uuid4().hex
    # The bystander keeps the replies routable, so the worker can only stop for the cancel.
    async with observing(amqp, worker.replies_exchange, correlation_id) as replies:
        async for _ in client.stream("hi", model=name, correlation_id=correlation_id):
            break

        assert (await how_it_ended(replies))["done_reason"] == "cancelled"
    await fake_ollama.wait_for(lambda: fake_ollama.aborted_streams > aborted)


async def test_cancelling_the_task_cancels_the_generation(
    client: ChatClient,
    fake_ollama: FakeOllama,
    amqp: AbstractRobustConnection,
    worker: Settings,
) -> None:
    name = model(fake_ollama, first_token_delay=2.0)
    correlation_id = uuid.uuid4().hex
    async with observing(amqp, worker.replies_exchange, correlation_id) as replies:
        answer = asyncio.create_task(client.chat("hi", model=name, correlation_id=correlation_id))
        await fake_ollama.wait_for(lambda: any(r["model"] == name for r in fake_ollama.requests))
        answer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await answer

        assert (await how_it_ended(replies))["done_reason"] == "cancelled"


async def test_the_timeout_is_a_deadline_the_worker_stops_at(
    client: ChatClient,
    fake_ollama: FakeOllama,
    amqp: AbstractRobustConnection,
    worker: Settings,
) -> None:
    name = model(fake_ollama, first_token_delay=2.5)
    aborted = fake_ollama.aborted_streams
    correlation_id = uuid.uuid4().hex
    async with observing(amqp, worker.replies_exchange, correlation_id) as replies:
        with pytest.raises(DeadlineExceededError) as raised:
            await client.chat("hi", model=name, timeout=0.5, correlation_id=correlation_id)

        # The worker notices the deadline, or the client's cancel reaches it first.
        terminal = await how_it_ended(replies)
    assert terminal.get("code") == "deadline_exceeded" or terminal["done_reason"] == "cancelled"
    assert raised.value.retryable is False
    await fake_ollama.wait_for(lambda: fake_ollama.aborted_streams > aborted)


async def test_a_client_timeout_publishes_a_cancel(
    played: tuple[PlayedWorker, ChatClient],
    amqp: AbstractRobustConnection,
) -> None:
    worker, client = played
    async with observing(amqp, worker.settings.cancel_exchange) as cancels:
        with pytest.raises(DeadlineExceededError) as raised:
            await client.chat("hi", timeout=0.2)
        request = await worker.next_request()

        correlation_id = raised.value.correlation_id
        assert correlation_id is not None
        assert request.correlation_id == correlation_id
        while (await cancels.next())["correlation_id"] != correlation_id:
            pass


async def test_a_timeout_already_passed_is_not_sent(
    played: tuple[PlayedWorker, ChatClient],
) -> None:
    _, client = played
    with pytest.raises(DeadlineExceededError, match="before the request was sent"):
        await client.chat("hi", timeout=0)


@needs_rabbitmqctl
async def test_a_lost_connection_fails_the_waiting_requests_and_the_client_recovers(
    make_settings: MakeSettings, fake_ollama: FakeOllama, amqp: AbstractRobustConnection
) -> None:
    settings = make_settings(first_token_timeout=30)
    slow = model(fake_ollama, first_token_delay=20)
    name = f"client-test-{uuid.uuid4().hex[:8]}"
    correlation_id = uuid.uuid4().hex
    async with (
        running_worker(settings),
        client_for(settings, connection_name=name) as client,
        observing(amqp, settings.replies_exchange, correlation_id) as replies,
    ):
        waiting = asyncio.create_task(client.chat("hi", model=slow, correlation_id=correlation_id))
        await fake_ollama.wait_for(lambda: any(r["model"] == slow for r in fake_ollama.requests))
        await close_connection_named(name)

        with pytest.raises(ServiceUnavailableError, match="connection was lost"):
            await waiting
        # Once reconnected, the client cancels what it gave up on, and serves again.
        assert (await how_it_ended(replies))["done_reason"] == "cancelled"
        assert (await client.chat("hi", timeout=30)).message.content == ANSWER


# --- models -----------------------------------------------------------------------------------


async def test_models_lists_what_the_workers_ollama_has(client: ChatClient) -> None:
    models = await client.models()

    llama = next(m for m in models if m.name == "llama3.2:latest")
    assert llama.family == "llama"
    assert llama.parameter_size
    assert llama.size


async def test_models_without_a_worker_is_service_unavailable(
    played: tuple[PlayedWorker, ChatClient],
) -> None:
    _, client = played
    with pytest.raises(ServiceUnavailableError, match="no worker"):
        await client.models()


async def test_models_with_ollama_down_is_upstream_unavailable(
    make_settings: MakeSettings,
) -> None:
    settings = make_settings(ollama_host=f"http://127.0.0.1:{free_port()}")
    async with running_worker(settings), client_for(settings) as client:
        with pytest.raises(UpstreamUnavailableError):
            await client.models()


# --- conversations ---------------------------------------------------------------------------


async def test_a_conversation_keeps_its_history_and_restores_from_json(
    client: ChatClient, fake_ollama: FakeOllama
) -> None:
    conversation = Conversation(client, system="Be brief.")
    first, asked = "Why is the sky blue?", f"And at sunset? {uuid.uuid4().hex}"
    await conversation.say(first)
    await conversation.say(asked)

    assert [(m.role, m.content) for m in conversation.messages] == [
        ("user", first),
        ("assistant", ANSWER),
        ("user", asked),
        ("assistant", ANSWER),
    ]
    sent = [r["messages"] for r in fake_ollama.requests if r["messages"][-1]["content"] == asked]
    assert sent[-1] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": first},
        {"role": "assistant", "content": ANSWER},
        {"role": "user", "content": asked},
    ]

    exported = json.loads(json.dumps(conversation.export()))
    restored = Conversation.restore(client, exported)
    assert restored.export() == conversation.export()
    events = [event async for event in restored.stream("Thanks!")]
    assert text(events) == ANSWER
    assert len(restored.messages) == 6
    assert len(conversation.messages) == 4

    restored.reset()
    assert restored.messages == []
    assert restored.export() == {"system": "Be brief.", "messages": []}


async def test_a_failed_turn_leaves_the_history_as_it_was(client: ChatClient) -> None:
    conversation = Conversation(client)
    await conversation.say("Hello")
    conversation.model = "no-such-model"

    with pytest.raises(ModelNotFoundError):
        await conversation.say("Still there?")

    assert [m.content for m in conversation.messages] == ["Hello", ANSWER]


# --- what a gateway needs: headers of its own, a full queue, how many workers -----------------


async def test_headers_of_the_callers_go_on_the_request_beside_the_deadline(
    played: tuple[PlayedWorker, ChatClient],
) -> None:
    worker, client = played
    answer = asyncio.create_task(
        client.chat("hi", timeout=60, headers={"x-tenant": "acme", DEADLINE_HEADER: "0"})
    )
    request = await worker.next_request()
    await worker.reply(request, **done(0, "Hello."))
    await answer

    headers = request.headers or {}
    assert headers["x-tenant"] == "acme"
    assert float(str(headers[DEADLINE_HEADER])) > time.time()  # the client's own deadline wins


async def test_a_full_request_queue_is_service_unavailable(
    make_settings: MakeSettings, amqp: AbstractRobustConnection
) -> None:
    settings = make_settings()
    channel = await amqp.channel()
    # A worker's queue whose length limit is reached: reject-publish nacks every publish.
    await channel.declare_queue(
        settings.requests_queue,
        exclusive=True,
        arguments={"x-max-length": 0, "x-overflow": "reject-publish"},
    )
    async with client_for(settings) as client:
        with pytest.raises(ServiceUnavailableError, match="full") as raised:
            await client.chat("hi")
    await channel.close()

    assert raised.value.retryable is True


async def test_workers_counts_the_consumers_of_the_request_queue(
    make_settings: MakeSettings, worker: Settings
) -> None:
    async with client_for(make_settings()) as nobody, client_for(worker) as served:
        assert await nobody.workers() == 0  # no worker ever declared that queue
        assert await served.workers() == 1
        assert nobody.connected
        assert await served.chat("hi")  # the channel of the count left the client working
