"""`Generation` on its own: the fake Ollama behind a pool of one server, the real `ollama`
client made as the worker makes it, and a sink that keeps the chunks in a list. How tokens
become chunks, what the completion reports, and how each timeout, failure and cancel ends a
generation. (Failover between servers: tests/test_pool_worker.py.)"""

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from chatbus.contract import ChatRequest, ToolCall
from chatbus.errors import (
    ChatError,
    ChatTimeoutError,
    DeadlineExceededError,
    InvalidRequestError,
    ModelNotFoundError,
    UpstreamError,
    UpstreamUnavailableError,
)
from chatbus.generation import Generation
from chatbus.instruments import NO_INSTRUMENTS
from chatbus.pool import CallOutcome, OllamaPool, PoolOptions, parse_hosts
from chatbus.replies import RequesterGone
from chatbus.settings import Chunking, Retries, Timeouts
from chatbus.testing import Behaviour, FakeOllama
from chatbus.testing.fake_ollama import DEFAULT_THINKING, DEFAULT_TOKENS
from chatbus.upstream import create_ollama_client

ANSWER = "".join(DEFAULT_TOKENS)
QUESTION = ChatRequest.model_validate(
    {"messages": [{"role": "user", "content": "Why is the sky blue?"}]}
)
# The fake counts 4 tokens per message and one per 4 characters of content.
QUESTION_PROMPT_TOKENS = 4 + len("Why is the sky blue?") // 4

PATIENT = Timeouts(first_token=30.0, idle=30.0, total=60.0)
NO_RETRIES = Retries(budget=0.0)
QUICK_RETRIES = Retries(budget=10.0, initial_backoff=0.01, max_backoff=0.02)
EVERY_TOKEN = Chunking(flush_window=0.0)
LONG_WINDOW = Chunking(flush_window=60.0)

CLOCK_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {"name": "clock", "parameters": {"type": "object", "properties": {}}},
}
CLOCK_CALL: dict[str, Any] = {"function": {"name": "clock", "arguments": {"zone": "UTC"}}}

Chunk = tuple[str, str | None, list[ToolCall] | None]


class ListSink:
    """A `ChunkSink` that keeps every chunk, and lets a test wait for what it was sent."""

    def __init__(self) -> None:
        self.chunks: list[Chunk] = []
        self._changed = asyncio.Condition()

    async def chunk(
        self, content: str, thinking: str | None, tool_calls: list[ToolCall] | None
    ) -> None:
        async with self._changed:
            self.chunks.append((content, thinking, tool_calls))
            self._changed.notify_all()

    @property
    def contents(self) -> list[str]:
        return [content for content, _, _ in self.chunks]

    async def wait_for_content(self, text: str, timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: "".join(self.contents) == text)


class BrokenSink:
    """A sink whose requester has gone: every chunk raises, as the real publisher does."""

    async def chunk(
        self, content: str, thinking: str | None, tool_calls: list[ToolCall] | None
    ) -> None:
        raise RequesterGone("corr-1")


class CountingInstruments:
    """Counts the retries, which a test can wait for; records nothing else."""

    def __init__(self) -> None:
        self.retries = 0
        self.retried = asyncio.Event()

    def retry(self) -> None:
        self.retries += 1
        self.retried.set()

    def __getattr__(self, name: str) -> Any:
        return getattr(NO_INSTRUMENTS, name)


class Generations:
    """Makes generations against one fake Ollama, each through a pool of its own (not
    started: no background checks, so it knows nothing of the fake but what calls tell)."""

    def __init__(self, fake: FakeOllama) -> None:
        self._fake = fake
        self.pools: list[OllamaPool] = []

    def make(
        self,
        model: str = "llama3.2",
        *,
        request: ChatRequest = QUESTION,
        timeouts: Timeouts = PATIENT,
        retries: Retries = NO_RETRIES,
        chunking: Chunking = EVERY_TOKEN,
        max_num_predict: int = 100,
        deadline: float | None = None,
        instruments: CountingInstruments | None = None,
    ) -> Generation:
        pool = OllamaPool(
            parse_hosts(self._fake.url, default_parallel=1),
            lambda server: create_ollama_client(server.base_url, timeouts, connections=2),
            PoolOptions(),
        )
        self.pools.append(pool)
        return Generation(
            pool,
            request,
            model,
            timeouts=timeouts,
            retries=retries,
            chunking=chunking,
            max_num_predict=max_num_predict,
            deadline=deadline,
            instruments=instruments or NO_INSTRUMENTS,
        )

    async def aclose(self) -> None:
        for pool in self.pools:
            await pool.close()


@pytest.fixture
async def fake() -> AsyncIterator[FakeOllama]:
    async with FakeOllama() as server:
        yield server


@pytest.fixture
async def generations(fake: FakeOllama) -> AsyncIterator[Generations]:
    made = Generations(fake)
    yield made
    await made.aclose()


def ask(**fields: Any) -> ChatRequest:
    return QUESTION.model_copy(update=fields)


# ----------------------------------------------------------------------------- chunking


async def test_first_token_goes_at_once_and_the_rest_within_the_window(
    generations: Generations,
) -> None:
    sink = ListSink()

    completion = await generations.make(chunking=LONG_WINDOW).run(sink)

    assert sink.contents == [DEFAULT_TOKENS[0], ANSWER[len(DEFAULT_TOKENS[0]) :]]
    assert completion.done_reason == "stop"
    assert completion.message.content == ANSWER


async def test_no_flush_window_sends_every_token_as_a_chunk(generations: Generations) -> None:
    sink = ListSink()

    await generations.make(chunking=EVERY_TOKEN).run(sink)

    assert sink.contents == list(DEFAULT_TOKENS)
    assert all(thinking is None and tools is None for _, thinking, tools in sink.chunks)


async def test_max_chars_waiting_forces_a_flush(fake: FakeOllama, generations: Generations) -> None:
    fake.models["letters"] = Behaviour(tokens=["a", "bb", "ccc", "dddd", "e", "f"])
    sink = ListSink()

    completion = await generations.make(
        "letters", chunking=Chunking(flush_window=60.0, max_chars=5)
    ).run(sink)

    assert sink.contents == ["a", "bbccc", "dddde", "f"]
    assert completion.message.content == "abbcccddddef"


async def test_the_window_flushes_while_the_stream_pauses(
    fake: FakeOllama, generations: Generations
) -> None:
    fake.models["pausing"] = Behaviour(stall_after=3)
    generation = generations.make("pausing", chunking=Chunking(flush_window=0.05))
    sink = ListSink()
    running = asyncio.create_task(generation.run(sink))

    # No token comes after the third: only the window's timer can send the second and third.
    await sink.wait_for_content("".join(DEFAULT_TOKENS[:3]))
    generation.cancel()
    completion = await running

    assert sink.contents[0] == DEFAULT_TOKENS[0]
    assert completion.done_reason == "cancelled"


# ----------------------------------------------------------------------------- what Ollama says


async def test_thinking_streams_before_the_answer(
    fake: FakeOllama, generations: Generations
) -> None:
    sink = ListSink()

    completion = await generations.make(request=ask(think=True)).run(sink)

    assert fake.requests[0]["think"] is True
    thinking = [(content, thinking) for content, thinking, _ in sink.chunks if thinking]
    assert thinking == [("", piece) for piece in DEFAULT_THINKING]
    assert "".join(sink.contents) == ANSWER
    assert completion.message.thinking == "".join(DEFAULT_THINKING)
    assert completion.message.content == ANSWER


async def test_a_tool_call_is_sent_at_once(fake: FakeOllama, generations: Generations) -> None:
    fake.models["tooling"] = Behaviour(tool_calls=[CLOCK_CALL])
    sink = ListSink()

    completion = await generations.make(
        "tooling", request=ask(tools=[CLOCK_TOOL]), chunking=LONG_WINDOW
    ).run(sink)

    assert fake.requests[0]["tools"] == [CLOCK_TOOL]
    expected_call = ToolCall.model_validate(CLOCK_CALL)
    assert sink.chunks == [
        (DEFAULT_TOKENS[0], None, None),
        (ANSWER[len(DEFAULT_TOKENS[0]) :], None, [expected_call]),
    ]
    assert completion.message.tool_calls == [expected_call]


async def test_num_predict_of_the_request_ends_in_length(
    fake: FakeOllama, generations: Generations
) -> None:
    completion = await generations.make(request=ask(options={"num_predict": 3})).run(ListSink())

    assert fake.requests[0]["options"]["num_predict"] == 3
    assert completion.done_reason == "length"
    assert completion.message.content == "".join(DEFAULT_TOKENS[:3])
    assert completion.usage.completion_tokens == 3


async def test_num_predict_is_capped_when_the_request_sets_none(
    fake: FakeOllama, generations: Generations
) -> None:
    completion = await generations.make(max_num_predict=2).run(ListSink())

    assert fake.requests[0]["options"]["num_predict"] == 2
    assert completion.done_reason == "length"
    assert completion.message.content == "".join(DEFAULT_TOKENS[:2])


async def test_the_completion_reports_usage_and_timings(generations: Generations) -> None:
    generation = generations.make()
    assert generation.log_fields() == {}

    completion = await generation.run(ListSink())

    assert completion.model == "llama3.2"
    assert completion.usage.prompt_tokens == QUESTION_PROMPT_TOKENS
    assert completion.usage.completion_tokens == len(DEFAULT_TOKENS)
    timings = completion.timings.model_dump()
    assert all(isinstance(ns, int) and ns > 0 for ns in timings.values()), timings
    parts = ("load_duration", "prompt_eval_duration", "eval_duration")
    assert timings["total_duration"] >= sum(timings[part] for part in parts)
    fields = generation.log_fields()
    assert fields["first_token_ms"] >= 0
    assert fields["server"] == completion.server == generations.pools[0].statuses()[0].id


# ----------------------------------------------------------------------------- faults


@pytest.mark.parametrize(
    ("fault", "timeouts", "failure", "chunks_first", "message"),
    [
        pytest.param(
            {"first_token_delay": 30.0},
            Timeouts(first_token=0.2, idle=30.0, total=60.0),
            ChatTimeoutError,
            0,
            "no first token within 0.2s",
            id="first_token_timeout",
        ),
        pytest.param(
            {"stall_after": 2},
            Timeouts(first_token=30.0, idle=0.2, total=60.0),
            ChatTimeoutError,
            2,
            "no token for 0.2s (idle timeout)",
            id="idle_timeout",
        ),
        pytest.param(
            {"error_after": 2, "error_message": "out of memory"},
            PATIENT,
            UpstreamError,
            2,
            "Ollama failed: out of memory",
            id="error_line",
        ),
        pytest.param(
            {"disconnect_after": 3},
            PATIENT,
            UpstreamError,
            3,
            "Ollama connection lost mid-stream: RemoteProtocolError",
            id="disconnect",
        ),
    ],
)
async def test_a_fault_ends_in_the_chunks_so_far_and_one_error(
    fake: FakeOllama,
    generations: Generations,
    fault: dict[str, Any],
    timeouts: Timeouts,
    failure: type[ChatError],
    chunks_first: int,
    message: str,
) -> None:
    fake.models["faulty"] = Behaviour(**fault)
    sink = ListSink()

    with pytest.raises(failure) as raised:
        await generations.make("faulty", timeouts=timeouts, retries=QUICK_RETRIES).run(sink)

    assert raised.value.message == message
    assert raised.value.retryable
    assert sink.contents == list(DEFAULT_TOKENS[:chunks_first])
    assert len(fake.requests) == 1
    if failure is ChatTimeoutError:  # the worker closed the stream, so Ollama stops
        await fake.wait_aborted()


@pytest.mark.parametrize(
    ("total", "deadline_in", "failure"),
    [
        pytest.param(0.2, None, ChatTimeoutError, id="total_timeout"),
        pytest.param(0.2, 60.0, ChatTimeoutError, id="total_timeout_before_deadline"),
        pytest.param(60.0, 0.2, DeadlineExceededError, id="deadline_before_total_timeout"),
    ],
)
async def test_the_earlier_of_total_timeout_and_deadline_ends_a_slow_stream(
    fake: FakeOllama,
    generations: Generations,
    total: float,
    deadline_in: float | None,
    failure: type[ChatError],
) -> None:
    fake.models["slow"] = Behaviour(token_delay=0.05)
    deadline = None if deadline_in is None else asyncio.get_running_loop().time() + deadline_in
    sink = ListSink()

    with pytest.raises(failure) as raised:
        await generations.make(
            "slow", timeouts=Timeouts(first_token=30.0, idle=30.0, total=total), deadline=deadline
        ).run(sink)

    assert raised.value.retryable is (failure is ChatTimeoutError)
    sent = "".join(sink.contents)
    assert ANSWER.startswith(sent)
    assert len(sent) < len(ANSWER)
    await fake.wait_aborted()


# ----------------------------------------------------------------------------- retries


@pytest.mark.parametrize(
    "fault",
    [
        pytest.param({"status": 503}, id="busy_503"),
        pytest.param({"status": 500}, id="runner_500"),
        pytest.param({"error_after": 0}, id="error_before_first_token"),
        pytest.param({"disconnect_after": 0}, id="disconnect_before_first_token"),
    ],
)
async def test_unavailable_before_the_first_token_is_retried_until_it_recovers(
    fake: FakeOllama, generations: Generations, fault: dict[str, Any]
) -> None:
    fake.models["flaky"] = Behaviour(**fault, fail_times=2)
    instruments = CountingInstruments()
    sink = ListSink()

    completion = await generations.make(
        "flaky", retries=QUICK_RETRIES, instruments=instruments
    ).run(sink)

    assert completion.message.content == ANSWER
    assert "".join(sink.contents) == ANSWER
    assert len(fake.requests) == 3
    assert instruments.retries == 2


@pytest.mark.parametrize(
    ("retries", "calls_more_than_once"),
    [
        pytest.param(NO_RETRIES, False, id="no_budget"),
        pytest.param(
            Retries(budget=0.5, initial_backoff=0.01, max_backoff=0.05), True, id="budget_spent"
        ),
    ],
)
async def test_unavailable_past_the_retry_budget_fails(
    fake: FakeOllama, generations: Generations, retries: Retries, calls_more_than_once: bool
) -> None:
    fake.models["busy"] = Behaviour(status=503)
    instruments = CountingInstruments()

    with pytest.raises(UpstreamUnavailableError) as raised:
        await generations.make("busy", retries=retries, instruments=instruments).run(ListSink())

    assert raised.value.retryable
    assert "503" in raised.value.message
    assert (len(fake.requests) > 1) is calls_more_than_once
    assert instruments.retries == len(fake.requests) - 1


@pytest.mark.parametrize(
    ("model", "status", "failure"),
    [
        pytest.param("missing", None, ModelNotFoundError, id="404"),
        pytest.param("no-tools", 400, InvalidRequestError, id="400"),
    ],
)
async def test_a_request_ollama_refuses_fails_after_one_call(
    fake: FakeOllama,
    generations: Generations,
    model: str,
    status: int | None,
    failure: type[ChatError],
) -> None:
    if status is not None:  # else the fake has no such model
        fake.models[model] = Behaviour(status=status)

    with pytest.raises(failure) as raised:
        await generations.make(model, retries=QUICK_RETRIES).run(ListSink())

    assert not raised.value.retryable
    assert len(fake.requests) == 1


# ----------------------------------------------------------------------------- stopping


async def test_cancel_mid_stream_ends_in_cancelled_and_closes_the_stream(
    fake: FakeOllama, generations: Generations
) -> None:
    fake.models["endless"] = Behaviour(stall_after=2)
    generation = generations.make("endless")
    sink = ListSink()
    running = asyncio.create_task(generation.run(sink))

    await sink.wait_for_content("".join(DEFAULT_TOKENS[:2]))
    generation.cancel()
    completion = await running

    assert completion.done_reason == "cancelled"
    assert completion.message.content == "".join(DEFAULT_TOKENS[:2])
    assert completion.usage.completion_tokens == 2
    await fake.wait_aborted()


async def test_cancel_before_the_first_token(fake: FakeOllama, generations: Generations) -> None:
    fake.models["cold"] = Behaviour(first_token_delay=30.0)
    generation = generations.make("cold")
    sink = ListSink()
    running = asyncio.create_task(generation.run(sink))

    await fake.wait_for(lambda: fake.active_streams == 1)
    generation.cancel()
    completion = await running

    assert completion.done_reason == "cancelled"
    assert completion.message.content == ""
    assert sink.chunks == []
    await fake.wait_aborted()


async def test_cancel_ends_the_wait_between_retries(
    fake: FakeOllama, generations: Generations
) -> None:
    fake.models["busy"] = Behaviour(status=503)
    instruments = CountingInstruments()
    generation = generations.make(
        "busy",
        retries=Retries(budget=60.0, initial_backoff=30.0, max_backoff=30.0),
        instruments=instruments,
    )
    running = asyncio.create_task(generation.run(ListSink()))

    # Its call failed and left the pool: it waits out the backoff.
    (pool,) = generations.pools
    async with asyncio.timeout(5.0):
        while pool.statuses()[0].calls.get(CallOutcome.FAILED) != 1:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    generation.cancel()
    async with asyncio.timeout(5.0):
        completion = await running

    assert completion.done_reason == "cancelled"
    assert len(fake.requests) == 1


async def test_cancel_while_waiting_for_a_free_server(
    fake: FakeOllama, generations: Generations
) -> None:
    generation = generations.make()
    (pool,) = generations.pools
    async with pool.lease("llama3.2"):  # the server's one slot
        running = asyncio.create_task(generation.run(ListSink()))
        async with asyncio.timeout(5.0):
            while pool.waiting != 1:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        generation.cancel()
        async with asyncio.timeout(5.0):
            completion = await running

    assert completion.done_reason == "cancelled"
    assert fake.requests == []


async def test_a_sink_that_raises_stops_the_generation_and_closes_the_stream(
    fake: FakeOllama, generations: Generations
) -> None:
    fake.models["endless"] = Behaviour(stall_after=5)

    with pytest.raises(RequesterGone):
        await generations.make("endless").run(BrokenSink())

    await fake.wait_aborted()
    assert fake.completed_streams == 0
