"""The chat streaming logic: one request's Ollama stream, turned into coalesced chunks.

A reader task pulls Ollama's stream into an inbox; the generation loop waits on that inbox
alone, so the first-token, idle and total timeouts, flushes and cancels are all one wait.
Closing the reader closes the HTTP stream, which is the only way to make Ollama stop.

Each call goes to a server the pool leases for it. A call that fails before its first token
(unreachable, 5xx, busy, or 404 where another server has the model) is made again at once on
the next server that can take it; only when every one has failed does the generation back
off before the next round, all within the retry budget. After the first token nothing is
made again: the requester has seen part of the answer.
"""

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import ollama

from chatbus.contract import AssistantMessage, ChatRequest, Timings, ToolCall, Usage
from chatbus.errors import (
    ChatError,
    ChatTimeoutError,
    DeadlineExceededError,
    ModelNotFoundError,
    UpstreamError,
    UpstreamUnavailableError,
)
from chatbus.instruments import NO_INSTRUMENTS, Instruments
from chatbus.pool import (
    Abandoned,
    Lease,
    ModelNotInPool,
    NoFreeSlot,
    NoServerAvailable,
    OllamaPool,
)
from chatbus.replies import ChunkSink, Completion
from chatbus.settings import Chunking, Retries, Timeouts
from chatbus.upstream import classify_upstream_error

__all__ = ["Generation", "cancelled", "ollama_arguments"]


class _Cancel:
    """The requester asked to stop."""


class _StreamEnd:
    """The Ollama stream ended (after its final `done` part, if it was well formed)."""


@dataclass
class _Answer:
    """The answer so far, and how much of it the requester has not been sent yet."""

    content: list[str] = field(default_factory=list)
    thinking: list[str] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)
    unsent_chars: int = 0
    _sent: tuple[int, int, int] = (0, 0, 0)

    def add(self, message: ollama.Message) -> None:
        if message.content:
            self.content.append(message.content)
            self.unsent_chars += len(message.content)
        if message.thinking:
            self.thinking.append(message.thinking)
            self.unsent_chars += len(message.thinking)
        if message.tool_calls:
            self.tool_calls.extend(_tool_call(call) for call in message.tool_calls)

    def has_unsent(self) -> bool:
        return self._sent != (len(self.content), len(self.thinking), len(self.tool_calls))

    def take_unsent(self) -> tuple[str, str | None, list[ToolCall] | None]:
        content_from, thinking_from, tools_from = self._sent
        self._sent = (len(self.content), len(self.thinking), len(self.tool_calls))
        self.unsent_chars = 0
        return (
            "".join(self.content[content_from:]),
            "".join(self.thinking[thinking_from:]) or None,
            self.tool_calls[tools_from:] or None,
        )

    def message(self) -> AssistantMessage:
        return AssistantMessage(
            content="".join(self.content),
            thinking="".join(self.thinking) or None,
            tool_calls=self.tool_calls or None,
        )


def _tool_call(call: ollama.Message.ToolCall) -> ToolCall:
    return ToolCall.model_validate(
        {"function": {"name": call.function.name, "arguments": dict(call.function.arguments)}}
    )


def ollama_arguments(request: ChatRequest, model: str, max_num_predict: int) -> dict[str, Any]:
    """The `/api/chat` arguments for a request: its own fields, with `num_predict` capped so
    that no request can generate without end (Ollama's default)."""
    options = dict(request.options or {})
    options.setdefault("num_predict", max_num_predict)
    return {
        "model": model,
        "messages": [m.model_dump(exclude_none=True) for m in request.messages],
        "tools": request.tools,
        "format": request.format,
        "options": options,
        "think": request.think,
        "keep_alive": request.keep_alive,
    }


class Generation:
    """One attempt at answering one request. `cancel()` may be called from anywhere."""

    def __init__(
        self,
        pool: OllamaPool,
        request: ChatRequest,
        model: str,
        *,
        timeouts: Timeouts,
        retries: Retries,
        chunking: Chunking,
        max_num_predict: int,
        deadline: float | None = None,
        instruments: Instruments = NO_INSTRUMENTS,
    ) -> None:
        """`deadline` is the requester's, on the event loop's clock."""
        self._pool = pool
        self._request = request
        self._model = model
        self._timeouts = timeouts
        self._retries = retries
        self._chunking = chunking
        self._max_num_predict = max_num_predict
        self._deadline = deadline
        self._instruments = instruments
        self._inbox: asyncio.Queue[Any] = asyncio.Queue()
        # Set too by a cancel, for the wait for a free server, where the inbox is not read.
        self._cancelled = asyncio.Event()
        self._started = 0.0
        self._first_token_after: float | None = None
        self.server: str | None = None
        """The server of the latest call."""

    def log_fields(self) -> dict[str, Any]:
        """For the request's log line: the server of the latest call and the time to the
        first token, in milliseconds."""
        fields: dict[str, Any] = {}
        if self.server is not None:
            fields["server"] = self.server
        if self._first_token_after is not None:
            fields["first_token_ms"] = round(self._first_token_after * 1000)
        return fields

    def cancel(self) -> None:
        self._cancelled.set()
        self._inbox.put_nowait(_Cancel())

    async def run(self, sink: ChunkSink) -> Completion:
        """Stream the answer into `sink`; return the completion or raise a `ChatError`."""
        loop = asyncio.get_running_loop()
        timeouts, retries = self._timeouts, self._retries
        started = self._started = loop.time()
        stop_at = started + timeouts.total
        stop_failure: ChatError
        if self._deadline is not None and self._deadline < stop_at:
            stop_at = self._deadline
            stop_failure = DeadlineExceededError("the request's deadline passed", retryable=False)
        else:
            stop_failure = ChatTimeoutError(
                f"no complete answer within the total timeout of {timeouts.total:g}s",
                retryable=True,
            )
        retry_until = min(started + retries.budget, stop_at)
        backoff = retries.initial_backoff
        tried: set[str] = set()
        missing_on: set[str] = set()
        failure: ChatError | None = None
        while True:
            try:
                return await self._call(sink, tried, stop_at, stop_failure)
            except _Retryable as retry:
                failure = retry.failure
                tried.add(retry.server)
                if isinstance(failure, ModelNotFoundError):
                    missing_on.add(retry.server)
                if loop.time() >= retry_until:
                    raise failure from None
                continue  # the next server, at once
            except NoServerAvailable as unavailable:
                # Every server that may have the model was asked, and none had it.
                none_has_it = tried == missing_on and not unavailable.down
                if isinstance(failure, ModelNotFoundError) and none_has_it:
                    raise failure from None
                failure = failure or UpstreamUnavailableError(str(unavailable), retryable=True)
            except ModelNotInPool as missing:
                raise ModelNotFoundError(str(missing), retryable=False) from None
            except Abandoned:
                return cancelled(self._model)
            except NoFreeSlot as busy:
                if loop.time() >= stop_at:
                    raise stop_failure from None
                message = f"no first token within {timeouts.first_token:g}s: {busy}"
                raise ChatTimeoutError(message, retryable=True) from None
            # Every server that can take the request failed: back off before the next round.
            delay = min(backoff, retries.max_backoff) * random.uniform(0.5, 1.0)
            if loop.time() + delay > retry_until:
                raise failure
            backoff *= 2
            tried.clear()
            missing_on.clear()
            with contextlib.suppress(TimeoutError):
                cancel = await asyncio.wait_for(self._inbox.get(), delay)
                if not isinstance(cancel, _Cancel):
                    raise AssertionError(f"only a cancel can arrive between attempts: {cancel!r}")
                return cancelled(self._model)

    async def _call(
        self, sink: ChunkSink, tried: set[str], stop_at: float, stop_failure: ChatError
    ) -> Completion:
        """One call, on a server of the pool that has not been tried this round."""
        wait_for_slot = min(self._timeouts.first_token, stop_at - asyncio.get_running_loop().time())
        async with self._pool.lease(
            self._model,
            exclude=tried,
            timeout=max(0.0, wait_for_slot),
            abandon=self._cancelled,
        ) as lease:
            if self.server is not None:  # a call before this one failed
                self._instruments.retry()
            self.server = lease.server
            reader = asyncio.create_task(self._read(lease.client))
            try:
                return await self._consume(sink, stop_at, stop_failure, lease)
            finally:
                reader.cancel()
                await asyncio.wait([reader])

    async def _read(self, client: ollama.AsyncClient) -> None:
        try:
            with self._instruments.ollama_call(self._model) as call:
                stream: AsyncIterator[ollama.ChatResponse] = await client.chat(
                    **ollama_arguments(self._request, self._model, self._max_num_predict),
                    stream=True,
                )
                async with contextlib.aclosing(stream) as parts:  # type: ignore[type-var]
                    async for part in parts:
                        call.answered()
                        self._inbox.put_nowait(part)
            self._inbox.put_nowait(_StreamEnd())
        except Exception as error:  # handed to the generation loop, which decides
            self._inbox.put_nowait(error)

    async def _consume(
        self, sink: ChunkSink, stop_at: float, stop_failure: ChatError, lease: Lease
    ) -> Completion:
        loop = asyncio.get_running_loop()
        flush_window, max_chars = self._chunking.flush_window, self._chunking.max_chars
        inbox = self._inbox
        answer = _Answer()
        parts_received = 0
        last_part_at = loop.time()
        last_flush_at = 0.0
        while True:
            if inbox.empty():
                wait_until, wait_failure = self._wait_limit(
                    parts_received, last_part_at, stop_at, stop_failure
                )
                flush_at = last_flush_at + flush_window if answer.has_unsent() else wait_until
                try:
                    item = await asyncio.wait_for(
                        inbox.get(), min(wait_until, flush_at) - loop.time()
                    )
                except TimeoutError:
                    if answer.has_unsent() and loop.time() >= flush_at:
                        await sink.chunk(*answer.take_unsent())
                        last_flush_at = loop.time()
                        continue
                    if wait_failure is not stop_failure:  # the server's stall, not ours
                        lease.failed(TimeoutError(wait_failure.message))
                    raise wait_failure from None
            else:
                item = inbox.get_nowait()

            if isinstance(item, ollama.ChatResponse):
                parts_received += 1
                last_part_at = loop.time()
                if parts_received == 1:
                    lease.answered()
                    self._first_token_after = last_part_at - self._started
                    self._instruments.first_token(self._model, self._first_token_after)
                answer.add(item.message)
                if item.done:
                    if answer.has_unsent():
                        await sink.chunk(*answer.take_unsent())
                    return self._completion(item, answer.message(), lease.server)
                if (
                    parts_received == 1
                    or item.message.tool_calls
                    or answer.unsent_chars >= max_chars
                    or last_part_at >= last_flush_at + flush_window
                ) and answer.has_unsent():
                    await sink.chunk(*answer.take_unsent())
                    last_flush_at = loop.time()
            elif isinstance(item, _Cancel):
                if answer.has_unsent():
                    await sink.chunk(*answer.take_unsent())
                return cancelled(self._model, answer.message(), parts_received, lease.server)
            elif isinstance(item, _StreamEnd):
                message = "Ollama's stream ended without its final part"
                lease.failed(ConnectionError(message))
                raise UpstreamError(message, retryable=True)
            else:
                lease.failed(item)
                failure, retry = classify_upstream_error(item, tokens_sent=parts_received > 0)
                # A 404 where another server may have the model is not the request's end.
                if retry or (isinstance(failure, ModelNotFoundError) and not parts_received):
                    raise _Retryable(failure, lease.server)
                raise failure

    def _wait_limit(
        self, parts_received: int, last_part_at: float, stop_at: float, stop_failure: ChatError
    ) -> tuple[float, ChatError]:
        """Until when the loop may wait for Ollama's next part, and the failure past it."""
        timeouts = self._timeouts
        if parts_received:
            limit = last_part_at + timeouts.idle
            failure = ChatTimeoutError(
                f"no token for {timeouts.idle:g}s (idle timeout)", retryable=True
            )
        else:
            limit = last_part_at + timeouts.first_token
            failure = ChatTimeoutError(
                f"no first token within {timeouts.first_token:g}s", retryable=True
            )
        return (stop_at, stop_failure) if stop_at < limit else (limit, failure)

    def _completion(
        self, final: ollama.ChatResponse, message: AssistantMessage, server: str
    ) -> Completion:
        return Completion(
            done_reason=final.done_reason or "stop",
            model=final.model or self._model,
            message=message,
            usage=Usage(
                prompt_tokens=final.prompt_eval_count or 0,
                completion_tokens=final.eval_count or 0,
            ),
            timings=Timings(
                total_duration=final.total_duration,
                load_duration=final.load_duration,
                prompt_eval_duration=final.prompt_eval_duration,
                eval_duration=final.eval_duration,
            ),
            server=server,
        )


def cancelled(
    model: str,
    message: AssistantMessage | None = None,
    parts: int = 0,
    server: str | None = None,
) -> Completion:
    """The completion of a cancelled generation. Ollama reports no counts for a stream we
    closed, so the completion tokens are the parts received."""
    return Completion(
        done_reason="cancelled",
        model=model,
        message=message or AssistantMessage(),
        usage=Usage(prompt_tokens=0, completion_tokens=parts),
        timings=Timings(),
        server=server,
    )


class _Retryable(Exception):
    """The call failed before its first token in a way that calling again (another server,
    or the same one later) may mend."""

    def __init__(self, failure: ChatError, server: str) -> None:
        super().__init__(str(failure))
        self.failure = failure
        self.server = server
