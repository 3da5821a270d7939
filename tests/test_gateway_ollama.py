"""Ollama's API on the gateway, driven by the real `ollama` client, with the real worker and
the fake Ollama behind the bus."""

import asyncio
import base64
import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from typing import Any

import httpx
import ollama
import pytest

from chatbus.settings import Settings
from chatbus.testing import FakeOllama
from chatbus.testing.fake_ollama import DEFAULT_THINKING, DEFAULT_TOKENS
from tests.gateway_support import Gateway, running_gateway
from tests.support import model, requests_for

ANSWER = "".join(DEFAULT_TOKENS)
QUESTION = [{"role": "user", "content": "Why is the sky blue?"}]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
WEATHER_CALL = {"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}


def last_request(fake: FakeOllama, model_name: str) -> dict[str, Any]:
    return [body for body in fake.requests if body.get("model") == model_name][-1]


async def test_chat_streams_ndjson_parts_then_the_final_object(
    gateway: Gateway, fake_ollama: FakeOllama
) -> None:
    name = model(fake_ollama)
    parts = [
        part
        async for part in await gateway.ollama().chat(
            name, QUESTION, stream=True, options={"temperature": 0.2}, keep_alive="5m"
        )
    ]

    assert "".join(part.message.content or "" for part in parts) == ANSWER
    assert [part.done for part in parts] == [False] * len(DEFAULT_TOKENS) + [True]
    final = parts[-1]
    assert (final.model, final.done_reason, final.eval_count) == (name, "stop", len(DEFAULT_TOKENS))
    assert final.prompt_eval_count
    assert final.total_duration
    assert final.eval_duration
    sent = last_request(fake_ollama, name)
    assert sent["messages"] == QUESTION
    assert sent["options"]["temperature"] == 0.2
    assert sent["keep_alive"] == "5m"


async def test_chat_without_streaming_is_one_object(
    gateway: Gateway, fake_ollama: FakeOllama
) -> None:
    name = model(fake_ollama)
    response = await gateway.ollama().chat(name, QUESTION)

    assert response.message.content == ANSWER
    assert response.message.role == "assistant"
    assert (response.done, response.done_reason) == (True, "stop")
    assert response.eval_count == len(DEFAULT_TOKENS)


async def test_tools_thinking_format_and_images_pass_through(
    gateway: Gateway, fake_ollama: FakeOllama
) -> None:
    name = model(fake_ollama, tool_calls=[WEATHER_CALL])
    schema = {"type": "object", "properties": {"city": {"type": "string"}}}
    image = base64.b64encode(b"not really a png").decode()
    client = gateway.ollama()
    question = [{"role": "user", "content": "Weather in Oslo?", "images": [image]}]

    whole = await client.chat(name, question, tools=[WEATHER_TOOL], think=True, format=schema)
    streamed = [
        part
        async for part in await client.chat(
            name, question, tools=[WEATHER_TOOL], think="high", stream=True
        )
    ]

    assert whole.message.thinking == "".join(DEFAULT_THINKING)
    assert [call.model_dump() for call in whole.message.tool_calls or []] == [WEATHER_CALL]
    assert "".join(part.message.thinking or "" for part in streamed) == "".join(DEFAULT_THINKING)
    assert [call.model_dump() for part in streamed for call in part.message.tool_calls or []] == [
        WEATHER_CALL
    ]
    first, second = [body for body in fake_ollama.requests if body.get("model") == name]
    assert first["tools"] == [WEATHER_TOOL]
    assert first["format"] == schema
    assert first["think"] is True
    assert first["messages"][0]["images"] == [image]
    assert second["think"] == "high"


async def test_a_conversation_with_a_tool_result_reaches_ollama_as_sent(
    gateway: Gateway, fake_ollama: FakeOllama
) -> None:
    name = model(fake_ollama)
    conversation: list[dict[str, Any]] = [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": "Let me look.", "tool_calls": [WEATHER_CALL]},
        {"role": "tool", "content": "12 degrees", "tool_name": "get_weather"},
    ]
    await gateway.ollama().chat(name, conversation)

    assert last_request(fake_ollama, name)["messages"] == conversation


async def test_generate_answers_through_chat_in_generates_shape(
    gateway: Gateway, fake_ollama: FakeOllama
) -> None:
    name = model(fake_ollama)
    client = gateway.ollama()

    whole = await client.generate(name, "Why is the sky blue?", system="Be brief.", think=True)
    parts = [part async for part in await client.generate(name, "Why?", stream=True)]

    assert whole.response == ANSWER
    assert whole.thinking == "".join(DEFAULT_THINKING)
    assert (whole.done, whole.done_reason) == (True, "stop")
    assert whole.eval_count == len(DEFAULT_THINKING) + len(DEFAULT_TOKENS)
    assert "".join(part.response or "" for part in parts) == ANSWER
    assert parts[-1].done
    assert parts[-1].done_reason == "stop"
    assert [body["messages"] for body in fake_ollama.requests if body.get("model") == name] == [
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Why is the sky blue?"},
        ],
        [{"role": "user", "content": "Why?"}],
    ]


async def test_a_body_is_read_as_json_whatever_its_content_type(
    gateway: Gateway, fake_ollama: FakeOllama
) -> None:
    """As Ollama does: `curl -d '{...}'` sends a form type, and Ollama's examples do that."""
    name = model(fake_ollama)
    async with httpx.AsyncClient(base_url=gateway.url) as http:
        response = await http.post(
            "/api/chat",
            content=json.dumps({"model": name, "messages": QUESTION, "stream": False}),
            headers={"content-type": "application/x-www-form-urlencoded"},
        )

    assert response.status_code == 200, response.text
    assert response.json()["message"]["content"] == ANSWER


@pytest.mark.parametrize(
    ("field", "value"),
    [("raw", True), ("template", "{{ .Prompt }}"), ("context", [1, 2, 3]), ("suffix", "end")],
)
async def test_generate_refuses_what_chat_cannot_honour_naming_the_field(
    gateway: Gateway, fake_ollama: FakeOllama, field: str, value: Any
) -> None:
    name = model(fake_ollama)
    with pytest.raises(ollama.ResponseError) as raised:
        await gateway.ollama().generate(name, "Why?", **{field: value})

    assert raised.value.status_code == 400
    assert raised.value.error.startswith(f"{field} is not supported")
    assert requests_for(fake_ollama, name) == 0


async def test_tags_and_version(gateway: Gateway, fake_ollama: FakeOllama) -> None:
    name = model(fake_ollama)
    client = gateway.ollama()
    listed = await client.list()
    async with httpx.AsyncClient(base_url=gateway.url) as http:
        version = await http.get("/api/version")

    names = [entry.model for entry in listed.models]
    assert f"{name}:latest" in names
    entry = listed.models[names.index(f"{name}:latest")]
    assert entry.size
    assert entry.modified_at
    assert entry.details
    assert entry.details.family == "llama"
    assert version.status_code == 200
    assert version.json()["version"].count(".") == 2


# --- errors -------------------------------------------------------------------------------


async def read(request: Awaitable[Any], parts: list[Any] | None = None) -> None:
    """Send the request and read the answer; a streamed one part by part, into `parts`."""
    response = await request
    if isinstance(response, AsyncIterator):
        async for part in response:
            if parts is not None:
                parts.append(part)


async def ollama_error(request: Awaitable[Any]) -> ollama.ResponseError:
    """The error a request ends in."""
    with pytest.raises(ollama.ResponseError) as raised:
        await read(request)
    return raised.value


async def test_errors_before_the_answer_have_their_status(
    gateway: Gateway, fake_ollama: FakeOllama
) -> None:
    client = gateway.ollama()
    unknown = await ollama_error(client.chat("no-such-model", QUESTION))
    invalid = await ollama_error(
        client.chat(model(fake_ollama), [{"role": "robot", "content": "beep"}], stream=True)
    )
    unavailable = await ollama_error(
        client.chat(model(fake_ollama, status=503), QUESTION, stream=True)
    )
    # Not streamed: the failure comes before any byte of the answer.
    failed = await ollama_error(client.chat(model(fake_ollama, error_after=2), QUESTION))

    assert (unknown.status_code, unknown.error) == (
        404,
        'model "no-such-model" not found, try pulling it first',
    )
    assert invalid.status_code == 400
    assert "messages.0.role" in invalid.error
    assert unavailable.status_code == 503
    assert failed.status_code == 502


async def test_a_503_tells_when_to_retry(gateway: Gateway, fake_ollama: FakeOllama) -> None:
    busy = model(fake_ollama, status=503)
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as http:
        response = await http.post("/api/chat", json={"model": busy, "messages": QUESTION})

    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert response.json() == {"error": response.json()["error"]}


async def test_an_error_after_the_answer_began_ends_the_stream_with_an_error_line(
    gateway: Gateway, fake_ollama: FakeOllama
) -> None:
    broken = model(fake_ollama, error_after=2, error_message="the GPU fell over")
    seen: list[ollama.ChatResponse] = []
    with pytest.raises(ollama.ResponseError) as raised:
        await read(gateway.ollama().chat(broken, QUESTION, stream=True), seen)

    assert [part.message.content for part in seen] == list(DEFAULT_TOKENS[:2])
    assert "the GPU fell over" in raised.value.error


async def test_the_gateway_timeout_is_the_requests_deadline(
    worker: Settings, fake_ollama: FakeOllama
) -> None:
    cold = model(fake_ollama, first_token_delay=30.0)
    aborted = fake_ollama.aborted_streams
    async with running_gateway(worker, gateway_timeout=0.5) as gateway:
        error = await ollama_error(gateway.ollama().chat(cold, QUESTION))

    assert error.status_code == 504
    await fake_ollama.wait_aborted(aborted + 1, timeout=5)  # the worker stopped at it too


# --- a client that leaves -----------------------------------------------------------------


async def test_a_client_leaving_mid_stream_stops_the_generation(
    gateway: Gateway, fake_ollama: FakeOllama
) -> None:
    slow = model(fake_ollama, token_delay=0.05, tokens=[f"t{i} " for i in range(400)])
    aborted = fake_ollama.aborted_streams
    stream = await gateway.ollama().chat(slow, QUESTION, stream=True)
    assert isinstance(stream, AsyncGenerator)
    first = await anext(stream)
    await stream.aclose()

    assert first.message.content == "t0 "
    await fake_ollama.wait_aborted(aborted + 1, timeout=5)


async def test_a_client_leaving_before_the_first_token_stops_the_generation(
    gateway: Gateway, fake_ollama: FakeOllama
) -> None:
    cold = model(fake_ollama, first_token_delay=30.0)
    aborted = fake_ollama.aborted_streams
    waiting = asyncio.create_task(gateway.ollama().chat(cold, QUESTION))
    await fake_ollama.wait_for(lambda: requests_for(fake_ollama, cold) == 1)
    waiting.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await waiting

    await fake_ollama.wait_aborted(aborted + 1, timeout=5)
