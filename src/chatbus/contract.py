"""The message contract: what requesters publish and what the worker replies.

The request mirrors Ollama's `/api/chat` body so that anyone who knows Ollama knows it.
Every reply carries `type`, `correlation_id`, `attempt` and `seq`; exactly one reply per
attempt is terminal (`done` or `error`).
"""

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

__all__ = [
    "DEADLINE_HEADER",
    "MAX_TENANT_CHARS",
    "NAMES",
    "TENANT_HEADER",
    "AssistantMessage",
    "CancelRequest",
    "ChatMessage",
    "ChatRequest",
    "ChunkReply",
    "ContractNames",
    "DoneReply",
    "ErrorCode",
    "ErrorReply",
    "ModelInfo",
    "ModelsReply",
    "Reply",
    "TerminalReply",
    "Timings",
    "ToolCall",
    "ToolCallFunction",
    "Usage",
    "models_reply_adapter",
    "reply_adapter",
]


@dataclass(frozen=True)
class ContractNames:
    """The RabbitMQ objects of the contract. Every part of chatbus (the topology, the worker,
    the client, the CLI, the tests) takes its names from one of these; the defaults are the
    contract's, and a deployment may rename them all (settings `REQUESTS_QUEUE`, ...)."""

    requests_queue: str = "chat.requests"
    """Quorum queue the requests are published to; every worker consumes it."""
    replies_exchange: str = "chat.replies"
    """Direct exchange; requesters bind their queue under each request's correlation id."""
    cancel_exchange: str = "chat.cancel"
    """Fanout exchange: a `CancelRequest` here reaches every worker."""
    dead_letter_queue: str = "chat.requests.dlq"
    """Where invalid requests and requests that failed on every allowed delivery end."""
    models_queue: str = "chat.models"
    """Request/reply: a message published here with `reply_to` is answered on that queue,
    with the request's correlation id, by a `ModelsReply` (or an `ErrorReply` when Ollama
    cannot be asked). RabbitMQ deletes the queue a few seconds after the last worker stopped
    consuming it, so a mandatory publish then tells a requester at once that none is up."""


NAMES = ContractNames()
"""The contract's names, as they are unless a deployment renames them."""

DEADLINE_HEADER = "x-deadline"
"""Request header: absolute deadline as Unix epoch seconds (integer, decimal string or AMQP
timestamp). An expired request is answered with `deadline_exceeded` without calling Ollama."""

TENANT_HEADER = "x-tenant"
"""Request header: the tenant a request is made for, a short string (the HTTP gateway sets
it from the caller's API key). Optional and informational: the worker puts it in the
request's log line and counts requests by it (at most 100 tenants, then `other`); it does
not change the answer."""

MAX_TENANT_CHARS = 64
"""How much of an x-tenant header the worker keeps."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ToolCallFunction(_Strict):
    name: str = Field(description="Name of the function the model calls.")
    arguments: dict[str, Any] = Field(description="Arguments, as a JSON object.")


class ToolCall(_Strict):
    function: ToolCallFunction


class ChatMessage(_Strict):
    """One message of the conversation, as Ollama's `/api/chat` takes it."""

    role: Literal["system", "user", "assistant", "tool"]
    content: str = Field(default="", description="Text of the message.")
    thinking: str | None = Field(
        default=None, description="The model's earlier thinking (assistant messages)."
    )
    images: list[str] | None = Field(
        default=None, description="Base64-encoded images for multimodal models."
    )
    tool_calls: list[ToolCall] | None = Field(
        default=None, description="Tool calls the assistant made (assistant messages)."
    )
    tool_name: str | None = Field(
        default=None, description="Which tool produced this result (tool messages)."
    )


class ChatRequest(_Strict):
    """A chat request. Fields other than `messages` are optional and passed to Ollama as is."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "model": "llama3.2",
                    "messages": [{"role": "user", "content": "Why is the sky blue?"}],
                    "options": {"temperature": 0.2},
                }
            ]
        },
    )

    messages: list[ChatMessage] = Field(
        min_length=1, description="The conversation so far; at least one message."
    )
    model: str | None = Field(
        default=None, min_length=1, description="Ollama model; the worker's default if absent."
    )
    options: dict[str, Any] | None = Field(
        default=None, description="Ollama model options (temperature, num_predict, ...)."
    )
    tools: list[dict[str, Any]] | None = Field(
        default=None, description="Tools the model may call, in Ollama's format."
    )
    format: Literal["json"] | dict[str, Any] | None = Field(
        default=None, description='"json" or a JSON schema the reply must follow.'
    )
    think: bool | Literal["low", "medium", "high"] | None = Field(
        default=None, description="Ask a thinking model to think (and stream its thinking)."
    )
    keep_alive: str | float | None = Field(
        default=None, description="How long Ollama keeps the model loaded afterwards."
    )
    stream: bool = Field(
        default=True, description="false: no chunks, the only reply is the `done` message."
    )


class ErrorCode(StrEnum):
    """The closed set of error codes a terminal `error` reply carries (this docstring is the
    description of the code in the AsyncAPI document):

    - `invalid_request`: the request is malformed, violates the schema or a limit, or
      Ollama answered 400. Not retryable.
    - `model_not_found`: Ollama does not have the model (HTTP 404). Not retryable.
    - `upstream_unavailable`: Ollama could not be reached or was busy before the first
      token, after retries. Retryable.
    - `upstream_error`: Ollama failed after the answer started, or answered another 4xx.
      Retryable when it failed mid-stream.
    - `timeout`: no first token in time, no token for the idle timeout, or longer than the
      total timeout. Retryable.
    - `deadline_exceeded`: the request's own deadline passed. Not retryable.
    - `internal_error`: the worker failed on every allowed delivery of the request.
      Retryable.
    """

    INVALID_REQUEST = "invalid_request"
    MODEL_NOT_FOUND = "model_not_found"
    UPSTREAM_UNAVAILABLE = "upstream_unavailable"
    UPSTREAM_ERROR = "upstream_error"
    TIMEOUT = "timeout"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    INTERNAL_ERROR = "internal_error"


class Usage(BaseModel):
    prompt_tokens: int = Field(description="Tokens in the prompt (Ollama's prompt_eval_count).")
    completion_tokens: int = Field(description="Tokens generated (Ollama's eval_count).")


class Timings(BaseModel):
    """Ollama's own timings, in nanoseconds."""

    total_duration: int | None = None
    load_duration: int | None = None
    prompt_eval_duration: int | None = None
    eval_duration: int | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str = ""
    thinking: str | None = None
    tool_calls: list[ToolCall] | None = None


class _Reply(BaseModel):
    correlation_id: str = Field(description="The request's correlation id.")
    attempt: int = Field(
        default=1,
        ge=1,
        description="Delivery attempt of the request (1, 2, ...). Replies of a higher attempt "
        "supersede an earlier attempt's partial output.",
    )
    seq: int = Field(ge=0, description="0, 1, 2, ... in publish order, restarting per attempt.")


class ChunkReply(_Reply):
    """Part of the answer: what Ollama produced since the previous chunk (tokens within the
    worker's flush window are sent together). None for `stream: false` requests."""

    type: Literal["chunk"] = "chunk"
    content: str = Field(description="The text delta.")
    thinking: str | None = Field(default=None, description="Thinking delta, when sent.")
    tool_calls: list[ToolCall] | None = Field(default=None, description="Tool calls, when sent.")


class DoneReply(_Reply):
    """Terminal: the generation ended, normally or by a cancel. Carries the whole assistant
    message, the token usage and Ollama's timings."""

    type: Literal["done"] = "done"
    done_reason: str = Field(
        description='Ollama\'s done_reason ("stop", "length", ...), or '
        '"cancelled" when a cancel stopped the generation.'
    )
    model: str
    message: AssistantMessage = Field(description="The whole assistant message.")
    usage: Usage
    timings: Timings
    server: str | None = Field(
        default=None,
        description="The Ollama server that answered, as host:port (the worker may spread "
        "its calls over several); absent when none was called, as for a request cancelled "
        "before it started.",
    )


class ErrorReply(_Reply):
    """Terminal: the request got no (complete) answer. `code` says why, `retryable` whether
    sending the same request again may succeed."""

    type: Literal["error"] = "error"
    code: ErrorCode
    message: str = Field(description="What went wrong, for humans.")
    retryable: bool = Field(description="Whether sending the same request again may succeed.")


Reply = Annotated[ChunkReply | DoneReply | ErrorReply, Field(discriminator="type")]
TerminalReply = DoneReply | ErrorReply
reply_adapter: TypeAdapter[ChunkReply | DoneReply | ErrorReply] = TypeAdapter(Reply)


class CancelRequest(BaseModel):
    """Published to the fanout exchange `chat.cancel` to stop a generation."""

    correlation_id: str = Field(min_length=1)


class ModelInfo(BaseModel):
    """One model the worker's Ollama servers have, as their `/api/tags` lists it."""

    name: str = Field(description='Model name with its tag, e.g. "llama3.2:latest".')
    size: int | None = Field(default=None, description="Size on disk in bytes.")
    modified_at: datetime | None = None
    family: str | None = None
    parameter_size: str | None = Field(default=None, description='e.g. "3.2B".')
    quantization_level: str | None = Field(default=None, description='e.g. "Q4_K_M".')
    servers: list[str] | None = Field(
        default=None, description="The Ollama servers (host:port) that have the model."
    )
    loaded_on: list[str] | None = Field(
        default=None,
        description="Those of them that have it loaded now: a request there starts without a load.",
    )


class ModelsReply(BaseModel):
    """The answer to a request on `chat.models`."""

    type: Literal["models"] = "models"
    correlation_id: str = Field(description="The request's correlation id.")
    models: list[ModelInfo]


models_reply_adapter: TypeAdapter[ModelsReply | ErrorReply] = TypeAdapter(
    Annotated[ModelsReply | ErrorReply, Field(discriminator="type")]
)
