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

Errors are the contract's error reply (`{"type": "error", "code", "message", "retryable"}`)
with the gateway's statuses. The tenant of the request's API key ("" without API keys) keeps
its sessions apart from other tenants'.
"""

import asyncio
import base64
import binascii
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, Literal, TypeVar

from fastapi import APIRouter, Request, Response, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_serializer,
)

from chatbus.client import ChatEvent
from chatbus.contract import ChatMessage, ChatRequest, DoneReply
from chatbus.errors import (
    ChatError,
    InternalError,
    InvalidRequestError,
    ServiceUnavailableError,
    over_limit,
    validation_problems,
)
from chatbus.gateway.auth import NO_VALID_KEY, TenantOf
from chatbus.gateway.errors import Failure
from chatbus.gateway.operations import request_log
from chatbus.history import (
    HistoryStore,
    HistoryUnavailableError,
    InvalidSessionIdError,
    Session,
    Turn,
    check_session_id,
)
from chatbus.settings import RequestLimitSettings

logger = logging.getLogger(__name__)

_T = TypeVar("_T")


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

    @field_serializer("messages")
    def _messages_without_nulls(self, messages: list[ChatMessage]) -> list[dict[str, Any]]:
        # As the contract's replies are sent: a message has the fields it uses.
        return [message.model_dump(mode="json", exclude_none=True) for message in messages]

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


class HistoryUnavailable(ServiceUnavailableError):
    """The session's history could not be read or stored: its store failed."""

    code = "history_unavailable"


Ask = Callable[[ChatRequest, str], AsyncGenerator[ChatEvent, None]]
"""Sends a request of a tenant over the bus and yields its events as `ChatClient.stream`
does (only the `DoneReply` for `stream: false`); closing it early cancels the generation.
The gateway's is its `Bus`, which also checks that a worker is there and sends the tenant."""


class Sessions:
    """Turns of sessions: the history in `store`, the answers from the bus through `ask`."""

    def __init__(self, store: HistoryStore, ask: Ask, limits: RequestLimitSettings) -> None:
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
        if chars > (limit := self._limits.max_prompt_chars):
            what = "prompt length in characters (message and system prompt)"
            raise over_limit(what, chars, "max_prompt_chars", limit)
        return chars

    def check_size(self, body: bytes | str) -> None:
        size = len(body.encode() if isinstance(body, str) else body)
        if size > (limit := self._limits.max_request_bytes):
            raise over_limit("request size in bytes", size, "max_request_bytes", limit)

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


_NO_SUCH_SESSION = Failure(404, "not_found", "no such session")
_SUBPROTOCOL = "chatbus"
_BEARER_PROTOCOL = "bearer."


def sessions_router(sessions: Sessions, tenant_of: TenantOf) -> APIRouter:
    """The sessions API, for the gateway to include; `tenant_of` checks the API keys."""
    router = APIRouter(tags=["sessions"])

    def tenant_of_request(request: Request) -> str | None:
        tenant = tenant_of(request.headers.get("authorization"))
        if tenant:
            request_log(request)["tenant"] = tenant
        return tenant

    @router.post("/chat", response_model=None)
    async def chat(request: Request) -> Response:
        tenant = tenant_of_request(request)
        if tenant is None:
            return _refusal(NO_VALID_KEY)
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
        events = _logged(
            sessions.turn(tenant, session_id, turn, stream=parsed.stream), request_log(request)
        )
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

    @router.api_route("/history/{session_id}", methods=["GET", "DELETE"], response_model=None)
    async def history(session_id: str, request: Request) -> Response:
        """GET: the session's `HistoryView`; DELETE: forget the session (204). 404 when the
        tenant has no session of that id."""
        tenant = tenant_of_request(request)
        if tenant is None:
            return _refusal(NO_VALID_KEY)
        try:
            checked_id = _session_id(session_id)
            if request.method == "DELETE":
                forgotten = await sessions.forget(tenant, checked_id)
                return Response(status_code=204) if forgotten else _refusal(_NO_SUCH_SESSION)
            session = await sessions.history(tenant, checked_id)
        except ChatError as error:
            return _error_response(error)
        if session is None:
            return _refusal(_NO_SUCH_SESSION)
        return JSONResponse(HistoryView.of(session).model_dump(mode="json"))

    @router.websocket("/ws/{session_id}")
    async def socket(websocket: WebSocket, session_id: str) -> None:
        tenant = tenant_of(_socket_authorization(websocket))
        if tenant is None:
            await websocket.close(code=1008, reason=NO_VALID_KEY.message)
            return
        try:
            _session_id(session_id)
        except InvalidRequestError as error:
            await websocket.close(code=1008, reason=error.message)
            return
        offered = websocket.scope.get("subprotocols", [])
        await websocket.accept(subprotocol=_SUBPROTOCOL if _SUBPROTOCOL in offered else None)
        await _SocketConversation(sessions, websocket, tenant, session_id).run()

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


async def _logged(
    events: AsyncGenerator[ChatEvent, None], log: dict[str, Any]
) -> AsyncGenerator[ChatEvent, None]:
    """The turn's events, with what the request's log line tells of them: the correlation
    id, the model and how the turn ended (the done reason, the error code, or
    `disconnected` when the client left first)."""
    async with contextlib.aclosing(events):
        try:
            async for event in events:
                log["correlation_id"] = event.correlation_id
                if isinstance(event, DoneReply):
                    log |= {"model": event.model, "outcome": event.done_reason}
                yield event
        except ChatError as error:
            log |= {"correlation_id": error.correlation_id, "outcome": error.code}
            raise
        except Exception:
            log["outcome"] = InternalError.code
            raise
        finally:
            log.setdefault("outcome", "disconnected")


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
    return _json_error(Failure.of(error), _error_event(error))


def _refusal(failure: Failure) -> Response:
    """The gateway's own refusals (no valid key, no such session), as error events."""
    event = ErrorEvent(code=failure.code, message=failure.message, retryable=False)
    return _json_error(failure, event.model_dump_json(exclude_none=True))


def _json_error(failure: Failure, event: str) -> Response:
    return Response(event, failure.status, media_type="application/json", headers=failure.headers)
