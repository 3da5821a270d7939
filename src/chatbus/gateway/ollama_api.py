"""Ollama's HTTP API (as its API documentation describes it), answered through the bus:
`POST /api/chat`, `POST /api/generate`, `GET /api/tags`, `GET /api/version`.

As Ollama does, fields a route does not know are ignored, in the body and in its messages.
"""

from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field

from chatbus.contract import ChatMessage, ChunkReply, DoneReply, ModelInfo, ToolCall
from chatbus.gateway.answers import Answer, answer
from chatbus.gateway.auth import Authenticate
from chatbus.gateway.bus import Bus
from chatbus.gateway.errors import OLLAMA_ERRORS, invalid, json_line

OLLAMA_API_VERSION = "0.12.6"
"""What `/api/version` answers: the Ollama release whose API the gateway follows (the one the
compose file runs). Clients read it to tell which features they may use (thinking, for one,
came with 0.9)."""

Think = bool | Literal["low", "medium", "high"]


class _OllamaBody(BaseModel):
    """Fields both routes share. Unknown fields are ignored, as Ollama ignores them."""

    model: str = Field(min_length=1)
    format: Literal["", "json"] | dict[str, Any] | None = None
    options: dict[str, Any] | None = None
    stream: bool = True
    think: Think | None = None
    keep_alive: str | float | None = None

    def contract_fields(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "format": self.format or None,
            "options": self.options,
            "stream": self.stream,
            "think": self.think,
            "keep_alive": self.keep_alive,
        }


class ChatBody(_OllamaBody):
    messages: list[dict[str, Any]] = Field(default_factory=list)
    tools: list[dict[str, Any]] | None = None


class GenerateBody(_OllamaBody):
    prompt: str = ""
    system: str | None = None
    images: list[str] | None = None
    # Not honoured through the chat contract: refused when set (see _refuse_raw_generation).
    suffix: str | None = None
    template: str | None = None
    context: list[int] | None = None
    raw: bool = False


def _known_fields(message: dict[str, Any]) -> dict[str, Any]:
    """A message with only the fields the contract knows (Ollama ignores unknown ones), and
    its tool calls likewise."""
    known = {key: value for key, value in message.items() if key in ChatMessage.model_fields}
    calls = known.get("tool_calls")
    if isinstance(calls, list):
        known["tool_calls"] = [
            {"function": {k: v for k, v in call["function"].items() if k in ("name", "arguments")}}
            if isinstance(call, dict) and isinstance(call.get("function"), dict)
            else call
            for call in calls
        ]
    return known


def _refuse_raw_generation(body: GenerateBody) -> None:
    """400 for what only Ollama's own /api/generate can do: the gateway answers through
    chat, which applies the model's template to a conversation and keeps no state."""
    reasons = {
        "raw": "a raw prompt bypasses the model's chat template",
        "template": "the chat contract always uses the model's own template",
        "context": "the gateway keeps no state: send the conversation to /api/chat",
        "suffix": "fill-in-the-middle is not part of the chat contract",
    }
    for name, reason in reasons.items():
        if getattr(body, name):
            raise invalid(f"{name} is not supported through the gateway: {reason}", name)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _counters(done: DoneReply) -> dict[str, Any]:
    timings = done.timings
    counters = {
        "total_duration": timings.total_duration,
        "load_duration": timings.load_duration,
        "prompt_eval_count": done.usage.prompt_tokens,
        "prompt_eval_duration": timings.prompt_eval_duration,
        "eval_count": done.usage.completion_tokens,
        "eval_duration": timings.eval_duration,
    }
    return {name: value for name, value in counters.items() if value is not None}


def _tool_calls(calls: list[ToolCall] | None) -> dict[str, Any]:
    return {"tool_calls": [call.model_dump() for call in calls]} if calls else {}


class ChatFormat:
    """`/api/chat`'s NDJSON: a `message` delta per chunk, then the `done: true` object."""

    media_type = "application/x-ndjson"
    errors = OLLAMA_ERRORS

    def __init__(self, model: str) -> None:
        self._model = model

    def chunk(self, chunk: ChunkReply) -> bytes:
        message: dict[str, Any] = {"role": "assistant", "content": chunk.content}
        if chunk.thinking:
            message["thinking"] = chunk.thinking
        message |= _tool_calls(chunk.tool_calls)
        return json_line(
            {"model": self._model, "created_at": _now(), "message": message, "done": False}
        )

    def end(self, done: DoneReply) -> bytes:
        return json_line(self._final(done, {"role": "assistant", "content": ""}))

    def whole(self, done: DoneReply) -> dict[str, Any]:
        return self._final(done, done.message.model_dump(exclude_none=True))

    def _final(self, done: DoneReply, message: dict[str, Any]) -> dict[str, Any]:
        return {
            "model": done.model,
            "created_at": _now(),
            "message": message,
            "done": True,
            "done_reason": done.done_reason,
            **_counters(done),
        }


class GenerateFormat:
    """`/api/generate`'s NDJSON: a `response` delta per chunk, then the `done: true` object."""

    media_type = "application/x-ndjson"
    errors = OLLAMA_ERRORS

    def __init__(self, model: str) -> None:
        self._model = model

    def chunk(self, chunk: ChunkReply) -> bytes:
        part: dict[str, Any] = {"model": self._model, "created_at": _now()}
        part["response"] = chunk.content
        if chunk.thinking:
            part["thinking"] = chunk.thinking
        part["done"] = False
        return json_line(part)

    def end(self, done: DoneReply) -> bytes:
        return json_line(self._final(done, ""))

    def whole(self, done: DoneReply) -> dict[str, Any]:
        final = self._final(done, done.message.content)
        if done.message.thinking:
            final["thinking"] = done.message.thinking
        return final

    def _final(self, done: DoneReply, response: str) -> dict[str, Any]:
        return {
            "model": done.model,
            "created_at": _now(),
            "response": response,
            "done": True,
            "done_reason": done.done_reason,
            **_counters(done),
        }


def _tag(model: ModelInfo) -> dict[str, Any]:
    details = {
        "family": model.family,
        "parameter_size": model.parameter_size,
        "quantization_level": model.quantization_level,
    }
    tag: dict[str, Any] = {"name": model.name, "model": model.name}
    if model.modified_at is not None:
        tag["modified_at"] = model.modified_at.isoformat()
    if model.size is not None:
        tag["size"] = model.size
    tag["details"] = {key: value for key, value in details.items() if value is not None}
    return tag


class _BodyIsJson(APIRoute):
    """Ollama reads every request body as JSON whatever its Content-Type, and its own curl
    examples send none but `curl -d`'s form type; FastAPI would parse only a JSON type."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def with_json_type(request: Request) -> Response:
            headers = [(k, v) for k, v in request.scope["headers"] if k != b"content-type"]
            scope = {**request.scope, "headers": [*headers, (b"content-type", _JSON)]}
            return await handler(Request(scope, request.receive))

        return with_json_type


_JSON = b"application/json"


def ollama_routes(bus: Bus, authenticate: Authenticate) -> APIRouter:
    router = APIRouter(dependencies=[Depends(authenticate)], route_class=_BodyIsJson)
    tenant_of_key = Depends(authenticate)

    @router.post("/api/chat")
    async def chat(
        body: ChatBody, request: Request, tenant: Annotated[str | None, tenant_of_key]
    ) -> Answer:
        values = body.contract_fields() | {
            "messages": [_known_fields(message) for message in body.messages],
            "tools": body.tools,
        }
        return answer(bus, request, values, tenant, ChatFormat(body.model))

    @router.post("/api/generate")
    async def generate(
        body: GenerateBody, request: Request, tenant: Annotated[str | None, tenant_of_key]
    ) -> Answer:
        _refuse_raw_generation(body)
        if not body.prompt:
            raise invalid(
                "prompt is required: an empty prompt asks Ollama to load the model, which "
                "the gateway leaves to the workers",
                "prompt",
            )
        messages: list[dict[str, Any]] = []
        if body.system:
            messages.append({"role": "system", "content": body.system})
        messages.append({"role": "user", "content": body.prompt, "images": body.images})
        values = body.contract_fields() | {"messages": messages}
        return answer(bus, request, values, tenant, GenerateFormat(body.model))

    @router.get("/api/tags")
    async def tags() -> dict[str, Any]:
        return {"models": [_tag(model) for model in await bus.models()]}

    @router.get("/api/version")
    async def version() -> dict[str, str]:
        return {"version": OLLAMA_API_VERSION}

    return router
