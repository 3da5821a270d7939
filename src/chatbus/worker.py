"""The worker: one request message in, a stream of replies out, then the ack.

The request is acknowledged only after its terminal reply is confirmed by the broker. Invalid
requests are answered with `invalid_request` and rejected into the dead-letter queue; an
unexpected failure is requeued, and on the last allowed delivery answered with
`internal_error` and dead-lettered, so no request is dropped silently.
"""

import asyncio
import contextlib
import json
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

import ollama
from aio_pika import IncomingMessage
from aiormq.abc import DeliveredMessage
from faststream.rabbit import RabbitBroker, RabbitExchange
from faststream.rabbit.message import RabbitMessage
from pydantic import BaseModel, ValidationError

from chatbus import topology
from chatbus.contract import (
    DEADLINE_HEADER,
    CancelRequest,
    ChatRequest,
    ChunkReply,
    DoneReply,
    ErrorCode,
    ErrorReply,
    ToolCall,
)
from chatbus.generation import Completion, Generation, cancelled
from chatbus.instruments import NO_INSTRUMENTS, Instruments, RequestLog
from chatbus.options import WorkerOptions
from chatbus.upstream import ChatFailure

logger = logging.getLogger("chatbus.worker")

_DEFAULT_EXCHANGE = RabbitExchange("")


class RequesterGone(Exception):
    """A reply came back unroutable: nobody is listening for this correlation id."""


_DIRECT_REPLY_TO_PREFIX = "amq.rabbitmq.reply-to."


@dataclass(frozen=True)
class ReplyRoute:
    exchange: RabbitExchange
    routing_key: str

    @property
    def detects_requester_gone(self) -> bool:
        """Whether a mandatory publish tells us nobody is listening. Not so for direct
        reply-to: RabbitMQ returns mandatory replies there even when it delivers them."""
        return not self.routing_key.startswith(_DIRECT_REPLY_TO_PREFIX)


class ReplyPublisher:
    """Publishes one attempt's replies, in order, numbered from seq 0."""

    def __init__(
        self,
        broker: RabbitBroker,
        route: ReplyRoute,
        correlation_id: str,
        attempt: int,
        *,
        publish_timeout: float,
        instruments: Instruments,
    ) -> None:
        self._broker = broker
        self._instruments = instruments
        self._route = route
        self._correlation_id = correlation_id
        self._attempt = attempt
        self.send_chunks = True
        """False for `stream: false` requests: the only reply is the terminal one."""
        self._publish_timeout = publish_timeout
        self._seq = 0

    async def chunk(
        self, content: str, thinking: str | None, tool_calls: list[ToolCall] | None
    ) -> None:
        if not self.send_chunks:
            return
        await self._publish(
            ChunkReply(
                correlation_id=self._correlation_id,
                attempt=self._attempt,
                seq=self._seq,
                content=content,
                thinking=thinking,
                tool_calls=tool_calls,
            )
        )

    async def done(self, completion: Completion) -> None:
        await self._publish(
            DoneReply(
                correlation_id=self._correlation_id,
                attempt=self._attempt,
                seq=self._seq,
                done_reason=completion.done_reason,
                model=completion.model,
                message=completion.message,
                usage=completion.usage,
                timings=completion.timings,
            )
        )

    async def error(self, failure: ChatFailure) -> None:
        await self._publish(
            ErrorReply(
                correlation_id=self._correlation_id,
                attempt=self._attempt,
                seq=self._seq,
                code=failure.code,
                message=failure.message,
                retryable=failure.retryable,
            )
        )

    async def _publish(self, reply: BaseModel) -> None:
        self._seq += 1
        # The timeout also covers waiting for a reconnecting channel, not just the confirm.
        async with asyncio.timeout(self._publish_timeout):
            confirmation = await self._broker.publish(
                reply.model_dump_json(exclude_none=True).encode(),
                exchange=self._route.exchange,
                routing_key=self._route.routing_key,
                correlation_id=self._correlation_id,
                content_type="application/json",
                mandatory=self._route.detects_requester_gone,
            )
        if isinstance(confirmation, DeliveredMessage):
            raise RequesterGone(self._correlation_id)
        if isinstance(reply, DoneReply | ErrorReply):
            self._instruments.terminal_reply(reply)


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


def delivery_attempt(message: IncomingMessage) -> int:
    """1 for the first delivery. Quorum queues count earlier deliveries in x-delivery-count."""
    count = (message.headers or {}).get("x-delivery-count")
    if isinstance(count, int) and count >= 0:
        return count + 1
    return 2 if message.redelivered else 1


def request_deadline(message: IncomingMessage) -> float | None:
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


def _epoch_seconds(header: object) -> float:
    """An AMQP timestamp, an integer, a decimal or a numeric string. (A float header is
    accepted but imprecise: common AMQP clients encode floats in 32 bits.)"""
    if isinstance(header, datetime):
        return header.timestamp()
    if isinstance(header, int | float | Decimal) and not isinstance(header, bool):
        return float(header)
    if isinstance(header, bytes | str):
        with contextlib.suppress(ValueError):
            return float(header)
    raise ChatFailure(
        ErrorCode.INVALID_REQUEST,
        f"header {DEADLINE_HEADER} must be Unix epoch seconds, got {header!r}",
        retryable=False,
    )


class ChatWorker:
    def __init__(
        self,
        broker: RabbitBroker,
        client: ollama.AsyncClient,
        options: WorkerOptions,
        instruments: Instruments = NO_INSTRUMENTS,
    ) -> None:
        self._broker = broker
        self._client = client
        self._options = options
        self._instruments = instruments
        self._replies_exchange = topology.replies_exchange(options)
        self._running: dict[str, Generation] = {}
        self._recent_cancels = RecentCancels(options.cancel_memory_seconds)

    @property
    def in_flight(self) -> int:
        return len(self._running)

    def cancel(self, cancel: CancelRequest) -> None:
        generation = self._running.get(cancel.correlation_id)
        if generation is None:
            self._recent_cancels.add(cancel.correlation_id)
        else:
            generation.cancel()

    async def handle(self, message: RabbitMessage) -> None:
        raw = message.raw_message
        correlation_id = raw.correlation_id or raw.message_id
        attempt = delivery_attempt(raw)
        log = RequestLog(correlation_id, attempt)
        if not correlation_id:
            logger.warning(
                "request without correlation_id or message_id: dead-lettered",
                extra=log.ended("dead_lettered"),
            )
            await message.reject(requeue=False)
            return
        if raw.reply_to:
            route = ReplyRoute(_DEFAULT_EXCHANGE, raw.reply_to)
        else:
            route = ReplyRoute(self._replies_exchange, correlation_id)
        replies = ReplyPublisher(
            self._broker,
            route,
            correlation_id,
            attempt,
            publish_timeout=self._options.publish_timeout,
            instruments=self._instruments,
        )
        try:
            answered = await self._answer(raw, correlation_id, replies, log)
        except Exception:
            await self._fail_unexpectedly(message, replies, attempt, log)
            return
        if answered:
            await message.ack()
        else:
            await message.reject(requeue=False)

    async def _answer(
        self,
        raw: IncomingMessage,
        correlation_id: str,
        replies: ReplyPublisher,
        log: RequestLog,
    ) -> bool:
        """Reply to a request; False when it is invalid and belongs in the dead-letter queue."""
        try:
            request = self._parse(raw.body, raw.content_type)
            deadline = request_deadline(raw)
        except ChatFailure as failure:
            logger.warning(
                "invalid request dead-lettered: %s", failure.message, extra=log.ended(failure.code)
            )
            with contextlib.suppress(RequesterGone):
                await replies.error(failure)
            return False
        replies.send_chunks = request.stream
        try:
            await self._generate(request, deadline, correlation_id, replies, log)
        except RequesterGone:
            logger.info("requester gone: generation stopped", extra=log.ended("requester_gone"))
        return True

    async def _generate(
        self,
        request: ChatRequest,
        deadline: float | None,
        correlation_id: str,
        replies: ReplyPublisher,
        log: RequestLog,
    ) -> None:
        model = request.model or self._options.default_model
        log["model"] = model
        if self._options.log_content:
            log["prompt"] = [m.content for m in request.messages]
        if self._recent_cancels.pop(correlation_id):
            await replies.done(cancelled(model))
            logger.info("request cancelled before it started", extra=log.ended("cancelled"))
            return
        loop_deadline = None
        if deadline is not None:
            remaining = deadline - time.time()
            if remaining <= 0:
                failure = ChatFailure(
                    ErrorCode.DEADLINE_EXCEEDED,
                    "the request's deadline passed before it was started",
                    retryable=False,
                )
                await replies.error(failure)
                logger.info("request expired before it started", extra=log.ended(failure.code))
                return
            loop_deadline = asyncio.get_running_loop().time() + remaining
        generation = Generation(
            self._client, request, model, self._options, loop_deadline, self._instruments
        )
        self._running[correlation_id] = generation
        try:
            completion = await generation.run(replies)
        except ChatFailure as failure:
            await replies.error(failure)
            log.update(generation.log_timings())
            logger.info("request failed: %s", failure, extra=log.ended(failure.code))
            return
        finally:
            # Two requests may share a correlation id: forget only this one's generation.
            if self._running.get(correlation_id) is generation:
                del self._running[correlation_id]
        await replies.done(completion)
        if self._options.log_content:
            log["reply"] = completion.message.content
        log.update(generation.log_timings())
        logger.info(
            "request done: %s", completion.done_reason, extra=log.ended(completion.done_reason)
        )

    def _parse(self, body: bytes, content_type: str | None) -> ChatRequest:
        options = self._options
        if content_type not in (None, "", "application/json"):
            raise _invalid(f"content type must be application/json, got {content_type!r}")
        _check_limit("request size in bytes", len(body), "max_request_bytes", options)
        try:
            request = ChatRequest.model_validate(json.loads(body))
        except (ValueError, TypeError) as error:
            detail = (
                "; ".join(
                    f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}"
                    for e in error.errors()
                )
                if isinstance(error, ValidationError)
                else f"body is not valid JSON: {error}"
            )
            raise _invalid(detail) from None
        _check_limit("number of messages", len(request.messages), "max_messages", options)
        prompt_chars = sum(len(m.content) for m in request.messages)
        _check_limit("prompt length in characters", prompt_chars, "max_prompt_chars", options)
        num_predict = (request.options or {}).get("num_predict")
        if isinstance(num_predict, int):
            # Ollama reads a negative num_predict as "no limit".
            unlimited = num_predict < 0
            _check_limit(
                "options.num_predict",
                options.max_num_predict + 1 if unlimited else num_predict,
                "max_num_predict",
                options,
            )
        model = request.model or options.default_model
        if options.allowed_models and model not in options.allowed_models:
            raise _invalid(f"model {model!r} is not in allowed_models")
        return request

    async def _fail_unexpectedly(
        self, message: RabbitMessage, replies: ReplyPublisher, attempt: int, log: RequestLog
    ) -> None:
        """Requeue, so another attempt may succeed; the last allowed attempt answers
        `internal_error` and dead-letters the request instead."""
        # The queue dead-letters a request returned more than delivery_limit times.
        if attempt <= self._options.delivery_limit:
            logger.exception("request failed unexpectedly: requeued", extra=log.ended("requeued"))
            await message.reject(requeue=True)
            return
        logger.exception(
            "request failed unexpectedly on its last attempt: dead-lettered",
            extra=log.ended(ErrorCode.INTERNAL_ERROR),
        )
        failure = ChatFailure(
            ErrorCode.INTERNAL_ERROR,
            "the worker failed on every allowed delivery of this request",
            retryable=True,
        )
        try:
            await replies.error(failure)
        except Exception:
            logger.exception("could not publish the internal_error reply", extra=log)
        await message.reject(requeue=False)


def _check_limit(what: str, value: int, limit_name: str, options: WorkerOptions) -> None:
    limit = getattr(options, limit_name)
    if value > limit:
        raise _invalid(f"{what} is {value}, over the limit {limit_name}={limit}")


def _invalid(detail: str) -> ChatFailure:
    return ChatFailure(ErrorCode.INVALID_REQUEST, detail, retryable=False)
