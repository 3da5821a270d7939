"""Failures as each API reports them: the HTTP status, and the error body of Ollama's API
(`{"error": "..."}`) or of OpenAI's (`{"error": {"message", "type", "param", "code"}}`).

A failure before the answer starts is an HTTP error response. One after the answer started
(the status line is sent) ends the stream with an error object: an NDJSON line for Ollama,
an SSE event for OpenAI.
"""

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

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

RETRY_AFTER_SECONDS = 1
"""What a 503 tells clients to wait: a worker may be back, or the queue have room, soon
(OpenAI's SDK honours it when it retries)."""

_STATUS: dict[type[ChatError], int] = {
    InvalidRequestError: 400,
    ModelNotFoundError: 404,
    InternalError: 500,
    UpstreamError: 502,
    UpstreamUnavailableError: 503,
    ServiceUnavailableError: 503,
    ChatTimeoutError: 504,
    DeadlineExceededError: 504,
}

ANSWER_RESTARTED = "answer_restarted"
"""The code of a stream ended because its request was redelivered mid-answer."""


@dataclass(frozen=True)
class Failure:
    """What went wrong, in terms both APIs can report."""

    status: int
    code: str
    message: str
    param: str | None = None

    @classmethod
    def of(cls, error: ChatError) -> "Failure":
        """The failure `error` is; a subclass of an error (the gateway's own, with a code
        of its own) gets its parent's status."""
        status = next((_STATUS[kind] for kind in type(error).__mro__ if kind in _STATUS), 500)
        return cls(status, error.code, error.message)

    @property
    def headers(self) -> dict[str, str]:
        if self.status == 503:
            return {"Retry-After": str(RETRY_AFTER_SECONDS)}
        if self.status == 401:
            return {"WWW-Authenticate": "Bearer"}
        return {}


class Refused(Exception):
    """A request the gateway answers with an error of its own (a bad API key, a field the
    bus cannot honour), before anything is sent to the bus."""

    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.message)
        self.failure = failure


def invalid(message: str, param: str | None = None) -> Refused:
    """400: the request asks for something the bus cannot do; `param` names the field."""
    return Refused(Failure(400, "invalid_request", message, param))


class ErrorFormat(Protocol):
    def body(self, failure: Failure) -> dict[str, Any]:
        """The error object of this API."""

    def stream_error(self, failure: Failure) -> bytes:
        """The error that ends a stream that began."""


class OllamaErrors:
    def body(self, failure: Failure) -> dict[str, Any]:
        return {"error": failure.message}

    def stream_error(self, failure: Failure) -> bytes:
        return json_line(self.body(failure))


class OpenAIErrors:
    def body(self, failure: Failure) -> dict[str, Any]:
        if failure.status == 401:
            kind = "authentication_error"
        elif failure.status < 500:
            kind = "invalid_request_error"
        else:
            kind = "server_error"
        return {
            "error": {
                "message": failure.message,
                "type": kind,
                "param": failure.param,
                "code": failure.code,
            }
        }

    def stream_error(self, failure: Failure) -> bytes:
        return sse_event(self.body(failure))


OLLAMA_ERRORS = OllamaErrors()
OPENAI_ERRORS = OpenAIErrors()


def json_line(value: Mapping[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


def sse_event(value: Mapping[str, Any]) -> bytes:
    return b"data: " + json_line(value) + b"\n"


def error_response(errors: ErrorFormat, failure: Failure) -> JSONResponse:
    return JSONResponse(errors.body(failure), failure.status, headers=failure.headers)


def errors_for(request: Request) -> ErrorFormat:
    """OpenAI's shapes under /v1/, Ollama's everywhere else."""
    return OPENAI_ERRORS if request.url.path.startswith("/v1/") else OLLAMA_ERRORS


async def on_chat_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, ChatError)
    return error_response(errors_for(request), Failure.of(error))


async def on_refused(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, Refused)
    return error_response(errors_for(request), error.failure)


async def on_invalid_body(request: Request, error: Exception) -> JSONResponse:
    """A body that does not fit the route's model: 400 (both APIs), naming the field."""
    assert isinstance(error, RequestValidationError)
    refused = invalid(*validation_problems(error.errors()))
    return error_response(errors_for(request), refused.failure)


async def on_http_error(request: Request, error: Exception) -> JSONResponse:
    """Unknown paths and methods, in the API's error shape."""
    assert isinstance(error, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
    failure = Failure(
        error.status_code, code, f"{request.method} {request.url.path}: {error.detail}"
    )
    return error_response(errors_for(request), failure)


EXCEPTION_HANDLERS = {
    ChatError: on_chat_error,
    Refused: on_refused,
    RequestValidationError: on_invalid_body,
    HTTPException: on_http_error,
}
