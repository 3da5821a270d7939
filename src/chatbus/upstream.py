"""Ollama client setup and the mapping of its failures onto the contract's error codes."""

import math
from collections.abc import AsyncIterator, Callable

import httpx
import ollama

from chatbus.errors import (
    ChatError,
    ChatTimeoutError,
    InvalidRequestError,
    ModelNotFoundError,
    UpstreamError,
    UpstreamUnavailableError,
)
from chatbus.settings import Timeouts

# Statuses Ollama answers when it is overloaded or failing, not when the request is wrong.
_TRANSIENT_STATUSES = frozenset({500, 502, 503, 504})

_CONNECTIONS_PER_POOL = 16


def create_ollama_client(host: str, timeouts: Timeouts, connections: int) -> ollama.AsyncClient:
    """One client per worker, with `connections` kept open (one for each generation the
    worker runs at once, and one for listing the models), so that neither httpx's default of 100
    connections caps the prefetch nor a burst reconnects. The library's default is no
    timeout at all; the read timeout here is only a backstop, the generation loop enforces
    the finer first-token, idle and total timeouts itself."""
    timeout = httpx.Timeout(
        connect=timeouts.ollama_connect,
        read=max(timeouts.first_token, timeouts.idle),
        write=timeouts.ollama_connect,
        pool=timeouts.first_token,
    )
    transport = PooledTransport(connections)
    return ollama.AsyncClient(host=host, timeout=timeout, transport=transport)


class PooledTransport(httpx.AsyncBaseTransport):
    """`connections` spread over small httpx pools, each request sent through the least
    busy one. httpcore's pool walks all its connections, in quadratic time, when a request
    starts and when it ends: with a few hundred connections in one pool that costs more CPU
    than the whole generation."""

    def __init__(self, connections: int) -> None:
        pools = math.ceil(connections / _CONNECTIONS_PER_POOL)
        size = math.ceil(connections / pools)
        limits = httpx.Limits(max_connections=size, max_keepalive_connections=size)
        # One TLS context for all: each holds its own copy of the CA bundle otherwise.
        tls = httpx.create_ssl_context()
        self._pools = [httpx.AsyncHTTPTransport(verify=tls, limits=limits) for _ in range(pools)]
        self._busy = [0] * pools

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        index = min(range(len(self._pools)), key=self._busy.__getitem__)
        self._busy[index] += 1
        try:
            response = await self._pools[index].handle_async_request(request)
        except BaseException:
            self._busy[index] -= 1
            raise
        assert isinstance(response.stream, httpx.AsyncByteStream)
        response.stream = _Releasing(response.stream, lambda: self._release(index))
        return response

    def _release(self, index: int) -> None:
        self._busy[index] -= 1

    async def aclose(self) -> None:
        for pool in self._pools:
            await pool.aclose()


class _Releasing(httpx.AsyncByteStream):
    """A response body that tells when it is closed, which is when httpx hands its
    connection back to the pool."""

    def __init__(self, stream: httpx.AsyncByteStream, release: Callable[[], None]) -> None:
        self._stream = stream
        self._release: Callable[[], None] | None = release

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._stream:
            yield chunk

    async def aclose(self) -> None:
        try:
            await self._stream.aclose()
        finally:
            if self._release is not None:
                self._release()
                self._release = None


def classify_upstream_error(error: Exception, *, tokens_sent: bool) -> tuple[ChatError, bool]:
    """Map an exception from the Ollama client to a failure, and say whether retrying the
    call may help. Only failures before the first token are worth a retry: after it, the
    requester has already seen part of the answer."""
    if isinstance(error, ollama.ResponseError):
        status = error.status_code
        if status == 404:
            return ModelNotFoundError(error.error, retryable=False), False
        if status == 400:
            return InvalidRequestError(error.error, retryable=False), False
        if status in _TRANSIENT_STATUSES and not tokens_sent:
            message = f"Ollama answered {status}: {error.error}"
            return UpstreamUnavailableError(message, retryable=True), True
        retryable = status == -1 or status in _TRANSIENT_STATUSES
        return UpstreamError(f"Ollama failed: {error.error}", retryable=retryable), False
    if isinstance(error, httpx.ReadTimeout):
        message = "Ollama sent nothing within the client's read timeout"
        return ChatTimeoutError(message, retryable=True), False
    if isinstance(error, ValueError):
        # A line that is not JSON, or JSON that is not a chat response.
        message = f"Ollama sent an unreadable response: {error}"
        return UpstreamError(message, retryable=True), False
    if isinstance(error, httpx.TransportError | ConnectionError):
        if tokens_sent:
            message = f"Ollama connection lost mid-stream: {type(error).__name__}"
            return UpstreamError(message, retryable=True), False
        message = f"Ollama unreachable: {type(error).__name__}: {error}"
        return UpstreamUnavailableError(message, retryable=True), True
    raise error
