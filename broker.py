"""Wires the worker to RabbitMQ: the subscribers, and what the worker declares at start-up."""

import socket
import uuid

from faststream import AckPolicy, FastStream
from faststream.rabbit import Channel, RabbitBroker, RabbitQueue
from faststream.rabbit.annotations import RabbitMessage
from yarl import URL

from chatbus import topology
from chatbus.catalog import list_models
from chatbus.contract import CancelRequest, ErrorReply, ModelsReply
from chatbus.upstream import create_ollama_client
from chatbus.worker import ChatWorker
from config import Settings


async def keep_body_raw(message: RabbitMessage) -> bytes:
    """The worker parses requests itself, so that a malformed one is answered, not dropped
    by FastStream's JSON decoding before the handler runs."""
    return message.body


def with_connection_name(url: str, name: str) -> str:
    """Name the AMQP connection (aiormq reads `name` from the URL), so that operators and
    the fault tests can tell this worker's connection apart; a name in the URL wins."""
    parsed = URL(url)
    return url if "name" in parsed.query else str(parsed.update_query(name=name))


def create_app(settings: Settings) -> FastStream:
    broker = RabbitBroker(
        with_connection_name(settings.rabbitmq_url, settings.connection_name),
        graceful_timeout=settings.graceful_timeout,
        reconnect_interval=settings.reconnect_interval,
    )
    client = create_ollama_client(settings.ollama_host, settings)
    worker = ChatWorker(broker, client, settings)

    @broker.subscriber(
        topology.requests_queue(settings),
        # The prefetch bounds the generations one worker runs at once.
        channel=Channel(prefetch_count=settings.prefetch),
        ack_policy=AckPolicy.MANUAL,
        decoder=keep_body_raw,
        no_reply=True,
        title=settings.requests_queue,
    )
    async def handle_chat_request(message: RabbitMessage) -> None:
        await worker.handle(message)

    cancel_queue = RabbitQueue(
        f"{settings.cancel_exchange}.{socket.gethostname()}.{uuid.uuid4().hex[:8]}",
        exclusive=True,
        auto_delete=True,
    )

    @broker.subscriber(
        cancel_queue, topology.cancel_exchange(settings), title=settings.cancel_exchange
    )
    async def handle_cancel(cancel: CancelRequest) -> None:
        worker.cancel(cancel)

    @broker.subscriber(
        topology.models_queue(settings), decoder=keep_body_raw, title=settings.models_queue
    )
    async def handle_models_request(message: RabbitMessage) -> ModelsReply | ErrorReply:
        return await list_models(client, message.correlation_id)

    app = FastStream(broker)

    @app.on_startup
    async def declare_topology() -> None:
        # Declared before consuming starts: requesters bind to the replies exchange, and
        # dead letters need their queue to exist.
        await broker.connect()
        await broker.declare_queue(topology.dead_letter_queue(settings))
        await broker.declare_exchange(topology.replies_exchange(settings))

    @app.after_shutdown
    async def close_ollama_client() -> None:
        await client.close()  # type: ignore[no-untyped-call]

    return app
