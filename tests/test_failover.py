"""Several addresses in RABBITMQ_URL: reading them, and connecting over them against the
real broker (a closed port stands for a node that is down; the broker under two names,
`localhost` and `127.0.0.1`, for two nodes that both answer). The three-node cluster with
nodes killed is tests/test_cluster.py."""

import asyncio
import re
import uuid
from collections.abc import Callable

import pytest
from yarl import URL

from chatbus import failover
from chatbus.client import ChatClient
from chatbus.settings import Settings
from chatbus.testing import running_worker
from tests.support import close_connection_named, free_port, needs_rabbitmqctl

MakeSettings = Callable[..., Settings]


def test_one_address_is_read_as_it_is() -> None:
    assert failover.addresses("amqp://u:p@rabbit:5672/vhost?heartbeat=30") == (
        URL("amqp://u:p@rabbit:5672/vhost?heartbeat=30"),
    )


def test_a_bare_host_takes_everything_but_host_and_port_from_the_first() -> None:
    found = failover.addresses("amqps://u:p@rabbit-1:5671/v?heartbeat=30, rabbit-2:5681,rabbit-3")
    assert [str(url) for url in found] == [
        "amqps://u:p@rabbit-1:5671/v?heartbeat=30",
        "amqps://u:p@rabbit-2:5681/v?heartbeat=30",
        "amqps://u:p@rabbit-3/v?heartbeat=30",
    ]


def test_whole_urls_keep_their_own_credentials() -> None:
    found = failover.addresses("amqp://a:1@one:5672/,amqp://b:2@two:5673/x")
    assert [(url.user, url.password, url.host, url.port, url.path) for url in found] == [
        ("a", "1", "one", 5672, "/"),
        ("b", "2", "two", 5673, "/x"),
    ]


@pytest.mark.parametrize(
    ("setting", "complaint"),
    [
        ("localhost:5672", "must start with amqp:// or amqps://"),
        ("http://localhost/", "must start with amqp:// or amqps://"),
        ("amqp://u:secret@one/,,two", "address 2 is empty"),
        ("amqp://u:secret@one/,two:port", "address 2 has a port that is not a number"),
        ("amqp://u:secret@one/,redis://two/", "address 2 must start with amqp://"),
    ],
)
def test_an_unreadable_setting_is_a_configuration_error(setting: str, complaint: str) -> None:
    with pytest.raises(failover.ConfigurationError, match=re.escape(complaint)) as raised:
        failover.addresses(setting)
    assert "secret" not in str(raised.value)


def test_passwords_are_hidden_when_shown() -> None:
    shown = failover.shown("amqp://u:secret@one:5672/,amqp://v:other@two/,three:5673")
    assert shown == "amqp://u:******@one:5672/,amqp://v:******@two/,three:5673"


def dead_address() -> str:
    """A port nothing listens on: a node that is down."""
    return f"amqp://guest:guest@127.0.0.1:{free_port()}/"


def other_name_for(rabbitmq_url: str) -> str:
    """The same broker under another name, so that two addresses both answer."""
    url = URL(rabbitmq_url)
    aliases = {"localhost": "127.0.0.1", "127.0.0.1": "localhost"}
    if url.host not in aliases:
        pytest.skip("needs the broker on localhost, to give it a second name")
    return str(url.with_host(aliases[url.host]))


async def test_the_first_address_that_answers_is_used(rabbitmq_url: str) -> None:
    connection = await failover.connect_robust(f"{dead_address()},{rabbitmq_url}")
    async with connection:
        assert connection.url.port == URL(rabbitmq_url).port
        channel = await connection.channel()
        await channel.close()


async def test_no_address_answering_names_them_all() -> None:
    first, second = dead_address(), dead_address()
    with pytest.raises(ConnectionError, match="no RabbitMQ address answered") as raised:
        await failover.connect_robust(f"{first},{second}")
    assert f":{URL(first).port}" in str(raised.value)
    assert f":{URL(second).port}" in str(raised.value)


async def test_a_plain_connection_also_takes_the_first_that_answers(rabbitmq_url: str) -> None:
    async with await failover.connect(f"{dead_address()},{rabbitmq_url}") as connection:
        channel = await connection.channel()
        await channel.close()


@needs_rabbitmqctl
async def test_a_lost_connection_moves_to_the_next_address(rabbitmq_url: str) -> None:
    second = other_name_for(rabbitmq_url)
    name = f"failover-test-{uuid.uuid4().hex[:8]}"
    connection = await failover.connect_robust(
        f"{rabbitmq_url},{second}",
        client_properties={"connection_name": name},
        reconnect_interval=0.1,
    )
    async with connection:
        assert connection.url.host == URL(rabbitmq_url).host
        channel = await connection.channel()
        queue = await channel.declare_queue(exclusive=True)
        reconnected = asyncio.Event()
        connection.reconnect_callbacks.add(lambda *_: reconnected.set())

        await close_connection_named(name)
        async with asyncio.timeout(10):
            await reconnected.wait()

        assert connection.url.host == URL(second).host
        # The exclusive queue went with the old connection; it was declared again.
        await queue.declare(timeout=5)


async def test_the_worker_and_the_client_skip_an_address_that_is_down(
    make_settings: MakeSettings, rabbitmq_url: str
) -> None:
    settings = make_settings(rabbitmq_url=f"{dead_address()},{rabbitmq_url}")
    async with (
        running_worker(settings),
        ChatClient(settings.rabbitmq_url, names=settings.names, timeout=10) as client,
    ):
        done = await client.chat("Why is the sky blue?")
    assert done.done_reason == "stop"


async def test_a_client_with_no_address_answering_cannot_connect() -> None:
    client = ChatClient(f"{dead_address()},{dead_address()}")
    with pytest.raises(ConnectionError, match="no RabbitMQ address answered"):
        await client.connect(give_up_after=0)
