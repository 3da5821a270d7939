"""What every history store does, whatever keeps the data."""

import asyncio
import re
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime

from pydantic import BaseModel, Field

from chatbus.contract import ChatMessage

SESSION_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{16,128}")
"""16 to 128 letters, digits, `-` or `_`: long enough to be unguessable (a UUID is 36), and
safe in a URL, a Redis key and a log line."""


class HistoryUnavailableError(Exception):
    """The store could not be read or written: its database or its Redis failed."""


class InvalidSessionIdError(ValueError):
    """A session id that does not match `SESSION_ID_PATTERN`."""


def check_session_id(session_id: str) -> str:
    if SESSION_ID_PATTERN.fullmatch(session_id) is None:
        raise InvalidSessionIdError(
            "a session id is 16 to 128 characters, each a letter, a digit, '-' or '_'"
        )
    return session_id


def utc(epoch_seconds: float) -> datetime:
    return datetime.fromtimestamp(epoch_seconds, UTC)


class Session(BaseModel):
    """A conversation as the store keeps it: the system prompt apart from the turns."""

    session_id: str
    model: str | None = Field(description="The model that gave the latest answer.")
    system: str | None = Field(description="The system prompt, sent before every turn.")
    messages: list[ChatMessage] = Field(
        description="Question and answer of each kept turn, oldest first."
    )
    created_at: datetime
    updated_at: datetime = Field(description="When the latest turn was stored.")
    expires_at: datetime = Field(description="When the session is forgotten unless a turn comes.")


@dataclass(frozen=True)
class Turn:
    """A question and its whole answer, stored together or not at all."""

    question: ChatMessage
    answer: ChatMessage
    model: str
    system: str | None = None
    """A new system prompt for the session; None keeps the one it has."""


class HistoryStore(ABC):
    """Sessions of a tenant, each expiring `ttl` seconds after its latest turn and holding at
    most `max_messages` messages besides the system prompt (the oldest turns go first).

    Sessions are kept per tenant: the same session id under another tenant is another
    session, so a tenant can neither see nor change another's.

    The store never logs what the messages say. Its backend's failures are raised as
    `HistoryUnavailableError`.
    """

    def __init__(self, *, ttl: float, max_messages: int) -> None:
        if ttl <= 0:
            raise ValueError("the history's ttl must be positive")
        if max_messages < 2:
            raise ValueError("max_messages must leave room for one turn (2 messages)")
        self.ttl = ttl
        # Whole turns only: half a turn would start the kept history with an answer.
        self.kept_messages = max_messages - max_messages % 2
        self._local_locks: dict[tuple[str, str], tuple[asyncio.Lock, int]] = {}

    @abstractmethod
    async def get(self, tenant: str, session_id: str) -> Session | None:
        """The session, or None when the tenant has none of that id (never had, expired or
        deleted)."""

    @abstractmethod
    async def add_turn(self, tenant: str, session_id: str, turn: Turn) -> None:
        """Append a turn, in one atomic write: trim to `max_messages`, refresh the expiry.
        A session that does not exist is created."""

    @abstractmethod
    async def delete(self, tenant: str, session_id: str) -> bool:
        """Forget the session; False when there was none."""

    @abstractmethod
    async def close(self) -> None: ...

    @asynccontextmanager
    async def turn_lock(self, tenant: str, session_id: str) -> AsyncIterator[None]:
        """Held for a whole turn, from reading the history to storing the answer, so that
        the turns of one session run one after the other. Within this process the waiting
        turns go in the order they came (asyncio's lock is fair); `_shared_lock` extends
        the exclusion to the other processes sharing the store."""
        key = (tenant, session_id)
        lock, users = self._local_locks.get(key, (asyncio.Lock(), 0))
        self._local_locks[key] = (lock, users + 1)
        try:
            async with lock, self._shared_lock(tenant, session_id):
                yield
        finally:
            lock, users = self._local_locks[key]
            if users == 1:
                del self._local_locks[key]
            else:
                self._local_locks[key] = (lock, users - 1)

    def _shared_lock(self, tenant: str, session_id: str) -> AbstractAsyncContextManager[None]:
        """The exclusion between processes; none for a store only one process uses."""
        return nullcontext()
