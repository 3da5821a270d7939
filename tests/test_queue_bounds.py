"""Bounds on the request queue and the dead-letter queue (MAX_QUEUED_REQUESTS,
DLQ_MAX_LENGTH, DLQ_MAX_AGE), on the real broker with the real worker."""

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractRobustConnection

from chatbus.client import ChatClient
from chatbus.errors import ServiceUnavailableError
from chatbus.settings import Settings
from chatbus.testing import running_worker
from tests.support import REPO_ROOT, Requester, queue_depths

MakeSettings = Callable[..., Settings]


async def dead_letter_bodies(amqp: AbstractRobustConnection, settings: Settings) -> list[bytes]:
    """What the dead-letter queue holds, oldest first, left in it: the messages are taken
    unacknowledged, and closing the channel gives them back."""
    channel = await amqp.channel()
    try:
        queue = await channel.declare_queue(settings.dead_letter_queue, passive=True)
        bodies = []
        while (message := await queue.get(fail=False)) is not None:
            bodies.append(message.body)
        return bodies
    finally:
        await channel.close()


async def dead_letters_held(amqp: AbstractRobustConnection, settings: Settings, count: int) -> bool:
    return (await queue_depths(amqp, settings))[1] == count


async def publish_until_refused(channel: aio_pika.abc.AbstractChannel, queue: str) -> int:
    """How many requests the queue takes before it refuses one (a quorum queue applies its
    length limit once it is passed: it takes one more)."""
    for accepted in range(3):
        try:
            await channel.default_exchange.publish(
                aio_pika.Message(b"{}", correlation_id=f"fills-the-queue-{accepted}"),
                routing_key=queue,
            )
        except aio_pika.exceptions.DeliveryError:
            return accepted
    raise AssertionError("the queue took 3 requests, and refused none")


async def until(condition: Callable[[], Awaitable[bool]], timeout: float = 15.0) -> None:
    """Polls until the broker gets there: dead-lettering and expiry run on its own time,
    and RabbitMQ has no event for either."""
    async with asyncio.timeout(timeout):
        while not await condition():  # noqa: ASYNC110
            await asyncio.sleep(0.05)


async def test_a_full_request_queue_refuses_requests_as_service_unavailable(
    make_settings: MakeSettings, amqp: AbstractRobustConnection
) -> None:
    settings = make_settings(max_queued_requests=1)
    async with running_worker(settings):
        pass  # it declared the queue with its bound; now nobody consumes it
    channel = await amqp.channel()
    accepted = await publish_until_refused(channel, settings.requests_queue)
    await channel.close()

    async with ChatClient(settings.rabbitmq_url, names=settings.names) as client:
        with pytest.raises(ServiceUnavailableError, match="is full") as raised:
            await client.chat("hi", timeout=10)

    assert raised.value.retryable is True
    assert await queue_depths(amqp, settings) == (accepted, 0)


async def test_the_dead_letter_queue_keeps_only_the_newest_dlq_max_length(
    make_settings: MakeSettings, amqp: AbstractRobustConnection
) -> None:
    settings = make_settings(dlq_max_length=2)
    async with running_worker(settings), Requester(amqp, settings) as requester:
        for number in range(4):
            replies = await requester.chat(f"not json {number}".encode())
            assert replies[-1]["code"] == "invalid_request"

    async def newest_two_kept() -> bool:
        return await dead_letter_bodies(amqp, settings) == [b"not json 2", b"not json 3"]

    await until(newest_two_kept)


async def test_a_dead_letter_older_than_dlq_max_age_is_dropped(
    make_settings: MakeSettings, amqp: AbstractRobustConnection
) -> None:
    settings = make_settings(dlq_max_age=2)
    async with running_worker(settings), Requester(amqp, settings) as requester:
        replies = await requester.chat(b"not json")
        assert replies[-1]["code"] == "invalid_request"

    await until(lambda: dead_letters_held(amqp, settings, 1), timeout=2)
    await until(lambda: dead_letters_held(amqp, settings, 0))


async def test_the_readmes_dead_letter_peek_shows_them_and_leaves_them(
    make_settings: MakeSettings,
    amqp: AbstractRobustConnection,
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings = make_settings()
    async with running_worker(settings), Requester(amqp, settings) as requester:
        await requester.chat(b"not json", correlation_id="peeked-request")
    await until(lambda: dead_letters_held(amqp, settings, 1))
    text = (REPO_ROOT / "README.md").read_text()
    section = text[text.index("To look at it without taking") :]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    code = code.replace('"chat.requests.dlq"', repr(settings.dead_letter_queue)).replace(
        '"amqp://guest:guest@localhost:5672/"', repr(settings.rabbitmq_url)
    )
    body, last_line = code.rstrip().rsplit("\n", 1)
    assert last_line == "asyncio.run(peek())"
    namespace: dict[str, Any] = {}
    exec(compile(body, "README.md", "exec"), namespace)

    await namespace["peek"]()

    assert capsys.readouterr().out == "peeked-request rejected b'not json'\n"
    assert await dead_letters_held(amqp, settings, 1)
