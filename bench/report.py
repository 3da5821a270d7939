"""The issue's targets, as ratios within one run, and the table that shows them."""

from collections.abc import Sequence
from typing import Any

THROUGHPUT_RATIO_MIN = 0.9
ADDED_FIRST_TOKEN_MAX_HOPS = 1.5
LATENESS_SLACK_MS = 20.0
RSS_PEAK_MAX_MB = 250.0
RSS_IDLE_MAX_MB = 80.0
MESSAGES_PER_TOKEN_MAX = 0.1
GATEWAY_THROUGHPUT_RATIO_MIN = 0.7
GATEWAY_ADDED_FIRST_TOKEN_MAX_MS = 5.0
FAILOVER_ADDED_P99_MAX_MS = 50.0
ROUTED_LOADS_MAX = 4
ROUTED_TIME_RATIO_MAX = 0.5
SCALE_RATIO_MIN = 1.8


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    rows = _single_server_targets(results) if "service" in results else []
    if "pool" in results:
        rows += _pool_targets(results["pool"])
    return rows


def _pool_targets(pool: dict[str, Any]) -> list[dict[str, Any]]:
    added = pool["failover"]["added_first_token_p99_ms"]
    mixed = pool["routing"]["mixed"]
    time_ratio = mixed["pool"]["seconds"] / mixed["round_robin"]["seconds"]
    scale = pool["scale"]["ratio"]
    return [
        _target(
            "failover: added first-token p99 while one of two servers is down, ms",
            added,
            f"<= {FAILOVER_ADDED_P99_MAX_MS:g}",
            added <= FAILOVER_ADDED_P99_MAX_MS,
        ),
        _target(
            "model-aware routing, mixed models: model loads",
            mixed["pool"]["model_loads"],
            f"<= {ROUTED_LOADS_MAX}",
            mixed["pool"]["model_loads"] <= ROUTED_LOADS_MAX,
        ),
        _target(
            "model-aware routing, mixed models: total time / round-robin's",
            time_ratio,
            f"<= {ROUTED_TIME_RATIO_MAX}",
            time_ratio <= ROUTED_TIME_RATIO_MAX,
        ),
        _target(
            "two servers' tokens/s / one server's",
            scale,
            f">= {SCALE_RATIO_MIN}",
            scale >= SCALE_RATIO_MIN,
        ),
    ]


def _single_server_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    direct, service, hop = results["direct"], results["service"], results["amqp_hop"]
    two_hops = hop["request_latency_ms"]["p50"] + hop["reply_latency_ms"]["p50"]
    added_first_token = service["first_token_ms"]["p50"] - direct["first_token_ms"]["p50"]
    direct_late = results["direct_paced"]["token_lateness_ms"]["p99"]
    rows = [
        _target(
            "P1 throughput: service / ollama client alone",
            service["tokens_per_second"] / direct["tokens_per_second"],
            f">= {THROUGHPUT_RATIO_MIN}",
            service["tokens_per_second"] / direct["tokens_per_second"] >= THROUGHPUT_RATIO_MIN,
        ),
        _target(
            "P2 added first-token p50 / (quorum hop + classic hop) p50",
            added_first_token / two_hops,
            f"<= {ADDED_FIRST_TOKEN_MAX_HOPS}",
            added_first_token / two_hops <= ADDED_FIRST_TOKEN_MAX_HOPS,
        ),
    ]
    for paced in results["paced"]:
        window = paced["flush_window_ms"]
        late = paced["token_lateness_ms"]["p99"]
        allowed = direct_late + window + LATENESS_SLACK_MS
        rows += [
            _target(
                f"P3 {paced['streams']} paced streams completed (window {window:g} ms)",
                paced["completed"],
                f"= {paced['streams']}",
                paced["completed"] == paced["streams"],
            ),
            _target(
                f"P3 p99 token lateness, ms (client alone's p99 + {window:g} + "
                f"{LATENESS_SLACK_MS:g})",
                late,
                f"<= {allowed:.0f}",
                late <= allowed,
            ),
            _target(
                f"broker messages per token at 50 tokens/s (window {window:g} ms)",
                paced["broker_messages_per_token"],
                f"<= {MESSAGES_PER_TOKEN_MAX}",
                paced["broker_messages_per_token"] <= MESSAGES_PER_TOKEN_MAX,
            ),
        ]
    rss = results["rss"]
    rows += [
        _target(
            f"P4 worker RSS peak with {rss['streams']} streams in flight, MB",
            rss["worker_rss_peak_mb"],
            f"<= {RSS_PEAK_MAX_MB:g}",
            rss["worker_rss_peak_mb"] <= RSS_PEAK_MAX_MB,
        ),
        _target(
            "P4 worker RSS idle, MB",
            service["worker_rss_idle_mb"],
            f"<= {RSS_IDLE_MAX_MB:g}",
            service["worker_rss_idle_mb"] <= RSS_IDLE_MAX_MB,
        ),
    ]
    gateway = results["gateway"]
    gateway_ratio = gateway["tokens_per_second"] / direct["tokens_per_second"]
    gateway_added = gateway["first_token_ms"]["p50"] - direct["first_token_ms"]["p50"]
    rows += [
        _target(
            "throughput: gateway (ollama client) / direct client",
            gateway_ratio,
            f">= {GATEWAY_THROUGHPUT_RATIO_MIN}",
            gateway_ratio >= GATEWAY_THROUGHPUT_RATIO_MIN,
        ),
        _target(
            "gateway: added first-token p50, ms",
            gateway_added,
            f"<= {GATEWAY_ADDED_FIRST_TOKEN_MAX_MS:g}",
            gateway_added <= GATEWAY_ADDED_FIRST_TOKEN_MAX_MS,
        ),
    ]
    return rows


def _target(name: str, measured: float, target: str, met: bool) -> dict[str, Any]:
    return {"target": name, "measured": measured, "wanted": target, "met": met}


def print_table(results: dict[str, Any]) -> None:
    machine = results["machine"]
    print(
        f"\n{machine['cpu']}, {machine['cores']} cores, Python {machine['python']} "
        f"({machine['worker_event_loop']} in the worker), RabbitMQ {machine['rabbitmq']}\n"
    )
    measurements = _single_server_rows(results) if "service" in results else []
    if "pool" in results:
        measurements += _pool_rows(results["pool"])
    _print_rows(("measurement", "value"), measurements)
    print()
    _print_rows(
        ("target", "measured", "wanted", "met"),
        [
            (row["target"], f"{row['measured']:.3g}", row["wanted"], "yes" if row["met"] else "NO")
            for row in results["targets"]
        ],
    )


def _pool_rows(pool: dict[str, Any]) -> list[tuple[str, str]]:
    failover, routing, scale = pool["failover"], pool["routing"], pool["scale"]
    rows = [
        (
            f"failover, {failover['requesters']} requesters: first token p50 / p99, both up",
            _ms_pair(failover["first_token_ms_both_up"]),
        ),
        (
            "failover: first token p50 / p99, both up again (nothing changed)",
            _ms_pair(failover["first_token_ms_both_up_again"]),
        ),
        (
            "failover: first token p50 / p99, the server that had the traffic killed",
            _ms_pair(failover["first_token_ms_one_down"]),
        ),
        (
            "failover: first-token p99 change, nothing changed / one server killed",
            f"{failover['unchanged_first_token_p99_ms']:+.1f} / "
            f"{failover['added_first_token_p99_ms']:+.1f} ms",
        ),
        (
            "failover: requests before the kill (on the killed server), cut off by it",
            f"{failover['requests_before']} ({failover['answered_by_the_killed_server_before']})"
            f", {failover['cut_off_by_the_kill']}",
        ),
        (
            "failover: requests after the kill, failed",
            f"{failover['requests_after']}, {failover['failed_after_the_kill']}",
        ),
    ]
    for order in ("alternating", "mixed"):
        routed = routing[order]
        rows.append(
            (
                f"{routing['requests']} requests, two models {order}, one loaded per server, "
                f"{routing['load_time_s']:g} s loads: loads and time, pool / round-robin",
                f"{routed['pool']['model_loads']} in {routed['pool']['seconds']:.2f} s / "
                f"{routed['round_robin']['model_loads']} in "
                f"{routed['round_robin']['seconds']:.2f} s",
            )
        )
    rows.append(
        (
            f"{scale['streams']} paced streams, {scale['parallel_per_server']} per server: "
            "tokens/s, one server / two",
            f"{scale['one_server_tokens_per_second']:,.0f} / "
            f"{scale['two_servers_tokens_per_second']:,.0f}",
        )
    )
    return rows


def _single_server_rows(results: dict[str, Any]) -> list[tuple[str, str]]:
    direct, service, hop = results["direct"], results["service"], results["amqp_hop"]
    gateway, scale, rss = results["gateway"], results["scale"], results["rss"]
    params = results["parameters"]
    measurements = [
        (
            f"ollama client alone, {params['streams']} streams x {params['tokens']} tokens",
            f"{direct['tokens_per_second']:,.0f} tokens/s",
        ),
        ("ollama client alone, first token p50 / p99", _ms_pair(direct["first_token_ms"])),
        ("raw AMQP hop into a quorum queue p50 / p99", _ms_pair(hop["request_latency_ms"])),
        ("raw AMQP hop into a classic queue p50 / p99", _ms_pair(hop["reply_latency_ms"])),
        (
            "raw AMQP hop into a classic queue, rate",
            f"{hop['messages_per_second']:,.0f} messages/s",
        ),
        (
            f"service, {params['streams']} streams x {params['tokens']} tokens",
            f"{service['tokens_per_second']:,.0f} tokens/s",
        ),
        ("service, worker CPU per token", f"{service['worker_cpu_us_per_token']:.1f} us"),
        ("service, broker messages per token", f"{service['broker_messages_per_token']:.3f}"),
        ("service, first token p50 / p99", _ms_pair(service["first_token_ms"])),
        (
            f"scale: {scale['workers']} worker processes / 1, tokens/s",
            f"{scale['tokens_per_second']:,.0f} tokens/s "
            f"({scale['tokens_per_second'] / service['tokens_per_second']:.2f}x)",
        ),
        (
            f"scale: cores busy with {scale['workers']} workers (the ceiling first)",
            ", ".join(
                f"{name} {busy:.2f}"
                for name, busy in sorted(scale["cores_busy"].items(), key=lambda i: -i[1])
            ),
        ),
        (
            f"gateway (ollama client), {params['streams']} streams x {params['tokens']} tokens",
            f"{gateway['tokens_per_second']:,.0f} tokens/s",
        ),
        ("gateway, CPU per token", f"{gateway['gateway_cpu_us_per_token']:.1f} us"),
        ("gateway, first token p50 / p99", _ms_pair(gateway["first_token_ms"])),
        (
            "gateway, added first token p50 / p99 (over the client alone)",
            _ms_pair(_difference(gateway["first_token_ms"], direct["first_token_ms"])),
        ),
        (
            "gateway, added first token p50 / p99 (over the service's AMQP requester)",
            _ms_pair(_difference(gateway["first_token_ms"], service["first_token_ms"])),
        ),
        (
            "ollama client alone, paced token lateness p50 / p99",
            _ms_pair(results["direct_paced"]["token_lateness_ms"]),
        ),
    ]
    for paced in results["paced"]:
        window = f"window {paced['flush_window_ms']:g} ms"
        measurements += [
            (
                f"service, {paced['streams']} paced streams, {window}: token lateness p50 / p99",
                _ms_pair(paced["token_lateness_ms"]),
            ),
            (
                f"service, {paced['streams']} paced streams, {window}: completed, wall time",
                f"{paced['completed']}/{paced['streams']} in {paced['seconds']:.2f} s",
            ),
            (
                f"service, {paced['streams']} paced streams, {window}: worker CPU per token",
                f"{paced['worker_cpu_us_per_token']:.1f} us",
            ),
            (
                f"service, {paced['streams']} paced streams, {window}: worker RSS idle / peak",
                f"{paced['worker_rss_idle_mb']:.0f} / {paced['worker_rss_peak_mb']:.0f} MB",
            ),
        ]
    measurements.append(
        (
            f"service, {rss['streams']} paced streams: worker RSS idle / peak / per stream",
            f"{rss['worker_rss_idle_mb']:.0f} / {rss['worker_rss_peak_mb']:.0f} MB / "
            f"{(rss['worker_rss_peak_mb'] - rss['worker_rss_idle_mb']) / rss['streams'] * 1024:.0f}"
            " KB",
        )
    )
    return measurements


def _difference(summary: dict[str, float], baseline: dict[str, float]) -> dict[str, float]:
    return {p: summary[p] - baseline[p] for p in ("p50", "p99")}


def _ms_pair(summary: dict[str, float]) -> str:
    return f"{summary['p50']:.2f} / {summary['p99']:.2f} ms"


def _print_rows(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for line in [header, tuple("-" * w for w in widths), *rows]:
        print("| " + " | ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)) + " |")
