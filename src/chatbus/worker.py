"""The worker: one request message in, a stream of replies out, then the ack.

The request is acknowledged only after its terminal reply is confirmed by the broker. Invalid
requests are answered with `invalid_request` and rejected into the dead-letter queue; an
unexpected failure is requeued, and on the last allowed delivery answered with
`internal_error` and dead-lettered, so no request is dropped silently.
"""

import asyncio
import contextlib
import logging
import time

from aio_pika.abc import AbstractIncomingMessage
from faststream.rabbit import RabbitBroker
from faststream.rabbit.message import RabbitMessage
from opentelemetry import propagate

from chatbus.contract import CancelRequest, ChatRequest
from chatbus.errors import ChatError, DeadlineExceededError, InternalError
from chatbus.generation import Generation, cancelled
from chatbus.instruments import NO_INSTRUMENTS, Instruments, RequestLog
from chatbus.intake import (
    RecentCancels,
    delivery_attempt,
    parse_request,
    request_deadline,
    request_tenant,
)
from chatbus.pool import OllamaPool
from chatbus.replies import ReplyExchanges, ReplyPublisher, RequesterGone
from chatbus.settings import Settings

__all__ = ["ChatWorker"]

logger = logging.getLogger("chatbus.worker")


class ChatWorker:
    def __init__(
        self,
        broker: RabbitBroker,
        pool: OllamaPool,
        settings: Settings,
        instruments: Instruments = NO_INSTRUMENTS,
    ) -> None:
        self._broker = broker
        self._pool = pool
        self._settings = settings
        self._limits = settings.limits
        self._instruments = instruments
        self._exchanges: ReplyExchanges | None = None
        self._running: dict[str, Generation] = {}
        self._recent_cancels = RecentCancels(settings.cancel_memory_seconds)

    async def declare(self) -> None:
        """Declare where replies go; the broker must be connected."""
        self._exchanges = await ReplyExchanges.declare(self._broker, self._settings.names)

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
        tenant = request_tenant(raw)
        if tenant is not None:
            log["tenant"] = tenant
        self._instruments.request_taken(tenant)
        if not correlation_id:
            logger.warning(
                "request without correlation_id or message_id: dead-lettered",
                extra=log.ended("dead_lettered"),
            )
            await message.reject(requeue=False)
            return
        assert self._exchanges is not None, "declare() runs before the first request"
        # The request's trace context, as the telemetry middleware made it current.
        trace_headers: dict[str, str] = {}
        propagate.inject(trace_headers)
        replies = ReplyPublisher(
            self._exchanges.route(raw.reply_to, correlation_id),
            correlation_id,
            attempt,
            publish_timeout=self._settings.publish_timeout,
            instruments=self._instruments,
            headers=trace_headers,
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
        raw: AbstractIncomingMessage,
        correlation_id: str,
        replies: ReplyPublisher,
        log: RequestLog,
    ) -> bool:
        """Reply to a request; False when it is invalid and belongs in the dead-letter queue."""
        try:
            request = parse_request(
                raw.body, raw.content_type, self._limits, self._settings.default_model
            )
            deadline = request_deadline(raw)
        except ChatError as error:
            logger.warning(
                "invalid request dead-lettered: %s", error.message, extra=log.ended(error.code)
            )
            with contextlib.suppress(RequesterGone):
                await replies.error(error)
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
        settings = self._settings
        model = request.model or settings.default_model
        log["model"] = model
        if settings.log_content:
            log["prompt"] = [m.content for m in request.messages]
        if self._recent_cancels.pop(correlation_id):
            await replies.done(cancelled(model))
            logger.info("request cancelled before it started", extra=log.ended("cancelled"))
            return
        loop_deadline = None
        if deadline is not None:
            remaining = deadline - time.time()
            if remaining <= 0:
                expired = DeadlineExceededError(
                    "the request's deadline passed before it was started", retryable=False
                )
                await replies.error(expired)
                logger.info("request expired before it started", extra=log.ended(expired.code))
                return
            loop_deadline = asyncio.get_running_loop().time() + remaining
        generation = Generation(
            self._pool,
            request,
            model,
            timeouts=settings.timeouts,
            retries=settings.retries,
            chunking=settings.chunking,
            max_num_predict=settings.max_num_predict,
            deadline=loop_deadline,
            instruments=self._instruments,
        )
        self._running[correlation_id] = generation
        try:
            completion = await generation.run(replies)
        except ChatError as error:
            await replies.error(error)
            log.update(generation.log_fields())
            logger.info("request failed: %s", error, extra=log.ended(error.code))
            return
        finally:
            # Two requests may share a correlation id: forget only this one's generation.
            if self._running.get(correlation_id) is generation:
                del self._running[correlation_id]
        await replies.done(completion)
        if settings.log_content:
            log["reply"] = completion.message.content
        log.update(generation.log_fields())
        logger.info(
            "request done: %s", completion.done_reason, extra=log.ended(completion.done_reason)
        )

    async def _fail_unexpectedly(
        self, message: RabbitMessage, replies: ReplyPublisher, attempt: int, log: RequestLog
    ) -> None:
        """Requeue, so another attempt may succeed; the last allowed attempt answers
        `internal_error` and dead-letters the request instead."""
        # The queue dead-letters a request returned more than delivery_limit times.
        if attempt <= self._settings.delivery_limit:
            logger.exception("request failed unexpectedly: requeued", extra=log.ended("requeued"))
            await message.reject(requeue=True)
            return
        logger.exception(
            "request failed unexpectedly on its last attempt: dead-lettered",
            extra=log.ended(InternalError.code),
        )
        failure = InternalError(
            "the worker failed on every allowed delivery of this request", retryable=True
        )
        try:
            await replies.error(failure)
        except Exception:
            logger.exception("could not publish the internal_error reply", extra=log)
        await message.reject(requeue=False)
