"""The answer to one chat request as an HTTP response, in an API's format.

The response waits for the answer's first event before it picks its status, so that a
request that fails before its first token (an unknown model, no worker) gets the right
HTTP status and error body, as Ollama does: it too sends its headers with the first token.

The client is watched the whole time, also before the first byte and between two tokens: a
client that disconnects closes the answer's events, and closing them publishes a cancel to
the workers (`ChatClient` does that), so the generation stops within moments.
"""

import asyncio
import contextlib
import uuid
from collections.abc import AsyncGenerator
from typing import Any, Protocol

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from starlette.types import Message, Receive, Scope, Send

from chatbus.client import ChatEvent, Restarted
from chatbus.contract import ChunkReply, DoneReply
from chatbus.errors import ChatError
from chatbus.gateway.bus import Bus, BusRequest, contract_request
from chatbus.gateway.errors import ANSWER_RESTARTED, ErrorFormat, Failure, error_response
from chatbus.gateway.operations import request_log

RESTARTED = Failure(
    502,
    ANSWER_RESTARTED,
    "the worker answering this request stopped mid-answer and the request was redelivered; "
    "the answer restarts from its beginning, which this stream cannot show: send the "
    "request again",
)


class AnswerFormat(Protocol):
    """How one API writes an answer."""

    @property
    def media_type(self) -> str:
        """Of a streamed answer."""

    @property
    def errors(self) -> ErrorFormat: ...

    def chunk(self, chunk: ChunkReply) -> bytes:
        """The bytes of one streamed chunk."""

    def end(self, done: DoneReply) -> bytes:
        """The bytes that end a streamed answer."""

    def whole(self, done: DoneReply) -> dict[str, Any]:
        """The body of an answer that is not streamed."""


class Answer(Response):
    """Streams `events` (or sends the whole answer, when `stream` is false) in `answer_format`,
    and writes how the answer ended into `log`, the request's log line."""

    def __init__(
        self,
        events: AsyncGenerator[ChatEvent, None],
        answer_format: AnswerFormat,
        *,
        stream: bool,
        log: dict[str, Any],
    ) -> None:
        super().__init__()
        self._events = events
        self._format = answer_format
        self._stream = stream
        self._log = log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        complete = False

        async def sending(message: Message) -> None:
            nonlocal complete
            if message["type"] == "http.response.body" and not message.get("more_body"):
                complete = True
            await send(message)

        answering = asyncio.ensure_future(self._answer(scope, receive, sending))
        # Also returns once the response is complete: the server says so the same way.
        client_gone = asyncio.ensure_future(_disconnect(receive))
        try:
            await asyncio.wait((answering, client_gone), return_when=asyncio.FIRST_COMPLETED)
        finally:
            client_gone.cancel()
            if not answering.done() and not complete:
                self._log["outcome"] = "disconnected"
                answering.cancel()
            # A failure of the answer itself surfaces here; its cancellation does not.
            with contextlib.suppress(asyncio.CancelledError):
                await answering

    async def _answer(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with contextlib.aclosing(self._events) as events:
            try:
                first = await anext(events)
            except ChatError as error:
                self._log["outcome"] = error.code
                failure = Failure.of(error)
                await error_response(self._format.errors, failure)(scope, receive, send)
                return
            if not self._stream:
                assert isinstance(first, DoneReply)
                self._log["outcome"] = first.done_reason
                await JSONResponse(self._format.whole(first))(scope, receive, send)
                return
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        (b"content-type", self._format.media_type.encode()),
                        (b"cache-control", b"no-cache"),
                        # Proxies such as nginx would otherwise hold the tokens back.
                        (b"x-accel-buffering", b"no"),
                    ],
                }
            )
            await self._stream_from(first, events, send)
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _stream_from(
        self, event: ChatEvent, events: AsyncGenerator[ChatEvent, None], send: Send
    ) -> None:
        sent_any = False
        try:
            while True:
                if isinstance(event, DoneReply):
                    self._log["outcome"] = event.done_reason
                    await _body(send, self._format.end(event))
                    return
                if isinstance(event, Restarted):
                    # The earlier attempt's chunks the client has not seen are dropped
                    # by the client library; seen ones cannot be taken back.
                    if sent_any:
                        self._log["outcome"] = ANSWER_RESTARTED
                        await _body(send, self._format.errors.stream_error(RESTARTED))
                        return
                else:
                    await _body(send, self._format.chunk(event))
                    sent_any = True
                event = await anext(events)
        except ChatError as error:
            self._log["outcome"] = error.code
            await _body(send, self._format.errors.stream_error(Failure.of(error)))


async def _body(send: Send, data: bytes) -> None:
    if data:
        await send({"type": "http.response.body", "body": data, "more_body": True})


async def _disconnect(receive: Receive) -> None:
    """Returns when the client has gone (the request body is read by then)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def answer(
    bus: Bus,
    request: Request,
    values: dict[str, Any],
    tenant: str | None,
    answer_format: AnswerFormat,
    correlation_id: str | None = None,
) -> Answer:
    """The response to a chat request whose contract fields an API route gathered."""
    chat = BusRequest(contract_request(values), tenant, correlation_id or uuid.uuid4().hex)
    log = request_log(request)
    log |= {"correlation_id": chat.correlation_id, "model": chat.request.model}
    return Answer(bus.answer(chat), answer_format, stream=chat.request.stream, log=log)
