"""The reply side of one request: where its replies go and how they are published.

The worker makes a `ReplyPublisher` per delivery; the generation writes its chunks to it
through the `ChunkSink` protocol, and the worker ends it with `done` or `error`.

Replies are the hot path: they go straight onto the broker's channel, around FastStream's
publisher and its middlewares (that path cost about a quarter of the worker's CPU per
token). What those middlewares added is added here instead, computed once per request: the
request's trace context in each reply's headers, and the count of replies published.
"""

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, Self

import aiormq
from aio_pika.abc import AbstractChannel
from aiormq.abc import DeliveredMessage
from faststream.rabbit import RabbitBroker
from pydantic import BaseModel

from chatbus import topology
from chatbus.contract import (
    AssistantMessage,
    ChunkReply,
    ContractNames,
    DoneReply,
    ErrorReply,
    Timings,
    ToolCall,
    Usage,
)
from chatbus.errors import ChatError, error_reply
from chatbus.instruments import Instruments

__all__ = [
    "ChunkSink",
    "Completion",
    "ReplyExchanges",
    "ReplyPublisher",
    "ReplyRoute",
    "RequesterGone",
]

_DIRECT_REPLY_TO_PREFIX = "amq.rabbitmq.reply-to."


class RequesterGone(Exception):
    """A reply came back unroutable: nobody is listening for this correlation id."""


class ChunkSink(Protocol):
    """Where a generation sends its chunks; raises to stop the generation."""

    async def chunk(
        self, content: str, thinking: str | None, tool_calls: list[ToolCall] | None
    ) -> None: ...


@dataclass(frozen=True)
class Completion:
    """What the terminal `done` reply reports."""

    done_reason: str
    model: str
    message: AssistantMessage
    usage: Usage
    timings: Timings
    server: str | None = None
    """The Ollama server that answered (its short id)."""


@dataclass(frozen=True)
class ReplyRoute:
    channel: AbstractChannel
    exchange: str
    routing_key: str

    @property
    def destination(self) -> str:
        """The exchange, or "default" for a requester's own queue: a bounded metric label."""
        return self.exchange or "default"

    @property
    def detects_requester_gone(self) -> bool:
        """Whether a mandatory publish tells us nobody is listening. Not so for direct
        reply-to: RabbitMQ returns mandatory replies there even when it delivers them."""
        return not self.routing_key.startswith(_DIRECT_REPLY_TO_PREFIX)


class ReplyExchanges:
    """Where a worker's replies go: the replies exchange, keyed by correlation id, or a
    requester's `reply_to` queue through the default exchange; both on the broker's own
    (robust) channel, declared once the broker is connected."""

    def __init__(self, replies_channel: AbstractChannel, replies_exchange: str) -> None:
        self._channel = replies_channel
        self._replies_exchange = replies_exchange

    @classmethod
    async def declare(cls, broker: RabbitBroker, names: ContractNames) -> Self:
        exchange = await broker.declare_exchange(topology.replies_exchange(names))
        return cls(exchange.channel, exchange.name)

    def route(self, reply_to: str | None, correlation_id: str) -> ReplyRoute:
        if reply_to:
            return ReplyRoute(self._channel, "", reply_to)
        return ReplyRoute(self._channel, self._replies_exchange, correlation_id)


class ReplyPublisher:
    """Publishes one attempt's replies, in order, numbered from seq 0."""

    def __init__(
        self,
        route: ReplyRoute,
        correlation_id: str,
        attempt: int,
        *,
        publish_timeout: float,
        instruments: Instruments,
        headers: Mapping[str, Any] | None = None,
    ) -> None:
        """`headers` go on every reply: the request's trace context."""
        self._instruments = instruments
        self._count_published: Callable[[], None] = instruments.reply_published(route.destination)
        self._headers = dict(headers) if headers else None
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
                server=completion.server,
            )
        )

    async def error(self, error: ChatError) -> None:
        await self._publish(error_reply(error, self._correlation_id, self._attempt, self._seq))

    async def _publish(self, reply: BaseModel) -> None:
        self._seq += 1
        route = self._route
        # Fresh properties per reply: aiormq gives each its own message_id, by which it
        # matches a returned message to its publish.
        properties = aiormq.spec.Basic.Properties(
            content_type="application/json",
            correlation_id=self._correlation_id,
            headers=self._headers,
        )
        # The timeout also covers waiting for a reconnecting channel, not just the confirm.
        async with asyncio.timeout(self._publish_timeout):
            channel = await route.channel.get_underlay_channel()
            confirmation = await channel.basic_publish(
                reply.model_dump_json(exclude_none=True).encode(),
                exchange=route.exchange,
                routing_key=route.routing_key,
                properties=properties,
                mandatory=route.detects_requester_gone,
            )
        self._count_published()
        if isinstance(confirmation, DeliveredMessage):
            raise RequesterGone(self._correlation_id)
        if isinstance(reply, DoneReply | ErrorReply):
            self._instruments.terminal_reply(reply)
