"""The history stores, each against the real thing: a SQLite file and the Redis server."""

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.asyncio.lock import Lock

from chatbus.contract import ChatMessage
from chatbus.history import (
    HistorySettings,
    HistoryStore,
    HistoryUnavailableError,
    InvalidSessionIdError,
    RedisHistoryStore,
    SqliteHistoryStore,
    Turn,
    check_session_id,
    open_history_store,
)

StoreFactory = Callable[..., HistoryStore]


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
async def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[StoreFactory]:
    """Stores of one kind, each sharing the same data (the same file, or the same Redis
    prefix), closed at the end."""
    made: list[HistoryStore] = []
    if request.param == "redis":
        redis_url: str = request.getfixturevalue("redis_url")
        prefix = f"{request.getfixturevalue('redis_prefix')}{uuid.uuid4().hex[:8]}:"

    def make(ttl: float = 60.0, max_messages: int = 100, **kwargs: Any) -> HistoryStore:
        store: HistoryStore
        if request.param == "redis":
            store = RedisHistoryStore(
                Redis.from_url(redis_url),
                ttl=ttl,
                max_messages=max_messages,
                key_prefix=prefix,
                **kwargs,
            )
        else:
            store = SqliteHistoryStore(
                tmp_path / "history.sqlite3", ttl=ttl, max_messages=max_messages
            )
        made.append(store)
        return store

    yield make
    for store in made:
        await store.close()


def session_id() -> str:
    return uuid.uuid4().hex


def turn(n: int, model: str = "llama3.2", system: str | None = None) -> Turn:
    return Turn(
        question=ChatMessage(role="user", content=f"question {n}"),
        answer=ChatMessage(role="assistant", content=f"answer {n}"),
        model=model,
        system=system,
    )


def contents(messages: list[ChatMessage]) -> list[str]:
    return [message.content for message in messages]


async def eventually(condition: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        # Polled: nothing announces that a key expired or a row's time passed.
        while not await condition():  # noqa: ASYNC110
            await asyncio.sleep(0.02)


async def test_a_turn_is_stored_with_its_model_and_times(make_store: StoreFactory) -> None:
    store = make_store(ttl=60)
    sid = session_id()
    assert await store.get("t", sid) is None

    before = time.time()
    await store.add_turn("t", sid, turn(1, model="llama3.2", system="Be brief."))
    first = await store.get("t", sid)
    assert first is not None
    assert first.session_id == sid
    assert contents(first.messages) == ["question 1", "answer 1"]
    assert [m.role for m in first.messages] == ["user", "assistant"]
    assert first.model == "llama3.2"
    assert first.system == "Be brief."
    assert before - 1 <= first.created_at.timestamp() <= time.time() + 1
    assert first.created_at == first.updated_at
    assert abs(first.expires_at.timestamp() - (first.updated_at.timestamp() + 60)) < 1

    await store.add_turn("t", sid, turn(2, model="qwen3"))
    second = await store.get("t", sid)
    assert second is not None
    assert contents(second.messages) == ["question 1", "answer 1", "question 2", "answer 2"]
    assert second.model == "qwen3"
    assert second.system == "Be brief.", "a turn without a system prompt keeps the session's"
    assert second.created_at == first.created_at
    assert second.updated_at > first.updated_at

    await store.add_turn("t", sid, turn(3, system="Be verbose."))
    third = await store.get("t", sid)
    assert third is not None
    assert third.system == "Be verbose."


async def test_the_oldest_turns_are_dropped_first(make_store: StoreFactory) -> None:
    store = make_store(max_messages=5)  # room for two whole turns
    sid = session_id()
    for n in range(1, 5):
        await store.add_turn("t", sid, turn(n, system="Be brief." if n == 1 else None))
    session = await store.get("t", sid)
    assert session is not None
    assert contents(session.messages) == ["question 3", "answer 3", "question 4", "answer 4"]
    assert session.system == "Be brief.", "the system prompt is never trimmed"


async def test_a_session_expires_ttl_after_its_latest_turn(make_store: StoreFactory) -> None:
    store = make_store(ttl=1.0)
    sid = session_id()
    await store.add_turn("t", sid, turn(1))

    async def remaining() -> float:
        session = await store.get("t", sid)
        return 0.0 if session is None else session.expires_at.timestamp() - time.time()

    async def half_gone() -> bool:
        return 0 < await remaining() < 0.5

    await eventually(half_gone)
    await store.add_turn("t", sid, turn(2))
    assert await remaining() > 0.8, "the turn refreshed the expiry"

    async def gone() -> bool:
        return await store.get("t", sid) is None

    await eventually(gone)
    assert not await store.delete("t", sid), "an expired session is gone for delete too"
    await store.add_turn("t", sid, turn(3))
    session = await store.get("t", sid)
    assert session is not None
    assert contents(session.messages) == ["question 3", "answer 3"], "expired turns stay gone"


async def test_delete(make_store: StoreFactory) -> None:
    store = make_store()
    sid = session_id()
    await store.add_turn("t", sid, turn(1))
    assert await store.delete("t", sid)
    assert await store.get("t", sid) is None
    assert not await store.delete("t", sid)


async def test_tenants_never_see_each_others_sessions(make_store: StoreFactory) -> None:
    store = make_store()
    sid = session_id()
    await store.add_turn("alice", sid, turn(1))

    assert await store.get("bob", sid) is None
    assert not await store.delete("bob", sid)
    await store.add_turn("bob", sid, turn(2))
    bobs = await store.get("bob", sid)
    assert bobs is not None
    assert contents(bobs.messages) == ["question 2", "answer 2"]

    alices = await store.get("alice", sid)
    assert alices is not None
    assert contents(alices.messages) == ["question 1", "answer 1"]

    assert await store.delete("bob", sid)
    assert await store.get("alice", sid) is not None


async def test_tenant_names_with_separators_stay_apart(make_store: StoreFactory) -> None:
    store = make_store()
    sid = session_id()
    await store.add_turn("a:b", sid, turn(1))
    for other in ("a", "a%3Ab", "a:b:", "a"):
        assert await store.get(other, sid) is None
    assert await store.get("a:b", sid) is not None


async def test_concurrent_writes_keep_every_turn_whole(make_store: StoreFactory) -> None:
    """Without the turn lock, many writes at once: each turn's question and answer stay
    next to each other and nothing is lost."""
    stores = [make_store(), make_store()]
    sid = session_id()
    await asyncio.gather(*(stores[n % 2].add_turn("t", sid, turn(n)) for n in range(20)))
    session = await stores[0].get("t", sid)
    assert session is not None
    pairs = list(
        zip(contents(session.messages)[::2], contents(session.messages)[1::2], strict=True)
    )
    assert sorted(pairs) == sorted((f"question {n}", f"answer {n}") for n in range(20))


async def answer_in_turn(
    store: HistoryStore, sid: str, n: int, log: list[int], asking: asyncio.Event | None = None
) -> None:
    """One turn as the gateway runs it: read the history, let others run, store the turn.
    `log` records how many messages each turn saw; `asking` is set as it asks for the lock."""
    if asking is not None:
        asking.set()
    async with store.turn_lock("t", sid):
        session = await store.get("t", sid)
        log.append(0 if session is None else len(session.messages))
        await asyncio.sleep(0)  # let the other turns try to get in
        await store.add_turn("t", sid, turn(n))


async def test_turns_of_one_session_run_one_after_the_other_in_order(
    make_store: StoreFactory,
) -> None:
    store = make_store()
    sid = session_id()
    seen: list[int] = []
    await asyncio.gather(*(answer_in_turn(store, sid, n, seen) for n in range(10)))
    assert seen == list(range(0, 20, 2)), "every turn saw all the turns before it"
    session = await store.get("t", sid)
    assert session is not None
    assert contents(session.messages)[::2] == [f"question {n}" for n in range(10)]


@contextlib.asynccontextmanager
async def turn_held(store: HistoryStore, sid: str) -> AsyncIterator[None]:
    """Inside: another task holds the session's turn lock; it lets go when the block ends."""
    holding, release = asyncio.Event(), asyncio.Event()

    async def hold() -> None:
        async with store.turn_lock("t", sid):
            holding.set()
            await release.wait()

    holder = asyncio.create_task(hold())
    await holding.wait()
    try:
        yield
    finally:
        release.set()
        await holder


async def test_a_turn_cancelled_while_waiting_leaves_the_lock_usable(
    make_store: StoreFactory,
) -> None:
    store = make_store()
    sid = session_id()
    async with turn_held(store, sid):
        asking = asyncio.Event()
        waiter = asyncio.create_task(answer_in_turn(store, sid, 1, [], asking))
        await asking.wait()  # it runs on into turn_lock, where it waits behind the holder
        waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    await answer_in_turn(store, sid, 2, [])
    session = await store.get("t", sid)
    assert session is not None
    assert contents(session.messages) == ["question 2", "answer 2"]


@pytest.mark.redis
async def test_two_redis_stores_share_sessions_and_take_turns(
    redis_url: str, redis_prefix: str
) -> None:
    """Two gateways' stores on one Redis: either sees the other's turns, and their turns on
    one session never overlap."""
    prefix = f"{redis_prefix}{uuid.uuid4().hex[:8]}:"
    stores = [
        RedisHistoryStore(Redis.from_url(redis_url), ttl=60, max_messages=100, key_prefix=prefix)
        for _ in range(2)
    ]
    sid = session_id()
    seen: list[int] = []
    try:
        await asyncio.gather(*(answer_in_turn(stores[n % 2], sid, n, seen) for n in range(10)))
        assert sorted(seen) == list(range(0, 20, 2)), "no two turns read the same history"
        for store in stores:
            session = await store.get("t", sid)
            assert session is not None
            assert len(session.messages) == 20
    finally:
        for store in stores:
            await store.close()


@pytest.mark.redis
async def test_a_dead_gateways_lock_expires_and_a_live_ones_is_renewed(
    redis_url: str, redis_prefix: str
) -> None:
    prefix = f"{redis_prefix}{uuid.uuid4().hex[:8]}:"
    redis = Redis.from_url(redis_url)
    store = RedisHistoryStore(redis, ttl=60, max_messages=100, key_prefix=prefix, lock_ttl=0.3)
    sid = session_id()
    try:
        # A gateway that died holding the lock: it was taken, and is never released.
        dead = Lock(redis, f"{prefix}t:{sid}:lock", timeout=0.3, thread_local=False)
        assert await dead.acquire(blocking=False)
        started = time.monotonic()
        await asyncio.wait_for(answer_in_turn(store, sid, 1, []), timeout=3)
        assert time.monotonic() - started >= 0.2, "the turn waited for the lock to expire"

        async with turn_held(store, sid):  # a long turn
            other = RedisHistoryStore(
                Redis.from_url(redis_url), ttl=60, max_messages=100, key_prefix=prefix
            )
            waiter = asyncio.create_task(answer_in_turn(other, sid, 2, []))
            # Three lock lifetimes: without the renewal the waiter would have got in.
            done, _ = await asyncio.wait([waiter], timeout=0.9)
            assert not done, "the long turn's lock was renewed, so the other turn still waits"
        await asyncio.wait_for(waiter, timeout=3)
        await other.close()
    finally:
        await store.close()


def test_session_ids_are_checked() -> None:
    for good in ("a" * 16, "A-z_09" * 10, str(uuid.uuid4()), "x" * 128):
        assert check_session_id(good) == good
    for bad in ["a" * 15, "a" * 129, "a" * 15 + "/", "../" + "a" * 16, "a" * 16 + "\n", ""]:
        with pytest.raises(InvalidSessionIdError):
            check_session_id(bad)


async def test_history_url_chooses_the_store(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite3"
    sqlite = open_history_store(HistorySettings(history_url=f"sqlite:///{path}"))
    assert isinstance(sqlite, SqliteHistoryStore)
    assert not path.exists(), "a gateway whose sessions are never used writes no file"
    assert await sqlite.get("", session_id()) is None
    assert path.exists()
    await sqlite.close()
    redis = open_history_store(HistorySettings(history_url="redis://127.0.0.1:6379/0"))
    assert isinstance(redis, RedisHistoryStore)
    await redis.close()
    with pytest.raises(ValueError, match="history_url"):
        HistorySettings(history_url="postgres://localhost/db")


@pytest.mark.parametrize(
    "url",
    ["sqlite:///{tmp_path}/no-such-folder/h.sqlite3", "redis://127.0.0.1:1/0"],
    ids=["sqlite", "redis"],
)
async def test_a_store_that_cannot_be_reached_says_so(tmp_path: Path, url: str) -> None:
    store = open_history_store(HistorySettings(history_url=url.format(tmp_path=tmp_path)))
    try:
        with pytest.raises(HistoryUnavailableError):
            await store.get("", session_id())
        with pytest.raises(HistoryUnavailableError):
            await store.add_turn("", session_id(), turn(1))
    finally:
        await store.close()
