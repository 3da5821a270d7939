"""Dead letters an operator can act on: list them, replay them to the request queue, purge
some (`chatbus dlq ...`).

A request ends in the dead-letter queue when it was invalid, returned more than
`DELIVERY_LIMIT` times, or failed on its last delivery; RabbitMQ records why in its
`x-death` header. Reading a message of a queue takes it out until it is acknowledged or
returned, so every operation here takes the dead letters it needs one by one (at most as
many as the queue held when it started, so letters dead-lettered meanwhile do not keep it
going), acts on those it was asked about, and returns the others in one go at the end. If
the process dies, the broker returns every letter not yet acknowledged.

Replay publishes a copy of a dead letter to the request queue and waits for the broker to
confirm it before it acknowledges the dead letter: interrupted at any point, nothing is
lost, and at worst one request is both replayed and still in the dead-letter queue.

RabbitMQ counts a returned message as a delivery on quorum queues (on 4.0 to 4.2 even a
`nack` with requeue does, and the 4.x default `x-delivery-limit` of 20 applies to the
dead-letter queue too): there, listing a letter many times would end by dropping it.
"""

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage
from aiormq.abc import DeliveredMessage

Action = Callable[[AbstractIncomingMessage, AbstractChannel], Awaitable[bool]]
"""Called with each letter taken: True when the letter is to be acknowledged."""

BROKER_HEADERS = ("x-death", "x-delivery-count")
BROKER_HEADER_PREFIXES = ("x-first-death-", "x-last-death-")
"""Headers RabbitMQ set on the way to the dead-letter queue; a replayed request starts
without them (the worker reads its attempt from `x-delivery-count`)."""


RETURN_WAIT = 5.0


class DeadLetterError(RuntimeError):
    """A dead letter could not be moved; it is still in the dead-letter queue."""


@dataclass(frozen=True)
class DeadLetter:
    """One message of the dead-letter queue, as far as its headers and body tell."""

    correlation_id: str | None
    reason: str | None
    """Why it was dead-lettered (`x-death`): `rejected` (invalid, or failed on its last
    delivery), `delivery_limit`, `expired`, ..."""
    count: int | None
    """How often it was dead-lettered from that queue for that reason (`x-death`)."""
    queue: str | None
    dead_lettered_at: datetime | None
    published_at: datetime | None
    model: str | None
    body: bytes

    @classmethod
    def of(cls, message: AbstractIncomingMessage) -> "DeadLetter":
        deaths = (message.headers or {}).get("x-death")
        # The most recent death first.
        last = deaths[0] if isinstance(deaths, list) and deaths else {}
        if not isinstance(last, dict):
            last = {}
        died_at = last.get("time")
        count = last.get("count")
        return cls(
            correlation_id=message.correlation_id or message.message_id,
            reason=_text(last.get("reason")),
            count=count if isinstance(count, int) else None,
            queue=_text(last.get("queue")),
            dead_lettered_at=died_at if isinstance(died_at, datetime) else None,
            published_at=message.timestamp,
            model=_text(_request(message.body).get("model")),
            body=message.body,
        )

    def age(self, now: datetime | None = None) -> float | None:
        """Seconds since it was dead-lettered."""
        if self.dead_lettered_at is None:
            return None
        return ((now or datetime.now(UTC)) - self.dead_lettered_at).total_seconds()

    def summary(self, *, show_content: bool = False) -> dict[str, Any]:
        """As JSON data. The request's text (prompts are user data) only when asked for."""
        summary: dict[str, Any] = {
            "correlation_id": self.correlation_id,
            "reason": self.reason,
            "count": self.count,
            "queue": self.queue,
            "dead_lettered_at": _iso(self.dead_lettered_at),
            "age_seconds": self.age(),
            "published_at": _iso(self.published_at),
            "model": self.model,
        }
        if show_content:
            summary["content"] = self.content()
        return summary

    def content(self) -> Any:
        """The request's body: its JSON, or its text when it is not JSON."""
        try:
            return json.loads(self.body)
        except ValueError:
            return self.body.decode(errors="replace")


@dataclass(frozen=True)
class Outcome:
    """What an operation did: the letters it acted on, and the ids it was asked about that
    no letter carries."""

    done: list[DeadLetter]
    not_found: set[str]


class DeadLetterQueue:
    """The dead-letter queue of a deployment, on a connection the caller owns."""

    def __init__(
        self, connection: AbstractConnection, dead_letter_queue: str, requests_queue: str
    ) -> None:
        self._connection = connection
        self.name = dead_letter_queue
        self._requests_queue = requests_queue

    async def count(self) -> int:
        channel = await self._connection.channel()
        async with channel:
            return await _ready(channel, self.name)

    async def list(self, limit: int | None = None) -> list[DeadLetter]:
        """The dead letters from the head of the queue (the first `limit`); all stay in the
        queue. (RabbitMQ puts the ones a partial listing read back behind the others.)"""
        letters: list[DeadLetter] = []

        async def look(message: AbstractIncomingMessage, _: AbstractChannel) -> bool:
            letters.append(DeadLetter.of(message))
            return False

        await self._scan(look, limit)
        return letters

    async def replay(self, ids: Collection[str] | None = None) -> Outcome:
        """Move the dead letters with these correlation ids (every one when `ids` is None)
        back to the request queue."""

        async def move(message: AbstractIncomingMessage, channel: AbstractChannel) -> bool:
            confirmation = await channel.default_exchange.publish(
                _replayed(message), routing_key=self._requests_queue, mandatory=True
            )
            if isinstance(confirmation, DeliveredMessage):
                raise DeadLetterError(
                    f"no queue {self._requests_queue!r} to replay to: no worker declared it"
                )
            return True

        return await self._act_on(ids, move)

    async def purge(self, ids: Collection[str]) -> Outcome:
        """Drop the dead letters with these correlation ids."""

        async def drop(message: AbstractIncomingMessage, channel: AbstractChannel) -> bool:
            return True

        return await self._act_on(ids, drop)

    async def _act_on(self, ids: Collection[str] | None, act: Action) -> Outcome:
        wanted = None if ids is None else set(ids)
        done: list[DeadLetter] = []

        async def maybe(message: AbstractIncomingMessage, channel: AbstractChannel) -> bool:
            letter = DeadLetter.of(message)
            if wanted is not None and letter.correlation_id not in wanted:
                return False
            if await act(message, channel):
                done.append(letter)
                return True
            return False

        await self._scan(maybe, None)
        found = {letter.correlation_id for letter in done}
        return Outcome(done, set() if wanted is None else wanted - found)

    async def _scan(self, visit: Action, limit: int | None) -> None:
        """Take the letters one by one from the head of the queue, as many as it held at
        the start (or `limit`); acknowledge those `visit` acted on, return the others at
        the end, and wait (briefly) until the queue counts them again, so that the next
        command finds them."""
        channel = await self._connection.channel(publisher_confirms=True)
        async with channel:
            queue = await channel.get_queue(self.name, ensure=False)
            held = await _ready(channel, self.name)
            kept: AbstractIncomingMessage | None = None
            acked = 0
            try:
                for _ in range(held if limit is None else min(held, limit)):
                    message = await queue.get(no_ack=False, fail=False)
                    if message is None:
                        break
                    if await visit(message, channel):
                        await message.ack()
                        acked += 1
                    else:
                        kept = message
            finally:
                if kept is not None and not channel.is_closed:
                    # Every letter not acknowledged up to this one, in the order taken.
                    await kept.nack(multiple=True, requeue=True)
            if kept is not None:
                await _until_ready(channel, self.name, held - acked)


async def _ready(channel: AbstractChannel, queue: str) -> int:
    declared = await channel.declare_queue(queue, passive=True)
    return declared.declaration_result.message_count or 0


async def _until_ready(channel: AbstractChannel, queue: str, count: int) -> None:
    """A quorum queue takes returned messages back asynchronously: until it counts at
    least `count` ready ones again, for up to RETURN_WAIT seconds (then they are on their
    way all the same)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(RETURN_WAIT):
            while await _ready(channel, queue) < count:  # noqa: ASYNC110 - no event for it
                await asyncio.sleep(0.02)


def _replayed(message: AbstractIncomingMessage) -> aio_pika.Message:
    """The request as its requester sent it: the same body and properties, without what
    the broker added on the way to the dead-letter queue, and without `user_id`, which the
    broker checks against whoever replays it."""
    headers = {
        key: value
        for key, value in (message.headers or {}).items()
        if key not in BROKER_HEADERS and not key.startswith(BROKER_HEADER_PREFIXES)
    }
    return aio_pika.Message(
        message.body,
        headers=headers,
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        delivery_mode=message.delivery_mode,
        priority=message.priority,
        correlation_id=message.correlation_id,
        reply_to=message.reply_to,
        expiration=message.expiration,
        message_id=message.message_id,
        timestamp=message.timestamp,
        type=message.type,
        app_id=message.app_id,
    )


def _request(body: bytes) -> dict[str, Any]:
    try:
        request = json.loads(body)
    except ValueError:
        return {}
    return request if isinstance(request, dict) else {}


def _text(value: object) -> str | None:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return value if isinstance(value, str) else None


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None
