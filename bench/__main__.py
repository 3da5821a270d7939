"""`uv run python -m bench`: runs every scenario, prints the table, writes the JSON results."""

import argparse
import asyncio
import contextlib
import datetime
import importlib.util
import json
import os
import platform
import statistics
import sys
import uuid
from pathlib import Path
from typing import Any

import aio_pika
from aio_pika.abc import AbstractRobustConnection

from bench import pool, scenarios
from bench.processes import (
    FakeOllamaProcess,
    PeakRss,
    broker_pid,
    cpu_seconds,
    gateway_process,
    rss_mb,
    worker_process,
)
from bench.report import print_table, targets
from bench.requester import Requester
from chatbus.settings import Chunking, Settings

RESULTS = Path(__file__).parent / "results"


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--rabbitmq-url", default=Settings().rabbitmq_url)
    parser.add_argument("--streams", type=int, default=200, help="concurrent streams (throughput)")
    parser.add_argument("--tokens", type=int, default=50, help="tokens per stream (throughput)")
    parser.add_argument(
        "--rounds", type=int, default=3, help="throughput rounds; the median counts"
    )
    parser.add_argument("--first-token-samples", type=int, default=200)
    parser.add_argument("--hop-samples", type=int, default=500)
    parser.add_argument("--hop-messages", type=int, default=20_000)
    parser.add_argument("--paced-streams", type=int, default=200)
    parser.add_argument("--paced-tokens", type=int, default=100)
    parser.add_argument("--token-delay", type=float, default=0.02, help="seconds per paced token")
    parser.add_argument(
        "--flush-windows",
        type=float,
        nargs="+",
        default=[Chunking.flush_window],
        help="the worker's FLUSH_WINDOW values the paced streams run with",
    )
    parser.add_argument(
        "--rss-streams", type=int, default=500, help="paced streams in flight for the RSS peak"
    )
    parser.add_argument(
        "--scale-workers", type=int, default=2, help="worker processes for the scale row"
    )
    parser.add_argument(
        "--only",
        choices=["single", "pool"],
        help="only the one-server scenarios, or only those of several servers (default: all)",
    )
    parser.add_argument(
        "--output", type=Path, help="JSON file (default: bench/results/<time>.json)"
    )
    return parser.parse_args()


def _machine(connection: AbstractRobustConnection) -> dict[str, Any]:
    with open("/proc/cpuinfo") as cpuinfo:
        cpu = next(
            (line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")),
            platform.processor(),
        )
    server = connection.transport.connection.server_properties  # type: ignore[union-attr]
    version = server.get("version", b"")
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "worker_event_loop": "uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        "rabbitmq": version.decode() if isinstance(version, bytes) else str(version),
    }


def _worker_settings(run_id: str, rabbitmq_url: str, ollama_url: str, **values: Any) -> Settings:
    prefix = f"bench-{run_id}"
    return Settings(
        rabbitmq_url=rabbitmq_url,
        ollama_host=ollama_url,
        requests_queue=f"{prefix}.chat.requests",
        replies_exchange=f"{prefix}.chat.replies",
        cancel_exchange=f"{prefix}.chat.cancel",
        dead_letter_queue=f"{prefix}.chat.requests.dlq",
        models_queue=f"{prefix}.chat.models",
        # Several workers at once (the scale row) must not contend for one HTTP port.
        http_port=0,
        **values,
    )


async def _delete_topology(connection: AbstractRobustConnection, settings: Settings) -> None:
    channel = await connection.channel()
    for queue in (settings.requests_queue, settings.dead_letter_queue, settings.models_queue):
        await channel.queue_delete(queue)
    for exchange in (settings.replies_exchange, settings.cancel_exchange):
        await channel.exchange_delete(exchange)
    await channel.close()


async def _throughput_and_first_token(
    args: argparse.Namespace, connection: AbstractRobustConnection, settings: Settings
) -> dict[str, Any]:
    async with worker_process(settings) as worker, Requester(connection, settings) as requester:
        idle_rss = rss_mb(worker.pid)
        await scenarios.service_streams(requester, args.streams, timeout=60)  # warm-up
        rates, cpu_per_token, messages_per_token = [], [], []
        for _ in range(args.rounds):
            cpu_before = cpu_seconds(worker.pid)
            run = await scenarios.service_streams(requester, args.streams, timeout=60)
            cpu_per_token.append((cpu_seconds(worker.pid) - cpu_before) / run.tokens)
            rates.append(run.tokens / run.seconds)
            messages_per_token.append(run.broker_messages / run.tokens)
        first_token = await scenarios.service_first_token(requester, args.first_token_samples)
    return {
        "tokens_per_second": statistics.median(rates),
        "tokens_per_second_rounds": rates,
        "worker_cpu_us_per_token": statistics.median(cpu_per_token) * 1e6,
        "broker_messages_per_token": statistics.median(messages_per_token),
        "first_token_ms": scenarios.summary(first_token),
        "worker_rss_idle_mb": idle_rss,
    }


async def _gateway(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    """The same streams through the HTTP gateway, read with the same `ollama` client as the
    direct baseline: the client, the gateway, the worker and the fake each a process."""
    async with worker_process(settings), gateway_process(settings) as gateway:
        client = scenarios.direct_client(gateway.url, args.streams)
        await scenarios.gateway_tokens_per_second(client, args.streams)  # warm-up
        rates, cpu_per_token = [], []
        for _ in range(args.rounds):
            cpu_before = cpu_seconds(gateway.pid)
            rate, tokens = await scenarios.gateway_tokens_per_second(client, args.streams)
            cpu_per_token.append((cpu_seconds(gateway.pid) - cpu_before) / tokens)
            rates.append(rate)
        first_token = await scenarios.gateway_first_token(client, args.first_token_samples)
        await client.close()  # type: ignore[no-untyped-call]
    return {
        "tokens_per_second": statistics.median(rates),
        "tokens_per_second_rounds": rates,
        "gateway_cpu_us_per_token": statistics.median(cpu_per_token) * 1e6,
        "first_token_ms": scenarios.summary(first_token),
    }


async def _scale(
    args: argparse.Namespace,
    connection: AbstractRobustConnection,
    settings: Settings,
    fake: FakeOllamaProcess,
) -> dict[str, Any]:
    """The same streams with several worker processes on the same broker, and how busy each
    process was meanwhile (1.0 is a whole core): the busiest one is the ceiling."""
    async with contextlib.AsyncExitStack() as stack:
        workers = [
            await stack.enter_async_context(worker_process(settings))
            for _ in range(args.scale_workers)
        ]
        requester = await stack.enter_async_context(Requester(connection, settings))
        await scenarios.service_streams(requester, args.streams, timeout=60)  # warm-up
        processes = {f"worker {n + 1}": w.pid for n, w in enumerate(workers)}
        processes |= {"fake Ollama": fake.pid, "requester (this process)": os.getpid()}
        if (broker := broker_pid(args.rabbitmq_url)) is not None:
            processes["RabbitMQ"] = broker
        rates, busy = [], {name: 0.0 for name in processes}
        for _ in range(args.rounds):
            before = {name: cpu_seconds(pid) for name, pid in processes.items()}
            run = await scenarios.service_streams(requester, args.streams, timeout=60)
            rates.append(run.tokens / run.seconds)
            for name, pid in processes.items():
                busy[name] += (cpu_seconds(pid) - before[name]) / run.seconds / args.rounds
    return {
        "workers": args.scale_workers,
        "tokens_per_second": statistics.median(rates),
        "tokens_per_second_rounds": rates,
        "cores_busy": busy,
    }


async def _paced(
    args: argparse.Namespace,
    connection: AbstractRobustConnection,
    settings: Settings,
    streams: int,
) -> dict[str, Any]:
    async with worker_process(settings) as worker, Requester(connection, settings) as requester:
        idle_rss = rss_mb(worker.pid)
        async with PeakRss(worker.pid) as peak:
            cpu_before = cpu_seconds(worker.pid)
            run = await scenarios.service_streams(requester, streams, timeout=120)
            cpu = cpu_seconds(worker.pid) - cpu_before
    return {
        "flush_window_ms": settings.flush_window * 1000,
        "streams": streams,
        "completed": run.completed,
        "seconds": run.seconds,
        "token_lateness_ms": scenarios.summary(scenarios.service_lateness(run, args.token_delay)),
        "broker_messages_per_token": run.broker_messages / run.tokens,
        "worker_cpu_us_per_token": cpu / run.tokens * 1e6,
        "worker_rss_idle_mb": idle_rss,
        "worker_rss_peak_mb": peak.peak_mb,
    }


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    run_id = uuid.uuid4().hex[:8]
    connection = await aio_pika.connect_robust(args.rabbitmq_url)
    results: dict[str, Any] = {
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": _machine(connection),
        "parameters": {k: v for k, v in vars(args).items() if k not in ("output",)},
    }
    topology = _worker_settings(run_id, args.rabbitmq_url, "")
    try:
        if args.only != "pool":
            await _single_server(args, connection, run_id, results)
        if args.only != "single":
            results["pool"] = await _pool(args, connection, run_id)
    finally:
        await _delete_topology(connection, topology)
        await connection.close()
    results["targets"] = targets(results)
    return results


async def _single_server(
    args: argparse.Namespace,
    connection: AbstractRobustConnection,
    run_id: str,
    results: dict[str, Any],
) -> None:
    """One server, as before the pool: it runs any number of generations at once, so the
    worker gives it as many slots as its prefetch."""
    async with FakeOllamaProcess(args.tokens) as fast:
        client = scenarios.direct_client(fast.url, args.streams)
        await scenarios.direct_tokens_per_second(client, args.streams)  # warm-up
        rates = [
            await scenarios.direct_tokens_per_second(client, args.streams)
            for _ in range(args.rounds)
        ]
        first_token = await scenarios.direct_first_token(client, args.first_token_samples)
        await client.close()  # type: ignore[no-untyped-call]
        results["direct"] = {
            "tokens_per_second": statistics.median(rates),
            "tokens_per_second_rounds": rates,
            "first_token_ms": scenarios.summary(first_token),
        }
        hop = await scenarios.amqp_hops(
            connection, f"bench-{run_id}.hop", args.hop_samples, args.hop_messages
        )
        results["amqp_hop"] = {
            "reply_latency_ms": scenarios.summary(hop.reply_latencies),
            "request_latency_ms": scenarios.summary(hop.request_latencies),
            "messages_per_second": hop.messages_per_second,
        }
        settings = _worker_settings(
            run_id,
            args.rabbitmq_url,
            fast.url,
            prefetch=max(args.streams, args.paced_streams, args.rss_streams),
            ollama_num_parallel=max(args.streams, args.paced_streams, args.rss_streams),
        )
        results["service"] = await _throughput_and_first_token(args, connection, settings)
        results["scale"] = await _scale(args, connection, settings, fast)
        results["gateway"] = await _gateway(args, settings)

    async with FakeOllamaProcess(args.paced_tokens, args.token_delay) as paced:
        client = scenarios.direct_client(paced.url, args.paced_streams)
        floor = await scenarios.direct_lateness(client, args.paced_streams, args.token_delay)
        await client.close()  # type: ignore[no-untyped-call]
        results["direct_paced"] = {"token_lateness_ms": scenarios.summary(floor)}
        results["paced"] = []
        for window in args.flush_windows:
            settings = _worker_settings(
                run_id,
                args.rabbitmq_url,
                paced.url,
                prefetch=max(args.paced_streams, args.rss_streams),
                ollama_num_parallel=max(args.paced_streams, args.rss_streams),
                flush_window=window,
            )
            results["paced"].append(await _paced(args, connection, settings, args.paced_streams))
        results["rss"] = await _paced(args, connection, settings, args.rss_streams)


async def _pool(
    args: argparse.Namespace, connection: AbstractRobustConnection, run_id: str
) -> dict[str, Any]:
    def settings_for(**values: Any) -> Settings:
        return _worker_settings(run_id, args.rabbitmq_url, "", **values)

    return {
        "failover": await pool.failover(settings_for, connection),
        "routing": await pool.routing(settings_for, connection),
        "scale": await pool.scale(settings_for, connection),
    }


def main() -> int:
    args = _arguments()
    results = asyncio.run(_run(args))
    print_table(results)
    output = args.output or RESULTS / f"{results['started'].replace(':', '')}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nresults: {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
