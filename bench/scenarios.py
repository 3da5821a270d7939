"""What the benchmark measures: the limits (the `ollama` client alone, a raw AMQP hop) and
the service between the same fake Ollama and a requester."""

import asyncio
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

import aio_pika
import ollama
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue, AbstractRobustConnection

from bench.requester import Requester, Stream, all_ended
from chatbus.settings import Timeouts
from chatbus.testing.fake_ollama import DEFAULT_TOKENS
from chatbus.upstream import create_ollama_client

MODEL = "llama3.2"
MESSAGES = [{"role": "user", "content": "Why is the sky blue?"}]
REQUEST = {"model": MODEL, "messages": MESSAGES}


def percentile(values: Sequence[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def direct_client(url: str, streams: int) -> ollama.AsyncClient:
    """The client a worker running `streams` generations at once has, so that the
    comparison is with the same client, set up the same way."""
    return create_ollama_client(url, Timeouts(), streams + 1)


async def _stream_parts(client: ollama.AsyncClient) -> list[float]:
    """When each token arrived."""
    arrivals = []
    async for part in await client.chat(model=MODEL, messages=MESSAGES, stream=True):
        if not part.done:
            arrivals.append(time.perf_counter())
    return arrivals


async def direct_tokens_per_second(client: ollama.AsyncClient, streams: int) -> float:
    started = time.perf_counter()
    counts = await asyncio.gather(*(_stream_parts(client) for _ in range(streams)))
    return sum(len(arrivals) for arrivals in counts) / (time.perf_counter() - started)


async def direct_first_token(client: ollama.AsyncClient, samples: int) -> list[float]:
    """Seconds to the first token, one request at a time."""
    waits = []
    for _ in range(samples):
        started = time.perf_counter()
        arrivals = await _stream_parts(client)
        waits.append(arrivals[0] - started)
    return waits


async def direct_lateness(client: ollama.AsyncClient, streams: int, delay: float) -> list[float]:
    """How late each token is against a steady `delay` after the first: the floor of the
    fake Ollama and the client at this load."""
    per_stream = await asyncio.gather(*(_stream_parts(client) for _ in range(streams)))
    return [
        at - (arrivals[0] + index * delay)
        for arrivals in per_stream
        for index, at in enumerate(arrivals)
        if index
    ]


@dataclass
class HttpStream:
    first_token: float
    """Seconds from sending the request to the first part with text."""
    tokens: int
    """As the final part counts them (a part through the gateway holds several tokens)."""


async def _http_stream(client: ollama.AsyncClient) -> HttpStream:
    started = time.perf_counter()
    first_token_at = None
    tokens = 0
    async for part in await client.chat(model=MODEL, messages=MESSAGES, stream=True):
        if first_token_at is None and part.message.content:
            first_token_at = time.perf_counter()
        if part.done:
            tokens = part.eval_count or 0
    assert first_token_at is not None, "an answer without text"
    return HttpStream(first_token_at - started, tokens)


async def gateway_tokens_per_second(client: ollama.AsyncClient, streams: int) -> tuple[float, int]:
    """`streams` at once through the gateway: tokens per second, and how many tokens."""
    started = time.perf_counter()
    runs = await asyncio.gather(*(_http_stream(client) for _ in range(streams)))
    tokens = sum(run.tokens for run in runs)
    return tokens / (time.perf_counter() - started), tokens


async def gateway_first_token(client: ollama.AsyncClient, samples: int) -> list[float]:
    """Seconds to the first token through the gateway, one request at a time."""
    return [(await _http_stream(client)).first_token for _ in range(samples)]


@dataclass
class Hop:
    reply_latencies: list[float]
    request_latencies: list[float]
    messages_per_second: float


async def amqp_hops(
    connection: AbstractRobustConnection, request_queue: str, samples: int, messages: int
) -> Hop:
    """Raw publish → consume hops through the broker with aio-pika, no confirms, one message
    at a time: into a classic queue, as a reply travels, and into a quorum queue, as a
    request does (the broker writes it to its log before delivering it). And the rate of
    the classic hop with many messages in flight."""
    channel = await connection.channel(publisher_confirms=False)
    # Not auto-deleted: it is consumed twice.
    replies = await channel.declare_queue(exclusive=True)
    requests = await channel.declare_queue(
        request_queue, durable=True, arguments={"x-queue-type": "quorum"}
    )
    arrivals: asyncio.Queue[float] = asyncio.Queue()

    async def arrived(message: AbstractIncomingMessage) -> None:
        arrivals.put_nowait(time.perf_counter())

    body = b'{"type":"chunk","content":"' + b"x" * 80 + b'"}'

    async def latencies(queue: AbstractQueue) -> list[float]:
        consumer_tag = await queue.consume(arrived, no_ack=True)
        waits = []
        for _ in range(samples):
            sent_at = time.perf_counter()
            await channel.default_exchange.publish(aio_pika.Message(body), routing_key=queue.name)
            waits.append(await arrivals.get() - sent_at)
        await queue.cancel(consumer_tag)
        return waits

    reply_latencies = await latencies(replies)
    request_latencies = await latencies(requests)
    await channel.queue_delete(request_queue)
    await replies.consume(arrived, no_ack=True)
    started = time.perf_counter()
    for _ in range(messages):
        await channel.default_exchange.publish(aio_pika.Message(body), routing_key=replies.name)
    last = 0.0
    for _ in range(messages):
        last = await arrivals.get()
    await channel.queue_delete(replies.name)
    await channel.close()
    return Hop(reply_latencies, request_latencies, messages / (last - started))


@dataclass
class ServiceRun:
    streams: list[Stream]
    seconds: float

    @property
    def tokens(self) -> int:
        return sum(stream.terminal["usage"]["completion_tokens"] for stream in self.streams)

    @property
    def completed(self) -> int:
        return sum(stream.terminal["type"] == "done" for stream in self.streams)

    @property
    def broker_messages(self) -> int:
        """Each request, and each of its replies."""
        return sum(1 + len(stream.replies) for stream in self.streams)


async def service_streams(requester: Requester, count: int, timeout: float) -> ServiceRun:
    """`count` requests sent at once; done when every one has its terminal reply."""
    streams = await requester.prepare(count)
    started = time.perf_counter()
    for stream in streams:
        await requester.send(stream, REQUEST)
    await all_ended(streams, timeout)
    ended = max(stream.replies[-1][0] for stream in streams)
    return ServiceRun(streams, ended - started)


async def service_first_token(requester: Requester, samples: int) -> list[float]:
    waits = []
    for _ in range(samples):
        [stream] = await requester.prepare(1)
        await requester.send(stream, REQUEST)
        await all_ended([stream], 10)
        waits.append(stream.first_chunk_at - stream.sent_at)
    return waits


def service_lateness(run: ServiceRun, delay: float) -> list[float]:
    """How late each token reached the requester against a steady `delay` after the first
    token: the flush window's wait plus whatever the service and the broker add. The fake
    sends the tokens of `DEFAULT_TOKENS` in turn, which tells which tokens a chunk holds."""
    late = []
    for stream in run.streams:
        chunks = stream.chunks()
        tokens = stream.terminal["usage"]["completion_tokens"]
        token_ends = list(
            accumulate(len(DEFAULT_TOKENS[i % len(DEFAULT_TOKENS)]) for i in range(tokens))
        )
        first_at = chunks[0][0]
        sent_chars = 0
        index = 0
        for at, content in chunks:
            sent_chars += len(content)
            while index < tokens and token_ends[index] <= sent_chars:
                if index:
                    late.append(at - (first_at + index * delay))
                index += 1
    return late


def summary(values: Sequence[float], scale: float = 1000.0) -> dict[str, Any]:
    """p50, p99 and max, in milliseconds unless told otherwise."""
    return {
        "p50": percentile(values, 50) * scale,
        "p99": percentile(values, 99) * scale,
        "max": max(values) * scale,
        "mean": statistics.fmean(values) * scale,
        "n": len(values),
    }
