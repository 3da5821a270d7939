"""What the worker reads from a request message before it calls Ollama: the request itself
within the limits, its deadline, its tenant, which delivery this is, and whether it was
cancelled before it arrived. Pure functions of the message, so each is tested on its own."""

import contextlib
import json
import math
import re
import time
from collections import OrderedDict
from datetime import datetime
from decimal import Decimal

from aio_pika.abc import AbstractIncomingMessage
from pydantic import ValidationError
from pydantic_core import PydanticSerializationError

from chatbus.contract import DEADLINE_HEADER, MAX_TENANT_CHARS, TENANT_HEADER, ChatRequest
from chatbus.errors import InvalidRequestError, over_limit, shortened, validation_problems
from chatbus.settings import Limits

__all__ = [
    "RecentCancels",
    "delivery_attempt",
    "parse_request",
    "request_deadline",
    "request_tenant",
]

_UTF8 = frozenset({"utf-8", "utf8"})
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
"""A JSON escape of half a surrogate pair: json.loads keeps a lone one as it is, in a str
that no encoder takes (Python's json.dumps writes one for bytes that were not UTF-8)."""


def parse_request(
    body: bytes, content_type: str | None, limits: Limits, default_model: str
) -> ChatRequest:
    """The request in `body`; raises `InvalidRequestError` naming what is wrong."""
    if content_type:
        _check_content_type(content_type)
    _check_limit("request size in bytes", len(body), "max_request_bytes", limits)
    try:
        request = ChatRequest.model_validate(json.loads(body))
    except ValidationError as error:
        raise _invalid(validation_problems(error.errors())[0]) from None
    except (ValueError, TypeError) as error:
        raise _invalid(f"body is not valid JSON: {error}") from None
    if _SURROGATE_ESCAPE.search(body):
        _check_unicode(request)
    _check_limit("number of messages", len(request.messages), "max_messages", limits)
    prompt_chars = sum(len(m.content) for m in request.messages)
    _check_limit("prompt length in characters", prompt_chars, "max_prompt_chars", limits)
    num_predict = (request.options or {}).get("num_predict")
    if num_predict is not None:
        _check_num_predict(num_predict, limits)
    model = request.model or default_model
    _check_limit("model name length in characters", len(model), "max_model_chars", limits)
    if limits.allowed_models and model not in limits.allowed_models:
        raise _invalid(f"model {shortened(model)!r} is not in allowed_models")
    return request


def _check_unicode(request: ChatRequest) -> None:
    """Only for a body with surrogate escapes, most of which are whole pairs (emoji from
    an ASCII-only encoder): what Ollama would be sent must encode."""
    try:
        request.model_dump_json()
    except PydanticSerializationError:
        raise _invalid(
            "the body holds text that is not valid Unicode: an escaped surrogate "
            "(\\ud800-\\udfff) without its pair"
        ) from None


def _check_content_type(content_type: str) -> None:
    """JSON in UTF-8: the media type in any case, parameters allowed (many AMQP clients add
    a charset); only a charset other than UTF-8 is refused."""
    media_type, *parameters = content_type.split(";")
    if media_type.strip().lower() != "application/json":
        raise _invalid(f"content type must be application/json, got {shortened(content_type)!r}")
    for parameter in parameters:
        name, _, value = parameter.partition("=")
        charset = value.strip().strip('"')
        if name.strip().lower() == "charset" and charset.lower() not in _UTF8:
            raise _invalid(f"charset {shortened(charset)!r} is not supported: send UTF-8")


def _check_num_predict(num_predict: object, limits: Limits) -> None:
    """Ollama reads a JSON float as the integer it holds, and a negative one as "no limit":
    every number is checked, and anything else refused rather than left to Ollama."""
    if isinstance(num_predict, bool) or not isinstance(num_predict, int | float):
        raise _invalid(
            f"options.num_predict must be a number, got {shortened(json.dumps(num_predict))}"
        )
    if not math.isfinite(num_predict) or num_predict < 0:
        raise _invalid(
            f"options.num_predict {num_predict} asks for no limit, over the limit "
            f"max_num_predict={limits.max_num_predict}"
        )
    _check_limit("options.num_predict", num_predict, "max_num_predict", limits)


def _check_limit(what: str, value: float, limit_name: str, limits: Limits) -> None:
    limit = getattr(limits, limit_name)
    if value > limit:
        raise over_limit(what, value, limit_name, limit)


def _invalid(detail: str) -> InvalidRequestError:
    return InvalidRequestError(detail, retryable=False)


def delivery_attempt(message: AbstractIncomingMessage) -> int:
    """1 for the first delivery. Quorum queues count earlier deliveries in x-delivery-count."""
    count = (message.headers or {}).get("x-delivery-count")
    if isinstance(count, int) and count >= 0:
        return count + 1
    return 2 if message.redelivered else 1


def request_deadline(message: AbstractIncomingMessage) -> float | None:
    """The requester's deadline as Unix time: the x-deadline header, or the AMQP expiration
    counted from the message's timestamp (or from now when it has none)."""
    deadlines = []
    header = (message.headers or {}).get(DEADLINE_HEADER)
    if header is not None:
        deadlines.append(_epoch_seconds(header))
    if message.expiration is not None:
        sent_at = message.timestamp.timestamp() if message.timestamp else time.time()
        deadlines.append(sent_at + float(message.expiration))  # type: ignore[arg-type]
    return min(deadlines, default=None)


def request_tenant(message: AbstractIncomingMessage) -> str | None:
    """The x-tenant header as text, cut to a length fit for a log line."""
    header = (message.headers or {}).get(TENANT_HEADER)
    if header is None:
        return None
    text = header.decode(errors="replace") if isinstance(header, bytes | bytearray) else str(header)
    return text[:MAX_TENANT_CHARS]


def _epoch_seconds(header: object) -> float:
    """An AMQP timestamp, an integer, a decimal or a numeric string. (A float header is
    accepted but imprecise: common AMQP clients encode floats in 32 bits.)"""
    seconds: float | None = None
    if isinstance(header, datetime):
        seconds = header.timestamp()
    elif isinstance(header, int | float | Decimal) and not isinstance(header, bool):
        seconds = float(header)
    elif isinstance(header, bytes | bytearray | str):
        # A byte array is how Go's and Node's AMQP clients send a buffer.
        with contextlib.suppress(ValueError):
            seconds = float(header)
    if seconds is not None and math.isfinite(seconds):
        return seconds
    raise _invalid(
        f"header {DEADLINE_HEADER} must be Unix epoch seconds, got {shortened(repr(header))}"
    )


class RecentCancels:
    """Cancels for requests this worker is not running (yet), kept for a bounded time and
    number so that a request that arrives after its cancel is skipped."""

    def __init__(self, ttl: float, max_entries: int = 100_000) -> None:
        self._ttl = ttl
        self._max_entries = max_entries
        self._expiry: OrderedDict[str, float] = OrderedDict()

    def add(self, correlation_id: str) -> None:
        now = time.monotonic()
        self._expiry[correlation_id] = now + self._ttl
        self._expiry.move_to_end(correlation_id)
        while self._expiry and (
            len(self._expiry) > self._max_entries or next(iter(self._expiry.values())) < now
        ):
            self._expiry.popitem(last=False)

    def pop(self, correlation_id: str) -> bool:
        expiry = self._expiry.pop(correlation_id, None)
        return expiry is not None and expiry >= time.monotonic()
