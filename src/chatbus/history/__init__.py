"""Conversation history of the gateway's sessions, behind one interface (`HistoryStore`) with
two implementations chosen by `HISTORY_URL`:

- `sqlite:///PATH` (the default, `sqlite:///chatbus-history.sqlite3`, relative to the working
  directory; `sqlite:////abs/path` for an absolute one): one gateway, nothing else to run.
- `redis://...` or `rediss://...`: several gateways share the sessions.
"""

from pydantic import BaseModel, Field
from redis.asyncio import Redis

from chatbus.history.redis_store import DEFAULT_KEY_PREFIX, RedisHistoryStore
from chatbus.history.sqlite_store import SqliteHistoryStore
from chatbus.history.store import (
    SESSION_ID_PATTERN,
    HistoryStore,
    HistoryUnavailableError,
    InvalidSessionIdError,
    Session,
    Turn,
    check_session_id,
)

__all__ = [
    "SESSION_ID_PATTERN",
    "HistorySettings",
    "HistoryStore",
    "HistoryUnavailableError",
    "InvalidSessionIdError",
    "RedisHistoryStore",
    "Session",
    "SqliteHistoryStore",
    "Turn",
    "check_session_id",
    "open_history_store",
]

_SQLITE = "sqlite:///"


class HistorySettings(BaseModel):
    """The `HISTORY_*` settings (a part of the gateway's settings)."""

    history_url: str = Field(
        default=f"{_SQLITE}chatbus-history.sqlite3",
        pattern=r"^(sqlite:///|rediss?://)",
        description="Where sessions are kept: sqlite:///PATH or redis://HOST:PORT/DB.",
    )
    history_ttl: float = Field(
        default=86400.0, gt=0, description="Seconds a session lives after its latest turn."
    )
    history_max_messages: int = Field(
        default=200,
        ge=2,
        description="Messages kept per session besides the system prompt; the oldest turns "
        "are dropped first.",
    )
    history_key_prefix: str = Field(
        default=DEFAULT_KEY_PREFIX,
        description="Prefix of the Redis keys, for deployments that share one Redis.",
    )


def open_history_store(settings: HistorySettings) -> HistoryStore:
    url, ttl, max_messages = (
        settings.history_url,
        settings.history_ttl,
        settings.history_max_messages,
    )
    if url.startswith(_SQLITE):
        return SqliteHistoryStore(url.removeprefix(_SQLITE), ttl=ttl, max_messages=max_messages)
    return RedisHistoryStore(
        Redis.from_url(url),
        ttl=ttl,
        max_messages=max_messages,
        key_prefix=settings.history_key_prefix,
    )
