"""Ollama client setup and the mapping of its failures onto the contract's error codes."""

from dataclasses import dataclass

import httpx
import ollama

from chatbus.contract import ErrorCode
from chatbus.options import WorkerOptions

# Statuses Ollama answers when it is overloaded or failing, not when the request is wrong.
_TRANSIENT_STATUSES = frozenset({500, 502, 503, 504})


def create_ollama_client(host: str, options: WorkerOptions) -> ollama.AsyncClient:
    """One client per worker. The library's default is no timeout at all; the read timeout
    here is only a backstop, the generation loop enforces the finer first-token, idle and
    total timeouts itself."""
    timeout = httpx.Timeout(
        connect=options.ollama_connect_timeout,
        read=max(options.first_token_timeout, options.idle_timeout),
        write=options.ollama_connect_timeout,
        pool=options.first_token_timeout,
    )
    return ollama.AsyncClient(host=host, timeout=timeout)


@dataclass(frozen=True)
class ChatFailure(Exception):
    """A generation ended in a terminal `error` reply."""

    code: ErrorCode
    message: str
    retryable: bool

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


def classify_upstream_error(error: Exception, *, tokens_sent: bool) -> tuple[ChatFailure, bool]:
    """Map an exception from the Ollama client to a failure, and say whether retrying the
    call may help. Only failures before the first token are worth a retry: after it, the
    requester has already seen part of the answer."""
    if isinstance(error, ollama.ResponseError):
        status = error.status_code
        if status == 404:
            return ChatFailure(ErrorCode.MODEL_NOT_FOUND, error.error, retryable=False), False
        if status == 400:
            return ChatFailure(ErrorCode.INVALID_REQUEST, error.error, retryable=False), False
        if status in _TRANSIENT_STATUSES and not tokens_sent:
            failure = ChatFailure(
                ErrorCode.UPSTREAM_UNAVAILABLE,
                f"Ollama answered {status}: {error.error}",
                retryable=True,
            )
            return failure, True
        return (
            ChatFailure(
                ErrorCode.UPSTREAM_ERROR,
                f"Ollama failed: {error.error}",
                retryable=status == -1 or status in _TRANSIENT_STATUSES,
            ),
            False,
        )
    if isinstance(error, httpx.ReadTimeout):
        message = "Ollama sent nothing within the client's read timeout"
        return ChatFailure(ErrorCode.TIMEOUT, message, retryable=True), False
    if isinstance(error, ValueError):
        # A line that is not JSON, or JSON that is not a chat response.
        message = f"Ollama sent an unreadable response: {error}"
        return ChatFailure(ErrorCode.UPSTREAM_ERROR, message, retryable=True), False
    if isinstance(error, httpx.TransportError | ConnectionError):
        if tokens_sent:
            message = f"Ollama connection lost mid-stream: {type(error).__name__}"
            return ChatFailure(ErrorCode.UPSTREAM_ERROR, message, retryable=True), False
        message = f"Ollama unreachable: {type(error).__name__}: {error}"
        return ChatFailure(ErrorCode.UPSTREAM_UNAVAILABLE, message, retryable=True), True
    raise error
