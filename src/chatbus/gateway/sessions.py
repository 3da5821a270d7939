"""Sessions: conversations the gateway keeps, so that a client sends only its next message.

A turn reads the session's history, sends it with the new message over the bus (through the
gateway's `ChatClient`), streams the answer back, and stores question and answer together
once the answer is done. A turn that fails or is cancelled leaves the history as it was. The
turns of one session run one after the other (the store's turn lock).

HTTP, as a router the gateway mounts (`sessions_router`):

- `POST /chat` `{session_id, message, model?, system?, options?, stream?}`: SSE events
  `chunk`, then `done` or `error` (and `restarted` when a worker died mid-answer and the
  answer starts over), or with `stream: false` the `done` reply as one JSON object.
- `GET /history/{session_id}`, `DELETE /history/{session_id}`.
- `WS /ws/{session_id}`: the client sends `{"message": ..., "model"?: ...}` or
  `{"cancel": true}` and receives the same events as JSON messages.
- `/`: the web chat page.

The tenant ("" without API keys) keeps its sessions apart from other tenants'.
"""

import asyncio
import base64
import binascii
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from importlib import resources
from typing import Any, Literal, Protocol, TypeVar

from fastapi import APIRouter, Request, Response, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from chatbus.client import ChatEvent
from chatbus.contract import ChatMessage, ChatRequest, DoneReply
from chatbus.errors import ChatError, InternalError, InvalidRequestError, validation_problems
from chatbus.history import (
    HistorySettings,
    HistoryStore,
    HistoryUnavailableError,
    InvalidSessionIdError,
    Session,
    Turn,
    check_session_id,
)
from chatbus.settings import Limits as BusLimits

logger = logging.getLogger(__name__)

_T = TypeVar("_T")


class Limits(Protocol):
    """The bus's request limits (the worker's settings of the same names)."""

    @property
    def max_request_bytes(self) -> int: ...
    @property
    def max_prompt_chars(self) -> int: ...
    @property
    def max_messages(self) -> int: ...


class SessionSettings(HistorySettings):
    """What the gateway reads for its sessions: the `HISTORY_*` settings, and the bus's
    request limits under the workers' names, so that one environment sets both."""

    max_request_bytes: int = Field(default=BusLimits.max_request_bytes, ge=1)
    max_prompt_chars: int = Field(default=BusLimits.max_prompt_chars, ge=1)
    max_messages: int = Field(default=BusLimits.max_messages, ge=1)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TurnRequest(_Strict):
    """The next message of a session, and how to answer it."""

    message: str = Field(min_length=1, description="The user's message.")
    model: str | None = Field(
        default=None, min_length=1, description="The session's latest model when absent."
    )
    system: str | None = Field(
        default=None, description="A new system prompt for the session; kept when absent."
    )
    options: dict[str, Any] | None = Field(default=None, description="Ollama options.")


class ChatBody(TurnRequest):
    """`POST /chat`."""

    session_id: str
    stream: bool = True


class CancelMessage(_Strict):
    """What a WebSocket client sends to stop the answer in progress."""

    cancel: Literal[True]


_socket_message: TypeAdapter[CancelMessage | TurnRequest] = TypeAdapter(CancelMessage | TurnRequest)


class ErrorEvent(BaseModel):
    """The `error` event: the contract's error reply, for failures on the bus and the
    gateway's own (`service_unavailable`, `history_unavailable`, `cancelled`)."""

    type: Literal["error"] = "error"
    correlation_id: str | None = None
    code: str
    message: str
    retryable: bool


class HistoryView(BaseModel):
    """`GET /history/{session_id}`."""

    session_id: str
    model: str | None
    system: str | None
    messages: list[ChatMessage]
    created_at: str
    updated_at: str
    expires_at: str

    @classmethod
    def of(cls, session: Session) -> "HistoryView":
        return cls(
            session_id=session.session_id,
            model=session.model,
            system=session.system,
            messages=session.messages,
            created_at=session.created_at.isoformat(),
            updated_at=session.updated_at.isoformat(),
            expires_at=session.expires_at.isoformat(),
        )


class HistoryUnavailable(ChatError):
    """The session's history could not be read or stored."""

    code = "history_unavailable"


TenantOf = Callable[[str | None], str | None]
"""The tenant of a request's `Authorization` header (None: the request has none); None
when it grants nothing. Without API keys, every request is of one tenant ("")."""


def no_tenants(_: str | None) -> str:
    return ""


Ask = Callable[[ChatRequest, str], AsyncGenerator[ChatEvent, None]]
"""Sends a request of a tenant over the bus and yields its events as `ChatClient.stream`
does (only the `DoneReply` for `stream: false`); closing it early cancels the generation.
The gateway's is its `Bus`, which also checks that a worker is there and sends the tenant."""


class Sessions:
    """Turns of sessions: the history in `store`, the answers from the bus through `ask`."""

    def __init__(self, store: HistoryStore, ask: Ask, limits: Limits) -> None:
        self.store = store
        self._ask = ask
        self._limits = limits

    async def turn(
        self, tenant: str, session_id: str, request: TurnRequest, *, stream: bool = True
    ) -> AsyncGenerator[ChatEvent, None]:
        """The answer's events, as `ChatClient.stream` yields them; the turn is stored
        before the `DoneReply` is yielded. Raises `ChatError`s. Close it (`aclosing`) when
        leaving early: it holds the session's turn lock."""
        question = ChatMessage(role="user", content=request.message)
        async with self._history(), self.store.turn_lock(tenant, session_id):
            session = await self.store.get(tenant, session_id)
            system = request.system if request.system is not None else _system(session)
            bus_request = ChatRequest(
                messages=self._context(system, session.messages if session else [], question),
                model=request.model or (session.model if session else None),
                options=request.options,
                stream=stream,
            )
            events = self._ask(bus_request, tenant)
            async with contextlib.aclosing(events):
                async for event in events:
                    if isinstance(event, DoneReply) and event.done_reason != "cancelled":
                        answer = ChatMessage.model_validate(
                            event.message.model_dump(exclude_none=True)
                        )
                        turn = Turn(question, answer, model=event.model, system=request.system)
                        # Shielded: an answer that is done is kept even if its client
                        # leaves now.
                        await asyncio.shield(self.store.add_turn(tenant, session_id, turn))
                    yield event

    async def history(self, tenant: str, session_id: str) -> Session | None:
        async with self._history():
            return await self.store.get(tenant, session_id)

    async def forget(self, tenant: str, session_id: str) -> bool:
        async with self._history():
            return await self.store.delete(tenant, session_id)

    def check(self, request: TurnRequest) -> None:
        """Refuse a message that is over the bus's limits whatever the history holds."""
        self._check_prompt(request.message, request.system)

    def _check_prompt(self, message: str, system: str | None) -> int:
        chars = len(message) + len(system or "")
        if chars > self._limits.max_prompt_chars:
            raise _over_limit(
                "prompt length in characters (message and system prompt)",
                chars,
                "max_prompt_chars",
                self._limits,
            )
        return chars

    def check_size(self, body: bytes | str) -> None:
        size = len(body.encode() if isinstance(body, str) else body)
        if size > self._limits.max_request_bytes:
            raise _over_limit("request size in bytes", size, "max_request_bytes", self._limits)

    def _context(
        self, system: str | None, history: list[ChatMessage], question: ChatMessage
    ) -> list[ChatMessage]:
        """System prompt, as many of the latest turns as the bus's limits allow, the
        question. The question and system prompt alone over a limit are refused."""
        head = [ChatMessage(role="system", content=system)] if system else []
        chars = self._check_prompt(question.content, system)
        room_chars = self._limits.max_prompt_chars - chars
        room_messages = self._limits.max_messages - len(head) - 1
        start = len(history)
        while start >= 2 and room_messages >= 2:
            turn_chars = sum(len(message.content) for message in history[start - 2 : start])
            if turn_chars > room_chars:
                break
            room_chars -= turn_chars
            room_messages -= 2
            start -= 2
        return [*head, *history[start:], question]

    @contextlib.asynccontextmanager
    async def _history(self) -> AsyncIterator[None]:
        try:
            yield
        except HistoryUnavailableError as error:
            # The backend's error names the failure, never the content.
            logger.error("session history unavailable: %s", error)
            raise HistoryUnavailable(
                "the session's history could not be read or stored", retryable=True
            ) from None


def _system(session: Session | None) -> str | None:
    return session.system if session else None


def _over_limit(what: str, value: int, limit_name: str, limits: Limits) -> InvalidRequestError:
    limit = getattr(limits, limit_name)
    return InvalidRequestError(
        f"{what} is {value}, over the limit {limit_name}={limit}", retryable=False
    )


_STATUS = {
    "invalid_request": 400,
    "model_not_found": 404,
    "upstream_error": 502,
    "upstream_unavailable": 503,
    "service_unavailable": 503,
    HistoryUnavailable.code: 503,
    "timeout": 504,
    "deadline_exceeded": 504,
    "internal_error": 500,
}
_RETRY_AFTER_SECONDS = "1"
_NO_SUCH_SESSION = "no such session"
_NO_KEY = "a valid API key is needed: Authorization: Bearer KEY"
_SUBPROTOCOL = "chatbus"
_BEARER_PROTOCOL = "bearer."
_PAGE = resources.files("chatbus.gateway") / "web"
_PAGE_POLICY = (
    "default-src 'self'; connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'"
)


def sessions_router(sessions: Sessions, tenant_of: TenantOf = no_tenants) -> APIRouter:
    """The sessions API and the web page, for the gateway to include."""
    router = APIRouter(tags=["sessions"])

    @router.post("/chat", response_model=None)
    async def chat(request: Request) -> Response:
        tenant = tenant_of(request.headers.get("authorization"))
        if tenant is None:
            return _unauthorized()
        body = await request.body()
        try:
            sessions.check_size(body)
            parsed = ChatBody.model_validate_json(body)
            session_id = _session_id(parsed.session_id)
            turn = TurnRequest.model_validate(
                parsed.model_dump(include=set(TurnRequest.model_fields))
            )
            sessions.check(turn)
        except ChatError as error:
            return _error_response(error)
        except ValidationError as error:
            return _error_response(_invalid(error))
        events = sessions.turn(tenant, session_id, turn, stream=parsed.stream)
        if parsed.stream:
            return StreamingResponse(
                _server_sent(events),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        try:
            done = await _unless_disconnected(request, _done(events))
        except ChatError as error:
            return _error_response(error)
        if done is None:
            return Response(status_code=499)  # nobody is there to read it
        return JSONResponse(done.model_dump(mode="json", exclude_none=True))

    @router.get("/history/{session_id}", response_model=HistoryView)
    async def history(session_id: str, request: Request) -> Response:
        tenant = tenant_of(request.headers.get("authorization"))
        if tenant is None:
            return _unauthorized()
        try:
            session = await sessions.history(tenant, _session_id(session_id))
        except ChatError as error:
            return _error_response(error)
        if session is None:
            return _not_found()
        return JSONResponse(HistoryView.of(session).model_dump(mode="json"))

    @router.delete("/history/{session_id}", status_code=204, response_model=None)
    async def forget(session_id: str, request: Request) -> Response:
        tenant = tenant_of(request.headers.get("authorization"))
        if tenant is None:
            return _unauthorized()
        try:
            deleted = await sessions.forget(tenant, _session_id(session_id))
        except ChatError as error:
            return _error_response(error)
        return Response(status_code=204) if deleted else _not_found()

    @router.websocket("/ws/{session_id}")
    async def socket(websocket: WebSocket, session_id: str) -> None:
        tenant = tenant_of(_socket_authorization(websocket))
        if tenant is None:
            await websocket.close(code=1008, reason=_NO_KEY)
            return
        try:
            _session_id(session_id)
        except InvalidRequestError as error:
            await websocket.close(code=1008, reason=error.message)
            return
        offered = websocket.scope.get("subprotocols", [])
        await websocket.accept(subprotocol=_SUBPROTOCOL if _SUBPROTOCOL in offered else None)
        await _SocketConversation(sessions, websocket, tenant, session_id).run()

    @router.get("/", include_in_schema=False)
    async def page() -> Response:
        return _page_file("index.html", "text/html; charset=utf-8")

    @router.get("/web/chat.js", include_in_schema=False)
    async def script() -> Response:
        return _page_file("chat.js", "text/javascript; charset=utf-8")

    @router.get("/web/chat.css", include_in_schema=False)
    async def style() -> Response:
        return _page_file("chat.css", "text/css; charset=utf-8")

    return router


class _SocketConversation:
    """One WebSocket on one session: messages are answered one after the other, in the
    order they came; a cancel stops the answer in progress; a closed socket stops it too."""

    MAX_WAITING = 8

    def __init__(
        self, sessions: Sessions, websocket: WebSocket, tenant: str, session_id: str
    ) -> None:
        self._sessions = sessions
        self._websocket = websocket
        self._tenant = tenant
        self._session_id = session_id
        self._waiting: asyncio.Queue[TurnRequest] = asyncio.Queue(self.MAX_WAITING)
        self._answering: asyncio.Task[None] | None = None
        self._sending = asyncio.Lock()

    async def run(self) -> None:
        answerer = asyncio.create_task(self._answer_in_order())
        try:
            while True:
                message = await self._websocket.receive()
                if message["type"] == "websocket.disconnect":
                    return
                text = message.get("text") or (message.get("bytes") or b"").decode(errors="replace")
                await self._take(text)
        finally:
            answerer.cancel()
            if self._answering is not None:
                self._answering.cancel()
            await asyncio.gather(answerer, *self._in_progress(), return_exceptions=True)

    async def _take(self, text: str) -> None:
        try:
            self._sessions.check_size(text)
            message = _socket_message.validate_json(text)
            if isinstance(message, TurnRequest):
                self._sessions.check(message)
                self._waiting.put_nowait(message)
            elif self._answering is not None:
                self._answering.cancel()
        except ChatError as error:
            await self._send("error", _error_event(error))
        except ValidationError as error:
            await self._send("error", _error_event(_invalid(error)))
        except asyncio.QueueFull:
            busy = InvalidRequestError(
                f"{self.MAX_WAITING} messages are already waiting for an answer",
                retryable=True,
            )
            await self._send("error", _error_event(busy))

    async def _answer_in_order(self) -> None:
        while True:
            request = await self._waiting.get()
            self._answering = asyncio.create_task(self._answer(request))
            await asyncio.wait([self._answering])
            if self._answering.cancelled():
                stopped = ErrorEvent(
                    code="cancelled",
                    message="the answer was stopped; this turn is not kept in the history",
                    retryable=False,
                )
                await self._send("error", stopped.model_dump_json(exclude_none=True))
            elif not isinstance(error := self._answering.exception(), WebSocketDisconnect | None):
                logger.error("a WebSocket turn failed", exc_info=error)
            self._answering = None

    async def _answer(self, request: TurnRequest) -> None:
        events = _wire_events(self._sessions.turn(self._tenant, self._session_id, request))
        async with contextlib.aclosing(events):
            async for kind, data in events:
                await self._send(kind, data)

    def _in_progress(self) -> list[asyncio.Task[None]]:
        return [] if self._answering is None else [self._answering]

    async def _send(self, kind: str, data: str) -> None:
        async with self._sending:
            await self._websocket.send_text(data)


async def _wire_events(
    events: AsyncGenerator[ChatEvent, None],
) -> AsyncGenerator[tuple[str, str], None]:
    """A turn's events as (type, JSON), ending with an `error` event when it fails."""
    async with contextlib.aclosing(events):
        try:
            async for event in events:
                yield event.type, event.model_dump_json(exclude_none=True)
        except ChatError as error:
            yield "error", _error_event(error)
        except Exception:
            logger.exception("a session's turn failed unexpectedly")
            internal = InternalError("the gateway failed to answer", retryable=True)
            yield "error", _error_event(internal)


async def _server_sent(events: AsyncGenerator[ChatEvent, None]) -> AsyncIterator[str]:
    wire = _wire_events(events)
    async with contextlib.aclosing(wire):
        async for kind, data in wire:
            yield f"event: {kind}\ndata: {data}\n\n"


async def _done(events: AsyncGenerator[ChatEvent, None]) -> DoneReply:
    async with contextlib.aclosing(events):
        async for event in events:
            if isinstance(event, DoneReply):
                return event
    raise AssertionError("a turn ends with its DoneReply or raises")


async def _unless_disconnected(request: Request, answer: Awaitable[_T]) -> _T | None:
    """`answer`, or None when the client goes away first; the answer is then cancelled,
    which cancels its generation."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    answering = asyncio.ensure_future(answer)
    watching = asyncio.create_task(disconnected())
    try:
        await asyncio.wait([answering, watching], return_when=asyncio.FIRST_COMPLETED)
    finally:
        answering.cancel()
        watching.cancel()
        await asyncio.gather(answering, watching, return_exceptions=True)
    return None if answering.cancelled() else answering.result()


def _socket_authorization(websocket: WebSocket) -> str | None:
    """The Authorization header, or for a browser, which cannot set one on a WebSocket,
    the key it offers as the subprotocol `bearer.<the key in base64url>`."""
    if (header := websocket.headers.get("authorization")) is not None:
        return header
    for offered in websocket.scope.get("subprotocols", []):
        if offered.startswith(_BEARER_PROTOCOL):
            encoded = offered.removeprefix(_BEARER_PROTOCOL)
            try:
                key = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode()
            except (binascii.Error, UnicodeDecodeError):
                return None
            return f"Bearer {key}"
    return None


def _session_id(session_id: str) -> str:
    try:
        return check_session_id(session_id)
    except InvalidSessionIdError as error:
        raise InvalidRequestError(str(error), retryable=False) from None


def _invalid(error: ValidationError) -> InvalidRequestError:
    return InvalidRequestError(validation_problems(error.errors())[0], retryable=False)


def _error_event(error: ChatError) -> str:
    event = ErrorEvent(
        correlation_id=error.correlation_id,
        code=error.code,
        message=error.message,
        retryable=error.retryable,
    )
    return event.model_dump_json(exclude_none=True)


def _error_response(error: ChatError) -> Response:
    status = _STATUS.get(error.code, 500)
    headers = {"Retry-After": _RETRY_AFTER_SECONDS} if status == 503 else None
    return Response(
        _error_event(error), status_code=status, media_type="application/json", headers=headers
    )


def _unauthorized() -> Response:
    event = ErrorEvent(code="invalid_api_key", message=_NO_KEY, retryable=False)
    return Response(
        event.model_dump_json(exclude_none=True),
        status_code=401,
        media_type="application/json",
        headers={"WWW-Authenticate": "Bearer"},
    )


def _not_found() -> Response:
    event = ErrorEvent(code="not_found", message=_NO_SUCH_SESSION, retryable=False)
    return Response(
        event.model_dump_json(exclude_none=True), status_code=404, media_type="application/json"
    )


def _page_file(name: str, media_type: str) -> Response:
    return Response(
        (_PAGE / name).read_bytes(),
        media_type=media_type,
        headers={"Cache-Control": "no-cache", "Content-Security-Policy": _PAGE_POLICY},
    )
