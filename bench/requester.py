"""A requester in raw aio-pika, written from the README's contract, that timestamps every
reply as it arrives."""

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Self

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)

from chatbus.settings import Settings


@dataclass
class Stream:
    """One request and its replies, with the `perf_counter` time each one arrived."""

    correlation_id: str
    sent_at: float = 0.0
    replies: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    ended: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def first_chunk_at(self) -> float:
        return next(at for at, reply in self.replies if reply["type"] == "chunk")

    @property
    def terminal(self) -> dict[str, Any]:
        return self.replies[-1][1]

    def chunks(self) -> list[tuple[float, str]]:
        return [(at, reply["content"]) for at, reply in self.replies if reply["type"] == "chunk"]


class Requester:
    """Binds one reply queue of its own to the replies exchange, once per correlation id,
    before any request is sent, so that the binding is not part of what is timed."""

    def __init__(self, connection: AbstractRobustConnection, settings: Settings) -> None:
        self._connection = connection
        self._settings = settings
        self._streams: dict[str, Stream] = {}

    async def __aenter__(self) -> Self:
        # Requests are published without confirms: the requester's own wait is not measured.
        self._channel: AbstractChannel = await self._connection.channel(publisher_confirms=False)
        self._queue: AbstractQueue = await self._channel.declare_queue(
            exclusive=True, auto_delete=True
        )
        await self._queue.consume(self._deliver, no_ack=True)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._channel.close()

    async def prepare(self, count: int) -> list[Stream]:
        streams = [Stream(uuid.uuid4().hex) for _ in range(count)]
        for stream in streams:
            await self._queue.bind(self._settings.replies_exchange, stream.correlation_id)
            self._streams[stream.correlation_id] = stream
        return streams

    async def send(self, stream: Stream, body: dict[str, Any]) -> None:
        message = aio_pika.Message(
            json.dumps(body).encode(),
            content_type="application/json",
            correlation_id=stream.correlation_id,
        )
        stream.sent_at = time.perf_counter()
        await self._channel.default_exchange.publish(
            message, routing_key=self._settings.requests_queue
        )

    async def _deliver(self, message: AbstractIncomingMessage) -> None:
        arrived_at = time.perf_counter()
        reply = json.loads(message.body)
        stream = self._streams[reply["correlation_id"]]
        stream.replies.append((arrived_at, reply))
        if reply["type"] != "chunk":
            stream.ended.set()


async def all_ended(streams: list[Stream], timeout: float) -> None:
    async with asyncio.timeout(timeout):
        for stream in streams:
            await stream.ended.wait()
