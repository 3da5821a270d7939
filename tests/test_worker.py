"""The worker end to end: real RabbitMQ, the real worker, the fake Ollama over HTTP."""

import json
import uuid
from typing import Any

import pika
from aio_pika.abc import AbstractRobustConnection

from chatbus.settings import Settings
from chatbus.testing import Behaviour, FakeOllama
from chatbus.testing.fake_ollama import DEFAULT_THINKING, DEFAULT_TOKENS
from tests.support import DIRECT_REPLY_TO, Requester, assert_well_formed, streamed_text, user


async def test_streams_the_whole_answer_in_order(requester: Requester) -> None:
    correlation_id = uuid.uuid4().hex
    replies = await requester.chat(user(), correlation_id=correlation_id)

    assert_well_formed(replies, correlation_id)
    assert len(replies) > 2
    assert streamed_text(replies) == "".join(DEFAULT_TOKENS)
    done = replies[-1]
    assert done["type"] == "done"
    assert done["done_reason"] == "stop"
    assert done["model"] == "llama3.2"
    assert done["message"] == {"role": "assistant", "content": "".join(DEFAULT_TOKENS)}
    assert done["usage"]["completion_tokens"] == len(DEFAULT_TOKENS)
    assert done["usage"]["prompt_tokens"] > 0
    assert done["timings"]["total_duration"] > 0
    assert all(r["attempt"] == 1 for r in replies)


async def test_replies_go_to_the_reply_to_queue(requester: Requester) -> None:
    replies = await requester.chat(user(), reply_to=f"replies-{uuid.uuid4().hex}")

    assert_well_formed(replies)
    assert streamed_text(replies) == "".join(DEFAULT_TOKENS)


async def test_replies_go_to_direct_reply_to(requester: Requester) -> None:
    replies = await requester.chat(user(), reply_to=DIRECT_REPLY_TO)

    assert_well_formed(replies)
    assert replies[-1]["type"] == "done"
    assert streamed_text(replies) == "".join(DEFAULT_TOKENS)


async def test_message_id_stands_in_for_a_missing_correlation_id(requester: Requester) -> None:
    message_id = uuid.uuid4().hex
    replies = await requester.chat(user(), message_id=message_id)

    assert_well_formed(replies, message_id)


async def test_stream_false_replies_with_done_only(requester: Requester) -> None:
    replies = await requester.chat(user(stream=False))

    assert len(replies) == 1
    assert replies[0]["type"] == "done"
    assert replies[0]["seq"] == 0
    assert replies[0]["message"]["content"] == "".join(DEFAULT_TOKENS)


async def test_request_fields_reach_ollama_unchanged(
    requester: Requester, fake_ollama: FakeOllama
) -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather in a city",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string", "description": "City"}},
                    "required": ["city"],
                },
            },
        }
    ]
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}}
    options = {"temperature": 0.1, "seed": 7, "num_ctx": 4096, "num_predict": 100}
    history: list[dict[str, Any]] = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}],
        },
        {"role": "tool", "content": "cold", "tool_name": "get_weather"},
    ]
    correlation_id = uuid.uuid4().hex
    await requester.chat(
        {
            "messages": history,
            "tools": tools,
            "format": schema,
            "options": options,
            "think": True,
            "keep_alive": "10m",
        },
        correlation_id=correlation_id,
    )

    # The official client leaves out empty content, so the assistant turn arrives without it.
    expected_messages = [{k: v for k, v in m.items() if v != ""} for m in history]
    sent = next(r for r in reversed(fake_ollama.requests) if r["messages"] == expected_messages)
    assert sent["tools"] == tools
    assert sent["format"] == schema
    assert sent["options"] == options
    assert sent["think"] is True
    assert sent["keep_alive"] == "10m"
    assert sent["model"] == "llama3.2"


async def test_num_predict_is_capped_when_the_request_sets_none(
    requester: Requester, fake_ollama: FakeOllama, worker: Settings
) -> None:
    content = f"cap {uuid.uuid4().hex}"
    await requester.chat(user(content, options={"temperature": 0.5}))

    sent = next(r for r in fake_ollama.requests if r["messages"][0]["content"] == content)
    assert sent["options"] == {"temperature": 0.5, "num_predict": worker.max_num_predict}


async def test_thinking_and_tool_calls_are_streamed(
    requester: Requester, fake_ollama: FakeOllama
) -> None:
    call = {"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}
    fake_ollama.models["tool-model"] = Behaviour(tool_calls=[call])
    tools = [{"type": "function", "function": {"name": "get_weather"}}]
    replies = await requester.chat(user(model="tool-model", think=True, tools=tools))

    assert_well_formed(replies)
    thinking = "".join(r.get("thinking", "") for r in replies if r["type"] == "chunk")
    assert thinking == "".join(DEFAULT_THINKING)
    assert [r["tool_calls"] for r in replies if r.get("tool_calls")] == [[call]]
    done = replies[-1]
    assert done["message"]["thinking"] == "".join(DEFAULT_THINKING)
    assert done["message"]["tool_calls"] == [call]


async def test_unknown_model_is_model_not_found(requester: Requester) -> None:
    replies = await requester.chat(user(model="no-such-model"))

    assert_well_formed(replies)
    error = replies[-1]
    assert error["type"] == "error"
    assert error["code"] == "model_not_found"
    assert error["retryable"] is False
    assert "no-such-model" in error["message"]


async def test_invalid_json_is_answered_and_the_next_request_served(
    requester: Requester,
) -> None:
    replies = await requester.chat(b'{"messages": [')

    assert_well_formed(replies)
    assert replies[-1]["type"] == "error"
    assert replies[-1]["code"] == "invalid_request"
    assert replies[-1]["retryable"] is False
    assert "JSON" in replies[-1]["message"]

    assert (await requester.chat(user()))[-1]["type"] == "done"


async def test_schema_violations_are_invalid_requests(requester: Requester) -> None:
    cases: dict[str, dict[str, Any]] = {
        "messages": {"model": "llama3.2"},
        "messages.0.role": {"messages": [{"role": "robot", "content": "hi"}]},
        "temprature": {"messages": [{"role": "user", "content": "hi"}], "temprature": 1},
        "at least 1": {"messages": []},
    }
    for expected_in_message, body in cases.items():
        replies = await requester.chat(body)
        assert replies[-1]["code"] == "invalid_request", body
        assert expected_in_message in replies[-1]["message"], replies[-1]["message"]


async def test_request_without_any_id_is_dead_lettered(
    requester: Requester, amqp: AbstractRobustConnection
) -> None:
    # aio-pika always sets a message_id; pika publishes the bare message other clients may send.
    payload = json.dumps(user(f"orphan {uuid.uuid4().hex}")).encode()
    with pika.BlockingConnection(pika.URLParameters(requester.settings.rabbitmq_url)) as blocking:
        blocking.channel().basic_publish(
            "",
            requester.settings.requests_queue,
            payload,
            pika.BasicProperties(content_type="application/json"),
        )
    channel = await amqp.channel()
    dlq = await channel.get_queue(requester.settings.dead_letter_queue)
    async with dlq.iterator(timeout=10) as messages:
        async for message in messages:
            await message.ack()
            if message.body == payload:
                break
    await channel.close()
