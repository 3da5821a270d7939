"""The gateway's parts that need no broker: the status of each error, the translation of
OpenAI's requests, and how an answer is written when the client leaves or the request is
restarted."""

import asyncio
import json
from collections.abc import AsyncGenerator
from typing import Any

import pytest
from pydantic import ValidationError
from starlette.types import Message

from chatbus.client import ChatEvent, Restarted
from chatbus.contract import ChatRequest, ChunkReply, DoneReply
from chatbus.errors import (
    ChatError,
    ChatTimeoutError,
    DeadlineExceededError,
    InternalError,
    InvalidRequestError,
    ModelNotFoundError,
    ServiceUnavailableError,
    UpstreamError,
    UpstreamUnavailableError,
    validation_problems,
)
from chatbus.gateway.answers import Answer
from chatbus.gateway.errors import Failure, Refused
from chatbus.gateway.ollama_api import ChatFormat
from chatbus.gateway.openai_api import CompletionBody, CompletionFormat, contract_values
from chatbus.gateway.sessions import HistoryUnavailable


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (InvalidRequestError, 400),
        (ModelNotFoundError, 404),
        (InternalError, 500),
        (UpstreamError, 502),
        (UpstreamUnavailableError, 503),
        (ServiceUnavailableError, 503),
        (ChatTimeoutError, 504),
        (DeadlineExceededError, 504),
        (HistoryUnavailable, 503),  # a subclass: its parent's status, its own code
    ],
)
def test_each_error_code_has_its_status(error: type[ChatError], status: int) -> None:
    failure = Failure.of(error("what happened", retryable=False))

    assert (failure.status, failure.code, failure.message) == (status, error.code, "what happened")
    assert ("Retry-After" in failure.headers) == (status == 503)


def test_validation_problems_name_the_fields_and_never_repeat_the_input() -> None:
    secret = "the user's private words"
    with pytest.raises(ValidationError) as raised:
        ChatRequest.model_validate({"messages": [{"role": "robot", "content": secret}], "x": 1})
    fastapi_places = [{**e, "loc": ("body", *e["loc"])} for e in raised.value.errors()]

    for errors in (raised.value.errors(), fastapi_places):
        message, field = validation_problems(errors)
        assert message.startswith("messages.0.role: Input should be")
        assert "; x: Extra inputs are not permitted" in message
        assert secret not in message
        assert field == "messages.0.role"
    assert validation_problems([{"loc": (), "msg": "not an object"}]) == (
        "body: not an object",
        None,
    )


# --- OpenAI's requests as the contract's ----------------------------------------------------


def translate(**fields: Any) -> dict[str, Any]:
    body = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]} | fields
    return contract_values(CompletionBody.model_validate(body))


def refusal(**fields: Any) -> Failure:
    with pytest.raises(Refused) as raised:
        translate(**fields)
    return raised.value.failure


def test_messages_become_ollamas() -> None:
    values = translate(
        messages=[
            {"role": "developer", "content": "Be brief."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is"},
                    {"type": "text", "text": "in it?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,QUJD"}},
                ],
            },
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "look", "arguments": '{"closer": true}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "a cat"},
        ]
    )

    assert values["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is\nin it?", "images": ["QUJD"]},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "look", "arguments": {"closer": True}}}],
        },
        {"role": "tool", "content": "a cat", "tool_name": "look"},
    ]


def test_sampling_limits_formats_and_reasoning_become_ollamas() -> None:
    values = translate(
        max_tokens=10,
        temperature=0.5,
        stop=["END"],
        frequency_penalty=0.1,
        response_format={"type": "json_object"},
        reasoning_effort="minimal",
        tools=[{"type": "function", "function": {"name": "look"}}],
        tool_choice="auto",
    )

    assert values["options"] == {
        "num_predict": 10,
        "temperature": 0.5,
        "stop": ["END"],
        "frequency_penalty": 0.1,
    }
    assert values["format"] == "json"
    assert values["think"] == "low"
    assert values["tools"] == [{"type": "function", "function": {"name": "look"}}]
    assert translate(max_tokens=10, max_completion_tokens=20)["options"] == {"num_predict": 20}
    assert translate(reasoning_effort="none")["think"] is False
    assert (
        translate(tools=[{"type": "function", "function": {}}], tool_choice="none")["tools"] is None
    )


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"n": 3}, "n"),
        ({"logprobs": True}, "logprobs"),
        ({"response_format": {"type": "json_schema", "json_schema": {}}}, None),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        (
            {
                "tools": [{"type": "function", "function": {"name": "x"}}],
                "tool_choice": {"type": "function", "function": {"name": "x"}},
            },
            "tool_choice",
        ),
        ({"tools": [{"type": "web_search"}]}, "tools.0"),
        ({"messages": [{"role": "function", "content": "x"}]}, "messages.0.role"),
        (
            {
                "messages": [
                    {
                        "role": "assistant",
                        "tool_calls": [{"function": {"name": "f", "arguments": "not json"}}],
                    }
                ]
            },
            "messages.0.tool_calls.0.function.arguments",
        ),
        (
            {"messages": [{"role": "system", "content": [{"type": "image_url"}]}]},
            "messages.0.content.0.type",
        ),
    ],
)
def test_what_cannot_be_honoured_is_refused_naming_the_field(
    fields: dict[str, Any], param: str | None
) -> None:
    failure = refusal(**fields)

    assert failure.status == 400
    assert failure.param == (param or "response_format.json_schema.schema")


# --- writing an answer ---------------------------------------------------------------------


def chunk(seq: int, content: str, attempt: int = 1) -> ChunkReply:
    return ChunkReply(correlation_id="c", attempt=attempt, seq=seq, content=content)


def done(content: str) -> DoneReply:
    return DoneReply.model_validate(
        {
            "correlation_id": "c",
            "seq": 9,
            "done_reason": "stop",
            "model": "llama3.2",
            "message": {"role": "assistant", "content": content},
            "usage": {"prompt_tokens": 3, "completion_tokens": 2},
            "timings": {},
        }
    )


class Recording:
    """What an `Answer` sends, with a client that leaves when `leave` is set."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.leave = asyncio.Event()
        self.part_sent = asyncio.Event()
        self.closed = False

    async def receive(self) -> Message:
        await self.leave.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        self.messages.append(message)
        if message.get("body"):
            self.part_sent.set()

    @property
    def status(self) -> int:
        return int(self.messages[0]["status"])

    def lines(self) -> list[dict[str, Any]]:
        body = b"".join(m.get("body", b"") for m in self.messages[1:])
        return [json.loads(line) for line in body.splitlines() if line]

    async def events(self, *events: ChatEvent | ChatError) -> AsyncGenerator[ChatEvent, None]:
        try:
            for event in events:
                if isinstance(event, ChatError):
                    raise event
                yield event
            await asyncio.Event().wait()  # no more: an answer still being generated
        finally:
            self.closed = True


async def respond(
    recording: Recording, *events: ChatEvent | ChatError, stream: bool = True
) -> dict[str, Any]:
    log: dict[str, Any] = {}
    answer = Answer(recording.events(*events), ChatFormat("llama3.2"), stream=stream, log=log)
    await answer({"type": "http"}, recording.receive, recording.send)
    return log


async def test_a_streamed_answer_is_ndjson_parts_then_the_final_object() -> None:
    recording = Recording()
    log = await respond(recording, chunk(0, "Blue"), chunk(1, "."), done("Blue."))

    assert recording.status == 200
    assert [line["message"]["content"] for line in recording.lines()] == ["Blue", ".", ""]
    assert recording.lines()[-1]["done"] is True
    assert recording.messages[-1] == {"type": "http.response.body", "body": b"", "more_body": False}
    assert log["outcome"] == "stop"
    assert recording.closed


async def test_a_failure_before_the_first_part_is_an_error_response() -> None:
    recording = Recording()
    log = await respond(recording, ModelNotFoundError("no such model", retryable=False))

    assert recording.status == 404
    assert recording.lines() == [{"error": "no such model"}]
    assert log["outcome"] == "model_not_found"


async def test_a_restart_after_parts_were_sent_ends_the_stream_with_an_error() -> None:
    recording = Recording()
    log = await respond(
        recording,
        chunk(0, "Blue"),
        Restarted(correlation_id="c", attempt=2),
        chunk(0, "Red", attempt=2),
    )

    lines = recording.lines()
    assert [line.get("message", {}).get("content") for line in lines[:-1]] == ["Blue"]
    assert "stopped mid-answer" in lines[-1]["error"]
    assert log["outcome"] == "answer_restarted"
    assert recording.closed  # which cancels the second attempt


async def test_a_restart_before_anything_was_sent_is_hidden() -> None:
    recording = Recording()
    await respond(
        recording, Restarted(correlation_id="c", attempt=2), chunk(0, "Red", 2), done("Red")
    )

    assert [line["message"]["content"] for line in recording.lines()] == ["Red", ""]


async def test_a_client_that_leaves_closes_the_answer() -> None:
    recording = Recording()
    responding = asyncio.create_task(respond(recording, chunk(0, "Blue")))
    await asyncio.wait_for(recording.part_sent.wait(), 5)
    recording.leave.set()
    log = await asyncio.wait_for(responding, 5)

    assert log["outcome"] == "disconnected"
    assert recording.closed


async def test_a_client_that_leaves_before_the_first_part_closes_the_answer() -> None:
    recording = Recording()
    responding = asyncio.create_task(respond(recording, stream=False))
    recording.leave.set()
    log = await asyncio.wait_for(responding, 5)

    assert recording.messages == []
    assert log["outcome"] == "disconnected"
    assert recording.closed


def test_openai_chunks_carry_the_role_first_and_the_finish_reason_last() -> None:
    answer_format = CompletionFormat("llama3.2", "chatcmpl-1", include_usage=True)
    first = answer_format.chunk(chunk(0, "Blue"))
    end = answer_format.end(done("Blue"))

    events = [e.removeprefix(b"data: ") for e in (first + end).split(b"\n\n") if e]
    assert events[-1] == b"[DONE]"
    parsed = [json.loads(event) for event in events[:-1]]
    assert parsed[0]["choices"][0]["delta"] == {"role": "assistant", "content": "Blue"}
    assert parsed[1]["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "stop",
    }
    assert parsed[2]["choices"] == []
    assert parsed[2]["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
