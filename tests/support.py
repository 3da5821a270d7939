"""Test helpers: the in-process worker and a requester written with raw aio-pika from the
README's contract alone (no chatbus client code), so the tests check the contract itself."""

import asyncio
import json
import os
import re
import shutil
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Self

import aio_pika
import httpx
import ollama
import pytest
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from prometheus_client.parser import text_string_to_metric_families

from chatbus.service import WorkerApp
from chatbus.settings import Settings
from chatbus.testing import Behaviour, FakeOllama, settings_env

DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"
REPO_ROOT = Path(__file__).parent.parent


class Replies:
    """The replies of one request, as they arrive."""

    def __init__(self) -> None:
        self.messages: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()

    async def deliver(self, message: AbstractIncomingMessage) -> None:
        await self.messages.put(message)

    async def next(self, timeout: float = 10.0) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            message = await self.messages.get()
        body: dict[str, Any] = json.loads(message.body)
        body["_amqp_correlation_id"] = message.correlation_id
        return body

    async def until_terminal(self, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Every reply up to and including the first terminal one."""
        replies = []
        while True:
            reply = await self.next(timeout)
            replies.append(reply)
            if reply["type"] != "chunk":
                return replies


class Requester:
    def __init__(self, connection: AbstractRobustConnection, settings: Settings) -> None:
        self._connection = connection
        self.settings = settings

    async def __aenter__(self) -> Self:
        self.channel = await self._connection.channel()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.channel.close()

    async def send(
        self,
        body: dict[str, Any] | bytes,
        *,
        correlation_id: str | None = None,
        message_id: str | None = None,
        reply_to: str | None = None,
        **properties: Any,
    ) -> Replies:
        """Bind a reply queue (unless replies go to `reply_to`), then publish the request.
        Without a correlation id or message id, one correlation id is made up."""
        if correlation_id is None and message_id is None:
            correlation_id = uuid.uuid4().hex
        replies = Replies()
        if reply_to == DIRECT_REPLY_TO:
            await self.channel.get_underlay_channel()
            queue = await self.channel.get_queue(DIRECT_REPLY_TO, ensure=False)
            await queue.consume(replies.deliver, no_ack=True)
        elif reply_to is None:
            queue = await self.channel.declare_queue(exclusive=True, auto_delete=True)
            await queue.bind(
                self.settings.replies_exchange, routing_key=correlation_id or message_id
            )
            await queue.consume(replies.deliver, no_ack=True)
        else:
            queue = await self.channel.declare_queue(reply_to, exclusive=True, auto_delete=True)
            await queue.consume(replies.deliver, no_ack=True)
        payload = body if isinstance(body, bytes) else json.dumps(body).encode()
        properties.setdefault("content_type", "application/json")
        await self.channel.default_exchange.publish(
            aio_pika.Message(
                payload,
                correlation_id=correlation_id,
                message_id=message_id,
                reply_to=reply_to,
                **properties,
            ),
            routing_key=self.settings.requests_queue,
        )
        return replies

    async def chat(self, body: dict[str, Any] | bytes, **kwargs: Any) -> list[dict[str, Any]]:
        replies = await self.send(body, **kwargs)
        return await replies.until_terminal()


def user(content: str = "Why is the sky blue?", **fields: Any) -> dict[str, Any]:
    """A request body with one user message."""
    return {"messages": [{"role": "user", "content": content}], **fields}


async def queue_depths(connection: AbstractRobustConnection, settings: Settings) -> tuple[int, int]:
    """Messages ready in the request queue and in the dead-letter queue."""
    channel = await connection.channel()
    try:
        requests = await channel.declare_queue(settings.requests_queue, passive=True)
        dead = await channel.declare_queue(settings.dead_letter_queue, passive=True)
        assert requests.declaration_result.message_count is not None
        assert dead.declaration_result.message_count is not None
        return requests.declaration_result.message_count, dead.declaration_result.message_count
    finally:
        await channel.close()


async def consumer_count(url: str, queue: str) -> int | None:
    """The queue's consumers, or None while the broker does not answer. A connection of its
    own, so that it works while the tests' shared connection is still reconnecting."""
    try:
        connection = await aio_pika.connect(url, timeout=5)
    except (OSError, aio_pika.exceptions.AMQPError):
        return None
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        return declared.declaration_result.consumer_count


async def dead_letters(connection: AbstractRobustConnection, settings: Settings) -> list[bytes]:
    """The bodies in the dead-letter queue, which this takes out of it."""
    channel = await connection.channel()
    queue = await channel.declare_queue(settings.dead_letter_queue, passive=True)
    bodies = []
    while (message := await queue.get(no_ack=True, fail=False)) is not None:
        bodies.append(message.body)
    await channel.close()
    return bodies


CHATBUS = str(Path(sys.executable).with_name("chatbus"))


async def start_chatbus(
    settings: Settings, cwd: Path, *args: str, **options: Any
) -> asyncio.subprocess.Process:
    """The `chatbus` command with `settings` in its environment, run in `cwd` (away from
    any .env of the repository); its output is piped unless `options` say otherwise."""
    options.setdefault("stdout", asyncio.subprocess.PIPE)
    options.setdefault("stderr", asyncio.subprocess.PIPE)
    return await asyncio.create_subprocess_exec(
        CHATBUS, *args, cwd=cwd, env=os.environ | settings_env(settings), **options
    )


def node_with(package: str) -> str:
    """The node binary, with `package` installed into node_modules (as `.ci/run` does).
    Without them the test is skipped, except under CI=true, where that is a failure."""
    node = shutil.which("node")
    if node is None or not (REPO_ROOT / "node_modules" / package).is_dir():
        reason = f"needs node and the npm package {package} (`.ci/run` installs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return node


def assert_well_formed(replies: list[dict[str, Any]], correlation_id: str | None = None) -> None:
    """Numbered 0, 1, 2, ... with exactly one terminal reply, the last, all of one request."""
    assert [r["seq"] for r in replies] == list(range(len(replies)))
    assert [r["type"] for r in replies[:-1]] == ["chunk"] * (len(replies) - 1)
    assert replies[-1]["type"] in ("done", "error")
    ids = {r["correlation_id"] for r in replies} | {r["_amqp_correlation_id"] for r in replies}
    assert len(ids) == 1
    if correlation_id is not None:
        assert ids == {correlation_id}


def streamed_text(replies: list[dict[str, Any]]) -> str:
    return "".join(r["content"] for r in replies if r["type"] == "chunk")


def model(fake: FakeOllama, **behaviour: Any) -> str:
    """A model of its own for one test, so tests cannot disturb each other's counters."""
    name = f"model-{uuid.uuid4().hex[:8]}"
    fake.models[name] = Behaviour(**behaviour)
    return name


async def preload(fake: FakeOllama, model: str = "m") -> None:
    """Load the model, as Ollama's docs do it: a chat without messages."""
    async with ollama.AsyncClient(host=fake.url) as client:
        await client.chat(model, [])


def requests_for(fake: FakeOllama, model_name: str) -> int:
    return sum(1 for r in fake.requests if r.get("model") == model_name)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def rabbitmqctl(*args: str) -> str:
    process = await asyncio.create_subprocess_exec(
        "rabbitmqctl", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        async with asyncio.timeout(120):
            stdout, stderr = await process.communicate()
    except TimeoutError:
        process.kill()
        raise AssertionError(f"rabbitmqctl {' '.join(args)} did not finish") from None
    assert process.returncode == 0, stderr.decode()
    return stdout.decode()


async def close_connection_named(name: str) -> None:
    listing = await rabbitmqctl(
        "list_connections", "pid", "client_properties", "--quiet", "--no-table-headers"
    )
    marker = f'{{"connection_name","{name}"}}'
    pids = [line.split("\t", 1)[0] for line in listing.splitlines() if marker in line]
    assert len(pids) == 1, listing
    await rabbitmqctl("close_connection", pids[0], "fault test: connection lost")


needs_rabbitmqctl = pytest.mark.skipif(
    not shutil.which("rabbitmqctl"), reason="needs rabbitmqctl on this machine"
)


@asynccontextmanager
async def observing(
    amqp: AbstractRobustConnection, exchange: str, routing_key: str = ""
) -> AsyncIterator[Replies]:
    """Messages on an exchange as a bystander sees them: the worker's replies for one
    correlation id, or every cancel."""
    observer = Replies()
    channel = await amqp.channel()
    queue = await channel.declare_queue(exclusive=True, auto_delete=True)
    await queue.bind(exchange, routing_key=routing_key)
    await queue.consume(observer.deliver, no_ack=True)
    try:
        yield observer
    finally:
        await channel.close()


async def how_it_ended(replies: Replies) -> dict[str, Any]:
    """The worker's terminal reply, as a bystander bound to its correlation id saw it."""
    return (await replies.until_terminal())[-1]


def healthcheck_command() -> list[str]:
    """The Dockerfile's HEALTHCHECK command, as the container runs it."""
    text = (REPO_ROOT / "Dockerfile").read_text()
    match = re.search(r"^HEALTHCHECK .*?CMD (\[.*?\])$", text, re.MULTILINE | re.DOTALL)
    assert match, "no HEALTHCHECK in exec form"
    command: list[str] = json.loads(match.group(1))
    return command


# --- the worker's HTTP side channel -----------------------------------------------------


@asynccontextmanager
async def http(app: WorkerApp) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://worker"
    ) as client:
        yield client


async def until(
    condition: Callable[[], Awaitable[bool]], timeout: float = 15.0, what: str = ""
) -> None:
    """Poll `condition` until it holds; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.05)


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(
    metrics: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return metrics.get((name, frozenset(labels.items())), 0.0)
