"""The requester side: a chat request over RabbitMQ in one call.

`ChatClient` holds one robust connection and one exclusive reply queue. Each request in
flight binds that queue to the replies exchange under its own correlation id, before it is
published (or its first replies would be lost), and unbinds it after the terminal reply. A
dispatcher hands every reply to the request it belongs to, so one client serves any number
of concurrent requests.
"""

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, Self, TypedDict, Unpack

import aio_pika
from aio_pika.abc import (
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractRobustChannel,
)
from aiormq.abc import DeliveredMessage
from aiormq.exceptions import ChannelInvalidStateError
from faststream.rabbit import RabbitExchange
from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticSerializationError

from chatbus import failover, topology
from chatbus.contract import (
    DEADLINE_HEADER,
    NAMES,
    CancelRequest,
    ChatMessage,
    ChatRequest,
    ChunkReply,
    ContractNames,
    DoneReply,
    ErrorReply,
    ModelInfo,
    models_reply_adapter,
    reply_adapter,
)
from chatbus.errors import (
    DeadlineExceededError,
    InvalidRequestError,
    ServiceUnavailableError,
    error_from_reply,
    validation_problems,
)
from chatbus.settings import DEFAULT_RABBITMQ_URL
from chatbus.startup import until_rabbitmq_answers

__all__ = ["ChatClient", "ChatEvent", "Messages", "RequestFields", "Restarted"]

logger = logging.getLogger("chatbus.client")

CANCEL_GRACE = 2.0
"""Seconds a cancelled request waits for the worker's terminal reply before it stops
listening (a request still queued is answered only when a worker takes it)."""


class Restarted(BaseModel):
    """The request is being answered again from the start: the worker answering it stopped
    mid-answer (it crashed or lost its connection) and the broker redelivered the request.
    Discard every chunk received so far; the chunks that follow are the whole new answer."""

    type: Literal["restarted"] = "restarted"
    correlation_id: str
    attempt: int


ChatEvent = ChunkReply | DoneReply | Restarted
"""What `ChatClient.stream` yields: chunks, then the `DoneReply`, with a `Restarted` in
between when the request had to be answered again."""

Messages = str | Sequence[ChatMessage | Mapping[str, Any]]
"""The conversation: `ChatMessage`s or plain dicts, or the text of one user message."""


class RequestFields(TypedDict, total=False):
    """The request's fields besides `messages`, as the contract (and Ollama) names them;
    None is the same as leaving a field out."""

    model: str | None
    options: Mapping[str, Any] | None
    tools: Sequence[Mapping[str, Any]] | None
    format: Literal["json"] | Mapping[str, Any] | None
    think: bool | Literal["low", "medium", "high"] | None
    keep_alive: str | float | None


@dataclass
class _Call:
    """One request in flight."""

    correlation_id: str
    give_up_at: float | None
    """When the caller's timeout passes, on the event loop's clock."""
    replies: asyncio.Queue[AbstractIncomingMessage | None] = field(default_factory=asyncio.Queue)
    """None when the connection the replies were coming on is gone."""

    @contextlib.asynccontextmanager
    async def within_timeout(self) -> AsyncIterator[None]:
        try:
            async with asyncio.timeout_at(self.give_up_at) as timeout:
                yield
        except TimeoutError:
            if not timeout.expired():
                raise
            raise DeadlineExceededError(
                "no answer before the request's timeout",
                retryable=False,
                correlation_id=self.correlation_id,
            ) from None


class ChatClient:
    """Sends chat requests to the chatbus workers and reads their replies.

    ```
    async with ChatClient("amqp://guest:guest@localhost:5672/") as client:
        done = await client.chat("Why is the sky blue?")
    ```

    `rabbitmq_url` may name several nodes of a cluster, comma-separated: the client connects
    to the first that answers and moves to the next when its connection is lost
    (`chatbus.failover`). `names` are the queues and exchanges to use, the contract's
    unless a deployment renamed them. `timeout` is the default of every call's own
    `timeout`: seconds until the request's deadline, which is also sent to the worker
    (header `x-deadline`) so that it stops working on an answer nobody waits for.

    `connect` (and `async with`) waits for RabbitMQ: it tries again every
    `reconnect_interval` seconds while RabbitMQ does not answer, logging a line at most
    every few seconds, and raises `chatbus.startup.RabbitMQRefused` at once when RabbitMQ
    refuses the configuration (login, virtual host, permissions).

    Before each request the client looks whether a worker consumes the request queue. When
    none does, it logs a warning (logger `chatbus.client`) and sends the request, which
    waits in the queue for a worker until its deadline; with `wait_for_worker=False` it
    raises `ServiceUnavailableError` instead, without sending it.
    """

    def __init__(
        self,
        rabbitmq_url: str = DEFAULT_RABBITMQ_URL,
        *,
        names: ContractNames = NAMES,
        timeout: float | None = None,
        connection_name: str | None = None,
        reconnect_interval: float = 1.0,
        wait_for_worker: bool = True,
    ) -> None:
        self._url = rabbitmq_url
        self._wait_for_worker = wait_for_worker
        self._names = names
        self._timeout = timeout
        self._connection_name = (
            connection_name or f"chatbus-client@{socket.gethostname()}:{os.getpid()}"
        )
        self._reconnect_interval = reconnect_interval
        self._pending: dict[str, _Call] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._closing = False

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def connect(self, *, give_up_after: float | None = None) -> None:
        """Connect, declare the exchanges the requests need (as the worker does, so that
        the client may start first) and start consuming the reply queue. While RabbitMQ
        does not answer, try again every `reconnect_interval` seconds, for at most
        `give_up_after` seconds (0: once) or, by default, until it does."""
        connection = await until_rabbitmq_answers(
            lambda: failover.connect_robust(
                self._url,
                client_properties={"connection_name": self._connection_name},
                reconnect_interval=self._reconnect_interval,
            ),
            rabbitmq_url=self._url,
            interval=self._reconnect_interval,
            give_up_after=give_up_after,
        )
        connection.close_callbacks.add(self._on_connection_closed)
        channel = await connection.channel()
        # Its own channel: a passive declare of a missing queue closes the channel.
        self._probe = await connection.channel(publisher_confirms=False)
        self._replies_exchange = await _declare(channel, topology.replies_exchange(self._names))
        self._cancel_exchange = await _declare(channel, topology.cancel_exchange(self._names))
        self._replies = await channel.declare_queue(
            f"chatbus.client.{uuid.uuid4().hex}", exclusive=True, auto_delete=True
        )
        await self._replies.consume(self._on_reply, no_ack=True)
        self._connection = connection
        self._channel = channel

    async def close(self) -> None:
        """Cancel the requests still in flight and close the connection."""
        self._closing = True
        if self._connection.connected.is_set():
            for correlation_id in list(self._pending):
                await self._publish_cancel(correlation_id)
            if self._background:
                # Cancelled requests whose end the worker has yet to confirm.
                await asyncio.wait(self._background, timeout=CANCEL_GRACE)
        for task in self._background:
            task.cancel()
        await self._connection.close()

    def stream(
        self,
        messages: Messages,
        *,
        timeout: float | None = None,
        correlation_id: str | None = None,
        headers: Mapping[str, Any] | None = None,
        **fields: Unpack[RequestFields],
    ) -> AsyncGenerator[ChatEvent, None]:
        """The answer as it is generated: `ChunkReply`s in order, then the `DoneReply`.

        Duplicated replies are dropped. If the request is redelivered to another worker
        mid-answer, a `Restarted` event comes first and the answer starts over: whoever shows
        the chunks clears what they showed. A terminal `error` reply raises the matching
        `ChatError`; so does the `timeout` passing (`DeadlineExceededError`).

        Leaving the iteration early, or the task being cancelled, cancels the generation on
        the worker. `break` does that as soon as the generator is garbage collected (at once
        in CPython); `async with contextlib.aclosing(client.stream(...))` does it on leaving
        the block.

        `headers` go on the request message as AMQP headers (e.g. `x-tenant`), beside the
        `x-deadline` the client sets.
        """
        request = _request(messages, stream=True, **fields)
        return self._exchange(request, timeout, correlation_id, headers)

    async def chat(
        self,
        messages: Messages,
        *,
        timeout: float | None = None,
        correlation_id: str | None = None,
        headers: Mapping[str, Any] | None = None,
        **fields: Unpack[RequestFields],
    ) -> DoneReply:
        """The whole answer: `message` (`content`, `thinking`, `tool_calls`), `done_reason`,
        `model`, `usage` and `timings`. Raises a `ChatError` as `stream` does; cancelling the
        task cancels the generation."""
        request = _request(messages, stream=False, **fields)
        exchange = self._exchange(request, timeout, correlation_id, headers)
        async with contextlib.aclosing(exchange) as events:
            async for event in events:
                if isinstance(event, DoneReply):
                    return event
        raise AssertionError("a reply stream ends with its terminal reply or raises")

    async def models(self, *, timeout: float = 30.0) -> list[ModelInfo]:
        """The models Ollama has, as a worker sees them (a request on `chat.models`).
        `ServiceUnavailableError` at once when no worker is up to answer."""
        call = self._call(uuid.uuid4().hex, timeout)
        try:
            async with call.within_timeout():
                await self._look_for_workers(
                    self._names.models_queue, call.correlation_id, wait=False
                )
                await self._publish(
                    b"{}",
                    self._names.models_queue,
                    call.correlation_id,
                    reply_to=self._replies.name,
                    # A request no worker took in time is dropped, not answered late.
                    expiration=timeout,
                )
            message = await self._next(call)
        finally:
            del self._pending[call.correlation_id]
        answer = models_reply_adapter.validate_json(message.body)
        if isinstance(answer, ErrorReply):
            raise error_from_reply(answer)
        return answer.models

    async def workers(self) -> int:
        """How many workers take requests now: the consumers of the requests queue (0 when
        no worker has declared it yet). A request sent while there are none waits in the
        queue until one comes, or its deadline passes."""
        # A channel of its own, not robust: a queue that does not exist closes the channel.
        try:
            async with aio_pika.Channel(self._connection) as channel:
                queue = await channel.declare_queue(self._names.requests_queue, passive=True)
        except aio_pika.exceptions.ChannelNotFoundEntity:
            return 0
        return queue.declaration_result.consumer_count or 0

    @property
    def connected(self) -> bool:
        """Whether the connection to RabbitMQ is up (it reconnects by itself)."""
        return self._connection.connected.is_set()

    async def _exchange(
        self,
        request: bytes,
        timeout: float | None,
        correlation_id: str | None,
        extra_headers: Mapping[str, Any] | None,
    ) -> AsyncGenerator[ChatEvent, None]:
        timeout = self._timeout if timeout is None else timeout
        call = self._call(correlation_id or uuid.uuid4().hex, timeout)
        correlation_id = call.correlation_id
        headers: dict[str, Any] = dict(extra_headers or {})
        if timeout is not None:
            # A string: pamqp (under aio-pika) sends a float as 32 bits, a minute off by now.
            headers[DEADLINE_HEADER] = f"{time.time() + timeout:.3f}"
        ended = False
        try:
            async with call.within_timeout():
                await self._look_for_workers(
                    self._names.requests_queue, correlation_id, wait=self._wait_for_worker
                )
                await self._replies.bind(self._replies_exchange, routing_key=correlation_id)
                await self._publish(
                    request,
                    self._names.requests_queue,
                    correlation_id,
                    headers=headers,
                )
            attempt, next_seq, shown = 0, 0, False
            while True:
                reply = _parse_reply(await self._next(call))
                if reply is None or (reply.attempt, reply.seq) < (attempt, next_seq):
                    continue  # unreadable, a duplicate, or from an attempt already superseded
                if reply.attempt > attempt:
                    if shown:
                        yield Restarted(correlation_id=correlation_id, attempt=reply.attempt)
                    attempt, shown = reply.attempt, False
                next_seq = reply.seq + 1
                if isinstance(reply, ErrorReply):
                    ended = True
                    raise error_from_reply(reply)
                if isinstance(reply, DoneReply):
                    ended = True
                    yield reply
                    return
                shown = True
                yield reply
        finally:
            if self._connection.connected.is_set():
                # Shielded: a second cancel must not keep the worker from hearing of the first.
                if not ended:
                    await asyncio.shield(self._publish_cancel_when_open(correlation_id))
                release = self._release(call, waits_for_the_end=not ended)
                if ended:
                    await asyncio.shield(release)
                else:
                    # The caller need not wait for the worker to confirm the cancel.
                    self._in_background(release)
            else:
                # Done once the connection is back, which the caller need not wait for.
                self._in_background(self._release(call, cancel=not ended))

    def _in_background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _call(self, correlation_id: str, timeout: float | None) -> _Call:
        if correlation_id in self._pending:
            raise ValueError(f"a request with correlation id {correlation_id!r} is in flight")
        if timeout is not None and timeout <= 0:
            raise DeadlineExceededError(
                "the timeout had passed before the request was sent",
                retryable=False,
                correlation_id=correlation_id,
            )
        loop = asyncio.get_running_loop()
        give_up_at = None if timeout is None else loop.time() + timeout
        call = _Call(correlation_id, give_up_at)
        self._pending[correlation_id] = call
        return call

    async def _publish(
        self, body: bytes, queue: str, correlation_id: str, **properties: Any
    ) -> None:
        """Publish to a queue, mandatory: a queue that does not exist means no worker. A
        publish the broker refuses (nack) means the queue is full: the request queue's
        overflow policy is reject-publish."""
        try:
            confirmation = await self._channel.default_exchange.publish(
                aio_pika.Message(
                    body,
                    content_type="application/json",
                    correlation_id=correlation_id,
                    **properties,
                ),
                routing_key=queue,
                mandatory=True,
            )
        except aio_pika.exceptions.DeliveryError:
            raise ServiceUnavailableError(
                f"queue {queue!r} refused the request: it is full",
                retryable=True,
                correlation_id=correlation_id,
            ) from None
        if isinstance(confirmation, DeliveredMessage):
            raise ServiceUnavailableError(
                f"no queue {queue!r}: no worker has declared it",
                retryable=True,
                correlation_id=correlation_id,
            )

    async def _look_for_workers(self, queue: str, correlation_id: str, *, wait: bool) -> None:
        """Say at once when no worker consumes `queue`: log it when the request is to
        `wait` for one, else raise ServiceUnavailableError (see the class)."""
        try:
            channel = await self._probe.get_underlay_channel()
            declared = await channel.queue_declare(queue, passive=True)
        except (aio_pika.exceptions.AMQPError, ChannelInvalidStateError):
            return  # no such queue (the mandatory publish reports that), or no channel
        if declared.consumer_count:
            return
        if not wait:
            raise ServiceUnavailableError(
                f"no worker consumes {queue!r}",
                retryable=True,
                correlation_id=correlation_id,
            )
        logger.warning(
            "no worker consumes %r: the request waits there for one, until its deadline",
            queue,
        )

    async def _next(self, call: _Call) -> AbstractIncomingMessage:
        async with call.within_timeout():
            message = await call.replies.get()
        if message is None:
            what = "the client was closed" if self._closing else "the connection was lost"
            raise ServiceUnavailableError(
                f"{what} while waiting for the answer",
                retryable=True,
                correlation_id=call.correlation_id,
            )
        return message

    async def _release(
        self, call: _Call, *, cancel: bool = False, waits_for_the_end: bool = False
    ) -> None:
        """Stop listening for a request's replies: first cancel it (`cancel`), or wait for
        the worker to end the request it was sent a cancel for (`waits_for_the_end`)."""
        correlation_id = call.correlation_id
        try:
            if self._closing:
                return  # close() cancels it, and the reply queue goes with the connection
            await self._channel.ready()  # after a lost connection: until it is back
            if cancel:
                await self._publish_cancel(correlation_id)
            if cancel or waits_for_the_end:
                await self._until_ended(call)
                if self._closing:
                    return  # the reply queue goes with the connection
            await self._replies.unbind(self._replies_exchange, routing_key=correlation_id)
        except (aio_pika.exceptions.AMQPError, ConnectionError, ChannelInvalidStateError) as error:
            logger.warning("could not release request %s: %r", correlation_id, error)
        finally:
            del self._pending[correlation_id]

    async def _publish_cancel_when_open(self, correlation_id: str) -> None:
        if self._closing:
            return  # close() cancels it
        try:
            await self._publish_cancel(correlation_id)
        except (aio_pika.exceptions.AMQPError, ConnectionError, ChannelInvalidStateError) as error:
            logger.warning("could not cancel request %s: %r", correlation_id, error)

    async def _until_ended(self, call: _Call) -> None:
        """Keep listening, for at most `CANCEL_GRACE` seconds, until the worker ends the
        cancelled request. Unbinding at once would make the worker's next reply unroutable,
        and the worker would record the request as `requester_gone`, not `cancelled`."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CANCEL_GRACE):
                while (message := await call.replies.get()) is not None:
                    if isinstance(_parse_reply(message), DoneReply | ErrorReply):
                        return

    async def _publish_cancel(self, correlation_id: str) -> None:
        await self._cancel_exchange.publish(
            aio_pika.Message(
                CancelRequest(correlation_id=correlation_id).model_dump_json().encode(),
                content_type="application/json",
                correlation_id=correlation_id,
            ),
            routing_key="",
            mandatory=False,
        )

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        # No await before the hand-over: deliveries run as tasks started in arrival order.
        call = self._pending.get(message.correlation_id or "")
        if call is None:
            logger.debug("reply for no request in flight: %s", message.correlation_id)
            return
        call.replies.put_nowait(message)

    def _on_connection_closed(self, _: object, error: BaseException | None) -> None:
        # The exclusive reply queue, with any reply sent meanwhile, went with the
        # connection: the requests waiting for replies would wait forever.
        for call in self._pending.values():
            call.replies.put_nowait(None)


async def _declare(channel: AbstractRobustChannel, exchange: RabbitExchange) -> AbstractExchange:
    return await channel.declare_exchange(
        exchange.name,
        exchange.type.value,
        durable=exchange.durable,
        auto_delete=exchange.auto_delete,
        arguments=exchange.arguments,
    )


def _request(messages: Messages, *, stream: bool, **fields: Unpack[RequestFields]) -> bytes:
    """The request's body; raises `InvalidRequestError` before anything is sent when it
    breaks the schema or cannot be JSON."""
    if isinstance(messages, str):
        messages = [ChatMessage(role="user", content=messages)]
    try:
        request = ChatRequest.model_validate(
            {"messages": list(messages), "stream": stream, **fields}
        )
        return request.model_dump_json(exclude_none=True).encode()
    except ValidationError as error:
        raise InvalidRequestError(validation_problems(error.errors())[0], retryable=False) from None
    except PydanticSerializationError as error:
        # Lone surrogates: bytes that were not UTF-8, decoded with surrogateescape (as
        # Python decodes command-line arguments, and standard input in the C locale).
        problem = (
            "the request holds text that is not valid UTF-8: convert it to UTF-8 first "
            "(iconv -f ENCODING -t UTF-8)"
            if "surrogates not allowed" in str(error)
            else f"the request cannot be sent as JSON: {error}"
        )
        raise InvalidRequestError(problem, retryable=False) from None


def _parse_reply(message: AbstractIncomingMessage) -> ChunkReply | DoneReply | ErrorReply | None:
    try:
        return reply_adapter.validate_json(message.body)
    except ValidationError as error:
        logger.warning("unreadable reply for %s dropped: %s", message.correlation_id, error)
        return None
