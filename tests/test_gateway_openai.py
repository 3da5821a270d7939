"""OpenAI's chat completions API on the gateway, driven by the real `openai` client, with the
real worker and the fake Ollama behind the bus."""

import base64
import json
from typing import Any, cast

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionChunk

from chatbus.testing import FakeOllama
from chatbus.testing.fake_ollama import DEFAULT_THINKING, DEFAULT_TOKENS
from tests.gateway_support import Gateway
from tests.support import model, requests_for

ANSWER = "".join(DEFAULT_TOKENS)
QUESTION: list[Any] = [{"role": "user", "content": "Why is the sky blue?"}]
WEATHER_TOOL: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


def last_request(fake: FakeOllama, model_name: str) -> dict[str, Any]:
    return [body for body in fake.requests if body.get("model") == model_name][-1]


async def chunks_of(stream: openai.AsyncStream[ChatCompletionChunk]) -> list[ChatCompletionChunk]:
    return [chunk async for chunk in stream]


async def test_a_completion_without_streaming(gateway: Gateway, fake_ollama: FakeOllama) -> None:
    name = model(fake_ollama)
    completion = await gateway.openai().chat.completions.create(model=name, messages=QUESTION)

    assert completion.id.startswith("chatcmpl-")
    assert completion.object == "chat.completion"
    assert completion.model == name
    [choice] = completion.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == ANSWER
    assert choice.finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == len(DEFAULT_TOKENS)
    assert completion.usage.total_tokens == (
        completion.usage.prompt_tokens + completion.usage.completion_tokens
    )


async def test_a_streamed_completion_with_usage(gateway: Gateway, fake_ollama: FakeOllama) -> None:
    name = model(fake_ollama)
    chunks = await chunks_of(
        await gateway.openai().chat.completions.create(
            model=name, messages=QUESTION, stream=True, stream_options={"include_usage": True}
        )
    )

    *answer, usage = chunks
    assert {chunk.id for chunk in chunks} == {chunks[0].id}
    assert {chunk.object for chunk in chunks} == {"chat.completion.chunk"}
    assert answer[0].choices[0].delta.role == "assistant"
    assert "".join(chunk.choices[0].delta.content or "" for chunk in answer) == ANSWER
    assert [chunk.choices[0].finish_reason for chunk in answer] == [None] * (len(answer) - 1) + [
        "stop"
    ]
    assert usage.choices == []
    assert usage.usage is not None
    assert usage.usage.completion_tokens == len(DEFAULT_TOKENS)


async def test_sampling_fields_and_token_limit_become_ollama_options(
    gateway: Gateway, fake_ollama: FakeOllama
) -> None:
    name = model(fake_ollama)
    completion = await gateway.openai().chat.completions.create(
        model=name,
        messages=[{"role": "developer", "content": "Be brief."}, *QUESTION],
        max_completion_tokens=3,
        temperature=0.2,
        top_p=0.9,
        seed=7,
        stop="\n\n",
        presence_penalty=0.5,
    )

    assert completion.choices[0].finish_reason == "length"
    assert completion.choices[0].message.content == "".join(DEFAULT_TOKENS[:3])
    sent = last_request(fake_ollama, name)
    assert sent["options"] == {
        "num_predict": 3,
        "temperature": 0.2,
        "top_p": 0.9,
        "seed": 7,
        "stop": ["\n\n"],
        "presence_penalty": 0.5,
    }
    assert sent["messages"][0] == {"role": "system", "content": "Be brief."}


async def test_tool_calls_whole_and_streamed_and_the_results_sent_back(
    gateway: Gateway, fake_ollama: FakeOllama
) -> None:
    call = {"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}
    name = model(fake_ollama, tool_calls=[call])
    client = gateway.openai()
    completion = await client.chat.completions.create(
        model=name, messages=QUESTION, tools=[WEATHER_TOOL]
    )
    streamed = await chunks_of(
        await client.chat.completions.create(
            model=name, messages=QUESTION, tools=[WEATHER_TOOL], stream=True
        )
    )
    [tool_call] = completion.choices[0].message.tool_calls or []
    assert tool_call.type == "function"
    assert tool_call.function.name == "get_weather"
    assert json.loads(tool_call.function.arguments) == {"city": "Oslo"}
    assert tool_call.id.startswith("call_")
    assert completion.choices[0].finish_reason == "tool_calls"
    [streamed_call] = [c for chunk in streamed for c in chunk.choices[0].delta.tool_calls or []]
    assert streamed_call.index == 0
    assert streamed_call.function is not None
    assert json.loads(streamed_call.function.arguments or "") == {"city": "Oslo"}
    assert streamed[-1].choices[0].finish_reason == "tool_calls"

    await client.chat.completions.create(
        model=name,
        messages=[
            *QUESTION,
            cast(Any, completion.choices[0].message.model_dump(exclude_none=True)),
            {"role": "tool", "tool_call_id": tool_call.id, "content": "12 degrees"},
        ],
        tools=[WEATHER_TOOL],
    )

    sent = last_request(fake_ollama, name)
    assert sent["tools"] == [WEATHER_TOOL]
    assert sent["messages"][1:] == [
        {"role": "assistant", "content": ANSWER, "tool_calls": [call]},
        {"role": "tool", "content": "12 degrees", "tool_name": "get_weather"},
    ]


async def test_response_formats_become_ollamas_format(
    gateway: Gateway, fake_ollama: FakeOllama
) -> None:
    name = model(fake_ollama)
    schema: Any = {"type": "object", "properties": {"colour": {"type": "string"}}}
    client = gateway.openai()
    await client.chat.completions.create(
        model=name,
        messages=QUESTION,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "answer", "schema": schema, "strict": True},
        },
    )
    await client.chat.completions.create(
        model=name, messages=QUESTION, response_format={"type": "json_object"}
    )

    with_schema, with_json = [body for body in fake_ollama.requests if body.get("model") == name]
    assert with_schema["format"] == schema
    assert with_json["format"] == "json"


async def test_images_and_reasoning(gateway: Gateway, fake_ollama: FakeOllama) -> None:
    name = model(fake_ollama)
    image = base64.b64encode(b"not really a png").decode()
    completion = await gateway.openai().chat.completions.create(
        model=name,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is in it?"},
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
                ],
            }
        ],
        reasoning_effort="high",
    )

    sent = last_request(fake_ollama, name)
    assert sent["messages"] == [{"role": "user", "content": "What is in it?", "images": [image]}]
    assert sent["think"] == "high"
    message = completion.choices[0].message
    assert (message.model_extra or {})["reasoning"] == "".join(DEFAULT_THINKING)
    assert message.content == ANSWER


async def test_models_lists_what_the_workers_ollama_has(
    gateway: Gateway, fake_ollama: FakeOllama
) -> None:
    name = model(fake_ollama)
    models = [entry async for entry in gateway.openai().models.list()]

    assert f"{name}:latest" in [entry.id for entry in models]
    assert {entry.object for entry in models} == {"model"}


# --- errors -------------------------------------------------------------------------------


async def test_errors_have_openais_shape_and_status(
    gateway: Gateway, fake_ollama: FakeOllama
) -> None:
    client = gateway.openai()
    name = model(fake_ollama)
    cases: dict[str, tuple[type[openai.APIStatusError], dict[str, Any]]] = {
        "unknown model": (openai.NotFoundError, {"model": "no-such-model"}),
        "several choices": (openai.BadRequestError, {"n": 2}),
        "no messages": (openai.BadRequestError, {"messages": []}),
        "a forced tool call": (
            openai.BadRequestError,
            {"tools": [WEATHER_TOOL], "tool_choice": "required"},
        ),
        "an image by URL": (
            openai.BadRequestError,
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}],
                    }
                ]
            },
        ),
        "upstream unavailable": (
            openai.InternalServerError,
            {"model": model(fake_ollama, status=503)},
        ),
        "upstream error": (
            openai.InternalServerError,
            {"model": model(fake_ollama, error_after=1)},
        ),
    }
    errors = {}
    for case, (error_class, fields) in cases.items():
        with pytest.raises(error_class) as raised:
            await client.chat.completions.create(**({"model": name, "messages": QUESTION} | fields))
        errors[case] = raised.value

    def what(case: str) -> tuple[int, Any, Any]:
        body = errors[case].body
        assert isinstance(body, dict)
        assert set(body) == {"message", "type", "param", "code"}
        return errors[case].status_code, body["code"], body["param"]

    assert what("unknown model") == (404, "model_not_found", None)
    assert what("several choices") == (400, "invalid_request", "n")
    assert what("no messages") == (400, "invalid_request", "messages")
    assert what("a forced tool call") == (400, "invalid_request", "tool_choice")
    assert what("an image by URL") == (400, "invalid_request", "messages.0.content.0.image_url.url")
    assert what("upstream unavailable") == (503, "upstream_unavailable", None)
    assert errors["upstream unavailable"].response.headers["retry-after"] == "1"
    assert what("upstream error") == (502, "upstream_error", None)
    assert requests_for(fake_ollama, name) == 0  # nothing refused reached Ollama


async def test_an_error_after_the_stream_began_is_an_error_event(
    gateway: Gateway, fake_ollama: FakeOllama
) -> None:
    broken = model(fake_ollama, error_after=2, error_message="the GPU fell over")
    stream = await gateway.openai().chat.completions.create(
        model=broken, messages=QUESTION, stream=True
    )
    with pytest.raises(openai.APIError) as raised:
        await chunks_of(stream)

    assert "the GPU fell over" in raised.value.message
    assert isinstance(raised.value.body, dict)
    assert raised.value.body["code"] == "upstream_error"


async def test_the_raw_stream_ends_with_the_error_event_and_no_done(
    gateway: Gateway, fake_ollama: FakeOllama
) -> None:
    broken = model(fake_ollama, error_after=1)
    async with (
        httpx.AsyncClient(base_url=gateway.url) as http,
        http.stream(
            "POST",
            "/v1/chat/completions",
            json={"model": broken, "messages": QUESTION, "stream": True},
        ) as response,
    ):
        events = [line async for line in response.aiter_lines() if line]

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert json.loads(events[0].removeprefix("data: "))["choices"][0]["delta"]["content"]
    assert json.loads(events[-1].removeprefix("data: "))["error"]["code"] == "upstream_error"
    assert "data: [DONE]" not in events


async def test_a_client_leaving_mid_stream_stops_the_generation(
    gateway: Gateway, fake_ollama: FakeOllama
) -> None:
    slow = model(fake_ollama, token_delay=0.05, tokens=[f"t{i} " for i in range(400)])
    aborted = fake_ollama.aborted_streams
    stream = await gateway.openai().chat.completions.create(
        model=slow, messages=QUESTION, stream=True
    )
    first = await anext(aiter(stream))
    await stream.close()

    assert first.choices[0].delta.content == "t0 "
    await fake_ollama.wait_aborted(aborted + 1, timeout=5)
