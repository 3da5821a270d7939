"""OpenAI's chat completions API, answered through the bus: `POST /v1/chat/completions`
(streamed as server-sent events, or one JSON object) and `GET /v1/models`.

Requests are translated to the contract's (Ollama's) fields: `response_format` becomes
`format`, `max_completion_tokens`/`max_tokens` `options.num_predict`, the sampling fields
`options`, `reasoning_effort` `think`; a model's thinking comes back as `reasoning`, as
Ollama's own OpenAI endpoint returns it. What cannot be honoured (several choices, log
probabilities, a forced tool call, images by URL) is refused with 400 naming the field.
"""

import json
import time
import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from chatbus.contract import ChunkReply, DoneReply, ToolCall
from chatbus.gateway.answers import Answer, answer
from chatbus.gateway.auth import Authenticate
from chatbus.gateway.bus import Bus
from chatbus.gateway.errors import OPENAI_ERRORS, invalid, sse_event


class StreamOptions(BaseModel):
    include_usage: bool = False


class CompletionBody(BaseModel):
    """The request fields the gateway reads; others are ignored."""

    model: str = Field(min_length=1)
    messages: list[dict[str, Any]] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = (
        None
    )
    n: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None


def contract_values(body: CompletionBody) -> dict[str, Any]:
    """The contract's request fields for an OpenAI request, or 400 naming what cannot be
    honoured."""
    if body.n not in (None, 1):
        raise invalid("n: only one choice is generated", "n")
    if body.logprobs or body.top_logprobs:
        raise invalid("logprobs: log probabilities are not available", "logprobs")
    return {
        "model": body.model,
        "messages": _messages(body.messages),
        "tools": _tools(body),
        "format": _format(body.response_format),
        "options": _options(body) or None,
        "think": _think(body.reasoning_effort),
        "stream": body.stream,
    }


def _options(body: CompletionBody) -> dict[str, Any]:
    options: dict[str, Any] = {
        "num_predict": body.max_completion_tokens or body.max_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "seed": body.seed,
        "stop": [body.stop] if isinstance(body.stop, str) else body.stop,
        "frequency_penalty": body.frequency_penalty,
        "presence_penalty": body.presence_penalty,
    }
    return {name: value for name, value in options.items() if value is not None}


def _think(effort: str | None) -> bool | str | None:
    """OpenAI's reasoning efforts as Ollama's think levels (low, medium, high)."""
    if effort is None:
        return None
    if effort == "none":
        return False
    return {"minimal": "low", "xhigh": "high", "max": "high"}.get(effort, effort)


def _format(response_format: dict[str, Any] | None) -> str | dict[str, Any] | None:
    kind = (response_format or {}).get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return "json"
    if kind == "json_schema":
        schema = ((response_format or {}).get("json_schema") or {}).get("schema")
        if not isinstance(schema, dict):
            raise invalid(
                "response_format.json_schema.schema: a JSON schema object is required",
                "response_format.json_schema.schema",
            )
        return schema
    raise invalid(
        f"response_format.type: {kind!r} is not one of text, json_object, json_schema",
        "response_format.type",
    )


def _tools(body: CompletionBody) -> list[dict[str, Any]] | None:
    choice = body.tool_choice
    if choice == "none" or not body.tools:
        return None
    if choice not in (None, "auto"):
        raise invalid(
            "tool_choice: only auto and none: a model cannot be made to call", "tool_choice"
        )
    for index, tool in enumerate(body.tools):
        if tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise invalid(f"tools.{index}: only function tools", f"tools.{index}")
    return [{"type": "function", "function": tool["function"]} for tool in body.tools]


def _messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI's messages as Ollama's: content parts flattened to text and base64 images,
    tool calls' JSON arguments parsed, tool results named after the call they answer."""
    tool_names: dict[str, str] = {}
    converted: list[dict[str, Any]] = []
    for index, message in enumerate(messages):
        where = f"messages.{index}"
        role = message.get("role")
        text, images = _content(message.get("content"), where, images_allowed=role == "user")
        if role in ("system", "developer"):
            converted.append({"role": "system", "content": text})
        elif role == "user":
            converted.append({"role": "user", "content": text, "images": images or None})
        elif role == "assistant":
            calls = _tool_calls(message.get("tool_calls") or [], where, tool_names)
            converted.append({"role": "assistant", "content": text, "tool_calls": calls or None})
        elif role == "tool":
            name = tool_names.get(str(message.get("tool_call_id")))
            converted.append({"role": "tool", "content": text, "tool_name": name})
        else:
            raise invalid(
                f"{where}.role: {role!r} is not one of system, developer, user, assistant, tool",
                f"{where}.role",
            )
    return converted


def _content(content: Any, where: str, *, images_allowed: bool) -> tuple[str, list[str]]:
    """A message's text and its images (base64), from a string or a list of parts."""
    if content is None or isinstance(content, str):
        return content or "", []
    if not isinstance(content, list):
        raise invalid(f"{where}.content: a string or a list of parts", f"{where}.content")
    texts, images = [], []
    for index, part in enumerate(content):
        at = f"{where}.content.{index}"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            texts.append(str(part.get("text", "")))
        elif kind == "image_url" and images_allowed:
            url = str((part.get("image_url") or {}).get("url", ""))
            header, comma, data = url.partition(",")
            if not (header.startswith("data:") and header.endswith(";base64") and comma):
                raise invalid(
                    f"{at}.image_url.url: only base64 data: URLs (no downloads)",
                    f"{at}.image_url.url",
                )
            images.append(data)
        else:
            raise invalid(f"{at}.type: {kind!r} parts are not supported here", f"{at}.type")
    return "\n".join(texts), images


def _tool_calls(calls: list[Any], where: str, tool_names: dict[str, str]) -> list[dict[str, Any]]:
    converted = []
    for index, call in enumerate(calls):
        at = f"{where}.tool_calls.{index}.function"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            raise invalid(f"{at}: a function call is required", at)
        arguments = function.get("arguments") or "{}"
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError:
                arguments = None
        if not isinstance(arguments, dict):
            raise invalid(f"{at}.arguments: a JSON object is required", f"{at}.arguments")
        name = str(function.get("name", ""))
        tool_names[str(call.get("id"))] = name
        converted.append({"function": {"name": name, "arguments": arguments}})
    return converted


def _openai_tool_calls(calls: list[ToolCall], first_index: int) -> list[dict[str, Any]]:
    return [
        {
            "index": first_index + offset,
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {
                "name": call.function.name,
                "arguments": json.dumps(call.function.arguments, ensure_ascii=False),
            },
        }
        for offset, call in enumerate(calls)
    ]


def _finish_reason(done: DoneReply, called_tools: bool) -> str:
    if called_tools:
        return "tool_calls"
    return "length" if done.done_reason == "length" else "stop"


def _usage(done: DoneReply) -> dict[str, int]:
    prompt, completion = done.usage.prompt_tokens, done.usage.completion_tokens
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


class CompletionFormat:
    """Chat completion chunks as server-sent events: the role on the first delta, the
    finish reason on the last, a usage chunk when asked for, then `[DONE]`."""

    media_type = "text/event-stream; charset=utf-8"
    errors = OPENAI_ERRORS

    def __init__(self, model: str, completion_id: str, *, include_usage: bool) -> None:
        self._model = model
        self._id = completion_id
        self._created = int(time.time())
        self._include_usage = include_usage
        self._role_sent = False
        self._tool_calls_sent = 0

    def chunk(self, chunk: ChunkReply) -> bytes:
        delta = self._delta()
        if chunk.content or not (chunk.thinking or chunk.tool_calls):
            delta["content"] = chunk.content
        if chunk.thinking:
            delta["reasoning"] = chunk.thinking
        if chunk.tool_calls:
            delta["tool_calls"] = _openai_tool_calls(chunk.tool_calls, self._tool_calls_sent)
            self._tool_calls_sent += len(chunk.tool_calls)
        return sse_event(self._completion_chunk([self._choice(delta, None)]))

    def end(self, done: DoneReply) -> bytes:
        finish = _finish_reason(done, self._tool_calls_sent > 0)
        events = sse_event(self._completion_chunk([self._choice(self._delta(), finish)]))
        if self._include_usage:
            events += sse_event(self._completion_chunk([]) | {"usage": _usage(done)})
        return events + b"data: [DONE]\n\n"

    def whole(self, done: DoneReply) -> dict[str, Any]:
        calls = done.message.tool_calls or []
        message: dict[str, Any] = {
            "role": "assistant",
            "content": done.message.content or (None if calls else ""),
        }
        if done.message.thinking:
            message["reasoning"] = done.message.thinking
        if calls:
            message["tool_calls"] = [
                {key: value for key, value in call.items() if key != "index"}
                for call in _openai_tool_calls(calls, 0)
            ]
        return {
            "id": self._id,
            "object": "chat.completion",
            "created": self._created,
            "model": done.model,
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": None,
                    "finish_reason": _finish_reason(done, bool(calls)),
                }
            ],
            "usage": _usage(done),
        }

    def _delta(self) -> dict[str, Any]:
        if self._role_sent:
            return {}
        self._role_sent = True
        return {"role": "assistant"}

    @staticmethod
    def _choice(delta: dict[str, Any], finish_reason: str | None) -> dict[str, Any]:
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}

    def _completion_chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self._id,
            "object": "chat.completion.chunk",
            "created": self._created,
            "model": self._model,
            "choices": choices,
        }


def openai_routes(bus: Bus, authenticate: Authenticate) -> APIRouter:
    router = APIRouter(prefix="/v1", dependencies=[Depends(authenticate)])
    tenant_of_key = Depends(authenticate)

    @router.post("/chat/completions")
    async def chat_completions(
        body: CompletionBody, request: Request, tenant: Annotated[str | None, tenant_of_key]
    ) -> Answer:
        correlation_id = uuid.uuid4().hex
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        answer_format = CompletionFormat(
            body.model, f"chatcmpl-{correlation_id}", include_usage=include_usage
        )
        values = contract_values(body)
        return answer(bus, request, values, tenant, answer_format, correlation_id)

    @router.get("/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": model.name,
                    "object": "model",
                    "created": int(model.modified_at.timestamp()) if model.modified_at else 0,
                    "owned_by": "library",
                }
                for model in await bus.models()
            ],
        }

    return router
