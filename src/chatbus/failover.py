"""Several RabbitMQ addresses in one `RABBITMQ_URL`: the nodes of a cluster.

`RABBITMQ_URL=amqp://guest:guest@rabbit-1:5672/,rabbit-2:5672,rabbit-3:5672` names three
nodes. An entry that is only `host[:port]` takes the scheme, credentials, virtual host and
options of the first; an entry may also be a whole URL. A connection goes to the first
address that answers, and when it is lost, it reconnects starting with the next address, so
that a client leaves a node that died instead of waiting for it to come back.

aio-pika's robust connection takes one URL. `FailoverConnection` is that robust connection
with its connect step (one per attempt, at start-up and after every loss) tried over each
address in turn; everything else (the reconnect loop and its interval, restoring channels,
queues and consumers on the new node) is aio-pika's.
"""

import asyncio
import logging
from collections.abc import Sequence
from typing import Any, ClassVar

import aio_pika
from aio_pika import RobustConnection
from aio_pika.abc import AbstractConnection
from aio_pika.exceptions import CONNECTION_EXCEPTIONS, ProbableAuthenticationError
from faststream.rabbit import RabbitBroker
from yarl import URL

from chatbus.settings import rabbitmq_url_problem

logger = logging.getLogger("chatbus.failover")

ADDRESS_TIMEOUT = 10.0
"""Seconds one address may take to accept a connection before the next one is tried: a
node cut off by the network does not refuse, it stays silent."""


class ConfigurationError(ValueError):
    """RABBITMQ_URL cannot be read."""


def addresses(rabbitmq_url: str) -> tuple[URL, ...]:
    """The addresses of `RABBITMQ_URL`, in order; an entry that is only `host[:port]` takes
    the rest from the first."""
    if (problem := rabbitmq_url_problem(rabbitmq_url)) is not None:
        raise ConfigurationError(f"RABBITMQ_URL {problem}")
    entries = [entry.strip() for entry in rabbitmq_url.split(",")]
    first = URL(entries[0])
    found = [first]
    for entry in entries[1:]:
        if "://" in entry:
            found.append(URL(entry))
        else:
            host, _, port = entry.partition(":")
            found.append(first.with_host(host).with_port(int(port) if port else None))
    return tuple(found)


def joined(urls: Sequence[URL]) -> str:
    """Addresses back into one RABBITMQ_URL."""
    return ",".join(str(url) for url in urls)


def shown(rabbitmq_url: str) -> str:
    """RABBITMQ_URL as it may be printed: without passwords."""
    return ",".join(_hidden(entry) for entry in rabbitmq_url.split(","))


def _hidden(entry: str) -> str:
    url = URL(entry.strip())
    return str(url.with_password("******")) if url.password else entry.strip()


class FailoverConnection(RobustConnection):
    """A robust connection to the first of `ADDRESSES` that answers, which, when the
    connection is lost, tries them again from the one after the node it lost. Made per set
    of addresses by `failover_connection_class`."""

    ADDRESSES: ClassVar[tuple[URL, ...]] = ()

    def __init__(self, url: URL, loop: asyncio.AbstractEventLoop | None = None, **kwargs: Any):
        super().__init__(url, loop, **kwargs)
        # The first address as aio-pika completed it (with the options given as arguments).
        self._addresses: tuple[URL, ...] = (self.url, *self.ADDRESSES[1:])
        self._start_at = 0

    async def _on_connection_close(self, closing: asyncio.Future[Any]) -> None:
        current = self._addresses.index(self.url) if self.url in self._addresses else 0
        self._start_at = (current + 1) % len(self._addresses)
        await super()._on_connection_close(closing)

    # RobustConnection's connect step, run by its reconnect loop for every attempt. The name
    # is its private one, so this is checked by tests/test_failover.py against the real
    # library: a change of aio-pika that bypasses it fails them.
    async def _RobustConnection__connect_transport(self) -> None:  # noqa: N802
        errors: list[tuple[URL, BaseException]] = []
        start_at = self._start_at
        for offset in range(len(self._addresses)):
            index = (start_at + offset) % len(self._addresses)
            self.url = self._addresses[index]
            try:
                async with asyncio.timeout(ADDRESS_TIMEOUT):
                    await super()._RobustConnection__connect_transport()  # type: ignore[misc]
            except CONNECTION_EXCEPTIONS as error:
                logger.debug("RabbitMQ at %s did not answer: %r", self, error)
                errors.append((self.url, error))
                continue
            self._start_at = index
            return
        raise _no_address_answered(errors)


def _no_address_answered(errors: list[tuple[URL, BaseException]]) -> BaseException:
    """A refused login says more than the other nodes being down."""
    for _, error in errors:
        if isinstance(error, ProbableAuthenticationError):
            return error
    if len(errors) == 1:
        return errors[0][1]
    tried = "; ".join(f"{url.host}:{url.port}: {error}" for url, error in errors)
    return ConnectionError(f"no RabbitMQ address answered ({tried})")


def failover_connection_class(urls: Sequence[URL]) -> type[FailoverConnection]:
    return type("FailoverConnection", (FailoverConnection,), {"ADDRESSES": tuple(urls)})


async def connect_robust(rabbitmq_url: str, **options: Any) -> FailoverConnection:
    """`aio_pika.connect_robust` over every address of `rabbitmq_url`."""
    urls = addresses(rabbitmq_url)
    connection: FailoverConnection = await aio_pika.connect_robust(
        urls[0], connection_class=failover_connection_class(urls), **options
    )
    return connection


async def connect(rabbitmq_url: str, **options: Any) -> AbstractConnection:
    """A plain (not robust) connection to the first address of `rabbitmq_url` that
    answers, for a command that ends when its connection does."""
    errors: list[tuple[URL, BaseException]] = []
    for url in addresses(rabbitmq_url):
        try:
            async with asyncio.timeout(ADDRESS_TIMEOUT):
                connection: AbstractConnection = await aio_pika.connect(url, **options)
                return connection
        except CONNECTION_EXCEPTIONS as error:
            errors.append((url, error))
    raise _no_address_answered(errors)


class FailoverRabbitBroker(RabbitBroker):
    """FastStream's RabbitBroker over every address of `url`."""

    def __init__(self, url: str, **options: Any) -> None:
        urls = addresses(url)
        super().__init__(urls[0], **options)
        # FastStream hands its connection options to aio_pika.connect_robust as they are,
        # and has no argument of its own for the connection class.
        self._connection_kwargs["connection_class"] = failover_connection_class(urls)
