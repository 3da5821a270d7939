"""A fake Ollama HTTP server for tests and benchmarks.

``FakeOllama`` is a real HTTP/1.1 server (``asyncio.start_server`` plus a small
hand-written HTTP parser: keep-alive, ``Content-Length`` and chunked request
bodies) that answers like the Ollama server does, so the real
``ollama.AsyncClient`` can talk to it over TCP.  Behaviour and faults are chosen
per model name (see :class:`Behaviour`); see the package docstring of
:mod:`chatbus.testing` for an overview.

Run it standalone with::

    python -m chatbus.testing.fake_ollama --port 11434 --tokens 200 --token-delay 0.01

It prints its URL, serves until SIGINT/SIGTERM, then prints its ``stats()`` as one JSON
line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import enum
import hashlib
import json
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any, Final, Self

from chatbus.testing.loaded_models import LoadedModels, Runner

__all__ = [
    "DEFAULT_THINKING",
    "DEFAULT_TOKENS",
    "Behaviour",
    "FakeOllama",
    "main",
]

DEFAULT_TOKENS: Final[tuple[str, ...]] = (
    "The",
    " sky",
    " appears",
    " blue",
    " because",
    " of",
    " Rayleigh",
    " scattering",
    " of",
    " sunlight",
    ".",
)
DEFAULT_THINKING: Final[tuple[str, ...]] = (
    "The",
    " user",
    " asks",
    " about",
    " the",
    " sky",
    ".",
)

# Error texts, as the Ollama server words them (server/routes.go, server/sched.go).
MODEL_NOT_FOUND: Final = 'model "{name}" not found, try pulling it first'
SHOW_MODEL_NOT_FOUND: Final = "model '{name}' not found"
MODEL_REQUIRED: Final = "model is required"
MISSING_BODY: Final = "missing request body"
SERVER_BUSY: Final = "server busy, please try again.  maximum pending requests exceeded"
RUNNER_TERMINATED: Final = "llama runner process has terminated: exit status 2"
RUN_ERROR: Final = "an error was encountered while running the model: unexpected EOF"
TOOLS_UNSUPPORTED: Final = "registry.ollama.ai/library/{name} does not support tools"

DEFAULT_VERSION: Final = "0.12.6"

_REASONS: Final[dict[int, str]] = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    411: "Length Required",
    413: "Request Entity Too Large",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    499: "Client Closed Request",
    500: "Internal Server Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}

_MAX_HEAD: Final = 64 * 1024
_MAX_BODY: Final = 64 * 1024 * 1024
_READ_SIZE: Final = 64 * 1024
_WRITE_HIGH_WATER: Final = 256 * 1024
_YIELD_EVERY: Final = 64  # chunks written back-to-back before yielding to the loop

_JSON_UTF8: Final = b"application/json; charset=utf-8"
_NDJSON: Final = b"application/x-ndjson"
_TEXT: Final = b"text/plain; charset=utf-8"


@dataclass
class Behaviour:
    """How the fake answers ``/api/chat`` for one model name.

    Counting: ``error_after``, ``disconnect_after`` and ``stall_after`` count the
    ``done: false`` chunks sent (thinking, content and tool-call chunks alike).
    ``fail_times`` limits *every* configured fault (``status``, ``error_after``,
    ``disconnect_after``, ``stall_after``) to the first N chat requests for this
    model; later requests are served normally.  ``None`` means always.
    """

    tokens: list[str] = field(default_factory=lambda: list(DEFAULT_TOKENS))
    thinking: list[str] = field(default_factory=lambda: list(DEFAULT_THINKING))
    tool_calls: list[dict[str, Any]] | None = None
    token_delay: float = 0.0
    first_token_delay: float = 0.0
    status: int | None = None
    fail_times: int | None = None
    error_after: int | None = None
    disconnect_after: int | None = None
    stall_after: int | None = None
    error_message: str | None = None
    """Overrides the error text used by ``status`` and ``error_after``."""
    faults_served: int = field(default=0, init=False, compare=False)
    """How many requests for this model have hit the configured fault so far."""

    @property
    def has_fault(self) -> bool:
        return (
            self.status is not None
            or self.error_after is not None
            or self.disconnect_after is not None
            or self.stall_after is not None
        )


class _Outcome(enum.Enum):
    COMPLETED = "completed"  # full response sent, connection reusable
    ERRORED = "errored"  # server-side fault (error line, 500, disconnect)
    ABORTED = "aborted"  # the client went away first


class _PeerClosedError(Exception):
    """The client closed the connection (or reset it)."""


class _HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# --------------------------------------------------------------------------- helpers


class _Clock:
    """Go-style RFC 3339 UTC timestamps with nanoseconds (trailing zeros trimmed)."""

    __slots__ = ("_prefix", "_sec")

    def __init__(self) -> None:
        self._sec = -1
        self._prefix = b""

    def now(self) -> bytes:
        ns = time.time_ns()
        sec, frac = divmod(ns, 1_000_000_000)
        if sec != self._sec:
            self._sec = sec
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)).encode()
        if frac:
            return b"%s.%sZ" % (self._prefix, (b"%09d" % frac).rstrip(b"0"))
        return self._prefix + b"Z"


_clock = _Clock()


def _go_json(value: Any) -> bytes:
    """Compact JSON like Go's encoding/json (UTF-8, HTML characters escaped)."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    if "<" in text or ">" in text or "&" in text:
        text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return text.encode()


def _chunk(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def _go_type(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if value is None:
        return "null"
    return "object"


def _head(status: int, content_type: bytes | None, extra: Sequence[bytes] = ()) -> list[bytes]:
    lines = [
        b"HTTP/1.1 %d %s" % (status, _REASONS.get(status, "Unknown").encode()),
        b"Date: " + formatdate(usegmt=True).encode(),
    ]
    if content_type is not None:
        lines.append(b"Content-Type: " + content_type)
    lines.extend(extra)
    return lines


def _response_bytes(
    status: int,
    body: bytes,
    content_type: bytes = _JSON_UTF8,
    *,
    close: bool = False,
    head_only: bool = False,
) -> bytes:
    extra = [b"Content-Length: %d" % len(body)]
    if close:
        extra.append(b"Connection: close")
    head = b"\r\n".join(_head(status, content_type, extra)) + b"\r\n\r\n"
    return head if head_only else head + body


def _estimate_prompt_tokens(body: dict[str, Any]) -> int:
    chars = 0
    count = 0
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in messages:
            count += 4
            if isinstance(message, dict):
                content = message.get("content")
                if isinstance(content, str):
                    chars += len(content)
    tools = body.get("tools")
    if tools:
        chars += len(json.dumps(tools))
    return max(1, count + chars // 4)


def _num_predict(body: dict[str, Any]) -> int | None:
    options = body.get("options")
    if not isinstance(options, dict):
        return None
    value = options.get("num_predict")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    limit = int(value)
    return limit if limit > 0 else None


def _keep_alive_is_zero(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return value == 0
    if isinstance(value, str):
        return value.strip() in {"0", "0s", "0m", "0h"}
    return False


def _full_name(name: str) -> str:
    return name if ":" in name.rsplit("/", 1)[-1] else name + ":latest"


# --------------------------------------------------------------------------- connection


class _Conn:
    """A client connection with our own read buffer (so a watcher task can read ahead)."""

    __slots__ = ("buf", "reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.buf = bytearray()

    async def _fill(self) -> bool:
        try:
            data = await self.reader.read(_READ_SIZE)
        except (ConnectionError, OSError):
            return False
        if not data:
            return False
        self.buf += data
        return True

    async def read_head(self) -> bytes | None:
        """The request line and headers, or None on a clean EOF between requests."""
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end >= 0:
                head = bytes(self.buf[:end])
                del self.buf[: end + 4]
                return head
            if len(self.buf) > _MAX_HEAD:
                raise _HttpError(431, "request header fields too large")
            if not await self._fill():
                if self.buf.strip():
                    raise _PeerClosedError
                return None

    async def read_exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not await self._fill():
                raise _PeerClosedError
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    async def read_line(self) -> bytes:
        while True:
            end = self.buf.find(b"\r\n")
            if end >= 0:
                line = bytes(self.buf[:end])
                del self.buf[: end + 2]
                return line
            if len(self.buf) > _MAX_HEAD:
                raise _HttpError(400, "chunk header too long")
            if not await self._fill():
                raise _PeerClosedError

    async def read_chunked(self) -> bytes:
        body = bytearray()
        while True:
            size_line = await self.read_line()
            try:
                size = int(size_line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise _HttpError(400, "invalid chunk size") from None
            if size == 0:
                while await self.read_line():  # trailers
                    pass
                return bytes(body)
            body += await self.read_exactly(size)
            if len(body) > _MAX_BODY:
                raise _HttpError(413, "http: request body too large")
            await self.read_exactly(2)

    async def wait_peer_close(self) -> None:
        """Return once the client has closed the connection; buffers anything it sends."""
        while await self._fill():
            pass


@dataclass
class _Request:
    method: str
    target: str
    path: str
    headers: dict[str, str]
    body: bytes
    keep_alive: bool


# --------------------------------------------------------------------------- server

_Handler = Callable[[_Conn, _Request], Awaitable[bool]]


class FakeOllama:
    """A fake Ollama server; see :mod:`chatbus.testing` for the fault modes.

    Use as ``async with FakeOllama() as fake:`` or call :meth:`start` /
    :meth:`stop`.  ``fake.models[name] = Behaviour(...)`` adds or replaces a model
    at any time.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        models: dict[str, Behaviour] | None = None,
        *,
        version: str = DEFAULT_VERSION,
        load_time: float = 0.0,
        max_loaded_models: int | None = None,
    ) -> None:
        """`load_time`: seconds a chat for a model that is not loaded waits for its load.
        `max_loaded_models` (Ollama's OLLAMA_MAX_LOADED_MODELS; None, no bound): loading
        one more unloads the least recently used first. Both may be changed at any time."""
        self.host = host
        self._requested_port = port
        self.models: dict[str, Behaviour] = (
            models if models is not None else {"llama3.2": Behaviour()}
        )
        self.version = version
        self._server: asyncio.Server | None = None
        self._port: int | None = None
        self._conn_tasks: set[asyncio.Task[None]] = set()
        self._waiters: list[tuple[Callable[[], bool], asyncio.Future[None]]] = []
        self._memory = LoadedModels(load_time, max_loaded_models, self._notify)
        self.requests: list[dict[str, Any]] = []
        self.active_streams = 0
        self.max_active_streams = 0
        self.completed_streams = 0
        self.aborted_streams = 0
        self.errored_streams = 0
        self.connections_opened = 0
        self._routes: dict[str, dict[str, _Handler]] = {
            "/": {"GET": self._root, "HEAD": self._root},
            "/api/version": {"GET": self._version, "HEAD": self._version},
            "/api/tags": {"GET": self._tags, "HEAD": self._tags},
            "/api/ps": {"GET": self._ps},
            "/api/show": {"POST": self._show},
            "/api/chat": {"POST": self._chat},
        }

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> Self:
        if self._server is not None:
            return self
        self._server = await asyncio.start_server(
            self._on_connect, self.host, self._requested_port, limit=_READ_SIZE
        )
        sock = self._server.sockets[0]
        self._port = int(sock.getsockname()[1])
        return self

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        tasks = list(self._conn_tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        await self._memory.close()
        await server.wait_closed()
        for _, fut in self._waiters:
            if not fut.done():
                fut.set_exception(RuntimeError("FakeOllama stopped"))

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("FakeOllama is not started")
        return self._port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    # ------------------------------------------------------------------ loaded models

    @property
    def load_time(self) -> float:
        return self._memory.load_time

    @load_time.setter
    def load_time(self, seconds: float) -> None:
        self._memory.load_time = seconds

    @property
    def max_loaded_models(self) -> int | None:
        return self._memory.max_loaded

    @max_loaded_models.setter
    def max_loaded_models(self, count: int | None) -> None:
        self._memory.max_loaded = count

    @property
    def model_loads(self) -> int:
        """Models loaded since the start (or `reset_stats`): each one a swap to count."""
        return self._memory.loads

    @property
    def model_unloads(self) -> int:
        """Models unloaded: to make room, after `keep_alive: 0`, or expired."""
        return self._memory.unloads

    def loaded_models(self) -> list[str]:
        """The models loaded now (as `/api/ps` lists them), the most recently used first."""
        return [runner.name for runner in self._memory.loaded()]

    # ------------------------------------------------------------------ observability

    def reset_stats(self) -> None:
        """Clear ``requests`` and the stream counters (not ``active_streams``)."""
        self.requests.clear()
        self.max_active_streams = self.active_streams
        self.completed_streams = 0
        self.aborted_streams = 0
        self.errored_streams = 0
        self.connections_opened = 0
        self._memory.loads = 0
        self._memory.unloads = 0
        self._notify()

    def stats(self) -> dict[str, int]:
        return {
            "requests": len(self.requests),
            "active_streams": self.active_streams,
            "max_active_streams": self.max_active_streams,
            "completed_streams": self.completed_streams,
            "aborted_streams": self.aborted_streams,
            "errored_streams": self.errored_streams,
            "connections_opened": self.connections_opened,
            "model_loads": self.model_loads,
            "model_unloads": self.model_unloads,
        }

    async def wait_for(
        self,
        predicate: Callable[[], bool],
        timeout: float = 5.0,
    ) -> None:
        """Wait until ``predicate()`` is true; it is re-checked on every stats change.

        Raises ``TimeoutError`` (with the current stats) after ``timeout`` seconds.
        """
        if predicate():
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (predicate, fut)
        self._waiters.append(entry)
        try:
            await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise TimeoutError(
                f"FakeOllama condition not met within {timeout}s; stats={self.stats()}"
            ) from None
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(entry)

    async def wait_aborted(self, n: int = 1, timeout: float = 5.0) -> None:
        """Wait until at least ``n`` streams were aborted by the client."""
        await self.wait_for(lambda: self.aborted_streams >= n, timeout)

    async def wait_completed(self, n: int = 1, timeout: float = 5.0) -> None:
        """Wait until at least ``n`` streams were completed."""
        await self.wait_for(lambda: self.completed_streams >= n, timeout)

    async def wait_idle(self, timeout: float = 5.0) -> None:
        """Wait until no stream is active."""
        await self.wait_for(lambda: self.active_streams == 0, timeout)

    def _notify(self) -> None:
        for predicate, fut in self._waiters:
            if not fut.done() and predicate():
                fut.set_result(None)

    def lookup(self, name: str) -> Behaviour | None:
        """The behaviour for ``name``; ``x`` and ``x:latest`` are the same model."""
        behaviour = self.models.get(name)
        if behaviour is not None:
            return behaviour
        if name.endswith(":latest"):
            return self.models.get(name[: -len(":latest")])
        if ":" not in name.rsplit("/", 1)[-1]:
            return self.models.get(name + ":latest")
        return None

    # ------------------------------------------------------------------ HTTP layer

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conn_tasks.add(task)
        self.connections_opened += 1
        self._notify()
        writer.transport.set_write_buffer_limits(high=_WRITE_HIGH_WATER)
        conn = _Conn(reader, writer)
        try:
            await self._serve(conn)
        except (_PeerClosedError, ConnectionError, OSError):
            pass
        except asyncio.CancelledError:
            # stop() (or loop shutdown) cancels connection tasks; asyncio's stream
            # protocol would log a cancelled client_connected_cb task as an error.
            writer.transport.abort()
        finally:
            self._conn_tasks.discard(task)
            if not writer.transport.is_closing():
                writer.close()
            self._notify()

    async def _serve(self, conn: _Conn) -> None:
        while True:
            try:
                request = await self._read_request(conn)
            except _HttpError as exc:
                conn.writer.write(
                    _response_bytes(exc.status, exc.message.encode(), _TEXT, close=True)
                )
                await conn.writer.drain()
                return
            if request is None:
                return
            keep = await self._dispatch(conn, request)
            if not keep or not request.keep_alive:
                with contextlib.suppress(ConnectionError, OSError):
                    await conn.writer.drain()
                return

    async def _read_request(self, conn: _Conn) -> _Request | None:
        head = await conn.read_head()
        if head is None:
            return None
        lines = head.split(b"\r\n")
        try:
            method_b, target_b, version_b = lines[0].split(b" ", 2)
        except ValueError:
            raise _HttpError(400, "malformed request line") from None
        headers: dict[str, str] = {}
        for raw in lines[1:]:
            name, sep, value = raw.partition(b":")
            if not sep:
                raise _HttpError(400, "malformed header line")
            headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
        version = version_b.strip().decode("latin-1")
        connection = headers.get("connection", "").lower()
        if version == "HTTP/1.0":
            keep_alive = "keep-alive" in connection
        else:
            keep_alive = "close" not in connection
        if headers.get("expect", "").lower() == "100-continue":
            conn.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if "chunked" in headers.get("transfer-encoding", "").lower():
            body = await conn.read_chunked()
        else:
            try:
                length = int(headers.get("content-length", "0") or "0")
            except ValueError:
                raise _HttpError(400, "invalid content-length") from None
            if length < 0 or length > _MAX_BODY:
                raise _HttpError(413, "http: request body too large")
            body = await conn.read_exactly(length) if length else b""
        target = target_b.decode("latin-1")
        return _Request(
            method=method_b.decode("latin-1").upper(),
            target=target,
            path=target.split("?", 1)[0],
            headers=headers,
            body=body,
            keep_alive=keep_alive,
        )

    async def _send(self, conn: _Conn, data: bytes) -> bool:
        conn.writer.write(data)
        await conn.writer.drain()
        return True

    async def _send_json(
        self, conn: _Conn, req: _Request, status: int, payload: Any, *, head_only: bool = False
    ) -> bool:
        body = _go_json(payload)
        data = _response_bytes(
            status, body, _JSON_UTF8, close=not req.keep_alive, head_only=head_only
        )
        return await self._send(conn, data)

    async def _send_error(self, conn: _Conn, req: _Request, status: int, message: str) -> bool:
        return await self._send_json(conn, req, status, {"error": message})

    async def _dispatch(self, conn: _Conn, req: _Request) -> bool:
        methods = self._routes.get(req.path)
        if methods is None:
            data = _response_bytes(
                404,
                b"404 page not found",
                _TEXT,
                close=not req.keep_alive,
                head_only=req.method == "HEAD",
            )
            return await self._send(conn, data)
        handler = methods.get(req.method)
        if handler is None:
            data = _response_bytes(405, b"405 method not allowed", _TEXT, close=not req.keep_alive)
            return await self._send(conn, data)
        return await handler(conn, req)

    # ------------------------------------------------------------------ simple endpoints

    async def _root(self, conn: _Conn, req: _Request) -> bool:
        data = _response_bytes(
            200,
            b"Ollama is running",
            _TEXT,
            close=not req.keep_alive,
            head_only=req.method == "HEAD",
        )
        return await self._send(conn, data)

    async def _version(self, conn: _Conn, req: _Request) -> bool:
        return await self._send_json(
            conn, req, 200, {"version": self.version}, head_only=req.method == "HEAD"
        )

    @staticmethod
    def _details() -> dict[str, Any]:
        return {
            "parent_model": "",
            "format": "gguf",
            "family": "llama",
            "families": ["llama"],
            "parameter_size": "3.2B",
            "quantization_level": "Q4_K_M",
        }

    @staticmethod
    def _digest(name: str) -> str:
        return hashlib.sha256(_full_name(name).encode()).hexdigest()

    async def _tags(self, conn: _Conn, req: _Request) -> bool:
        models = [
            {
                "name": _full_name(name),
                "model": _full_name(name),
                "modified_at": "2025-09-25T10:12:34.123456789Z",
                "size": 2019393189,
                "digest": self._digest(name),
                "details": self._details(),
            }
            for name in list(self.models)
        ]
        return await self._send_json(
            conn, req, 200, {"models": models}, head_only=req.method == "HEAD"
        )

    async def _ps(self, conn: _Conn, req: _Request) -> bool:
        models = [
            {
                "name": runner.name,
                "model": runner.name,
                "size": 3357174784,
                "digest": self._digest(runner.name),
                "details": self._details(),
                "expires_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(runner.expires_at)),
                "size_vram": 3357174784,
                "context_length": 4096,
            }
            for runner in self._memory.loaded()
            if self.lookup(runner.name) is not None
        ]
        return await self._send_json(conn, req, 200, {"models": models})

    def _parse_body(self, req: _Request, struct: str) -> dict[str, Any]:
        if not req.body.strip():
            raise _HttpError(400, MISSING_BODY)
        try:
            body = json.loads(req.body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise _HttpError(400, f"invalid character in request body: {exc}") from None
        if not isinstance(body, dict):
            raise _HttpError(
                400, f"json: cannot unmarshal {_go_type(body)} into Go value of type api.{struct}"
            )
        return body

    async def _show(self, conn: _Conn, req: _Request) -> bool:
        try:
            body = self._parse_body(req, "ShowRequest")
        except _HttpError as exc:
            return await self._send_error(conn, req, exc.status, exc.message)
        name = body.get("model") or body.get("name")
        if not isinstance(name, str) or not name:
            return await self._send_error(conn, req, 400, MODEL_REQUIRED)
        if self.lookup(name) is None:
            return await self._send_error(conn, req, 404, SHOW_MODEL_NOT_FOUND.format(name=name))
        payload = {
            "license": "",
            "modelfile": (
                '# Modelfile generated by "ollama show"\n'
                f"FROM {_full_name(name)}\n"
                'TEMPLATE """{{ .Prompt }}"""\n'
            ),
            "parameters": 'stop                           "<|eot_id|>"',
            "template": "{{ .Prompt }}",
            "details": self._details(),
            "model_info": {
                "general.architecture": "llama",
                "general.parameter_count": 3212749888,
                "llama.context_length": 131072,
            },
            "capabilities": ["completion", "tools", "thinking"],
            "modified_at": "2025-09-25T10:12:34.123456789Z",
        }
        return await self._send_json(conn, req, 200, payload)

    # ------------------------------------------------------------------ /api/chat

    async def _chat(self, conn: _Conn, req: _Request) -> bool:
        try:
            body = self._parse_body(req, "ChatRequest")
        except _HttpError as exc:
            return await self._send_error(conn, req, exc.status, exc.message)
        self.requests.append(body)
        self._notify()

        for key, expected, pytype in (
            ("model", "string", str),
            ("stream", "bool", bool),
            ("messages", "[]api.Message", list),
        ):
            value = body.get(key)
            if value is not None and not isinstance(value, pytype):
                return await self._send_error(
                    conn,
                    req,
                    400,
                    f"json: cannot unmarshal {_go_type(value)} into Go struct field "
                    f"ChatRequest.{key} of type {expected}",
                )
        name = body.get("model")
        if not name:
            return await self._send_error(conn, req, 400, MODEL_REQUIRED)
        assert isinstance(name, str)
        behaviour = self.lookup(name)
        if behaviour is None:
            return await self._send_error(conn, req, 404, MODEL_NOT_FOUND.format(name=name))

        faulty = behaviour.has_fault and (
            behaviour.fail_times is None or behaviour.faults_served < behaviour.fail_times
        )
        if faulty:
            behaviour.faults_served += 1
        if faulty and behaviour.status is not None:
            return await self._send_error(
                conn, req, behaviour.status, self._status_message(behaviour, name)
            )

        stream = body.get("stream") is not False
        plan = _Plan(self, body, name, behaviour, faulty, stream, req.keep_alive)
        self.active_streams += 1
        self.max_active_streams = max(self.max_active_streams, self.active_streams)
        self._notify()
        outcome = _Outcome.ABORTED
        try:
            outcome = await self._guarded(conn, plan.run(conn))
        finally:
            if not plan.finished:
                task = asyncio.current_task()
                stopping = task is not None and task.cancelling() > 0
                plan.finish(None if stopping else _Outcome.ABORTED)
        return outcome is not _Outcome.ABORTED and plan.reusable

    def _stream_ended(self, outcome: _Outcome | None) -> None:
        self.active_streams -= 1
        if outcome is _Outcome.COMPLETED:
            self.completed_streams += 1
        elif outcome is _Outcome.ERRORED:
            self.errored_streams += 1
        elif outcome is _Outcome.ABORTED:
            self.aborted_streams += 1
        self._notify()

    @staticmethod
    def _status_message(behaviour: Behaviour, name: str) -> str:
        if behaviour.error_message is not None:
            return behaviour.error_message
        status = behaviour.status
        if status == 400:
            return TOOLS_UNSUPPORTED.format(name=_full_name(name))
        if status == 404:
            return MODEL_NOT_FOUND.format(name=name)
        if status == 500:
            return RUNNER_TERMINATED
        if status == 503:
            return SERVER_BUSY
        return _REASONS.get(status or 500, "error").lower()

    async def _guarded(self, conn: _Conn, work: Coroutine[Any, Any, _Outcome]) -> _Outcome:
        """Run ``work`` while watching the connection; the client closing it aborts ``work``."""
        gen = asyncio.create_task(work)
        watch = asyncio.create_task(conn.wait_peer_close())
        try:
            await asyncio.wait((gen, watch), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (gen, watch):
                if not task.done():
                    task.cancel()
            await asyncio.wait((gen, watch))
        if gen.cancelled():
            return _Outcome.ABORTED
        exc = gen.exception()
        if exc is not None:
            if isinstance(exc, (_PeerClosedError, ConnectionError, OSError)):
                return _Outcome.ABORTED
            raise exc
        return gen.result()


class _Plan:
    """One /api/chat generation: pre-serialised chunks plus the fault schedule."""

    def __init__(
        self,
        fake: FakeOllama,
        body: dict[str, Any],
        name: str,
        behaviour: Behaviour,
        faulty: bool,
        stream: bool,
        keep_alive: bool,
    ) -> None:
        self.fake = fake
        self.name = name
        self.b = behaviour
        self.faulty = faulty
        self.stream = stream
        self.reusable = keep_alive
        self.finished = False
        self.start_ns = time.perf_counter_ns()
        self.loaded_ns = self.start_ns
        self.prompt_eval_count = _estimate_prompt_tokens(body)
        messages = body.get("messages") or []
        self.unload_after = _keep_alive_is_zero(body.get("keep_alive"))
        self.runner: Runner | None = None
        self.load_only: str | None = None
        if not messages:
            self.load_only = "unload" if self.unload_after else "load"

        think = bool(body.get("think"))
        thinking = list(behaviour.thinking) if think else []
        tokens = list(behaviour.tokens)
        limit = _num_predict(body)
        self.done_reason = "stop"
        if limit is not None and len(thinking) + len(tokens) > limit:
            self.done_reason = "length"
            thinking = thinking[:limit]
            tokens = tokens[: max(0, limit - len(thinking))]
        self.thinking = thinking
        self.tokens = tokens
        self.tool_calls: list[dict[str, Any]] | None = None
        if behaviour.tool_calls and body.get("tools") and self.done_reason == "stop":
            self.tool_calls = list(behaviour.tool_calls)
        self.eval_count = len(thinking) + len(tokens)
        self.n_chunks = len(thinking) + len(tokens) + (1 if self.tool_calls else 0)

        # Fault schedule: the index of the chunk before which the fault fires.
        self.error_at: int | None = None
        self.disconnect_at: int | None = None
        self.stall_at: int | None = None
        if faulty:
            self.error_at = behaviour.error_after
            self.disconnect_at = behaviour.disconnect_after
            self.stall_at = behaviour.stall_after

    # -- serialisation ---------------------------------------------------------

    def _prefix(self) -> bytes:
        return b'{"model":' + _go_json(self.name) + b',"created_at":"'

    def _lines(self) -> list[bytes]:
        """The middle+suffix of every done:false chunk (after the created_at value)."""
        out: list[bytes] = []
        for piece in self.thinking:
            out.append(
                b'","message":{"role":"assistant","content":"","thinking":'
                + _go_json(piece)
                + b'},"done":false}\n'
            )
        for piece in self.tokens:
            out.append(
                b'","message":{"role":"assistant","content":'
                + _go_json(piece)
                + b'},"done":false}\n'
            )
        if self.tool_calls:
            out.append(
                b'","message":{"role":"assistant","content":"","tool_calls":'
                + _go_json(self.tool_calls)
                + b'},"done":false}\n'
            )
        return out

    def _final(self, message: dict[str, Any]) -> dict[str, Any]:
        now = time.perf_counter_ns()
        load = max(1, self.loaded_ns - self.start_ns)
        prompt_eval = self.prompt_eval_count * 250_000
        evaluation = max(now - self.loaded_ns, self.eval_count * 10_000_000, 1)
        total = max(now - self.start_ns, load + prompt_eval + evaluation)
        return {
            "model": self.name,
            "created_at": _clock.now().decode(),
            "message": message,
            "done_reason": self.done_reason,
            "done": True,
            "total_duration": total,
            "load_duration": load,
            "prompt_eval_count": self.prompt_eval_count,
            "prompt_eval_duration": prompt_eval,
            "eval_count": self.eval_count,
            "eval_duration": evaluation,
        }

    def _whole_message(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": "".join(self.tokens)}
        if self.thinking:
            message["thinking"] = "".join(self.thinking)
        if self.tool_calls:
            message["tool_calls"] = self.tool_calls
        return message

    # -- running ---------------------------------------------------------------

    def finish(self, outcome: _Outcome | None) -> None:
        """Record the outcome; called *before* the last bytes are written, so a client
        that has seen the end of the response also sees the updated counters."""
        if not self.finished:
            self.finished = True
            if self.runner is not None:
                self.fake._memory.release(self.runner, unload=self.unload_after)
            self.fake._stream_ended(outcome)

    async def run(self, conn: _Conn) -> _Outcome:
        if self.load_only == "unload":
            self.fake._memory.unload(_full_name(self.name))
        else:
            self.runner = await self.fake._memory.acquire(_full_name(self.name))
        if self.b.first_token_delay > 0:
            await asyncio.sleep(self.b.first_token_delay)
        self.loaded_ns = time.perf_counter_ns()
        if self.load_only is not None:
            payload = {
                "model": self.name,
                "created_at": _clock.now().decode(),
                "message": {"role": "assistant", "content": ""},
                "done_reason": self.load_only,
                "done": True,
            }
            self.finish(_Outcome.COMPLETED)
            await self._send_json(conn, 200, payload)
            return _Outcome.COMPLETED
        if self.stream:
            return await self._run_stream(conn)
        return await self._run_whole(conn)

    async def _send_json(self, conn: _Conn, status: int, payload: Any) -> None:
        close = not self.reusable
        conn.writer.write(_response_bytes(status, _go_json(payload), _JSON_UTF8, close=close))
        await conn.writer.drain()

    def _fault_at(self, i: int) -> str | None:
        if self.disconnect_at is not None and i >= self.disconnect_at:
            return "disconnect"
        if self.error_at is not None and i >= self.error_at:
            return "error"
        if self.stall_at is not None and i >= self.stall_at:
            return "stall"
        return None

    async def _disconnect(self, conn: _Conn) -> _Outcome:
        """Close the TCP connection (after flushing what was written) mid-response."""
        self.reusable = False
        transport = conn.writer.transport
        transport.set_write_buffer_limits(high=0)
        with contextlib.suppress(ConnectionError, OSError):
            await conn.writer.drain()
        self.finish(_Outcome.ERRORED)
        transport.close()
        return _Outcome.ERRORED

    async def _stall(self, conn: _Conn) -> _Outcome:
        with contextlib.suppress(ConnectionError, OSError):
            await conn.writer.drain()
        await asyncio.Event().wait()  # until the client goes away (or the server stops)
        raise AssertionError("unreachable")

    async def _run_whole(self, conn: _Conn) -> _Outcome:
        delay = self.b.token_delay
        fault: str | None = None
        i = 0
        for i in range(self.n_chunks + 1):
            fault = self._fault_at(i)
            if fault or i == self.n_chunks:
                break
            if delay > 0 and i > 0:
                await asyncio.sleep(delay)
        if fault == "disconnect":
            return await self._disconnect(conn)
        if fault == "stall":
            return await self._stall(conn)
        if fault == "error":
            message = self.b.error_message or RUN_ERROR
            self.finish(_Outcome.ERRORED)
            await self._send_json(conn, 500, {"error": message})
            return _Outcome.ERRORED
        payload = self._final(self._whole_message())
        self.finish(_Outcome.COMPLETED)
        await self._send_json(conn, 200, payload)
        return _Outcome.COMPLETED

    async def _run_stream(self, conn: _Conn) -> _Outcome:
        writer = conn.writer
        transport = writer.transport
        delay = self.b.token_delay
        prefix = self._prefix()
        lines = self._lines()
        now = _clock.now
        extra = [b"Transfer-Encoding: chunked"]
        if not self.reusable:
            extra.append(b"Connection: close")
        head = b"\r\n".join(_head(200, _NDJSON, extra)) + b"\r\n\r\n"
        pending_head: bytes | None = head
        loop = asyncio.get_running_loop()
        first_at = loop.time()

        for i, rest in enumerate(lines):
            fault = self._fault_at(i)
            if fault is not None:
                return await self._stream_fault(conn, fault, pending_head)
            if i and delay > 0:
                # Due `i * delay` after the first token, as from a model producing at a steady
                # rate: the fake's own event-loop lag does not add up along the stream, so a
                # benchmark can tell the service's latency from the fake's.
                await asyncio.sleep(first_at + i * delay - loop.time())
            line = prefix + now() + rest
            data = b"%x\r\n%s\r\n" % (len(line), line)
            if pending_head is not None:
                data = pending_head + data
                pending_head = None
            writer.write(data)
            if delay > 0:
                await writer.drain()
            else:
                if transport.get_write_buffer_size() > _WRITE_HIGH_WATER:
                    await writer.drain()
                if i % _YIELD_EVERY == _YIELD_EVERY - 1:
                    await asyncio.sleep(0)
                    if transport.is_closing():
                        raise _PeerClosedError
        fault = self._fault_at(len(lines))
        if fault is not None:
            return await self._stream_fault(conn, fault, pending_head)

        final = self._final({"role": "assistant", "content": ""})
        data = _chunk(_go_json(final) + b"\n") + b"0\r\n\r\n"
        if pending_head is not None:
            data = pending_head + data
        self.finish(_Outcome.COMPLETED)
        writer.write(data)
        await writer.drain()
        return _Outcome.COMPLETED

    async def _stream_fault(self, conn: _Conn, fault: str, pending_head: bytes | None) -> _Outcome:
        # Ollama sends the status line and headers with the first chunk, so a
        # disconnect or stall before any chunk leaves the client without a response.
        if fault == "disconnect":
            return await self._disconnect(conn)
        if fault == "stall":
            return await self._stall(conn)
        message = self.b.error_message or RUN_ERROR
        self.finish(_Outcome.ERRORED)
        if pending_head is not None:
            # An error before any output: Ollama answers with a plain JSON error.
            await self._send_json(conn, 500, {"error": message})
            return _Outcome.ERRORED
        conn.writer.write(_chunk(_go_json({"error": message}) + b"\n") + b"0\r\n\r\n")
        await conn.writer.drain()
        return _Outcome.ERRORED


# --------------------------------------------------------------------------- CLI


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m chatbus.testing.fake_ollama",
        description="Serve a fake Ollama API until SIGINT/SIGTERM.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=11434, help="0 picks a free port")
    parser.add_argument("--tokens", type=int, default=None, help="tokens per reply")
    parser.add_argument("--token-delay", type=float, default=0.0, help="seconds between tokens")
    parser.add_argument(
        "--first-token-delay", type=float, default=0.0, help="seconds before the first token"
    )
    parser.add_argument(
        "--load-time",
        type=float,
        default=0.0,
        help="seconds a chat for a model that is not loaded waits for its load",
    )
    parser.add_argument(
        "--max-loaded-models",
        type=int,
        default=None,
        metavar="N",
        help="models kept loaded at once (Ollama's OLLAMA_MAX_LOADED_MODELS; default no bound): "
        "loading one more unloads the least recently used",
    )
    parser.add_argument(
        "--model",
        action="append",
        dest="models",
        metavar="NAME",
        help="model name to serve (repeatable; default llama3.2)",
    )
    parser.add_argument(
        "--behaviour",
        action="append",
        type=_named_behaviour,
        default=[],
        metavar="NAME=JSON",
        help="one more model, with Behaviour fields as JSON, e.g. "
        "'broken={\"error_after\": 2}' (repeatable)",
    )
    return parser.parse_args(argv)


def _named_behaviour(text: str) -> tuple[str, Behaviour]:
    name, separator, fields = text.partition("=")
    try:
        if not separator or not name:
            raise ValueError("expected NAME=JSON")
        return name, Behaviour(**json.loads(fields))
    except (ValueError, TypeError) as error:
        raise argparse.ArgumentTypeError(f"{text!r}: {error}") from None


def _tokens(n: int | None) -> list[str]:
    if n is None:
        return list(DEFAULT_TOKENS)
    return [DEFAULT_TOKENS[i % len(DEFAULT_TOKENS)] for i in range(max(0, n))]


async def _serve_forever(args: argparse.Namespace) -> None:
    models = {
        name: Behaviour(
            tokens=_tokens(args.tokens),
            token_delay=args.token_delay,
            first_token_delay=args.first_token_delay,
        )
        for name in (args.models or ["llama3.2"])
    } | dict(args.behaviour)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with FakeOllama(
        args.host,
        args.port,
        models,
        load_time=args.load_time,
        max_loaded_models=args.max_loaded_models,
    ) as fake:
        print(fake.url, flush=True)
        await stop.wait()
    print(json.dumps(fake.stats()), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    asyncio.run(_serve_forever(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
