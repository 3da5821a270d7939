"""The worker on a three-node RabbitMQ cluster of its own (`chatbus.testing.cluster`, on
ports of its own: the shared broker is not touched). Mid-stream, the node the worker is
connected to is killed, then the node that leads the request queue; every request still
ends in exactly one terminal reply per attempt or in the dead-letter queue, and the worker
keeps serving from the nodes left."""

import os
import uuid
from collections.abc import AsyncIterator

import pytest

from chatbus.settings import Settings
from chatbus.testing import FakeOllama, WorkerProcess
from chatbus.testing.chaos import (
    DurableRequester,
    RequestRecord,
    dead_letter_ids,
    isolated_settings,
)
from chatbus.testing.cluster import RabbitCluster, RabbitNode, available
from tests.support import model, user

pytestmark = [pytest.mark.slow, pytest.mark.rabbitmq]

STREAMS = 16


@pytest.fixture(scope="module")
async def cluster() -> AsyncIterator[RabbitCluster]:
    if (reason := available()) is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    async with RabbitCluster(3) as cluster:
        yield cluster


def on_cluster(cluster: RabbitCluster, fake: FakeOllama) -> Settings:
    prefix = f"cluster-{uuid.uuid4().hex[:8]}"
    return isolated_settings(
        prefix,
        rabbitmq_url=cluster.url,
        ollama_host=fake.url,
        connection_name=f"{prefix}-worker",
        prefetch=STREAMS,
        reconnect_interval=0.5,
        first_token_timeout=10,
        idle_timeout=5,
        total_timeout=60,
        graceful_timeout=5,
        http_port=0,
    )


async def kill_mid_stream(
    requester: DurableRequester, node: RabbitNode, body: dict[str, object]
) -> list[RequestRecord]:
    """Start STREAMS streams, kill the node once half of them are under way, and wait
    until every one has ended (as a later attempt, for those cut off)."""
    sent = [await requester.send(body) for _ in range(STREAMS)]
    await requester.ledger.wait_for(
        lambda: sum(1 for r in sent if r.replies) >= STREAMS // 2, timeout=30
    )
    await node.kill()
    await requester.ledger.settled(timeout=60)
    return sent


async def test_killing_the_workers_node_then_the_queue_leader_loses_nothing(
    cluster: RabbitCluster, fake_ollama: FakeOllama
) -> None:
    slow = model(fake_ollama, token_delay=0.05, tokens=[f"t{i} " for i in range(40)])
    settings = on_cluster(cluster, fake_ollama)
    worker = await WorkerProcess(settings).start()
    names = settings.names
    try:
        async with DurableRequester(
            cluster.url, names, f"{settings.connection_name}.replies"
        ) as requester:
            members = await cluster.running()[0].list("queues", "name", "members")
            assert [len(r["members"]) for r in members if r["name"] == names.requests_queue] == [3]

            workers_node = await cluster.connected_node(settings.connection_name)
            first_wave = await kill_mid_stream(requester, workers_node, user(model=slow))
            await workers_node.start()
            await cluster.wait_until_online(names.requests_queue, 3)

            leader = await cluster.leader_of(names.requests_queue)
            second_wave = await kill_mid_stream(requester, leader, user(model=slow))

            # Served from the two nodes left.
            after = [await requester.send(user()) for _ in range(5)]
            await requester.ledger.settled(timeout=30)
            tally = requester.ledger.tally(await dead_letter_ids(cluster.url, names))
    finally:
        await worker.kill()

    assert tally.lost_ids == []
    assert (tally.accepted, tally.duplicate_terminals) == (2 * STREAMS + 5, 0)
    assert tally.answered + tally.dead_lettered == tally.accepted
    # The kills did cut streams off: those were answered again as a later attempt.
    cut_off = [r for r in first_wave + second_wave if r.last_attempt > 1]
    assert cut_off
    assert all(r.ended for r in after)
