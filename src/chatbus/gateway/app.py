"""The gateway as an ASGI application, and the command that serves it."""

import contextlib
import math
import os
import signal
import socket
import uuid
from collections.abc import AsyncIterator

import uvicorn
from fastapi import FastAPI

from chatbus.client import ChatClient
from chatbus.gateway.auth import authenticator, tenant_lookup
from chatbus.gateway.bus import Bus, BusRequest, WorkerPresence
from chatbus.gateway.errors import EXCEPTION_HANDLERS
from chatbus.gateway.ollama_api import ollama_routes
from chatbus.gateway.openai_api import openai_routes
from chatbus.gateway.operations import GatewayMetrics, ObservedRequests, operations_routes
from chatbus.gateway.page import page_routes
from chatbus.gateway.sessions import Sessions, sessions_router
from chatbus.gateway.settings import GatewaySettings
from chatbus.history import open_history_store
from chatbus.observability import configure_logging, metrics_registry

MODELS_TIMEOUT = 10.0
"""Seconds a model listing may take: a worker asks Ollama."""


def create_gateway(settings: GatewaySettings) -> FastAPI:
    """The gateway: Ollama's and OpenAI's HTTP APIs, each request a request on the bus; the
    sessions API and the chat page. It connects to RabbitMQ when the application starts (its
    lifespan), and opens the history store when a session is first used."""
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
    store = open_history_store(settings)
    sessions = Sessions(
        store,
        lambda request, tenant: bus.answer(BusRequest(request, tenant or None, uuid.uuid4().hex)),
        settings,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await client.connect()
        try:
            yield
        finally:
            try:
                await client.close()
            finally:
                await store.close()

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
    tenant_of = tenant_lookup(settings.gateway_api_keys)
    authenticate = authenticator(tenant_of)
    app.include_router(ollama_routes(bus, authenticate))
    app.include_router(openai_routes(bus, authenticate))
    app.include_router(sessions_router(sessions, tenant_of))
    app.include_router(page_routes())
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
