"""A cancel the client sends before it stops listening is recorded by the worker as
`cancelled`, every time (issue 15: Ctrl-C in `ask` was sometimes logged `requester_gone`,
so logs and `chatbus_terminal_replies_total` disagreed)."""

import asyncio
import json
import logging
import signal
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from chatbus.client import ChatClient
from chatbus.contract import ChunkReply
from chatbus.settings import Settings
from chatbus.testing import FakeOllama
from tests.support import model, start_chatbus

TRIES = 10


class Outcomes(logging.Handler):
    """The outcome of each request, from the line the worker ends it with."""

    def __init__(self) -> None:
        super().__init__()
        self.by_request: dict[str, str] = {}
        self._logged = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        fields = record.__dict__  # the `extra` of the worker's line
        if "outcome" in fields:
            self.by_request[fields["correlation_id"]] = fields["outcome"]
            self._logged.set()

    async def of(self, correlation_id: str, timeout: float = 10.0) -> str:
        async with asyncio.timeout(timeout):
            while correlation_id not in self.by_request:
                self._logged.clear()
                await self._logged.wait()
        return self.by_request[correlation_id]


@contextmanager
def worker_outcomes() -> Iterator[Outcomes]:
    outcomes = Outcomes()
    logger = logging.getLogger("chatbus.worker")
    level = logger.level
    logger.addHandler(outcomes)
    logger.setLevel(logging.INFO)
    try:
        yield outcomes
    finally:
        logger.removeHandler(outcomes)
        logger.setLevel(level)


@pytest.fixture
async def client(worker: Settings) -> AsyncIterator[ChatClient]:
    async with ChatClient(worker.rabbitmq_url, names=worker.names) as client:
        yield client


async def interrupted_after_the_first_chunk(client: ChatClient, model_name: str) -> str:
    """Stream an answer and cancel the task at its first chunk, as Ctrl-C does to `ask`."""
    correlation_id = uuid.uuid4().hex
    started = asyncio.Event()

    async def show() -> None:
        async for event in client.stream("hi", model=model_name, correlation_id=correlation_id):
            if isinstance(event, ChunkReply):
                started.set()

    task = asyncio.create_task(show())
    async with asyncio.timeout(10):
        await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    return correlation_id


async def test_every_cancel_of_a_running_generation_is_recorded_cancelled(
    client: ChatClient, fake_ollama: FakeOllama
) -> None:
    # A chunk every few milliseconds: the worker is always about to publish the next one.
    fast = model(fake_ollama, tokens=["x"] * 5000, token_delay=0.002)

    with worker_outcomes() as outcomes:
        recorded = [
            await outcomes.of(await interrupted_after_the_first_chunk(client, fast))
            for _ in range(TRIES)
        ]

    assert recorded == ["cancelled"] * TRIES


async def test_ctrl_c_in_ask_is_recorded_cancelled(
    worker: Settings, fake_ollama: FakeOllama, tmp_path: Path
) -> None:
    fast = model(fake_ollama, tokens=["x"] * 5000, token_delay=0.002)

    with worker_outcomes() as outcomes:
        for _ in range(3):
            ask = await start_chatbus(
                worker,
                tmp_path,
                *("ask", "--json", "--model", fast, "hi"),
                stderr=asyncio.subprocess.DEVNULL,
                # Ctrl-C as in a terminal, even when the tests run where SIGINT is ignored.
                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
            )
            assert ask.stdout is not None
            async with asyncio.timeout(10):
                first = json.loads(await ask.stdout.readline())
            ask.send_signal(signal.SIGINT)
            async with asyncio.timeout(10):
                await ask.communicate()

            assert ask.returncode == 130
            assert await outcomes.of(first["correlation_id"]) == "cancelled"
