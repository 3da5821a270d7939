"""Metrics, traces and logs of a running worker.

Prometheus metrics live in a registry of the app's own (so several apps can live in one
process, as in the tests); FastStream's middlewares add the per-message ones, labelled so
that a label never takes one value per request. Traces use the OpenTelemetry SDK and leave
through OTLP/HTTP. Logs are one JSON object per line, or readable text for development.
"""

import contextlib
import json
import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from typing import Any

from aio_pika import IncomingMessage
from faststream.message import StreamMessage
from faststream.opentelemetry import TelemetryMiddleware
from faststream.prometheus import ConsumeAttrs, PrometheusMiddleware
from faststream.rabbit.opentelemetry.provider import RabbitTelemetrySettingsProvider
from faststream.rabbit.prometheus.provider import RabbitMetricsSettingsProvider
from faststream.rabbit.response import RabbitPublishCommand
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from chatbus.contract import DoneReply, TerminalReply
from chatbus.instruments import OllamaCall
from chatbus.pool import CallOutcome, CircuitState, OllamaPool
from chatbus.settings import LogFormat

# Seconds; from a warm model's first token to a cold load of a large one.
_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120)


class ServiceInstruments:
    """The `Instruments` of the service: Prometheus metrics, and a span per Ollama call."""

    def __init__(self, registry: CollectorRegistry, tracer: trace.Tracer) -> None:
        self._tracer = tracer
        self._in_flight = Gauge(
            "chatbus_generations_in_flight",
            "Generations this worker is running now.",
            registry=registry,
        )
        self._first_token = Histogram(
            "chatbus_time_to_first_token_seconds",
            "From the start of a generation (retries included) to its first token.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self._tokens = Counter(
            "chatbus_generated_tokens",
            "Tokens generated, counted when a generation ends with a done reply.",
            ["model"],
            registry=registry,
        )
        self._replies = Counter(
            "chatbus_terminal_replies",
            "Terminal replies published, by type (done, error) and code (the error code, "
            "or the done reason: stop, length, cancelled, ...).",
            ["type", "code"],
            registry=registry,
        )
        self._ollama_response = Histogram(
            "chatbus_ollama_response_seconds",
            "From sending a chat call to Ollama to its first streamed part (outcome "
            "answered) or to its failure (outcome failed).",
            ["outcome"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self._published = Counter(
            "chatbus_replies_published",
            "Replies published (chunks and terminal ones) and confirmed, by destination: "
            "the replies exchange, or default for requesters' own reply_to queues.",
            ["destination"],
            registry=registry,
        )
        self._retries = Counter(
            "chatbus_ollama_retries",
            "Chat calls repeated because Ollama was unavailable before the first token.",
            registry=registry,
        )
        self._requests = Counter(
            "chatbus_requests",
            "Requests delivered to this worker (redeliveries included), by tenant: the "
            f"x-tenant header, empty without one, {TenantLabels.OTHER!r} past "
            f"{TenantLabels.LIMIT} tenants.",
            ["tenant"],
            registry=registry,
        )
        self._tenants = TenantLabels()

    def request_taken(self, tenant: str | None) -> None:
        self._requests.labels(self._tenants.label(tenant)).inc()

    def watch_in_flight(self, count: Callable[[], int]) -> None:
        """Read the generations in flight from the worker itself at each scrape."""
        self._in_flight.set_function(count)

    @contextlib.contextmanager
    def ollama_call(self, model: str) -> Iterator[OllamaCall]:
        call = _TimedCall(self._ollama_response)
        # Status and exception are set below: a call the worker closes (done, cancel,
        # timeout) is cancelled, which is not a failure of Ollama's.
        with self._tracer.start_as_current_span(
            f"chat {model}",
            kind=trace.SpanKind.CLIENT,
            attributes={
                "gen_ai.operation.name": "chat",
                "gen_ai.system": "ollama",
                "gen_ai.request.model": model,
            },
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                yield call
            except Exception as error:
                call.failed()
                span.record_exception(error)
                span.set_status(trace.StatusCode.ERROR, type(error).__name__)
                raise

    def first_token(self, model: str, seconds: float) -> None:
        self._first_token.labels(model).observe(seconds)

    def retry(self) -> None:
        self._retries.inc()

    def reply_published(self, destination: str) -> Callable[[], None]:
        return self._published.labels(destination).inc

    def terminal_reply(self, reply: TerminalReply) -> None:
        if isinstance(reply, DoneReply):
            self._replies.labels(reply.type, reply.done_reason).inc()
            # A request cancelled before it started names a model nobody may have.
            if reply.usage.completion_tokens:
                self._tokens.labels(reply.model).inc(reply.usage.completion_tokens)
        else:
            self._replies.labels(reply.type, reply.code).inc()


class TenantLabels:
    """Tenants as a metric label: any requester may send any x-tenant header, so only the
    first `LIMIT` tenants seen get series of their own and the rest share `OTHER`."""

    LIMIT = 100
    OTHER = "other"

    def __init__(self) -> None:
        self._seen: set[str] = set()

    def label(self, tenant: str | None) -> str:
        if tenant is None:
            return ""
        if tenant in self._seen:
            return tenant
        if len(self._seen) < self.LIMIT:
            self._seen.add(tenant)
            return tenant
        return self.OTHER


class _TimedCall:
    def __init__(self, histogram: Histogram) -> None:
        self._histogram = histogram
        self._started = time.perf_counter()
        self._observed = False

    def answered(self) -> None:
        self._observe("answered")

    def failed(self) -> None:
        self._observe("failed")

    def _observe(self, outcome: str) -> None:
        if not self._observed:
            self._observed = True
            self._histogram.labels(outcome).observe(time.perf_counter() - self._started)


class PoolCollector(Collector):
    """The pool's servers, read from the pool at each scrape: labelled by server (host:port),
    a handful of values per worker."""

    def __init__(self, pool: OllamaPool) -> None:
        self._pool = pool

    def collect(self) -> Iterable[Metric]:
        statuses = self._pool.statuses()
        in_flight = GaugeMetricFamily(
            "chatbus_ollama_server_in_flight",
            "Calls this worker has running on the server.",
            labels=["server"],
        )
        capacity = GaugeMetricFamily(
            "chatbus_ollama_server_capacity",
            "Calls this worker runs on the server at most (its parallel).",
            labels=["server"],
        )
        circuit = GaugeMetricFamily(
            "chatbus_ollama_server_circuit",
            "The server's circuit breaker: 1 for its state (closed, open, half_open).",
            labels=["server", "state"],
        )
        calls = CounterMetricFamily(
            "chatbus_ollama_server_calls",
            "Chat calls to the server, by outcome: answered, failed (the server's failure), "
            "model_failed (the model's runner failed), model_missing (404), rejected (another "
            "4xx), abandoned (ended by the worker before any answer).",
            labels=["server", "outcome"],
        )
        loads = CounterMetricFamily(
            "chatbus_ollama_server_model_loads",
            "Calls this worker sent to the server for a model it did not have loaded.",
            labels=["server"],
        )
        for status in statuses:
            in_flight.add_metric([status.id], status.in_flight)
            capacity.add_metric([status.id], status.capacity)
            for state in CircuitState:
                circuit.add_metric([status.id, state.value], float(status.circuit is state))
            for outcome in CallOutcome:
                calls.add_metric([status.id, outcome.value], status.calls.get(outcome, 0))
            loads.add_metric([status.id], status.loads_caused)
        waiting = GaugeMetricFamily(
            "chatbus_ollama_waiting_for_a_server",
            "Requests waiting for a free slot on a server that has their model.",
            value=self._pool.waiting,
        )
        return [in_flight, capacity, circuit, calls, loads, waiting]


def metrics_registry() -> CollectorRegistry:
    """A registry with the process metrics (CPU, memory, file descriptors, GC) in it."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


def _destination(message: IncomingMessage | RabbitPublishCommand) -> str:
    """An exchange, or a queue for the default exchange, as a label. Replies are routed by
    correlation id or to each requester's own queue, so a routing key would make time
    series, and span names, of one request each."""
    if isinstance(message, RabbitPublishCommand):
        return message.exchange.name or "default"
    return message.exchange or message.routing_key or "default"


class _BoundedMetricLabels(RabbitMetricsSettingsProvider):
    def get_consume_attrs_from_message(self, msg: StreamMessage[IncomingMessage]) -> ConsumeAttrs:
        attrs = super().get_consume_attrs_from_message(msg)
        attrs["destination_name"] = _destination(msg.raw_message)
        return attrs

    def get_publish_destination_name_from_cmd(self, cmd: RabbitPublishCommand) -> str:
        return _destination(cmd)


class _BoundedSpanNames(RabbitTelemetrySettingsProvider):
    def get_consume_destination_name(self, msg: StreamMessage[IncomingMessage]) -> str:
        return _destination(msg.raw_message)

    def get_publish_destination_name(self, cmd: RabbitPublishCommand) -> str:
        return _destination(cmd)


def prometheus_middleware(
    registry: CollectorRegistry,
) -> PrometheusMiddleware[IncomingMessage, RabbitPublishCommand]:
    """FastStream's RabbitPrometheusMiddleware, with bounded `handler`/`destination` labels."""
    return PrometheusMiddleware(
        settings_provider_factory=lambda _: _BoundedMetricLabels(),
        registry=registry,
        app_name="chatbus",
    )


def telemetry_middleware(provider: TracerProvider) -> TelemetryMiddleware[RabbitPublishCommand]:
    """FastStream's RabbitTelemetryMiddleware, with bounded span names. It carries the W3C
    trace context from a request's headers into the worker's spans and on into the replies."""
    return TelemetryMiddleware(
        settings_provider_factory=lambda _: _BoundedSpanNames(),
        tracer_provider=provider,
    )


def otlp_tracer_provider(service_name: str, endpoint: str) -> TracerProvider:
    """Spans batched to an OTLP/HTTP collector at `endpoint` (its base URL). Resource
    attributes from OTEL_RESOURCE_ATTRIBUTES are added, as the SDK does."""
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service_name}))
    provider.add_span_processor(
        BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{endpoint.rstrip('/')}/v1/traces"))
    )
    return provider


# What every LogRecord has; anything else on a record came through `extra=`. Uvicorn
# adds a copy of its message with terminal colour codes.
_RECORD_ATTRIBUTES = frozenset(vars(logging.makeLogRecord({}))) | {
    "message",
    "asctime",
    "color_message",
}


def _extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _RECORD_ATTRIBUTES}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, then the record's extra
    fields (correlation_id, attempt, model, outcome, ...) and the exception, if any."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **_extra_fields(record),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """For people: the usual line, then the extra fields as key=value."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = " ".join(f"{k}={v}" for k, v in _extra_fields(record).items())
        if not fields:
            return line
        first, newline, rest = line.partition("\n")
        return f"{first} {fields}{newline}{rest}"


def configure_logging(level: str, log_format: LogFormat) -> None:
    """Every log line of the process, the libraries' included, through one handler."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    # FastStream's own logger writes in its own format and does not propagate.
    faststream_logger = logging.getLogger("faststream")
    faststream_logger.handlers.clear()
    faststream_logger.propagate = True
    # httpx logs every call at INFO: each Ollama call and readiness check would add a line.
    logging.getLogger("httpx").setLevel(logging.WARNING)
