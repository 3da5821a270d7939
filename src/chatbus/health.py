"""Liveness and readiness of a worker, served on its HTTP side channel.

Liveness says only that the process and its event loop answer: a worker must not be
restarted because RabbitMQ or Ollama is down. Readiness says whether it can serve requests
now, and which check failed when it cannot.
"""

import asyncio

import aiormq
from aio_pika import RobustQueue
from faststream.asgi import AsgiResponse, get
from faststream.asgi.handlers import GetHandler
from faststream.asgi.response import JSONResponse
from faststream.asgi.types import Scope
from faststream.rabbit import RabbitBroker
from faststream.rabbit.subscriber import RabbitSubscriber

from chatbus.pool import OllamaPool

__all__ = ["OK", "Readiness", "liveness_endpoint", "readiness_endpoint"]

OK = "ok"


class Readiness:
    """Ready when the broker connection is up, every subscriber of the broker is consuming,
    and at least one Ollama server of the pool is healthy (it answers `/api/version` and its
    circuit is not open). The pool checks its servers in the background; a probe asks them
    again only when their last check is older than `ollama_cache_seconds`, so that probes of
    many workers do not add up to load on them."""

    def __init__(
        self,
        broker: RabbitBroker,
        pool: OllamaPool,
        *,
        timeout: float,
        ollama_cache_seconds: float,
    ) -> None:
        self._broker = broker
        self._pool = pool
        self._timeout = timeout
        self._ollama_cache_seconds = ollama_cache_seconds
        self.connecting = False
        """True while the worker waits for RabbitMQ to answer at start-up."""

    async def check(self) -> dict[str, str]:
        """Each check's result: `"ok"`, or what is wrong."""
        rabbitmq, consumers, ollama = await asyncio.gather(
            self._rabbitmq(), self._consumers(), self._ollama()
        )
        return {"rabbitmq": rabbitmq, "consumers": consumers, "ollama": ollama}

    def ollama_servers(self) -> dict[str, str]:
        """Each server of the pool: `"ok"`, or what is wrong with it."""
        return {
            status.id: OK if status.healthy and status.problem is None else str(status.problem)
            for status in self._pool.statuses()
        }

    async def _rabbitmq(self) -> str:
        if self.connecting:
            return "connecting"
        return OK if await self._broker.ping(self._timeout) else "no connection to RabbitMQ"

    async def _consumers(self) -> str:
        idle = [
            subscriber.queue.name
            for subscriber in self._broker.subscribers
            if isinstance(subscriber, RabbitSubscriber)
            and not await _consuming(subscriber, self._timeout)
        ]
        return f"not consuming from {', '.join(idle)}" if idle else OK

    async def _ollama(self) -> str:
        await self._pool.refresh(self._ollama_cache_seconds)
        statuses = self._pool.statuses()
        if any(status.healthy for status in statuses):
            return OK
        problems = "; ".join(f"{status.id}: {status.problem}" for status in statuses)
        return f"no Ollama server is healthy: {problems}"


def _consumer_of(subscriber: RabbitSubscriber) -> tuple[RobustQueue | None, str | None]:
    """The aio-pika queue a subscriber consumes and its consumer tag. FastStream keeps both
    to itself (private attributes, checked against 0.7.x); this is the one place that
    reaches in, because only the tag on the live channel proves that the consumer is there
    after a reconnect (consumers not restored after a broker restart is a known
    aio-pika/FastStream failure, faststream#2758)."""
    queue: RobustQueue | None = subscriber._queue_obj
    tag: str | None = subscriber._consumer_tag
    return queue, tag


async def _consuming(subscriber: RabbitSubscriber, timeout: float) -> bool:
    """Whether RabbitMQ delivers to this subscriber now."""
    queue, tag = _consumer_of(subscriber)
    if queue is None or tag is None or queue.channel.is_closed:
        return False
    try:
        # A robust channel waits here for its connection to come back.
        async with asyncio.timeout(timeout):
            channel = await queue.channel.get_underlay_channel()
    except (TimeoutError, aiormq.exceptions.ChannelInvalidStateError):
        return False
    return (
        isinstance(channel, aiormq.Channel) and not channel.is_closed and tag in channel.consumers
    )


def liveness_endpoint() -> GetHandler:
    @get(include_in_schema=False)
    async def healthz(scope: Scope) -> AsgiResponse:
        return JSONResponse({"status": "alive"})

    return healthz


def readiness_endpoint(readiness: Readiness) -> GetHandler:
    @get(include_in_schema=False)
    async def readyz(scope: Scope) -> AsgiResponse:
        checks = await readiness.check()
        ready = all(result == OK for result in checks.values())
        body = {"ready": ready, "checks": checks, "ollama_servers": readiness.ollama_servers()}
        return JSONResponse(body, 200 if ready else 503)

    return readyz
