"""The worker service: wires the worker to RabbitMQ (the subscribers, and what the worker
declares at start-up) and to its HTTP side channel: health, readiness, metrics, the
AsyncAPI page.

`create_app(settings)` builds it; `app` is the one built from the environment, for
`faststream run chatbus.service:app` (and `chatbus worker`, which runs the same).
"""

import logging
import signal
import socket
import sys
import uuid
from typing import Any

import ollama
from faststream import AckPolicy
from faststream.asgi import AsgiFastStream, AsgiResponse, AsyncAPIRoute
from faststream.asgi.types import Receive, Scope, Send
from faststream.rabbit import Channel, RabbitBroker, RabbitQueue
from faststream.rabbit.annotations import RabbitMessage
from opentelemetry import trace
from prometheus_client import make_asgi_app
from pydantic import ValidationError
from yarl import URL

from chatbus import topology
from chatbus.asyncapi import ContractAsyncAPI
from chatbus.catalog import list_models
from chatbus.contract import CancelRequest, ErrorReply, ModelsReply
from chatbus.health import Readiness, liveness_endpoint, readiness_endpoint
from chatbus.observability import (
    PoolCollector,
    ServiceInstruments,
    configure_logging,
    metrics_registry,
    otlp_tracer_provider,
    prometheus_middleware,
    telemetry_middleware,
)
from chatbus.pool import OllamaPool, ServerSpec
from chatbus.settings import Settings, settings_problems
from chatbus.upstream import create_ollama_client
from chatbus.worker import ChatWorker

# `app` too, built on first use (see `__getattr__` below).
__all__ = ["EXIT_BAD_SETTINGS", "WorkerApp", "app_from_environment", "create_app"]

EXIT_BAD_SETTINGS = 2
"""The worker's exit status when its settings cannot work (it exits at once)."""


async def _keep_body_raw(message: RabbitMessage) -> bytes:
    """The worker parses requests itself, so that a malformed one is answered, not dropped
    by FastStream's JSON decoding before the handler runs."""
    return message.body


async def _the_message_itself(message: RabbitMessage) -> RabbitMessage:
    """Hands the handler the whole message as its body, unparsed. Injecting it with the
    `RabbitMessage` context annotation instead costs a hop to a worker thread per request
    (FastStream resolves context annotations synchronously)."""
    return message


def _with_connection_name(url: str, name: str) -> str:
    """Name the AMQP connection (aiormq reads `name` from the URL), so that operators and
    the fault tests can tell this worker's connection apart; a name in the URL wins."""
    parsed = URL(url)
    return url if "name" in parsed.query else str(parsed.update_query(name=name))


class WorkerApp(AsgiFastStream):
    """`faststream run` serves the HTTP side channel where the settings say (its own
    `--host`/`--port` still win), and leaves uvicorn's logs to the service's logging."""

    def __init__(self, broker: RabbitBroker, settings: Settings, **options: Any) -> None:
        super().__init__(broker, **options)
        # As `faststream run` passes its options: strings, which it converts.
        self._uvicorn_defaults: dict[str, Any] = {
            "host": settings.http_host,
            "port": str(settings.http_port),
            "log_config": None,
            # Probes and scrapes every few seconds would drown the request log lines.
            "access_log": "false",
        }

    async def not_found(self, scope: Scope, receive: Receive, send: Send) -> None:
        """An unknown HTTP path: a plain 404 that lists the endpoints (FastStream's own
        answer, "Application doesn't support regular HTTP protocol", tells nobody where to
        go)."""
        if scope["type"] != "http":
            await super().not_found(scope, receive, send)
            return
        endpoints = "".join(f"{path}\n" for path, _ in self.routes)
        response = AsgiResponse(
            body=f"404 Not Found. The worker's endpoints:\n{endpoints}".encode(),
            status_code=404,
            headers={"content-type": "text/plain; charset=utf-8"},
        )
        await response(scope, receive, send)

    async def run(
        self, log_level: int = logging.INFO, run_extra_options: dict[str, Any] | None = None
    ) -> None:
        # Uvicorn shuts down gracefully on SIGTERM/SIGINT, then raises the signal again for
        # whatever handler was there before it, so that the process ends as killed by it.
        # The shutdown was graceful: end with status 0, as FastStream's own runner does.
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: None)
        await super().run(log_level, self._uvicorn_defaults | (run_extra_options or {}))


def create_app(settings: Settings) -> WorkerApp:
    registry = metrics_registry()
    tracer_provider = (
        otlp_tracer_provider(settings.otel_service_name, settings.otel_exporter_otlp_endpoint)
        if settings.otel_enabled
        else None
    )
    broker = RabbitBroker(
        _with_connection_name(settings.rabbitmq_url, settings.connection_name),
        graceful_timeout=settings.graceful_timeout,
        reconnect_interval=settings.reconnect_interval,
        middlewares=[
            *([telemetry_middleware(tracer_provider)] if tracer_provider else []),
            prometheus_middleware(registry),
        ],
        logger=logging.getLogger("chatbus.broker"),
        # FastStream's "Received"/"Processed" lines only at DEBUG: the worker logs one line
        # per request.
        log_level=logging.DEBUG,
        # The document describes the contract, not the broker this process happens to use.
        specification_url="amqp://localhost:5672/",
    )
    names = settings.names

    def client_for(server: ServerSpec) -> ollama.AsyncClient:
        # A connection for each call the pool runs there at once, and one for its checks.
        return create_ollama_client(server.base_url, settings.timeouts, server.parallel + 1)

    pool = OllamaPool(settings.ollama_servers, client_for, settings.pool)
    registry.register(PoolCollector(pool))
    instruments = ServiceInstruments(
        registry,
        tracer_provider.get_tracer("chatbus") if tracer_provider else trace.NoOpTracer(),
    )
    worker = ChatWorker(broker, pool, settings, instruments)
    instruments.watch_in_flight(lambda: worker.in_flight)
    readiness = Readiness(
        broker,
        pool,
        timeout=settings.ready_timeout,
        ollama_cache_seconds=settings.ready_ollama_cache_seconds,
    )

    @broker.subscriber(
        topology.requests_queue(names, settings.delivery_limit, settings.queue_bounds),
        # The prefetch bounds the generations one worker runs at once.
        channel=Channel(prefetch_count=settings.prefetch),
        ack_policy=AckPolicy.MANUAL,
        decoder=_the_message_itself,
        no_reply=True,
        # Documented from the contract by ContractAsyncAPI, as is the cancel subscriber.
        include_in_schema=False,
    )
    async def handle_chat_request(message: Any) -> None:
        await worker.handle(message)

    cancel_queue = RabbitQueue(
        f"{names.cancel_exchange}.{socket.gethostname()}.{uuid.uuid4().hex[:8]}",
        exclusive=True,
        auto_delete=True,
    )

    @broker.subscriber(cancel_queue, topology.cancel_exchange(names), include_in_schema=False)
    async def handle_cancel(cancel: CancelRequest) -> None:
        worker.cancel(cancel)

    @broker.subscriber(
        topology.models_queue(names), decoder=_keep_body_raw, title=names.models_queue
    )
    async def handle_models_request(message: RabbitMessage) -> ModelsReply | ErrorReply:
        return await list_models(pool, message.correlation_id)

    app = WorkerApp(
        broker,
        settings,
        asgi_routes=[
            ("/healthz", liveness_endpoint()),
            ("/readyz", readiness_endpoint(readiness)),
            ("/metrics", make_asgi_app(registry)),
        ],
        # No try-it-out: it would let any HTTP client publish to the broker.
        asyncapi_path=AsyncAPIRoute("/docs/asyncapi", try_it_out_path=None),
        specification=ContractAsyncAPI(
            broker, names, settings.delivery_limit, settings.queue_bounds
        ),
        logger=logging.getLogger("chatbus.app"),
    )

    @app.on_startup
    async def declare_topology() -> None:
        # Declared before consuming starts: requesters bind to the replies exchange, and
        # dead letters need their queue to exist.
        await broker.connect()
        await broker.declare_queue(topology.dead_letter_queue(names, settings.queue_bounds))
        await worker.declare()
        await pool.start()

    @app.after_shutdown
    async def close_ollama_pool() -> None:
        await pool.close()
        if tracer_provider:
            # Sends the spans still batched.
            tracer_provider.shutdown()

    return app


def app_from_environment() -> WorkerApp:
    """The worker as the environment (and `.env`) configures it, logging included. Settings
    that cannot work end the process at once, with one line on stderr naming them."""
    try:
        settings = Settings()
    except ValidationError as error:
        print(f"chatbus worker: {settings_problems(error)}", file=sys.stderr)
        sys.exit(EXIT_BAD_SETTINGS)
    configure_logging(settings.log_level, settings.log_format)
    return create_app(settings)


def __getattr__(name: str) -> WorkerApp:
    # Built on first use, so that importing the module reads no environment.
    if name == "app":
        app = app_from_environment()
        globals()["app"] = app
        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
