"""Starting before RabbitMQ: connect when it answers, not at once or never.

A worker started while RabbitMQ is down (a broker restart, a whole deployment coming up in
any order) keeps trying every `RECONNECT_INTERVAL` and starts consuming when RabbitMQ
answers, as it does after a lost connection. The client library's `connect` does the same.
Only what trying again cannot fix ends the attempts at once: a `RABBITMQ_URL` that cannot be
read, a login RabbitMQ refuses, a virtual host or a permission it refuses, a certificate it
does not accept.
"""

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

from aio_pika.exceptions import CONNECTION_EXCEPTIONS
from aiormq.exceptions import (
    ChannelAccessRefused,
    ChannelPreconditionFailed,
    ConnectionNotAllowed,
    InvalidFrameError,
    ProbableAuthenticationError,
)

from chatbus import failover

__all__ = ["LOG_EVERY", "RabbitMQRefused", "refusal", "until_rabbitmq_answers"]

logger = logging.getLogger("chatbus.startup")

T = TypeVar("T")

LOG_EVERY = 5.0
"""Seconds between two lines about RabbitMQ not answering, however short the interval."""

REFUSED_OPENINGS = 3

_LIBRARY_LOGGERS = ("aiormq.connection", "aio_pika.robust_connection")
"""They log each failed try (an error, and "reconnecting" though a failed start does not)."""

_REFUSALS: tuple[type[BaseException], ...] = (
    failover.ConfigurationError,
    ChannelPreconditionFailed,  # a queue exists with other arguments than this worker's
    ProbableAuthenticationError,  # the login
    ConnectionNotAllowed,  # the virtual host: no access, or none of that name
    ChannelAccessRefused,  # a permission to declare, publish or consume
    ssl.SSLCertVerificationError,
)


class RabbitMQRefused(Exception):
    """RabbitMQ cannot be used as configured; trying again will not help."""


def refusal(error: BaseException) -> RabbitMQRefused | None:
    """The configuration error `error` means, or None when it is worth trying again."""
    if isinstance(error, RabbitMQRefused):
        return error
    if isinstance(error, _REFUSALS):
        return RabbitMQRefused(f"{type(error).__name__}: {error}")
    return None


async def until_rabbitmq_answers(
    attempt: Callable[[], Awaitable[T]],
    *,
    rabbitmq_url: str,
    interval: float,
    give_up_after: float | None = None,
) -> T:
    """`attempt()` (a connect, and what must follow it) again every `interval` seconds
    while RabbitMQ does not answer, logging a line at most every LOG_EVERY seconds
    (aiormq's and aio-pika's own lines about each try are held back meanwhile).
    RabbitMQRefused at once for a configuration error; the last error after
    `give_up_after` seconds, when given."""
    started = time.monotonic()
    attempts = 0
    refused_openings = 0
    logged_at: float | None = None
    while True:
        attempts += 1
        try:
            with _library_lines_held_back():
                return await attempt()
        except (*CONNECTION_EXCEPTIONS, failover.ConfigurationError) as error:
            if (refused := refusal(error)) is not None:
                raise refused from error
            refused_openings = refused_openings + 1 if _refused_opening(error) else 0
            if refused_openings >= REFUSED_OPENINGS:
                raise RabbitMQRefused(
                    f"RabbitMQ refused to open the virtual host {refused_openings} times "
                    "in a row: it does not exist, or the user may not use it"
                ) from error
            now = time.monotonic()
            if give_up_after is not None and now - started + interval > give_up_after:
                raise
            if logged_at is None or now - logged_at >= LOG_EVERY:
                logged_at = now
                logger.warning(
                    "waiting for RabbitMQ at %s (%s): trying again every %g s (attempt %d)",
                    failover.shown(rabbitmq_url),
                    error,
                    interval,
                    attempts,
                )
        await asyncio.sleep(interval)


def _refused_opening(error: BaseException) -> bool:
    """RabbitMQ closed the connection in answer to opening the virtual host (NOT_ALLOWED:
    no such virtual host, or no access to it). aiormq 7 reports it as an InvalidFrameError
    that names the frames but has lost the reply code, and a node shutting down during the
    handshake looks the same once: hence REFUSED_OPENINGS in a row."""
    text = str(error)
    return isinstance(error, InvalidFrameError) and "OpenOk" in text and "Close" in text


class _HeldBack(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return False


@contextlib.contextmanager
def _library_lines_held_back() -> Iterator[None]:
    held_back = _HeldBack()
    loggers = [logging.getLogger(name) for name in _LIBRARY_LOGGERS]
    for library in loggers:
        library.addFilter(held_back)
    try:
        yield
    finally:
        for library in loggers:
            library.removeFilter(held_back)
