"""History in a SQLite file: one gateway, nothing else to run.

One connection, used by one thread of its own, so that the event loop never waits for the
disk and the statements never interleave. A session is one row; a turn rewrites it in one
transaction, so it is stored whole or not at all.
"""

import asyncio
import json
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from pydantic import TypeAdapter

from chatbus.contract import ChatMessage
from chatbus.history.store import (
    HistoryStore,
    HistoryUnavailableError,
    Session,
    Turn,
    utc,
)

_T = TypeVar("_T")
_messages_adapter: TypeAdapter[list[ChatMessage]] = TypeAdapter(list[ChatMessage])

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    tenant TEXT NOT NULL,
    session_id TEXT NOT NULL,
    model TEXT,
    system TEXT,
    messages TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    PRIMARY KEY (tenant, session_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS sessions_by_expiry ON sessions (expires_at);
"""


class SqliteHistoryStore(HistoryStore):
    def __init__(self, path: str | Path, *, ttl: float, max_messages: int) -> None:
        super().__init__(ttl=ttl, max_messages=max_messages)
        self._path = path
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chatbus-history")
        self._db: sqlite3.Connection | None = None

    async def get(self, tenant: str, session_id: str) -> Session | None:
        return await self._run(self._get, tenant, session_id)

    async def add_turn(self, tenant: str, session_id: str, turn: Turn) -> None:
        await self._run(self._add_turn, tenant, session_id, turn)

    async def delete(self, tenant: str, session_id: str) -> bool:
        return await self._run(self._delete, tenant, session_id)

    async def close(self) -> None:
        await self._run(self._close)
        self._thread.shutdown()

    async def _run(self, call: Callable[..., _T], *args: object) -> _T:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._thread, call, *args)
        except sqlite3.Error as error:
            raise HistoryUnavailableError(f"SQLite: {error}") from error

    def _open(self) -> sqlite3.Connection:
        """The database, opened on first use (in the store's thread): a gateway whose
        sessions are never used writes no file."""
        if self._db is None:
            # Autocommit mode: every write below opens its own transaction explicitly.
            db = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)
            self._db = db
        return self._db

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()

    def _get(self, tenant: str, session_id: str) -> Session | None:
        db = self._open()
        row = db.execute(
            "SELECT model, system, messages, created_at, updated_at, expires_at FROM sessions"
            " WHERE tenant = ? AND session_id = ? AND expires_at > ?",
            (tenant, session_id, time.time()),
        ).fetchone()
        if row is None:
            return None
        model, system, messages, created_at, updated_at, expires_at = row
        return Session(
            session_id=session_id,
            model=model,
            system=system,
            messages=_messages_adapter.validate_json(messages),
            created_at=utc(created_at),
            updated_at=utc(updated_at),
            expires_at=utc(expires_at),
        )

    def _add_turn(self, tenant: str, session_id: str, turn: Turn) -> None:
        now = time.time()
        db = self._open()
        # IMMEDIATE: take the write lock before reading, so the read-modify-write is whole.
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("DELETE FROM sessions WHERE expires_at <= ?", (now,))
            row = db.execute(
                "SELECT messages FROM sessions WHERE tenant = ? AND session_id = ?",
                (tenant, session_id),
            ).fetchone()
            messages = [] if row is None else json.loads(row[0])
            messages += [
                message.model_dump(mode="json", exclude_none=True)
                for message in (turn.question, turn.answer)
            ]
            db.execute(
                "INSERT INTO sessions (tenant, session_id, model, system, messages, created_at,"
                " updated_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (tenant, session_id) DO UPDATE SET model = excluded.model,"
                " system = coalesce(excluded.system, system), messages = excluded.messages,"
                " updated_at = excluded.updated_at, expires_at = excluded.expires_at",
                (
                    tenant,
                    session_id,
                    turn.model,
                    turn.system,
                    json.dumps(messages[-self.kept_messages :]),
                    now,
                    now,
                    now + self.ttl,
                ),
            )
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def _delete(self, tenant: str, session_id: str) -> bool:
        deleted = self._open().execute(
            "DELETE FROM sessions WHERE tenant = ? AND session_id = ? AND expires_at > ?",
            (tenant, session_id, time.time()),
        )
        return deleted.rowcount > 0
