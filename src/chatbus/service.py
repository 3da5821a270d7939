"""The worker service: wires the worker to RabbitMQ (the subscribers, and what the worker
declares at start-up) and to its HTTP side channel: health, readiness, metrics, the
AsyncAPI page.

`create_app(settings)` builds it; `app` is the one built from the environment, for
`faststream run chatbus.service:app` (and `chatbus worker`, which runs the same).
"""

import asyncio
import logging
import signal
import socket
import sys
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import ollama
from aio_pika.exceptions import CONNECTION_EXCEPTIONS
from aiormq.exceptions import ChannelPreconditionFailed
from faststream import AckPolicy
from faststream.asgi import AsgiFastStream, AsgiResponse, AsyncAPIRoute
from faststream.asgi.types import Receive, Scope, Send
from faststream.rabbit import Channel, RabbitBroker, RabbitQueue
from faststream.rabbit.annotations import RabbitMessage
from opentelemetry import trace
from prometheus_client import make_asgi_app
from pydantic import ValidationError

from chatbus import topology
from chatbus.asyncapi import ContractAsyncAPI
from chatbus.catalog import list_models
from chatbus.contract import CancelRequest, ContractNames, ErrorReply, ModelsReply
from chatbus.failover import ConfigurationError, FailoverRabbitBroker, addresses, joined
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
from chatbus.startup import refusal, until_rabbitmq_answers
from chatbus.upstream import create_ollama_client
from chatbus.worker import ChatWorker

# `app` too, built on first use (see `__getattr__` below).
__all__ = [
    "EXIT_BAD_SETTINGS",
    "EXIT_CONFIGURATION",
    "WorkerApp",
    "app_from_environment",
    "create_app",
]

logger = logging.getLogger("chatbus.service")

EXIT_BAD_SETTINGS = 2
"""The worker's exit status when its settings cannot work (it exits at once)."""

EXIT_CONFIGURATION = 78
"""The exit code when RabbitMQ refuses the configuration (sysexits' EX_CONFIG): restarting
will not help. A supervisor can be told not to (systemd: RestartPreventExitStatus=78)."""


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
    """Name the AMQP connection (aiormq reads `name` from the URL) on every address, so
    that operators and the fault tests can tell this worker's connection apart; a name in
    the URL wins."""
    return joined(
        [
            address if "name" in address.query else address.update_query(name=name)
            for address in addresses(url)
        ]
    )


class WorkerApp(AsgiFastStream):
    """`faststream run` serves the HTTP side channel where the settings say (its own
    `--host`/`--port` still win), and leaves uvicorn's logs to the service's logging.

    It starts before RabbitMQ if it must: the side channel answers (alive, not ready:
    `rabbitmq: connecting`) while the worker tries every `RECONNECT_INTERVAL` to connect
    and declare its topology; then it consumes. A configuration RabbitMQ refuses ends the
    process with EXIT_CONFIGURATION and one line saying why."""

    def __init__(
        self,
        broker: RabbitBroker,
        settings: Settings,
        *,
        readiness: Readiness,
        declare_topology: Callable[[], Awaitable[None]],
        **options: Any,
    ) -> None:
        super().__init__(broker, **options)
        self._settings = settings
        self._readiness = readiness
        self._declare_topology = declare_topology
        self._serving = False
        self.exit_code = 0
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
        self._serving = True
        await super().run(log_level, self._uvicorn_defaults | (run_extra_options or {}))
        if self.exit_code:
            raise SystemExit(self.exit_code)

    async def _start_broker(self) -> None:
        # FastStream starts the broker here, once the startup hooks have run: under
        # uvicorn, the side channel is serving already.
        try:
            while not await self._started():
                pass
        except Exception as error:
            if not self._serving:
                raise
            await self._exit_for(error)

    async def _started(self) -> bool:
        """Connect when RabbitMQ answers, then start the subscribers; False when the
        connection was lost in between (the broker restarting), with everything stopped
        again, to start from the beginning."""
        assert self.broker is not None
        self._readiness.connecting = True
        await until_rabbitmq_answers(
            self._connect,
            rabbitmq_url=self._settings.rabbitmq_url,
            interval=self._settings.reconnect_interval,
        )
        self._readiness.connecting = False
        try:
            await super()._start_broker()
        except (*CONNECTION_EXCEPTIONS, TimeoutError) as error:
            if refusal(error) is not None:
                raise
            logger.warning("RabbitMQ went away while the worker started (%s): again", error)
            await self.broker.stop()
            return False
        return True

    async def _connect(self) -> None:
        """Connect, and declare what must exist before consuming starts."""
        assert self.broker is not None
        await self.broker.connect()
        await self._declare_topology()

    async def _exit_for(self, error: Exception) -> None:
        """Log why, and shut down as on SIGTERM; `run` then exits with the code. Waits
        for the shutdown to cancel it, so that nothing reports the worker as started."""
        if (refused := refusal(error)) is not None:
            logger.critical("cannot start: RabbitMQ refuses this configuration: %s", refused)
            self.exit_code = EXIT_CONFIGURATION
        else:
            logger.critical("cannot start: %s", error, exc_info=error)
            self.exit_code = 1
        signal.raise_signal(signal.SIGTERM)
        await asyncio.Event().wait()


def create_app(settings: Settings) -> WorkerApp:
    registry = metrics_registry()
    tracer_provider = (
        otlp_tracer_provider(settings.otel_service_name, settings.otel_exporter_otlp_endpoint)
        if settings.otel_enabled
        else None
    )
    broker = FailoverRabbitBroker(
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
        consume_args=topology.consumer_arguments(settings.total_timeout, settings.publish_timeout),
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

    async def declare_topology() -> None:
        # Declared before consuming starts: requesters bind to the replies exchange, and
        # dead letters need their queue to exist.
        await broker.declare_queue(topology.dead_letter_queue(names, settings.queue_bounds))
        await worker.declare()
        await _declare_models_queue(broker, names)

    app = WorkerApp(
        broker,
        settings,
        readiness=readiness,
        declare_topology=declare_topology,
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
    async def start_pool() -> None:
        await pool.start()

    @app.after_shutdown
    async def close_ollama_pool() -> None:
        await pool.close()
        if tracer_provider:
            # Sends the spans still batched.
            tracer_provider.shutdown()

    return app


async def _declare_models_queue(broker: RabbitBroker, names: ContractNames) -> None:
    """Before its subscriber does: while workers of a version that declared it transient
    still run, the queue has that form, and this worker waits (as for RabbitMQ itself)
    until they have stopped and RabbitMQ has deleted it with the last of them."""
    try:
        await broker.declare_queue(topology.models_queue(names))
    except ChannelPreconditionFailed as error:
        raise ConnectionError(
            f"{names.models_queue} has the form earlier versions declared ({error}): "
            "waiting for their workers to stop"
        ) from error


def app_from_environment() -> WorkerApp:
    """The worker as the environment (and `.env`) configures it, logging included. Settings
    that cannot work end the process at once, with one line on stderr naming them."""
    try:
        settings = Settings()
    except ValidationError as error:
        print(f"chatbus worker: {settings_problems(error)}", file=sys.stderr)
        sys.exit(EXIT_BAD_SETTINGS)
    configure_logging(settings.log_level, settings.log_format)
    try:
        return create_app(settings)
    except ConfigurationError as error:
        logger.critical("cannot start: %s", error)
        raise SystemExit(EXIT_CONFIGURATION) from None


def __getattr__(name: str) -> WorkerApp:
    # Built on first use, so that importing the module reads no environment.
    if name == "app":
        app = app_from_environment()
        globals()["app"] = app
        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
