"""A requester that survives what chaos tests do to the broker, and the ledger that tells
whether the service kept its promise: every accepted request ends in exactly one terminal
reply per attempt, or in the dead-letter queue.

`DurableRequester` reads its replies from a durable quorum queue of its own, bound to the
replies exchange per correlation id, over a connection to every node of `rabbitmq_url`: a
node, a connection or the requester's consumer may go, the replies wait in the queue. A
request counts as accepted once the broker confirmed it. Replies can arrive twice (a reply
whose ack was lost is delivered again); the ledger keeps one of each (attempt, seq) and
counts the others as redelivered.

```
async with DurableRequester(url, names, "soak.replies") as requester:
    await requester.send({"messages": [...]})
    await requester.ledger.settled(timeout=60)
    tally = requester.ledger.tally(dead_lettered=await dead_letter_ids(url, names))
```
"""

import asyncio
import json
import time
import uuid
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

import aio_pika
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue, AbstractRobustChannel
from aio_pika.exceptions import CONNECTION_EXCEPTIONS
from aiormq.abc import DeliveredMessage

from chatbus import failover, topology
from chatbus.contract import ContractNames
from chatbus.dlq import DeadLetterQueue
from chatbus.settings import Settings


def isolated_settings(prefix: str, **values: Any) -> Settings:
    """Worker settings whose queues and exchanges all have names of their own, starting
    with `prefix`, so that a run disturbs no other on the same broker."""
    return Settings(
        requests_queue=f"{prefix}.chat.requests",
        replies_exchange=f"{prefix}.chat.replies",
        cancel_exchange=f"{prefix}.chat.cancel",
        dead_letter_queue=f"{prefix}.chat.requests.dlq",
        models_queue=f"{prefix}.chat.models",
        **values,
    )


SEND_TIMEOUT = 10.0
"""Seconds a send may take (binding, publishing and the confirm), a reconnect included."""


class NotSent(Exception):
    """The broker did not confirm the request: it may or may not be in the queue."""


@dataclass
class RequestRecord:
    """What one request received: each distinct reply by (attempt, seq), its type."""

    correlation_id: str
    accepted: bool = False
    replies: dict[tuple[int, int], str] = field(default_factory=dict)
    redelivered: int = 0
    """Replies received again (same attempt and seq)."""

    @property
    def last_attempt(self) -> int:
        return max((attempt for attempt, _ in self.replies), default=0)

    def terminals(self, attempt: int) -> int:
        return sum(1 for (a, _), kind in self.replies.items() if a == attempt and kind != "chunk")

    @property
    def ended(self) -> bool:
        """Its latest attempt has its terminal reply."""
        return self.last_attempt > 0 and self.terminals(self.last_attempt) > 0

    @property
    def duplicate_terminals(self) -> int:
        """Terminal replies beyond the one each attempt may have."""
        attempts = {attempt for attempt, _ in self.replies}
        return sum(max(self.terminals(attempt) - 1, 0) for attempt in attempts)


@dataclass(frozen=True)
class Tally:
    accepted: int
    answered: int
    """Accepted requests whose latest attempt ended with a terminal reply."""
    lost: int
    """Accepted, not answered and not in the dead-letter queue."""
    dead_lettered: int
    duplicate_terminals: int
    redelivered_replies: int
    unconfirmed: int
    """Requests the broker did not confirm (not counted as accepted)."""
    outcomes: dict[str, int]
    """Terminal replies of the latest attempts by type (`done`) or error code."""
    attempts: dict[int, int]
    """How many accepted requests took 1, 2, ... attempts."""
    lost_ids: list[str]

    def as_dict(self) -> dict[str, Any]:
        return {
            "accepted": self.accepted,
            "answered": self.answered,
            "lost": self.lost,
            "dead_lettered": self.dead_lettered,
            "duplicate_terminals": self.duplicate_terminals,
            "redelivered_replies": self.redelivered_replies,
            "unconfirmed": self.unconfirmed,
            "outcomes": self.outcomes,
            "attempts": {str(k): v for k, v in sorted(self.attempts.items())},
            "lost_ids": self.lost_ids,
        }


class Ledger:
    """Every request sent and every reply received, and when the last one came."""

    def __init__(self) -> None:
        self.requests: dict[str, RequestRecord] = {}
        self._outcomes: dict[str, str] = {}
        self._changed = asyncio.Event()
        self.last_reply_at = time.monotonic()

    def sent(self, correlation_id: str) -> RequestRecord:
        record = self.requests[correlation_id] = RequestRecord(correlation_id)
        return record

    def reply(self, reply: dict[str, Any]) -> None:
        record = self.requests.get(str(reply.get("correlation_id")))
        if record is None:
            return
        key = (int(reply["attempt"]), int(reply["seq"]))
        if key in record.replies:
            record.redelivered += 1
            return
        record.replies[key] = reply["type"]
        self.last_reply_at = time.monotonic()
        if reply["type"] != "chunk" and key[0] >= record.last_attempt:
            self._outcomes[record.correlation_id] = reply.get("code", reply["type"])
        self._changed.set()

    async def wait_for(self, condition: Callable[[], bool], timeout: float) -> None:
        """Until `condition()` holds, checked whenever a reply arrives."""
        async with asyncio.timeout(timeout):
            while not condition():
                self._changed.clear()
                await self._changed.wait()

    def unsettled(self) -> list[RequestRecord]:
        return [r for r in self.requests.values() if r.accepted and not r.ended]

    async def settled(self, timeout: float, quiet: float | None = None) -> None:
        """Until every accepted request ended, or `timeout` passed, or (when given) no
        reply came for `quiet` seconds: what is left then is for the dead-letter queue
        to explain, or lost."""
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + timeout
        while self.unsettled():
            self._changed.clear()
            wait = give_up_at - loop.time()
            if quiet is not None:
                wait = min(wait, self.last_reply_at + quiet - time.monotonic())
            if wait <= 0:
                return
            try:
                async with asyncio.timeout(wait):
                    await self._changed.wait()
            except TimeoutError:
                continue

    def tally(self, dead_lettered: Collection[str]) -> Tally:
        accepted = [r for r in self.requests.values() if r.accepted]
        dead = set(dead_lettered)
        lost = [r for r in accepted if not r.ended and r.correlation_id not in dead]
        return Tally(
            accepted=len(accepted),
            answered=sum(1 for r in accepted if r.ended),
            lost=len(lost),
            dead_lettered=sum(1 for r in accepted if r.correlation_id in dead),
            duplicate_terminals=sum(r.duplicate_terminals for r in accepted),
            redelivered_replies=sum(r.redelivered for r in self.requests.values()),
            unconfirmed=sum(1 for r in self.requests.values() if not r.accepted),
            outcomes=dict(
                Counter(
                    outcome
                    for cid, outcome in self._outcomes.items()
                    if self.requests[cid].accepted and self.requests[cid].ended
                )
            ),
            attempts=dict(Counter(max(r.last_attempt, 1) for r in accepted)),
            lost_ids=sorted(r.correlation_id for r in lost),
        )


class DurableRequester:
    """Sends requests and records their replies in `ledger` (see the module docstring).
    The reply queue is deleted on leaving."""

    def __init__(self, rabbitmq_url: str, names: ContractNames, reply_queue: str) -> None:
        self._url = rabbitmq_url
        self._names = names
        self._reply_queue_name = reply_queue
        self.ledger = Ledger()

    async def __aenter__(self) -> Self:
        self._connection = await failover.connect_robust(
            self._url,
            reconnect_interval=0.5,
            client_properties={"connection_name": f"chaos-requester-{uuid.uuid4().hex[:8]}"},
        )
        self._channel: AbstractRobustChannel = await self._connection.channel()
        replies = topology.replies_exchange(self._names)
        self._exchange = await self._channel.declare_exchange(
            replies.name, replies.type.value, durable=True
        )
        self._queue: AbstractQueue = await self._channel.declare_queue(
            self._reply_queue_name, durable=True, arguments={"x-queue-type": "quorum"}
        )
        await self._queue.consume(self._on_reply)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            async with asyncio.timeout(SEND_TIMEOUT):
                await self._channel.queue_delete(self._reply_queue_name)
        finally:
            await self._connection.close()

    async def send(self, body: dict[str, Any]) -> RequestRecord:
        """Bind, publish and wait for the confirm; NotSent when that did not happen within
        SEND_TIMEOUT (the request is then recorded as not accepted)."""
        record = self.ledger.sent(uuid.uuid4().hex)
        try:
            async with asyncio.timeout(SEND_TIMEOUT):
                await self._queue.bind(self._exchange, routing_key=record.correlation_id)
                confirmation = await self._channel.default_exchange.publish(
                    aio_pika.Message(
                        json.dumps(body).encode(),
                        content_type="application/json",
                        correlation_id=record.correlation_id,
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    ),
                    routing_key=self._names.requests_queue,
                    mandatory=True,
                )
        except (TimeoutError, *CONNECTION_EXCEPTIONS) as error:
            raise NotSent(f"{record.correlation_id}: {error!r}") from error
        if isinstance(confirmation, DeliveredMessage):
            raise NotSent(f"{record.correlation_id}: no queue {self._names.requests_queue!r}")
        record.accepted = True
        return record

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        self.ledger.reply(json.loads(message.body))
        # If the ack is lost with the connection, the reply comes again: the ledger
        # counts it as redelivered.
        await message.ack()


async def dead_letter_ids(rabbitmq_url: str, names: ContractNames) -> set[str]:
    """The correlation ids in the dead-letter queue (which stay there)."""
    async with await failover.connect(rabbitmq_url) as connection:
        queue = DeadLetterQueue(connection, names.dead_letter_queue, names.requests_queue)
        return {letter.correlation_id or "" for letter in await queue.list()}
