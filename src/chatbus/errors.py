"""What a chat request can fail with: one exception per error code of the contract, plus
`ServiceUnavailableError` for a request that never reached a worker.

The worker raises these where a request fails and answers each with its `error_reply`; the
requester's client raises the same class again from that reply (`error_from_reply`), so both
sides name a failure alike.

```
ChatError                      code, message, retryable, correlation_id
├── InvalidRequestError        invalid_request
├── ModelNotFoundError         model_not_found
├── UpstreamUnavailableError   upstream_unavailable
├── UpstreamError              upstream_error
├── ChatTimeoutError           timeout
├── DeadlineExceededError      deadline_exceeded (also the client's own timeout)
├── InternalError              internal_error
└── ServiceUnavailableError    service_unavailable (client side: no route, connection lost)
```
"""

from collections.abc import Sequence
from typing import Any, ClassVar

from chatbus.contract import ErrorCode, ErrorReply

__all__ = [
    "MAX_MESSAGE_CHARS",
    "ChatError",
    "ChatTimeoutError",
    "DeadlineExceededError",
    "InternalError",
    "InvalidRequestError",
    "ModelNotFoundError",
    "ServiceUnavailableError",
    "UpstreamError",
    "UpstreamUnavailableError",
    "error_from_reply",
    "error_reply",
    "over_limit",
    "shortened",
    "validation_problems",
]

MAX_MESSAGE_CHARS = 1000
"""An error's message is cut to this length: it is sent in replies and logged, and may
quote what a requester (or Ollama, quoting the request) sent."""


def shortened(text: str, chars: int = 40) -> str:
    """`text` as a message may quote it: whole when short, else its first `chars`
    characters and its length, so that a hostile value is never echoed at length."""
    if len(text) <= chars:
        return text
    return f"{text[:chars]}… ({len(text)} characters)"


class ChatError(Exception):
    """A chat request ended in an error. `retryable` says whether sending the same request
    again may succeed."""

    code: ClassVar[str]

    def __init__(self, message: str, *, retryable: bool, correlation_id: str | None = None) -> None:
        message = shortened(message, MAX_MESSAGE_CHARS)
        super().__init__(message)
        self.message = message
        self.retryable = retryable
        self.correlation_id = correlation_id

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, retryable={self.retryable})"


class InvalidRequestError(ChatError):
    """Malformed, against the schema, over a limit, or refused by Ollama (400)."""

    code = ErrorCode.INVALID_REQUEST


class ModelNotFoundError(ChatError):
    code = ErrorCode.MODEL_NOT_FOUND


class UpstreamUnavailableError(ChatError):
    """Ollama was unreachable or busy before the first token, after the worker's retries."""

    code = ErrorCode.UPSTREAM_UNAVAILABLE


class UpstreamError(ChatError):
    """Ollama failed, usually after the answer had started."""

    code = ErrorCode.UPSTREAM_ERROR


class ChatTimeoutError(ChatError):
    """One of the worker's first-token, idle or total timeouts expired."""

    code = ErrorCode.TIMEOUT


class DeadlineExceededError(ChatError):
    """The request's deadline (the call's `timeout`) passed, noticed by the worker or by
    the client itself, whichever came first."""

    code = ErrorCode.DEADLINE_EXCEEDED


class InternalError(ChatError):
    code = ErrorCode.INTERNAL_ERROR


class ServiceUnavailableError(ChatError):
    """The request reached no worker: nothing consumes the queue it was sent to, or the
    connection to RabbitMQ was lost while it was waiting for its replies."""

    code = "service_unavailable"


_BY_CODE: dict[str, type[ChatError]] = {
    error.code: error
    for error in (
        InvalidRequestError,
        ModelNotFoundError,
        UpstreamUnavailableError,
        UpstreamError,
        ChatTimeoutError,
        DeadlineExceededError,
        InternalError,
    )
}


def error_from_reply(reply: ErrorReply) -> ChatError:
    return _BY_CODE[reply.code](
        reply.message, retryable=reply.retryable, correlation_id=reply.correlation_id
    )


def error_reply(
    error: ChatError, correlation_id: str, attempt: int = 1, seq: int = 0
) -> ErrorReply:
    """The terminal reply that tells the requester about `error`."""
    return ErrorReply(
        correlation_id=correlation_id,
        attempt=attempt,
        seq=seq,
        code=ErrorCode(error.code),
        message=error.message,
        retryable=error.retryable,
    )


def validation_problems(errors: Sequence[Any], shown: int = 3) -> tuple[str, str | None]:
    """Pydantic's validation errors (`ValidationError.errors()`) as one message, `field: what
    is wrong; ...`, and the first field named. Only the places and pydantic's messages:
    its full text repeats the input, which may be the user's words. `body` is the request
    as a whole; FastAPI's places begin with it, and it is left out before a field. A hostile
    body may break the schema thousands of times, with field names of any length: the
    first `shown` are named, each place cut short, and the rest counted."""
    described: list[str] = []
    first_field = None
    for problem in errors:
        place = [str(part) for part in problem["loc"]]
        field = shortened(".".join(place[1:] if place[:1] == ["body"] else place))
        if len(described) < shown:
            described.append(f"{field or 'body'}: {problem['msg']}")
        first_field = first_field or field or None
    more = len(errors) - len(described)
    return "; ".join(described) + (f" (and {more} more)" if more else ""), first_field


def over_limit(what: str, value: float, limit_name: str, limit: int) -> InvalidRequestError:
    """The refusal of a request over one of the limits, naming the setting."""
    return InvalidRequestError(
        f"{what} is {value}, over the limit {limit_name}={limit}", retryable=False
    )
