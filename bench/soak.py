"""`uv run python -m bench.soak`: the chaos soak (see the README's Reliability section).

It starts a RabbitMQ node of its own (never the machine's shared broker), the fake Ollama
and workers as real processes, then sends N requests through a requester whose replies wait
in a durable quorum queue, while a worker is SIGKILLed and replaced every few seconds and
the node is restarted a few times. It prints what became of every request: accepted,
answered, lost, dead-lettered, terminal replies beyond one per attempt, how many attempts
the requests took, and the longest time no worker was consuming; and writes the JSON to
`bench/results/`. It exits 1 when a request was lost, an attempt had two terminal replies,
or a worker exited by itself.
"""

import argparse
import asyncio
import contextlib
import datetime
import json
import logging
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika

from bench.processes import FakeOllamaProcess
from chatbus.settings import Settings
from chatbus.testing import WorkerProcess
from chatbus.testing.chaos import (
    DurableRequester,
    NotSent,
    Tally,
    dead_letter_ids,
    isolated_settings,
)
from chatbus.testing.cluster import NodeError, RabbitCluster, RabbitNode

RESULTS = Path(__file__).parent / "results"
WORKER_START_TIMEOUT = 120.0
"""A replacement started while the broker restarts waits for it."""
FOREVER = 1e9


def _arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--rate", type=float, default=50.0, help="requests sent per second")
    parser.add_argument("--workers", type=int, default=2, help="workers running at once")
    parser.add_argument(
        "--kill-every", type=float, default=3.0, help="seconds between two worker SIGKILLs"
    )
    parser.add_argument(
        "--restarts", type=int, default=3, help="broker restarts, spread over the sending"
    )
    parser.add_argument("--tokens", type=int, default=10, help="tokens per answer")
    parser.add_argument("--token-delay", type=float, default=0.02, help="seconds per token")
    parser.add_argument("--prefetch", type=int, default=16)
    parser.add_argument(
        "--quiet",
        type=float,
        default=60.0,
        help="after the sending, stop waiting for answers once none came for this long",
    )
    parser.add_argument(
        "--settle", type=float, default=1800.0, help="wait at most this long for the answers"
    )
    parser.add_argument(
        "--json", action="store_true", help="print the results as JSON instead of a table"
    )
    parser.add_argument("--output", type=Path, help="JSON file (default: bench/results/)")
    return parser.parse_args(argv)


class Timeline:
    """What happened when, in seconds from the start."""

    def __init__(self) -> None:
        self._started = time.monotonic()
        self.events: list[str] = []

    def add(self, event: str) -> None:
        self.events.append(f"{time.monotonic() - self._started:6.1f} s  {event}")


class Workers:
    """The worker processes. `replace_one` SIGKILLs the oldest and starts another; a
    worker that ends without being killed is recorded, with the end of its output."""

    def __init__(self, settings: Settings, count: int, timeline: Timeline) -> None:
        self._settings = settings
        self._timeline = timeline
        self._count = count
        self._running: list[WorkerProcess] = []
        self._killed: set[int] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.kills = 0
        self.exited_by_themselves: list[str] = []

    async def start(self) -> None:
        await asyncio.gather(*(self._start_one() for _ in range(self._count)))

    async def replace_one(self) -> None:
        if not self._running:
            return
        oldest = self._running.pop(0)
        self._killed.add(oldest.pid)
        await oldest.kill()
        self.kills += 1
        self._timeline.add(f"worker {oldest.pid} killed")
        # In the background: while the broker restarts, the new one waits for it.
        self._in_background(self._start_one())

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for worker in self._running:
            self._killed.add(worker.pid)
            await worker.kill()

    async def _start_one(self) -> None:
        worker = WorkerProcess(self._settings)
        try:
            await worker.start(timeout=WORKER_START_TIMEOUT)
        except AssertionError as failure:
            self.exited_by_themselves.append(str(failure)[-2000:])
            return
        self._running.append(worker)
        self._timeline.add(f"worker {worker.pid} started")
        self._in_background(self._watch(worker))

    async def _watch(self, worker: WorkerProcess) -> None:
        code = await worker.wait(timeout=FOREVER)
        if worker.pid not in self._killed:
            self._running.remove(worker)
            tail = "".join(worker.output[-20:])
            self.exited_by_themselves.append(f"exit code {code}:\n{tail}")
            self._timeline.add(f"worker {worker.pid} exited by itself: {code}")

    def _in_background(self, work: Any) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


@dataclass
class IdleWatch:
    """Samples the request queue's consumer count; the broker not answering counts as no
    consumer. `longest` is the longest stretch with none."""

    url: str
    queue: str
    timeline: Timeline
    interval: float = 0.2
    longest: float = 0.0
    _idle_since: float | None = field(default=None, init=False)

    async def run(self) -> None:
        connection: aio_pika.abc.AbstractConnection | None = None
        try:
            while True:
                try:
                    if connection is None or connection.is_closed:
                        connection = await aio_pika.connect(self.url, timeout=2)
                    consumers = await self._consumers(connection)
                except (TimeoutError, *aio_pika.exceptions.CONNECTION_EXCEPTIONS):
                    connection, consumers = None, 0
                self._sample(consumers)
                await asyncio.sleep(self.interval)
        finally:
            if connection is not None:
                with contextlib.suppress(Exception):
                    await connection.close()

    async def _consumers(self, connection: aio_pika.abc.AbstractConnection) -> int:
        async with connection.channel() as channel:
            declared = await channel.declare_queue(self.queue, passive=True, timeout=2)
            return declared.declaration_result.consumer_count or 0

    def _sample(self, consumers: int) -> None:
        now = time.monotonic()
        if consumers:
            if self._idle_since is not None and now - self._idle_since >= 1:
                self.timeline.add(f"consuming again after {now - self._idle_since:.1f} s")
            self._idle_since = None
            return
        if self._idle_since is None:
            self._idle_since = now
        self.longest = max(self.longest, now - self._idle_since)


async def _send(requester: DurableRequester, count: int, rate: float, body: Any) -> int:
    """Send until `count` requests are accepted, at `rate` per second; the sends the broker
    did not confirm (it was away) are counted and made again as new requests."""
    loop = asyncio.get_running_loop()
    next_at = loop.time()
    accepted = unconfirmed = 0
    while accepted < count:
        try:
            await requester.send(body)
            accepted += 1
        except NotSent:
            unconfirmed += 1
        next_at += 1 / rate
        await asyncio.sleep(max(next_at - loop.time(), 0))
    return unconfirmed


async def _chaos(
    workers: Workers,
    node: RabbitNode,
    args: argparse.Namespace,
    sending: asyncio.Task[int],
    timeline: Timeline,
) -> int:
    """Kill a worker every `kill_every` seconds and restart the broker `restarts` times,
    spread over the time the sending should take, until the sending is done."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    planned = args.requests / args.rate
    restart_at = [planned * (i + 1) / (args.restarts + 1) for i in range(args.restarts)]
    next_kill = args.kill_every
    restarts = 0
    while not sending.done() or restart_at:
        elapsed = loop.time() - started
        if restart_at and elapsed >= restart_at[0]:
            restart_at.pop(0)
            timeline.add("broker stopping")
            await node.stop()
            timeline.add("broker stopped; starting")
            await node.start()
            timeline.add("broker started")
            restarts += 1
        elif elapsed >= next_kill and not sending.done():
            await workers.replace_one()
            next_kill += args.kill_every
        await asyncio.sleep(0.1)
    return restarts


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    run_id = uuid.uuid4().hex[:8]
    started = time.monotonic()
    results: dict[str, Any] = {
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "parameters": {k: v for k, v in vars(args).items() if k not in ("output", "json")},
    }
    async with (
        RabbitCluster(1, run_id) as broker,
        FakeOllamaProcess(args.tokens, args.token_delay) as fake,
    ):
        node = broker.nodes[0]
        settings = isolated_settings(
            f"soak-{run_id}",
            rabbitmq_url=node.url,
            ollama_host=fake.url,
            prefetch=args.prefetch,
            reconnect_interval=0.5,
            first_token_timeout=10,
            idle_timeout=5,
            total_timeout=60,
            http_port=0,
        )
        timeline = Timeline()
        workers = Workers(settings, args.workers, timeline)
        await workers.start()
        idle = IdleWatch(node.url, settings.requests_queue, timeline)
        watching = asyncio.create_task(idle.run())
        try:
            reply_queue = f"soak-{run_id}.replies"
            async with DurableRequester(node.url, settings.names, reply_queue) as requester:
                body = {"messages": [{"role": "user", "content": "Why is the sky blue?"}]}
                sending = asyncio.create_task(_send(requester, args.requests, args.rate, body))
                restarts = await _chaos(workers, node, args, sending, timeline)
                unconfirmed = await sending
                timeline.add("all requests accepted")
                # The backlog can be long: the workers keep being killed.
                await requester.ledger.settled(timeout=args.settle, quiet=args.quiet)
                timeline.add("settled")
                tally = requester.ledger.tally(await dead_letter_ids(node.url, settings.names))
                left = await _queues(node.url, [settings.requests_queue, reply_queue])
                broker_state = None
                if tally.lost:
                    try:
                        broker_state = await _broker_state(node)
                    except NodeError as error:
                        broker_state = {"error": str(error)}
        finally:
            watching.cancel()
            await workers.stop()
    results |= {
        "seconds": time.monotonic() - started,
        "rabbitmq": "a node of its own, restarted (stop, start) during the run",
        "tally": tally.as_dict(),
        "unconfirmed_sends": unconfirmed,
        "kills": workers.kills,
        "restarts": restarts,
        "longest_without_consumer_seconds": idle.longest,
        "workers_exited_by_themselves": len(workers.exited_by_themselves),
        "exits": workers.exited_by_themselves,
        "timeline": timeline.events,
        "queues_at_the_end": left,
        "broker_at_the_end": broker_state,
        "passed": _passed(tally, workers.exited_by_themselves),
    }
    return results


async def _queues(url: str, names: list[str]) -> dict[str, dict[str, int]]:
    """Messages ready in each queue, and its consumers: where unanswered requests are."""
    state = {}
    async with await aio_pika.connect(url) as connection:
        channel = await connection.channel()
        for name in names:
            declared = (await channel.declare_queue(name, passive=True)).declaration_result
            state[name] = {
                "ready": declared.message_count or 0,
                "consumers": declared.consumer_count or 0,
            }
    return state


async def _broker_state(node: RabbitNode) -> dict[str, Any]:
    """What RabbitMQ says about its queues, consumers and channels, and its alarms: for
    finding out why requests went unanswered."""
    status = json.loads(await node.ctl("status", "--formatter", "json"))
    return {
        "alarms": status.get("alarms"),
        "queues": await node.list(
            "queues", "name", "messages_ready", "messages_unacknowledged", "consumers"
        ),
        "consumers": await node.list(
            "consumers", "queue_name", "channel_pid", "prefetch_count", "active", "arguments"
        ),
        "channels": await node.list(
            "channels",
            "pid",
            "connection",
            "consumer_count",
            "messages_unacknowledged",
            "messages_unconfirmed",
            "prefetch_count",
        ),
        "connections": await node.list("connections", "pid", "name", "state"),
    }


def _passed(tally: Tally, exits: list[str]) -> bool:
    return tally.lost == 0 and tally.duplicate_terminals == 0 and not exits


def _table(results: dict[str, Any]) -> str:
    tally = results["tally"]
    parameters = results["parameters"]
    attempts = ", ".join(f"{n}: {count:,}" for n, count in tally["attempts"].items())
    outcomes = ", ".join(f"{name} {count:,}" for name, count in sorted(tally["outcomes"].items()))
    rows = [
        ("accepted", f"{tally['accepted']:,}"),
        ("answered", f"{tally['answered']:,} ({outcomes})"),
        ("dead-lettered", f"{tally['dead_lettered']:,}"),
        ("lost", f"{tally['lost']:,}"),
        ("duplicate terminals per attempt", f"{tally['duplicate_terminals']:,}"),
        ("attempts", attempts),
        (
            "longest without a consuming worker",
            f"{results['longest_without_consumer_seconds']:.1f} s",
        ),
        ("workers that exited by themselves", str(results["workers_exited_by_themselves"])),
        ("sends not confirmed (sent again)", f"{results['unconfirmed_sends']:,}"),
        ("replies delivered twice", f"{tally['redelivered_replies']:,}"),
    ]
    width = max(len(name) for name, _ in rows)
    head = (
        f"chaos soak: {tally['accepted']:,} requests, {parameters['workers']} workers, "
        f"{results['kills']} SIGKILLs (one every {parameters['kill_every']:g} s), "
        f"{results['restarts']} broker restarts, {results['seconds']:.0f} s"
    )
    lines = [head, *(f"  {name.ljust(width)}  {value}" for name, value in rows)]
    if tally["lost_ids"]:
        lines.append(f"  lost: {' '.join(tally['lost_ids'][:20])}")
    lines.extend(f"  worker exit: {tail}" for tail in results["exits"])
    if tally["lost"]:
        lines.append(f"  queues at the end: {results['queues_at_the_end']}")
        lines.extend(f"  {event}" for event in results["timeline"])
    lines.append("PASSED" if results["passed"] else "FAILED")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    # The requester's reconnects during broker restarts are expected: aiormq and aio-pika
    # would log each try.
    logging.disable(logging.ERROR)
    results = asyncio.run(_run(args))
    output = args.output or RESULTS / f"soak-{results['started'].replace(':', '')}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    if args.json:
        print(json.dumps(results))
    else:
        print(_table(results))
        print(f"\nresults: {output}")
    return 0 if results["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
