"""Test helpers: the in-process worker and a requester written with raw aio-pika from the
README's contract alone (no chatbus client code), so the tests check the contract itself."""

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Any, Self

import aio_pika
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from faststream import FastStream

from broker import create_app
from config import Settings

DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"


@asynccontextmanager
async def running_worker(settings: Settings) -> AsyncIterator[FastStream]:
    app = create_app(settings)
    await app.start()
    try:
        yield app
    finally:
        await app.stop()


class Replies:
    """The replies of one request, as they arrive."""

    def __init__(self) -> None:
        self.messages: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()

    async def deliver(self, message: AbstractIncomingMessage) -> None:
        await self.messages.put(message)

    async def next(self, timeout: float = 10.0) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            message = await self.messages.get()
        body: dict[str, Any] = json.loads(message.body)
        body["_amqp_correlation_id"] = message.correlation_id
        return body

    async def until_terminal(self, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Every reply up to and including the first terminal one."""
        replies = []
        while True:
            reply = await self.next(timeout)
            replies.append(reply)
            if reply["type"] != "chunk":
                return replies


class Requester:
    def __init__(self, connection: AbstractRobustConnection, settings: Settings) -> None:
        self._connection = connection
        self.settings = settings

    async def __aenter__(self) -> Self:
        self.channel = await self._connection.channel()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.channel.close()

    async def send(
        self,
        body: dict[str, Any] | bytes,
        *,
        correlation_id: str | None = None,
        message_id: str | None = None,
        reply_to: str | None = None,
        **properties: Any,
    ) -> Replies:
        """Bind a reply queue (unless replies go to `reply_to`), then publish the request.
        Without a correlation id or message id, one correlation id is made up."""
        if correlation_id is None and message_id is None:
            correlation_id = uuid.uuid4().hex
        replies = Replies()
        if reply_to == DIRECT_REPLY_TO:
            await self.channel.get_underlay_channel()
            queue = await self.channel.get_queue(DIRECT_REPLY_TO, ensure=False)
            await queue.consume(replies.deliver, no_ack=True)
        elif reply_to is None:
            queue = await self.channel.declare_queue(exclusive=True, auto_delete=True)
            await queue.bind(
                self.settings.replies_exchange, routing_key=correlation_id or message_id
            )
            await queue.consume(replies.deliver, no_ack=True)
        else:
            queue = await self.channel.declare_queue(reply_to, exclusive=True, auto_delete=True)
            await queue.consume(replies.deliver, no_ack=True)
        payload = body if isinstance(body, bytes) else json.dumps(body).encode()
        properties.setdefault("content_type", "application/json")
        await self.channel.default_exchange.publish(
            aio_pika.Message(
                payload,
                correlation_id=correlation_id,
                message_id=message_id,
                reply_to=reply_to,
                **properties,
            ),
            routing_key=self.settings.requests_queue,
        )
        return replies

    async def chat(self, body: dict[str, Any] | bytes, **kwargs: Any) -> list[dict[str, Any]]:
        replies = await self.send(body, **kwargs)
        return await replies.until_terminal()


def user(content: str = "Why is the sky blue?", **fields: Any) -> dict[str, Any]:
    """A request body with one user message."""
    return {"messages": [{"role": "user", "content": content}], **fields}
