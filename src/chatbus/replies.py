"""The reply side of one request: where its replies go and how they are published.

The worker makes a `ReplyPublisher` per delivery; the generation writes its chunks to it
through the `ChunkSink` protocol, and the worker ends it with `done` or `error`.
"""

import asyncio
from dataclasses import dataclass
from typing import Protocol

from aiormq.abc import DeliveredMessage
from faststream.rabbit import RabbitBroker, RabbitExchange
from pydantic import BaseModel

from chatbus.contract import (
    AssistantMessage,
    ChunkReply,
    DoneReply,
    ErrorReply,
    Timings,
    ToolCall,
    Usage,
)
from chatbus.errors import ChatError, error_reply
from chatbus.instruments import Instruments

__all__ = ["ChunkSink", "Completion", "ReplyPublisher", "ReplyRoute", "RequesterGone"]

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

    async def error(self, error: ChatError) -> None:
        await self._publish(error_reply(error, self._correlation_id, self._attempt, self._seq))

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
