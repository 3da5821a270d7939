"""History in Redis: several gateways share the sessions.

A session is two keys that expire together: a hash (`created_at`, `updated_at`, `model`,
`system`) and a list of the messages as JSON. A turn is one MULTI/EXEC transaction (append,
trim, refresh both expiries), so no reader ever sees half of it. The turns of one session
are kept apart across gateways by a Redis lock that expires if its gateway dies and is
renewed while the turn runs.
"""

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from urllib.parse import quote

from redis.asyncio import Redis
from redis.asyncio.lock import Lock
from redis.exceptions import RedisError
from redis.typing import EncodableT, FieldT

from chatbus.contract import ChatMessage
from chatbus.history.store import (
    HistoryStore,
    HistoryUnavailableError,
    Session,
    Turn,
    utc,
)

logger = logging.getLogger("chatbus.history")

DEFAULT_KEY_PREFIX = "chatbus:history:"


class RedisHistoryStore(HistoryStore):
    def __init__(
        self,
        redis: Redis,
        *,
        ttl: float,
        max_messages: int,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        lock_ttl: float = 30.0,
    ) -> None:
        """`lock_ttl`: how long a turn's lock outlives a gateway that died holding it; a
        live gateway renews it every third of that."""
        super().__init__(ttl=ttl, max_messages=max_messages)
        self._redis = redis
        self._prefix = key_prefix
        self._lock_ttl = lock_ttl

    async def get(self, tenant: str, session_id: str) -> Session | None:
        meta_key, messages_key = self._keys(tenant, session_id)
        async with _unavailable_on_failure(), self._redis.pipeline(transaction=True) as pipe:
            pipe.hgetall(meta_key)
            pipe.lrange(messages_key, 0, -1)
            pipe.pttl(meta_key)
            meta, messages, ttl_ms = await pipe.execute()
        if not meta or ttl_ms < 0:
            return None
        return Session(
            session_id=session_id,
            model=_text(meta.get(b"model")),
            system=_text(meta.get(b"system")),
            messages=[ChatMessage.model_validate_json(message) for message in messages],
            created_at=utc(float(meta[b"created_at"])),
            updated_at=utc(float(meta[b"updated_at"])),
            expires_at=utc(time.time() + ttl_ms / 1000),
        )

    async def add_turn(self, tenant: str, session_id: str, turn: Turn) -> None:
        meta_key, messages_key = self._keys(tenant, session_id)
        now = repr(time.time())
        ttl_ms = max(1, round(self.ttl * 1000))
        meta: dict[FieldT, EncodableT] = {"updated_at": now, "model": turn.model}
        if turn.system is not None:
            meta["system"] = turn.system
        async with _unavailable_on_failure(), self._redis.pipeline(transaction=True) as pipe:
            pipe.hsetnx(meta_key, "created_at", now)
            pipe.hset(meta_key, mapping=meta)
            pipe.rpush(
                messages_key,
                *(m.model_dump_json(exclude_none=True) for m in (turn.question, turn.answer)),
            )
            pipe.ltrim(messages_key, -self.kept_messages, -1)
            pipe.pexpire(meta_key, ttl_ms)
            pipe.pexpire(messages_key, ttl_ms)
            await pipe.execute()

    async def delete(self, tenant: str, session_id: str) -> bool:
        async with _unavailable_on_failure():
            deleted: int = await self._redis.delete(*self._keys(tenant, session_id))
        return deleted > 0

    async def close(self) -> None:
        await self._redis.aclose()

    @contextlib.asynccontextmanager
    async def _shared_lock(self, tenant: str, session_id: str) -> AsyncIterator[None]:
        lock = Lock(
            self._redis,
            f"{self._session_key(tenant, session_id)}:lock",
            timeout=self._lock_ttl,
            sleep=0.02,
            thread_local=False,
        )
        async with _unavailable_on_failure():
            await lock.acquire()
        renewal = asyncio.create_task(self._keep(lock))
        try:
            yield
        finally:
            # Not awaited: a renewal that lands after the release finds the lock not its own.
            renewal.cancel()
            try:
                await lock.release()
            except RedisError:
                # Expired (it could not be renewed), or Redis is unreachable: either way the
                # lock ends by itself at its ttl.
                logger.warning("a session's turn lock expired before the turn ended")

    async def _keep(self, lock: Lock) -> None:
        while True:
            await asyncio.sleep(self._lock_ttl / 3)
            try:
                await lock.reacquire()
            except RedisError as error:
                # Tried again at the next third: the lock lives until its ttl is out.
                logger.warning("could not renew a session's turn lock: %r", error)

    def _session_key(self, tenant: str, session_id: str) -> str:
        # Quoted: a tenant name may hold the separator.
        return f"{self._prefix}{quote(tenant, safe='')}:{session_id}"

    def _keys(self, tenant: str, session_id: str) -> tuple[str, str]:
        key = self._session_key(tenant, session_id)
        return f"{key}:meta", f"{key}:messages"


@contextlib.asynccontextmanager
async def _unavailable_on_failure() -> AsyncIterator[None]:
    try:
        yield
    except RedisError as error:
        raise HistoryUnavailableError(f"Redis: {error!r}") from error


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode()
