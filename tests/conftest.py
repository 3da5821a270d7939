"""Fixtures: a real RabbitMQ, the fake Ollama, and the real worker around them.

The broker comes from RABBITMQ_URL when set (an unreachable one fails the run), else a broker
answering on localhost:5672, else testcontainers' RabbitMQ when Docker is available. Without
any of them the integration tests are skipped, except under CI=true where that is an error.
Every queue and exchange a run declares carries a prefix unique to the run.
"""

import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import pytest
from redis import Redis

from chatbus.settings import Settings
from chatbus.testing import Behaviour, FakeOllama, running_worker
from tests.gateway_support import Gateway, running_gateway
from tests.support import Requester

RUN_PREFIX = f"test-{uuid.uuid4().hex[:8]}"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test that reaches the broker is marked `rabbitmq` (so `-m "not rabbitmq"`
    runs the rest anywhere); slow tests (a broker restart) go first: RabbitMQ restarts
    fastest with the fewest queues to recover, and every test's queues live until the end
    of the run."""
    for item in items:
        if "rabbitmq_url" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.rabbitmq)
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def _answers(url: str, default_port: int = 5672) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection(
            (parts.hostname or "localhost", parts.port or default_port), 3
        ):
            return True
    except OSError:
        return False


def _docker_available() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True, check=False).returncode == 0


@pytest.fixture(scope="session")
def rabbitmq_url() -> Iterator[str]:
    if url := os.environ.get("RABBITMQ_URL"):
        if not _answers(url):
            pytest.fail(f"RABBITMQ_URL={url} is set but nothing answers there")
        yield url
        return
    local = "amqp://guest:guest@localhost:5672/"
    if _answers(local):
        yield local
        return
    if _docker_available():
        from testcontainers.rabbitmq import RabbitMqContainer

        with RabbitMqContainer("rabbitmq:4.1-management") as container:
            host = container.get_container_host_ip()
            port = container.get_exposed_port(5672)
            yield f"amqp://guest:guest@{host}:{port}/"
        return
    reason = "no RabbitMQ: set RABBITMQ_URL, run one on localhost:5672, or start Docker"
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="session")
async def fake_ollama() -> AsyncIterator[FakeOllama]:
    async with FakeOllama() as fake:
        yield fake


@pytest.fixture
async def two_ollamas() -> AsyncIterator[tuple[FakeOllama, FakeOllama]]:
    """Two fake Ollama servers of the test's own, each with the model "m"."""
    async with (
        FakeOllama(models={"m": Behaviour()}) as first,
        FakeOllama(models={"m": Behaviour()}) as second,
    ):
        yield first, second


@pytest.fixture(scope="session")
async def amqp(rabbitmq_url: str) -> AsyncIterator[aio_pika.abc.AbstractRobustConnection]:
    connection = await aio_pika.connect_robust(rabbitmq_url, reconnect_interval=0.5)
    yield connection
    await connection.close()


@pytest.fixture(scope="session")
async def make_settings(
    rabbitmq_url: str, fake_ollama: FakeOllama
) -> AsyncIterator[Callable[..., Settings]]:
    """Settings for a worker with its own queue and exchange names, and timeouts short
    enough for tests. Everything they name is deleted at the end of the run."""
    created: list[Settings] = []

    def make(**overrides: Any) -> Settings:
        prefix = f"{RUN_PREFIX}.{uuid.uuid4().hex[:6]}"
        values: dict[str, Any] = {
            "rabbitmq_url": rabbitmq_url,
            "ollama_host": fake_ollama.url,
            "requests_queue": f"{prefix}.chat.requests",
            "replies_exchange": f"{prefix}.chat.replies",
            "cancel_exchange": f"{prefix}.chat.cancel",
            "dead_letter_queue": f"{prefix}.chat.requests.dlq",
            "models_queue": f"{prefix}.chat.models",
            "first_token_timeout": 3.0,
            "idle_timeout": 1.0,
            "total_timeout": 20.0,
            "retry_budget": 1.0,
            "retry_initial_backoff": 0.05,
            # A circuit opened by one test's failing model closes within the next one's
            # retry budget.
            "ollama_cooldown": 0.2,
            "flush_window": 0.0,
            "graceful_timeout": 5.0,
            "reconnect_interval": 0.5,
            # Worker processes of one run must not contend for the default HTTP port.
            "http_port": 0,
        }
        settings = Settings(**(values | overrides))
        created.append(settings)
        return settings

    yield make

    # A connection of its own: the shared one may still be reconnecting after a fault test.
    async with await aio_pika.connect(rabbitmq_url) as connection:
        channel = await connection.channel()
        for settings in created:
            for queue in (
                settings.requests_queue,
                settings.dead_letter_queue,
                settings.models_queue,
            ):
                await channel.queue_delete(queue)
            for exchange in (settings.replies_exchange, settings.cancel_exchange):
                await channel.exchange_delete(exchange)


@pytest.fixture(scope="session")
async def worker_settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings()


@pytest.fixture(scope="session")
async def worker(worker_settings: Settings) -> AsyncIterator[Settings]:
    """The real worker, in this process, shared by the tests that need no worker of their own."""
    async with running_worker(worker_settings):
        yield worker_settings


@pytest.fixture
async def requester(
    amqp: aio_pika.abc.AbstractRobustConnection, worker: Settings
) -> AsyncIterator[Requester]:
    async with Requester(amqp, worker) as requester:
        yield requester


@pytest.fixture(scope="session")
def redis_url() -> str:
    """REDIS_URL, or the Redis on 127.0.0.1:6379. Tests that need it are skipped when it does
    not answer, except with CI=true, where that is a failure."""
    url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    if not _answers(url, default_port=6379):
        reason = f"no Redis answers at {url} (set REDIS_URL or start redis-server)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return url


@pytest.fixture(scope="session")
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A key prefix of this run's own; every key under it is deleted at the end."""
    prefix = f"{RUN_PREFIX}:"
    yield prefix
    with Redis.from_url(redis_url) as client:
        keys = list(client.scan_iter(match=f"{prefix}*"))
        if keys:
            client.delete(*keys)


@pytest.fixture(scope="session")
async def gateway(worker: Settings) -> AsyncIterator[Gateway]:
    """The HTTP gateway in front of the shared worker, served in this process."""
    async with running_gateway(worker) as gateway:
        yield gateway
