"""The HTTP side channel of a running worker: liveness, readiness, metrics, AsyncAPI page.

The worker runs in this process against the real broker; its ASGI app is called through
httpx's ASGI transport, as uvicorn would call it.
"""

import asyncio
import uuid
from collections.abc import Callable
from typing import Any

import httpx
from aio_pika.abc import AbstractRobustConnection

from chatbus.settings import Settings
from chatbus.testing import Behaviour, FakeOllama, running_worker
from chatbus.testing.fake_ollama import DEFAULT_TOKENS
from tests.support import Requester, http, samples, until, user, value


async def readiness(client: httpx.AsyncClient) -> tuple[int, dict[str, Any]]:
    response = await client.get("/readyz")
    body: dict[str, Any] = response.json()
    return response.status_code, body


class BrokerProxy:
    """A TCP proxy in front of RabbitMQ: `cut()` drops the worker's connection and refuses
    new ones, as a broker outage does for the worker, without touching the shared broker."""

    def __init__(self, rabbitmq_url: str) -> None:
        parsed = httpx.URL(rabbitmq_url.replace("amqp://", "http://", 1))
        self._upstream = (parsed.host, parsed.port or 5672)
        self._url = parsed
        self._server: asyncio.Server | None = None
        self._port = 0
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return str(self._url.copy_with(host="127.0.0.1", port=self._port)).replace(
            "http://", "amqp://", 1
        )

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self._port)
        self._port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self._upstream)
        self._writers |= {writer, up_writer}

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            except ConnectionError:
                pass
            finally:
                sink.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers -= {writer, up_writer}


async def test_liveness_does_not_depend_on_rabbitmq_or_ollama(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(ollama_host="http://127.0.0.1:9", ready_ollama_cache_seconds=0)
    async with running_worker(settings) as app, http(app) as client:
        live = await client.get("/healthz")
        status, body = await readiness(client)

    assert live.status_code == 200
    assert live.json() == {"status": "alive"}
    assert status == 503
    assert body["ready"] is False
    assert body["checks"]["rabbitmq"] == "ok"
    assert body["checks"]["consumers"] == "ok"
    assert body["checks"]["ollama"].startswith("no Ollama server is healthy: 127.0.0.1:9: ")
    assert body["ollama_servers"]["127.0.0.1:9"].startswith("Ollama unreachable: ConnectError")


async def test_readiness_follows_ollama(make_settings: Callable[..., Settings]) -> None:
    async with FakeOllama() as ollama:
        port = ollama.port
        settings = make_settings(ollama_host=ollama.url, ready_ollama_cache_seconds=0)
        async with running_worker(settings) as app, http(app) as client:
            assert await readiness(client) == (
                200,
                {
                    "ready": True,
                    "checks": {"rabbitmq": "ok", "consumers": "ok", "ollama": "ok"},
                    "ollama_servers": {f"127.0.0.1:{port}": "ok"},
                },
            )

            await ollama.stop()
            status, body = await readiness(client)
            assert status == 503
            assert "Ollama unreachable" in body["checks"]["ollama"]
            assert body["checks"]["rabbitmq"] == body["checks"]["consumers"] == "ok"

            async with FakeOllama(port=port):
                assert (await readiness(client))[0] == 200


async def test_readiness_reuses_ollamas_answer_within_the_cache_time(
    make_settings: Callable[..., Settings],
) -> None:
    async with FakeOllama() as ollama:
        settings = make_settings(ollama_host=ollama.url, ready_ollama_cache_seconds=300)
        async with running_worker(settings) as app, http(app) as client:
            assert (await readiness(client))[0] == 200
            await ollama.stop()

            assert (await readiness(client))[0] == 200


async def test_readiness_follows_the_broker_connection(
    make_settings: Callable[..., Settings], rabbitmq_url: str
) -> None:
    proxy = BrokerProxy(rabbitmq_url)
    await proxy.start()
    settings = make_settings(rabbitmq_url=proxy.url, reconnect_interval=0.2)
    async with running_worker(settings) as app, http(app) as client:
        assert (await readiness(client))[0] == 200

        await proxy.cut()
        await until(lambda: _status_is(client, 503), what="/readyz fails with the broker gone")
        _, body = await readiness(client)
        assert body["checks"]["rabbitmq"] == "no connection to RabbitMQ"
        assert body["checks"]["consumers"].startswith("not consuming from")
        assert settings.requests_queue in body["checks"]["consumers"]
        assert body["checks"]["ollama"] == "ok"

        # Back on the same port: the worker reconnects and its consumers are restored.
        await proxy.start()
        await until(lambda: _status_is(client, 200), what="/readyz ok after reconnecting")
    await proxy.cut()


async def test_readiness_fails_when_the_broker_cancels_a_consumer(
    make_settings: Callable[..., Settings], amqp: AbstractRobustConnection
) -> None:
    settings = make_settings()
    async with running_worker(settings) as app, http(app) as client:
        assert (await readiness(client))[0] == 200
        channel = await amqp.channel()
        # Deleting a queue makes RabbitMQ cancel its consumers, and nothing restores them.
        await channel.queue_delete(settings.requests_queue)
        await channel.close()

        await until(lambda: _status_is(client, 503), what="/readyz fails without a consumer")
        _, body = await readiness(client)
        assert body["checks"]["consumers"] == f"not consuming from {settings.requests_queue}"
        assert body["checks"]["rabbitmq"] == "ok"


async def _status_is(client: httpx.AsyncClient, status: int) -> bool:
    return (await client.get("/readyz")).status_code == status


async def test_metrics_count_requests_replies_tokens_and_latencies(
    make_settings: Callable[..., Settings],
    amqp: AbstractRobustConnection,
    fake_ollama: FakeOllama,
) -> None:
    settings = make_settings()
    busy = f"busy-{uuid.uuid4().hex[:6]}"
    fake_ollama.models[busy] = Behaviour(status=503, fail_times=1)
    async with running_worker(settings) as app, http(app) as client:
        before = samples((await client.get("/metrics")).text)
        async with Requester(amqp, settings) as requester:
            correlation_id = uuid.uuid4().hex
            done = (await requester.chat(user(), correlation_id=correlation_id))[-1]
            error = (await requester.chat(user(model="no-such-model")))[-1]
            retried = (await requester.chat(user(model=busy)))[-1]
        response = await client.get("/metrics")
    after = samples(response.text)

    assert response.status_code == 200
    assert (done["type"], error["code"], retried["type"]) == ("done", "model_not_found", "done")

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("chatbus_terminal_replies_total", type="done", code="stop") == 2
    assert moved("chatbus_terminal_replies_total", type="error", code="model_not_found") == 1
    assert moved("chatbus_generated_tokens_total", model="llama3.2") == len(DEFAULT_TOKENS)
    assert moved("chatbus_generated_tokens_total", model=busy) == len(DEFAULT_TOKENS)
    assert moved("chatbus_time_to_first_token_seconds_count", model="llama3.2") == 1
    assert moved("chatbus_ollama_response_seconds_count", outcome="answered") == 2
    # The first 503. (No call for the model the fake does not list: the worker knows.)
    assert moved("chatbus_ollama_response_seconds_count", outcome="failed") == 1
    assert moved("chatbus_ollama_retries_total") == 1
    assert value(after, "chatbus_generations_in_flight") == 0
    # FastStream's own, labelled by queue or exchange: never by a request's routing key.
    handler = {"app_name": "chatbus", "broker": "rabbitmq", "handler": settings.requests_queue}
    assert moved("faststream_received_messages_total", **handler) == 3
    assert moved("faststream_received_processed_messages_total", **handler, status="acked") == 3
    # Replies bypass FastStream's publisher; the worker counts them itself, by exchange.
    assert moved("chatbus_replies_published_total", destination=settings.replies_exchange) > 3
    assert correlation_id not in response.text
    assert value(after, "process_resident_memory_bytes") > 0


async def test_generations_in_flight_is_read_from_the_worker(
    make_settings: Callable[..., Settings],
    amqp: AbstractRobustConnection,
    fake_ollama: FakeOllama,
) -> None:
    settings = make_settings(idle_timeout=5.0)
    slow = f"slow-{uuid.uuid4().hex[:6]}"
    fake_ollama.models[slow] = Behaviour(token_delay=0.2)
    async with (
        running_worker(settings) as app,
        http(app) as client,
        Requester(amqp, settings) as requester,
    ):
        replies = await requester.send(user(model=slow))
        await replies.next()  # the first chunk: the generation runs
        in_flight = value(
            samples((await client.get("/metrics")).text), "chatbus_generations_in_flight"
        )
        await replies.until_terminal()
        after = value(samples((await client.get("/metrics")).text), "chatbus_generations_in_flight")

    assert (in_flight, after) == (1, 0)


async def test_the_asyncapi_page_and_document_are_served_without_try_it_out(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings()
    async with running_worker(settings) as app, http(app) as client:
        page = await client.get("/docs/asyncapi")
        document = await client.get("/docs/asyncapi.json")
        try_it_out = await client.post("/docs/asyncapi/try", json={})

    assert page.status_code == 200
    assert "text/html" in page.headers["content-type"]
    assert document.json()["channels"][settings.requests_queue]["address"] == (
        settings.requests_queue
    )
    # Try-it-out would publish whatever an HTTP client sends to the broker.
    assert try_it_out.status_code == 404


async def test_unknown_paths_are_not_found(make_settings: Callable[..., Settings]) -> None:
    async with running_worker(make_settings()) as app, http(app) as client:
        assert (await client.get("/api/chat")).status_code == 404
