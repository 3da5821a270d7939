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
import contextlib
import json
import time
import uuid
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any, Self

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
)
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
RECONNECT_INTERVAL = 0.5


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
        self._unsettled: set[str] = set()
        """Accepted requests whose latest attempt has no terminal reply: kept as replies
        come, since waiting must not cost a pass over every request per reply."""
        self._changed = asyncio.Event()
        self.last_reply_at = time.monotonic()

    def sent(self, correlation_id: str) -> RequestRecord:
        record = self.requests[correlation_id] = RequestRecord(correlation_id)
        return record

    def accepted(self, record: RequestRecord) -> None:
        record.accepted = True
        self._update(record)

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
        self._update(record)
        self._changed.set()

    def _update(self, record: RequestRecord) -> None:
        if record.accepted and not record.ended:
            self._unsettled.add(record.correlation_id)
        else:
            self._unsettled.discard(record.correlation_id)

    async def wait_for(self, condition: Callable[[], bool], timeout: float) -> None:
        """Until `condition()` holds, checked whenever a reply arrives."""
        async with asyncio.timeout(timeout):
            while not condition():
                self._changed.clear()
                await self._changed.wait()

    def unsettled(self) -> list[RequestRecord]:
        return [self.requests[correlation_id] for correlation_id in self._unsettled]

    async def settled(self, timeout: float, quiet: float | None = None) -> None:
        """Until every accepted request ended, or `timeout` passed, or (when given) no
        reply came for `quiet` seconds: what is left then is for the dead-letter queue
        to explain, or lost."""
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + timeout
        while self._unsettled:
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


@dataclass(frozen=True)
class _Session:
    """One connection's channel, and the reply queue and exchange declared on it."""

    channel: AbstractChannel
    queue: AbstractQueue
    exchange: AbstractExchange


class DurableRequester:
    """Sends requests and records their replies in `ledger` (see the module docstring).
    The reply queue is deleted on leaving.

    It keeps its own connection: a plain one, made again whenever it or its channel closes
    (not aio-pika's robust connection, whose channel stayed unrestored after a broker
    restart under load in the soak, so that the requester, not the service, lost replies).
    """

    def __init__(self, rabbitmq_url: str, names: ContractNames, reply_queue: str) -> None:
        self._url = rabbitmq_url
        self._names = names
        self._reply_queue_name = reply_queue
        self._name = f"chaos-requester-{uuid.uuid4().hex[:8]}"
        self.ledger = Ledger()
        self._session: _Session | None = None
        self._connected = asyncio.Event()

    async def __aenter__(self) -> Self:
        self._keeping = asyncio.create_task(self._stay_connected())
        async with asyncio.timeout(SEND_TIMEOUT):
            await self._connected.wait()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._keeping.cancel()
        await asyncio.gather(self._keeping, return_exceptions=True)
        async with asyncio.timeout(SEND_TIMEOUT):
            async with await failover.connect(self._url) as connection:
                channel = await connection.channel()
                await channel.queue_delete(self._reply_queue_name)

    async def _stay_connected(self) -> None:
        while True:
            try:
                async with await failover.connect(
                    self._url, client_properties={"connection_name": self._name}
                ) as connection:
                    channel = await connection.channel()
                    self._session = await self._open(channel)
                    self._connected.set()
                    await asyncio.wait(
                        [
                            asyncio.ensure_future(connection.closed()),
                            asyncio.ensure_future(channel.closed()),
                        ],
                        return_when=asyncio.FIRST_COMPLETED,
                    )
            except (TimeoutError, *CONNECTION_EXCEPTIONS):
                pass  # the broker is away: try again
            finally:
                self._connected.clear()
                self._session = None
            await asyncio.sleep(RECONNECT_INTERVAL)

    async def _open(self, channel: AbstractChannel) -> _Session:
        replies = topology.replies_exchange(self._names)
        exchange = await channel.declare_exchange(replies.name, replies.type.value, durable=True)
        queue = await channel.declare_queue(
            self._reply_queue_name, durable=True, arguments={"x-queue-type": "quorum"}
        )
        await queue.consume(self._on_reply)
        return _Session(channel, queue, exchange)

    async def send(self, body: dict[str, Any]) -> RequestRecord:
        """Bind, publish and wait for the confirm; NotSent when that did not happen within
        SEND_TIMEOUT (the request is then recorded as not accepted)."""
        record = self.ledger.sent(uuid.uuid4().hex)
        try:
            async with asyncio.timeout(SEND_TIMEOUT):
                await self._connected.wait()
                session = self._session
                assert session is not None
                await session.queue.bind(session.exchange, routing_key=record.correlation_id)
                confirmation = await session.channel.default_exchange.publish(
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
        self.ledger.accepted(record)
        return record

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        self.ledger.reply(json.loads(message.body))
        # If the ack is lost with the connection, the reply comes again: the ledger
        # counts it as redelivered.
        with contextlib.suppress(*CONNECTION_EXCEPTIONS):
            await message.ack()


async def dead_letter_ids(rabbitmq_url: str, names: ContractNames) -> set[str]:
    """The correlation ids in the dead-letter queue (which stay there)."""
    async with await failover.connect(rabbitmq_url) as connection:
        queue = DeadLetterQueue(connection, names.dead_letter_queue, names.requests_queue)
        return {letter.correlation_id or "" for letter in await queue.list()}
