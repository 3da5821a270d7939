"""The gateway as an ASGI application, and the command that serves it."""

import contextlib
import math
import os
import signal
import socket
from collections.abc import AsyncIterator

import uvicorn
from fastapi import FastAPI

from chatbus.client import ChatClient
from chatbus.gateway.auth import authenticator
from chatbus.gateway.bus import Bus, WorkerPresence
from chatbus.gateway.errors import EXCEPTION_HANDLERS
from chatbus.gateway.ollama_api import ollama_routes, root_routes
from chatbus.gateway.openai_api import openai_routes
from chatbus.gateway.operations import GatewayMetrics, ObservedRequests, operations_routes
from chatbus.gateway.settings import GatewaySettings
from chatbus.observability import configure_logging, metrics_registry

MODELS_TIMEOUT = 10.0
"""Seconds a model listing may take: a worker asks Ollama."""


def create_gateway(settings: GatewaySettings) -> FastAPI:
    """The gateway: Ollama's and OpenAI's HTTP APIs, each request a request on the bus.
    It connects to RabbitMQ when the application starts (its lifespan)."""
    client = ChatClient(
        settings.rabbitmq_url,
        names=settings.names,
        timeout=settings.gateway_timeout,
        connection_name=f"chatbus-gateway@{socket.gethostname()}:{os.getpid()}",
        reconnect_interval=settings.reconnect_interval,
    )
    bus = Bus(
        client,
        WorkerPresence(client, settings.requests_queue),
        models_timeout=MODELS_TIMEOUT,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await client.connect()
        try:
            yield
        finally:
            await client.close()

    registry = metrics_registry()
    app = FastAPI(
        title="chatbus gateway",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    for error, handler in EXCEPTION_HANDLERS.items():
        app.add_exception_handler(error, handler)
    authenticate = authenticator(settings.gateway_api_keys)
    app.include_router(ollama_routes(bus, authenticate))
    app.include_router(openai_routes(bus, authenticate))
    app.include_router(root_routes())
    app.include_router(operations_routes(bus, registry))
    app.add_middleware(ObservedRequests, metrics=GatewayMetrics(registry))
    return app


def serve(settings: GatewaySettings) -> None:
    """Serve the gateway until SIGTERM or SIGINT: then the requests in flight get
    `graceful_timeout` seconds, and the rest are cancelled on the workers."""
    configure_logging(settings.log_level, settings.log_format)
    # Uvicorn raises the signal again after its graceful shutdown, for the handler that was
    # there before it: the shutdown was clean, so the process ends with status 0.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: None)
    uvicorn.run(
        create_gateway(settings),
        host=settings.gateway_host,
        port=settings.gateway_port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=math.ceil(settings.graceful_timeout),
    )
