"""What the worker tells about its work as it goes: metrics, traces, and a log line.

The worker and the generation call an `Instruments` at the few points that matter to an
operator; what is recorded, and where, is the business of the implementation the service
passes in (`chatbus.observability.ServiceInstruments`). `NO_INSTRUMENTS` records nothing,
so the core runs and is tested without any of it.

Each request ends in one log line whose fields a `RequestLog` gathers on the way.
"""

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol, Self

from chatbus.contract import TerminalReply


class OllamaCall(Protocol):
    """One `/api/chat` call in flight."""

    def answered(self) -> None:
        """Ollama sent a part of its answer. Only the first call counts."""


class Instruments(Protocol):
    def request_taken(self, tenant: str | None) -> None:
        """A request was delivered to the worker; `tenant` is its x-tenant header."""

    def ollama_call(self, model: str) -> contextlib.AbstractContextManager[OllamaCall]:
        """Wraps one `/api/chat` call, from sending it to the end of its stream; an exception
        leaving it is the call's failure, a cancellation means the worker closed it."""

    def first_token(self, model: str, seconds: float) -> None:
        """The first token of a generation arrived, `seconds` after the generation started
        (retries included)."""

    def retry(self) -> None:
        """A call is made again after one that failed before its first token: on the next
        server at once, or after the backoff."""

    def terminal_reply(self, reply: TerminalReply) -> None:
        """A request's terminal reply was published (and confirmed)."""

    def reply_published(self, destination: str) -> Callable[[], None]:
        """What to call each time one of a request's replies is published to `destination`
        (an exchange, or "default"): resolved once per request, called per reply."""


class _NoCall:
    def answered(self) -> None:
        pass


class _NoInstruments:
    def request_taken(self, tenant: str | None) -> None:
        pass

    @contextlib.contextmanager
    def ollama_call(self, model: str) -> Iterator[OllamaCall]:
        yield _NoCall()

    def first_token(self, model: str, seconds: float) -> None:
        pass

    def retry(self) -> None:
        pass

    def terminal_reply(self, reply: TerminalReply) -> None:
        pass

    def reply_published(self, destination: str) -> Callable[[], None]:
        return _nothing


def _nothing() -> None:
    pass


NO_INSTRUMENTS: Instruments = _NoInstruments()


class RequestLog(dict[str, Any]):
    """The `extra` fields of the line a request's handling ends with: correlation_id,
    attempt, model and what else is learnt on the way, then its outcome and timings."""

    def __init__(self, correlation_id: str | None, attempt: int) -> None:
        super().__init__(correlation_id=correlation_id, attempt=attempt)
        self._started = time.monotonic()

    def ended(self, outcome: str) -> Self:
        """`outcome`: the terminal reply's code or done reason, or what became of a request
        that got none (requeued, dead_lettered, requester_gone)."""
        self["outcome"] = outcome
        self["duration_ms"] = round((time.monotonic() - self._started) * 1000)
        return self
