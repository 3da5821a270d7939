"""The gateway's operations side: liveness, readiness, Prometheus metrics, and one JSON log
line per request (no prompt or answer text)."""

import logging
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chatbus.errors import ServiceUnavailableError
from chatbus.gateway.bus import Bus

logger = logging.getLogger("chatbus.gateway")

OK = "ok"
DISCONNECTED = 499
"""The status recorded for a client that left before the response began (nginx's)."""

# Seconds: from a gateway's own overhead to a cold load of a large model.
_FIRST_BYTE_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120,
)  # fmt: skip
_QUIET_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "chatbus_gateway_requests",
            "HTTP requests answered, by route (the path template; unmatched for unknown "
            "paths), status (499: the client left before the response began) and tenant "
            "(empty without API keys or a valid key).",
            ["route", "status", "tenant"],
            registry=registry,
        )
        self.first_byte = Histogram(
            "chatbus_gateway_time_to_first_byte_seconds",
            "From a request's arrival to the first byte of its response body: for a "
            "streamed answer, its first token.",
            ["route"],
            buckets=_FIRST_BYTE_BUCKETS,
            registry=registry,
        )


def request_log(request: Request) -> dict[str, Any]:
    """The fields of the request's log line, which routes add to."""
    log: dict[str, Any] = request.state.log
    return log


class ObservedRequests:
    """ASGI middleware: each HTTP request counted, timed to its first body byte, and logged
    in one line when it ends."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self._app = app
        self._metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        started = time.perf_counter()
        log: dict[str, Any] = {"method": scope["method"], "path": scope["path"]}
        scope.setdefault("state", {})["log"] = log
        status = DISCONNECTED
        first_byte_at: float | None = None

        async def sending(message: Message) -> None:
            nonlocal status, first_byte_at
            if message["type"] == "http.response.start":
                status = message["status"]
            elif (
                message["type"] == "http.response.body"
                and first_byte_at is None
                and message.get("body")
            ):
                first_byte_at = time.perf_counter()
            await send(message)

        try:
            await self._app(scope, receive, sending)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", "unmatched")
            tenant = log.get("tenant") or ""
            self._metrics.requests.labels(template, str(status), tenant).inc()
            if first_byte_at is not None:
                self._metrics.first_byte.labels(template).observe(first_byte_at - started)
                log["first_byte_ms"] = round((first_byte_at - started) * 1000, 1)
            log["status"] = status
            log["duration_ms"] = round((time.perf_counter() - started) * 1000, 1)
            level = logging.DEBUG if scope["path"] in _QUIET_PATHS else logging.INFO
            logger.log(level, "%s %s %s", scope["method"], scope["path"], status, extra=log)


def operations_routes(bus: Bus, registry: CollectorRegistry) -> APIRouter:
    router = APIRouter(include_in_schema=False)

    @router.get("/healthz")
    async def healthz() -> dict[str, str]:
        """Liveness: the process and its event loop answer; RabbitMQ is not asked."""
        return {"status": "alive"}

    @router.get("/readyz")
    async def readyz() -> JSONResponse:
        """Ready when the connection to RabbitMQ is up and a worker consumes requests."""
        checks = {"rabbitmq": OK, "workers": OK}
        if not bus.client.connected:
            checks["rabbitmq"] = "no connection to RabbitMQ"
        try:
            await bus.workers.require()
        except ServiceUnavailableError as error:
            checks["workers"] = error.message
        ready = all(result == OK for result in checks.values())
        return JSONResponse({"ready": ready, "checks": checks}, 200 if ready else 503)

    @router.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return router
