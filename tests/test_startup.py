"""Starting without RabbitMQ, and the gap on the other side: requests with no worker.

A worker (a real process, started as production starts it) before its broker: a node of
its own started after the worker. Configurations RabbitMQ refuses end the worker with one
line. The client and `chatbus ask` say at once when no worker consumes the requests.
"""

import asyncio
import json
import logging
import os
import signal
import sys
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import aio_pika
import httpx
import pytest
from yarl import URL

from chatbus import startup
from chatbus.client import ChatClient
from chatbus.errors import DeadlineExceededError, ServiceUnavailableError
from chatbus.failover import FailoverRabbitBroker, shown
from chatbus.service import EXIT_CONFIGURATION, create_app
from chatbus.settings import Settings
from chatbus.testing import FakeOllama, WorkerProcess, running_worker, settings_env
from chatbus.testing.chaos import isolated_settings
from chatbus.testing.cluster import RabbitCluster, available
from tests.support import (
    Requester,
    consumer_count,
    free_port,
    model,
    needs_rabbitmqctl,
    rabbitmqctl,
    requests_for,
    user,
)

MakeSettings = Callable[..., Settings]


# --- the retry loop, without a broker ---------------------------------------------------------


async def test_a_broker_that_does_not_answer_is_tried_again_with_a_line_every_few_seconds(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(startup, "LOG_EVERY", 0.2)
    attempts = 0

    async def refused_nine_times() -> str:
        nonlocal attempts
        attempts += 1
        if attempts < 10:
            raise ConnectionRefusedError("nothing listens")
        return "connected"

    started = time.monotonic()
    with caplog.at_level(logging.WARNING, "chatbus.startup"):
        result = await startup.until_rabbitmq_answers(
            refused_nine_times, rabbitmq_url="amqp://u:secret@rabbit/", interval=0.05
        )
    elapsed = time.monotonic() - started

    assert (result, attempts) == ("connected", 10)
    lines = [r.getMessage() for r in caplog.records if "@rabbit/" in r.getMessage()]
    assert 1 <= len(lines) <= elapsed / 0.2 + 1 < 9
    assert lines[0].startswith("waiting for RabbitMQ at amqp://u:******@rabbit/ (nothing listens)")
    assert "secret" not in " ".join(lines)


async def test_a_refused_login_is_not_tried_again() -> None:
    attempts = 0

    async def refused_login() -> None:
        nonlocal attempts
        attempts += 1
        raise aio_pika.exceptions.ProbableAuthenticationError("ACCESS_REFUSED - Login was refused")

    with pytest.raises(startup.RabbitMQRefused, match="ACCESS_REFUSED"):
        await startup.until_rabbitmq_answers(
            refused_login, rabbitmq_url="amqp://rabbit/", interval=0.01
        )
    assert attempts == 1


async def test_giving_up_after_a_time_raises_the_last_error() -> None:
    async def refused() -> None:
        raise ConnectionRefusedError("nothing listens")

    with pytest.raises(ConnectionRefusedError):
        await startup.until_rabbitmq_answers(
            refused, rabbitmq_url="amqp://rabbit/", interval=0.01, give_up_after=0
        )


# --- the worker before its broker ---------------------------------------------------------------


def needs_nodes() -> None:
    if (reason := available()) is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.mark.slow
@pytest.mark.rabbitmq
async def test_a_worker_started_before_its_broker_serves_once_the_broker_is_up(
    fake_ollama: FakeOllama,
) -> None:
    needs_nodes()
    node = RabbitCluster(1)  # its address is known before it runs
    port = free_port()
    settings = isolated_settings(
        f"startup-{uuid.uuid4().hex[:8]}",
        rabbitmq_url=node.url,
        ollama_host=fake_ollama.url,
        reconnect_interval=0.5,
        http_port=port,
    )
    worker = WorkerProcess(settings)
    starting = asyncio.create_task(worker.start(timeout=120))
    # A client may start before the broker too.
    client = ChatClient(node.url, names=settings.names, reconnect_interval=0.5)
    connecting = asyncio.create_task(client.connect())
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            async with asyncio.timeout(30):
                while True:
                    try:
                        alive = await http.get("/healthz")
                        break
                    except httpx.ConnectError:
                        await asyncio.sleep(0.1)
            ready = await http.get("/readyz")
            assert alive.json() == {"status": "alive"}
            assert ready.status_code == 503
            assert ready.json()["checks"]["rabbitmq"] == "connecting"

            first, second = await waiting_lines(worker, 2, timeout=30)
            # One line at most every few seconds, however many attempts between them.
            assert first["message"].startswith(f"waiting for RabbitMQ at {shown(node.url)} (")
            assert seconds_between(first, second) >= startup.LOG_EVERY - 0.5
            assert attempt_of(second) - attempt_of(first) >= 5
            assert not starting.done()
            assert not connecting.done()

            async with node:
                await starting
                await connecting
                done = await client.chat("Why is the sky blue?", timeout=30)
                ready = await http.get("/readyz")
                await worker.signal(signal.SIGTERM)
                assert await worker.wait() == 0
    finally:
        starting.cancel()
        connecting.cancel()
        if connecting.done() and not connecting.cancelled():
            await client.close()
        await worker.kill()

    assert done.done_reason == "stop"
    assert ready.status_code == 200, ready.text


async def waiting_lines(worker: WorkerProcess, count: int, timeout: float) -> list[dict[str, Any]]:
    """The first `count` lines the worker logged about waiting for RabbitMQ; its output
    has no event to wait on."""
    async with asyncio.timeout(timeout):
        while True:
            lines = [json.loads(x) for x in worker.output if "waiting for RabbitMQ" in x]
            if len(lines) >= count:
                return lines[:count]
            await asyncio.sleep(0.1)


def seconds_between(first: dict[str, Any], second: dict[str, Any]) -> float:
    return (
        datetime.fromisoformat(second["time"]) - datetime.fromisoformat(first["time"])
    ).total_seconds()


def attempt_of(line: dict[str, Any]) -> int:
    return int(line["message"].rsplit("(attempt ", 1)[1].rstrip(")"))


@pytest.mark.rabbitmq
@pytest.mark.parametrize(
    ("address", "says"),
    [
        (lambda url: str(URL(url).with_password("wrong")), "ACCESS_REFUSED - Login was refused"),
        (lambda url: str(URL(url).with_path("/no-such-vhost")), "virtual host"),
    ],
    # An unreadable URL never gets this far: the settings refuse it (exit 2).
    ids=["wrong password", "no such virtual host"],
)
async def test_a_configuration_rabbitmq_refuses_ends_the_worker_with_one_line(
    make_settings: MakeSettings, rabbitmq_url: str, address: Callable[[str], str], says: str
) -> None:
    settings = make_settings(rabbitmq_url=address(rabbitmq_url), reconnect_interval=0.2)
    worker = WorkerProcess(settings)
    with pytest.raises(AssertionError, match="worker exited"):
        await worker.start()

    assert await worker.wait() == EXIT_CONFIGURATION
    critical = [json.loads(line) for line in worker.output if '"CRITICAL"' in line]
    assert len(critical) == 1, worker.output
    assert critical[0]["message"].startswith("cannot start: ")
    assert says in critical[0]["message"]
    assert not any('"ERROR"' in line or "Traceback" in line for line in worker.output)


async def until_logged(
    caplog: pytest.LogCaptureFixture, matches: Callable[[logging.LogRecord], bool]
) -> None:
    """Until a record that `matches` was logged (logging has no event to wait on)."""
    async with asyncio.timeout(10):
        while not any(matches(record) for record in caplog.records):  # noqa: ASYNC110
            await asyncio.sleep(0.05)


async def test_a_connection_lost_while_the_subscribers_start_starts_them_again(
    make_settings: MakeSettings,
    monkeypatch: pytest.MonkeyPatch,
    amqp: aio_pika.abc.AbstractRobustConnection,
) -> None:
    settings = make_settings()
    starts = 0
    real_start = FailoverRabbitBroker.start

    async def start_then_lose_the_connection(broker: FailoverRabbitBroker) -> None:
        nonlocal starts
        starts += 1
        await real_start(broker)
        if starts == 1:
            raise ConnectionResetError("the broker restarted while the subscribers started")

    monkeypatch.setattr(FailoverRabbitBroker, "start", start_then_lose_the_connection)
    async with running_worker(settings), Requester(amqp, settings) as requester:
        consumers = await consumer_count(settings.rabbitmq_url, settings.requests_queue)
        replies = await requester.chat(user())
    assert (starts, consumers) == (2, 1)
    assert replies[-1]["type"] == "done"


# --- RabbitMQ 4 readiness -------------------------------------------------------------------------


def table(arguments: list[tuple[str, str, Any]]) -> dict[str, Any]:
    """rabbitmqctl's JSON lists arguments as [name, type, value]."""
    return {name: value for name, _, value in arguments}


@needs_rabbitmqctl
async def test_the_request_consumer_has_its_own_acknowledgement_timeout(
    make_settings: MakeSettings,
) -> None:
    settings = make_settings(total_timeout=20, publish_timeout=10)
    async with running_worker(settings):
        rows = json.loads(
            await rabbitmqctl(
                "list_consumers", "queue_name", "arguments", "--formatter", "json", "--quiet"
            )
        )
    (consumer,) = [r for r in rows if r["queue_name"] == settings.requests_queue]
    assert table(consumer["arguments"]) == {"x-consumer-timeout": (20 + 10 + 60) * 1000}


@needs_rabbitmqctl
async def test_the_models_queue_is_durable_and_expires_after_its_last_worker(
    make_settings: MakeSettings,
) -> None:
    settings = make_settings()
    async with running_worker(settings):
        rows = json.loads(
            await rabbitmqctl(
                "list_queues",
                "name",
                "durable",
                "auto_delete",
                "arguments",
                "--formatter",
                "json",
                "--quiet",
            )
        )
    (models,) = [r for r in rows if r["name"] == settings.models_queue]
    assert (models["durable"], models["auto_delete"]) == (True, False)
    assert table(models["arguments"])["x-expires"] == 10_000


async def ignore(message: aio_pika.abc.AbstractIncomingMessage) -> None:
    """An earlier worker's consumer: only there to hold the queue."""


async def test_a_worker_waits_while_workers_of_an_earlier_version_hold_the_models_queue(
    make_settings: MakeSettings, rabbitmq_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(reconnect_interval=0.1)
    app = create_app(settings)
    with caplog.at_level(logging.WARNING, "chatbus.startup"):
        async with await aio_pika.connect(rabbitmq_url) as earlier_worker:
            channel = await earlier_worker.channel()
            # As earlier versions declared it: transient, deleted with its last consumer.
            queue = await channel.declare_queue(
                settings.models_queue, durable=False, auto_delete=True
            )
            await queue.consume(ignore)
            starting = asyncio.create_task(app.start())
            await until_logged(caplog, lambda r: "earlier versions" in r.getMessage())
            assert not starting.done()
        # The earlier worker stopped: its queue went with it, this worker goes on.
        await asyncio.wait_for(starting, 10)
    await app.stop()


# --- requests with no worker --------------------------------------------------------------------


async def no_worker_consuming(make_settings: MakeSettings) -> Settings:
    """Queues declared by a worker that has stopped since: nobody consumes the requests."""
    settings = make_settings()
    async with running_worker(settings):
        pass
    return settings


async def test_with_no_worker_the_client_says_so_and_waits_until_the_deadline(
    make_settings: MakeSettings, caplog: pytest.LogCaptureFixture
) -> None:
    settings = await no_worker_consuming(make_settings)
    async with ChatClient(settings.rabbitmq_url, names=settings.names) as client:
        with (
            caplog.at_level(logging.WARNING, "chatbus.client"),
            pytest.raises(DeadlineExceededError),
        ):
            await client.chat("hi", timeout=0.5)
    assert [r.getMessage() for r in caplog.records] == [
        f"no worker consumes {settings.requests_queue!r}: the request waits there for one, "
        "until its deadline"
    ]


async def test_with_no_worker_a_client_that_will_not_wait_fails_at_once(
    make_settings: MakeSettings,
) -> None:
    settings = await no_worker_consuming(make_settings)
    async with ChatClient(
        settings.rabbitmq_url, names=settings.names, wait_for_worker=False
    ) as client:
        with pytest.raises(ServiceUnavailableError, match="no worker consumes"):
            await client.chat("hi", timeout=30)
        with pytest.raises(ServiceUnavailableError, match="no worker consumes"):
            await client.models()


async def chatbus_ask(
    settings: Settings, cwd: Path, *args: str
) -> tuple[asyncio.subprocess.Process, asyncio.StreamReader]:
    process = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).with_name("chatbus")),
        "ask",
        *args,
        cwd=cwd,
        env=os.environ | settings_env(settings),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None
    return process, process.stderr


async def test_ask_with_no_worker_says_so_at_once_and_its_deadline_keeps_it_from_running_later(
    make_settings: MakeSettings,
    tmp_path: Path,
    fake_ollama: FakeOllama,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = await no_worker_consuming(make_settings)
    untouched = model(fake_ollama)
    process, stderr = await chatbus_ask(
        settings, tmp_path, "--model", untouched, "--timeout", "3", "hi"
    )
    async with asyncio.timeout(15):
        first_line = (await stderr.readline()).decode()
    assert process.returncode is None  # said while still waiting, not at the deadline
    assert first_line == (
        f"chatbus: no worker consumes {settings.requests_queue!r}: the request waits there "
        "for one, until its deadline\n"
    )
    async with asyncio.timeout(10):
        rest = (await stderr.read()).decode()
        assert await process.wait() == 1
    assert rest.startswith("chatbus: deadline_exceeded:")

    # The worker that comes later ends the abandoned request without generating it: its
    # deadline_exceeded reply finds nobody bound any more.
    with caplog.at_level(logging.INFO, "chatbus.worker"):
        async with running_worker(settings):
            await until_logged(caplog, lambda r: hasattr(r, "outcome"))
    (ended,) = [r for r in caplog.records if hasattr(r, "outcome")]
    assert ended.getMessage() == "requester gone: generation stopped"
    assert requests_for(fake_ollama, untouched) == 0

    process, stderr = await chatbus_ask(settings, tmp_path, "--no-wait", "hi")
    async with asyncio.timeout(10):
        said = (await stderr.read()).decode()
        assert await process.wait() == 1
    assert said.startswith("chatbus: service_unavailable: no worker consumes")
