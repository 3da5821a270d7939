"""The gateway's side of the bus: one `ChatClient` per gateway process, shared by every HTTP
request, and whether any worker takes requests.

`ChatClient` is the contract's requester already (a reply queue of its own bound per
correlation id before publishing, cancels on `chat.cancel` when a stream is closed early,
duplicates dropped, `Restarted` when a worker died mid-answer, `x-deadline` from the
timeout), so the gateway re-implements none of it with FastStream's RabbitRouter.
"""

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

import aio_pika
from aiormq.exceptions import ChannelInvalidStateError
from pydantic import ValidationError

from chatbus.client import ChatClient, ChatEvent, RequestFields
from chatbus.contract import TENANT_HEADER, ChatRequest, ModelInfo
from chatbus.errors import ServiceUnavailableError, validation_problems
from chatbus.gateway.errors import invalid


@dataclass
class BusRequest:
    """A chat request as the contract has it, for a tenant (with API keys on)."""

    request: ChatRequest
    tenant: str | None
    correlation_id: str


def contract_request(values: dict[str, Any]) -> ChatRequest:
    """The contract's request from the fields an API route gathered, or 400 naming the
    first field that breaks the contract's schema."""
    try:
        return ChatRequest.model_validate(values)
    except ValidationError as error:
        raise invalid(*validation_problems(error.errors())) from None


class WorkerPresence:
    """Whether a worker consumes the request queue, asked of the broker at most once per
    `ttl` seconds; the requests in between use the last answer."""

    def __init__(self, client: ChatClient, queue: str, *, ttl: float = 1.0, timeout: float = 2.0):
        self._client = client
        self._queue = queue
        self._ttl = ttl
        self._timeout = timeout
        self._lock = asyncio.Lock()
        self._count = 0
        self._asked_at: float | None = None

    async def count(self) -> int:
        async with self._lock:
            now = time.monotonic()
            if self._asked_at is None or now - self._asked_at >= self._ttl:
                self._count = await self._ask()
                self._asked_at = time.monotonic()
            return self._count

    async def require(self) -> None:
        if await self.count() == 0:
            raise ServiceUnavailableError(f"no worker is consuming {self._queue!r}", retryable=True)

    async def _ask(self) -> int:
        try:
            async with asyncio.timeout(self._timeout):
                return await self._client.workers()
        except (
            TimeoutError,
            ConnectionError,
            ChannelInvalidStateError,
            aio_pika.exceptions.AMQPError,
        ) as error:
            raise ServiceUnavailableError(
                f"cannot ask RabbitMQ for workers: {type(error).__name__}", retryable=True
            ) from None


class Bus:
    def __init__(self, client: ChatClient, workers: WorkerPresence, *, models_timeout: float):
        self.client = client
        self.workers = workers
        self._models_timeout = models_timeout

    async def answer(self, chat: BusRequest) -> AsyncGenerator[ChatEvent, None]:
        """The answer's events: chunks then the `DoneReply` (only the `DoneReply` for a
        request with `stream: false`). Closing the generator early cancels the generation."""
        await self.workers.require()
        request = chat.request
        fields = RequestFields(
            model=request.model,
            options=request.options,
            tools=request.tools,
            format=request.format,
            think=request.think,
            keep_alive=request.keep_alive,
        )
        headers = {TENANT_HEADER: chat.tenant} if chat.tenant is not None else None
        if not request.stream:
            yield await self.client.chat(
                request.messages, correlation_id=chat.correlation_id, headers=headers, **fields
            )
            return
        events = self.client.stream(
            request.messages, correlation_id=chat.correlation_id, headers=headers, **fields
        )
        async with contextlib.aclosing(events):
            async for event in events:
                yield event

    async def models(self) -> list[ModelInfo]:
        return await self.client.models(timeout=self._models_timeout)
