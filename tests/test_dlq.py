"""The dead-letter tools against the real broker: requests are dead-lettered by the real
worker (invalid ones, or ones over a limit), then listed, replayed and purged with
`chatbus.dlq` and with the `chatbus dlq` command."""

import asyncio
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractRobustConnection

from chatbus import failover
from chatbus.dlq import DeadLetterError, DeadLetterQueue
from chatbus.settings import Settings
from chatbus.testing import running_worker, settings_env
from tests.support import Replies, Requester, queue_depths, user

MakeSettings = Callable[..., Settings]
SECRET = "a prompt nobody else should read"


async def wait_for_dead_letters(amqp: AbstractRobustConnection, settings: Settings, n: int) -> None:
    """The worker rejects a request after its reply: wait until the broker moved it (no
    event tells)."""
    async with asyncio.timeout(10):
        while (await queue_depths(amqp, settings))[1] < n:  # noqa: ASYNC110
            await asyncio.sleep(0.05)


@asynccontextmanager
async def dead_letter_queue(settings: Settings) -> AsyncIterator[DeadLetterQueue]:
    async with await failover.connect(settings.rabbitmq_url) as connection:
        yield DeadLetterQueue(connection, settings.dead_letter_queue, settings.requests_queue)


@asynccontextmanager
async def dead_lettered(
    amqp: AbstractRobustConnection, settings: Settings, bodies: dict[str, bytes]
) -> AsyncIterator[dict[str, Replies]]:
    """Send each body (by correlation id) to a worker that dead-letters it, and wait until
    all are in the dead-letter queue. Their reply queues stay bound in the block."""
    replies = {}
    async with Requester(amqp, settings) as requester:
        async with running_worker(settings):
            for correlation_id, body in bodies.items():
                replies[correlation_id] = await requester.send(body, correlation_id=correlation_id)
                answer = await replies[correlation_id].until_terminal()
                assert answer[-1]["code"] == "invalid_request"
            await wait_for_dead_letters(amqp, settings, len(bodies))
        yield replies


def over_the_token_limit(content: str = SECRET, **fields: Any) -> bytes:
    return json.dumps(user(content, options={"num_predict": 10**6}, **fields)).encode()


def ids(n: int) -> list[str]:
    return [f"dead-{uuid.uuid4().hex[:8]}" for _ in range(n)]


async def test_list_tells_why_when_and_which_model_but_not_the_prompt(
    make_settings: MakeSettings, amqp: AbstractRobustConnection
) -> None:
    settings = make_settings()
    malformed, limited = ids(2)
    async with dead_lettered(
        amqp, settings, {malformed: b"{not json", limited: over_the_token_limit(model="m1")}
    ):
        async with dead_letter_queue(settings) as queue:
            assert await queue.count() == 2
            letters = await queue.list()
            assert await queue.count() == 2  # listing leaves them where they are
            again = await queue.list()

        assert [(x.correlation_id, x.reason, x.count, x.queue, x.model) for x in letters] == [
            (malformed, "rejected", 1, settings.requests_queue, None),
            (limited, "rejected", 1, settings.requests_queue, "m1"),
        ]
        assert [x.correlation_id for x in again] == [malformed, limited]
        age = letters[0].age()
        assert age is not None
        assert 0 <= age < 60
        assert SECRET not in json.dumps(letters[1].summary())
        shown = letters[1].summary(show_content=True)
        assert shown["content"]["messages"][0]["content"] == SECRET
        assert letters[0].summary(show_content=True)["content"] == "{not json"


async def test_a_limit_lists_the_first_ones_in_the_queue(
    make_settings: MakeSettings, amqp: AbstractRobustConnection
) -> None:
    settings = make_settings()
    first, second, third = ids(3)
    async with (
        dead_lettered(amqp, settings, {cid: b"[]" for cid in (first, second, third)}),
        dead_letter_queue(settings) as queue,
    ):
        assert [x.correlation_id for x in await queue.list(limit=2)] == [first, second]
        assert await queue.count() == 3


async def test_a_replay_after_the_cause_is_fixed_is_answered_as_a_first_attempt(
    make_settings: MakeSettings, amqp: AbstractRobustConnection
) -> None:
    settings = make_settings(allowed_models=["another-model"])
    refused, kept = ids(2)
    async with dead_lettered(
        amqp, settings, {refused: json.dumps(user()).encode(), kept: b"{not json"}
    ) as replies:
        fixed = settings.model_copy(update={"allowed_models": []})

        async with dead_letter_queue(settings) as queue:
            await queue.list()  # a delivery of each letter, which a replay must not count
            outcome = await queue.replay([refused])
            assert [x.correlation_id for x in outcome.done] == [refused]
            assert outcome.not_found == set()
            assert [x.correlation_id for x in await queue.list()] == [kept]
            async with running_worker(fixed):
                answer = await replies[refused].until_terminal()

        assert (answer[-1]["type"], answer[-1]["attempt"]) == ("done", 1)
        assert await queue_depths(amqp, settings) == (0, 1)


async def test_replay_all_and_ids_that_are_not_there(
    make_settings: MakeSettings, amqp: AbstractRobustConnection
) -> None:
    settings = make_settings()
    letters = ids(3)
    async with dead_lettered(amqp, settings, {cid: b"[]" for cid in letters}):
        async with dead_letter_queue(settings) as queue:
            missing = await queue.replay(["not-there", letters[0]])
            assert missing.not_found == {"not-there"}
            assert [x.correlation_id for x in (await queue.replay()).done] == letters[1:]
            assert await queue.count() == 0
        assert await queue_depths(amqp, settings) == (3, 0)


async def test_purge_drops_only_the_letters_named(
    make_settings: MakeSettings, amqp: AbstractRobustConnection
) -> None:
    settings = make_settings()
    first, second, third = ids(3)
    async with dead_lettered(amqp, settings, {cid: b"[]" for cid in (first, second, third)}):
        async with dead_letter_queue(settings) as queue:
            outcome = await queue.purge([second])
            assert [x.correlation_id for x in outcome.done] == [second]
            assert [x.correlation_id for x in await queue.list()] == [first, third]
        assert await queue_depths(amqp, settings) == (0, 2)


async def test_a_replay_that_cannot_publish_loses_nothing(
    make_settings: MakeSettings, amqp: AbstractRobustConnection
) -> None:
    settings = make_settings()
    (letter,) = ids(1)
    async with dead_lettered(amqp, settings, {letter: b"[]"}):
        async with await failover.connect(settings.rabbitmq_url) as connection:
            nowhere = DeadLetterQueue(connection, settings.dead_letter_queue, "no-such-queue")
            with pytest.raises(DeadLetterError, match="no queue 'no-such-queue'"):
                await nowhere.replay()
        await wait_for_dead_letters(amqp, settings, 1)  # returned when the channel closed
        assert await queue_depths(amqp, settings) == (0, 1)


async def test_a_replay_interrupted_before_the_ack_duplicates_at_worst(
    make_settings: MakeSettings,
    amqp: AbstractRobustConnection,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = make_settings()
    (letter,) = ids(1)
    async with dead_lettered(amqp, settings, {letter: b"[]"}):

        async def crash(*args: object, **kwargs: object) -> None:
            raise ConnectionResetError("the process died between the confirm and the ack")

        monkeypatch.setattr(aio_pika.IncomingMessage, "ack", crash)
        async with dead_letter_queue(settings) as queue:
            with pytest.raises(ConnectionResetError):
                await queue.replay()
        # Confirmed in the request queue, and back in the dead-letter queue: one of each.
        await wait_for_dead_letters(amqp, settings, 1)
        assert await queue_depths(amqp, settings) == (1, 1)


async def run_cli(settings: Settings, cwd: Path, *args: str) -> tuple[int, str, str]:
    """`chatbus dlq ARGS` as an operator runs it, with the deployment's settings."""
    process = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).with_name("chatbus")),
        "dlq",
        *args,
        cwd=cwd,  # away from any .env of the repository
        env=os.environ | settings_env(settings),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(30):
        out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_the_dlq_commands(
    make_settings: MakeSettings, amqp: AbstractRobustConnection, tmp_path: Path
) -> None:
    settings = make_settings()
    malformed, limited, third = ids(3)
    async with dead_lettered(
        amqp,
        settings,
        {malformed: b"{not json", limited: over_the_token_limit(model="m1"), third: b"[]"},
    ):
        code, out, _ = await run_cli(settings, tmp_path, "list")
        assert code == 0
        lines = out.splitlines()
        assert lines[0] == f"{settings.dead_letter_queue}: 3 dead letters"
        assert lines[1].split() == ["CORRELATION", "ID", "REASON", "COUNT", "AGE", "MODEL"]
        assert lines[3].split()[:3] == [limited, "rejected", "1"]
        assert lines[3].split()[-1] == "m1"
        assert SECRET not in out

        code, out, _ = await run_cli(settings, tmp_path, "list", "--show-content", "--limit", "2")
        assert "(the first 2 in the queue shown)" in out
        assert SECRET in out

        code, out, _ = await run_cli(settings, tmp_path, "list", "--json")
        listed = json.loads(out)
        assert listed["count"] == 3
        # The partial listing put the first two back behind the third.
        listed_ids = [x["correlation_id"] for x in listed["dead_letters"]]
        assert sorted(listed_ids) == sorted([malformed, limited, third])
        assert all("content" not in x for x in listed["dead_letters"])

        code, out, err = await run_cli(settings, tmp_path, "purge", "--id", malformed, "nope")
        assert (code, out.strip()) == (1, f"purged 1 from {settings.dead_letter_queue}")
        assert err.strip() == "chatbus: no dead letter with correlation id nope"

        code, out, err = await run_cli(settings, tmp_path, "replay", "--id", limited)
        assert (code, out.strip(), err) == (0, f"replayed 1 to {settings.requests_queue}", "")
        code, out, _ = await run_cli(settings, tmp_path, "replay", "--all")
        assert (code, out.strip()) == (0, f"replayed 1 to {settings.requests_queue}")
        assert await queue_depths(amqp, settings) == (2, 0)

        code, _, err = await run_cli(settings, tmp_path, "replay")
        assert code == 2
        assert "one of the arguments --id --all is required" in err
