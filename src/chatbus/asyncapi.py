"""The AsyncAPI document of the chat contract, as `faststream docs gen` and `/docs/asyncapi`
produce it.

FastStream documents a subscriber by its handler's annotations and nothing more of a
message, and that cannot describe this contract: the request handler takes the raw message
(so that malformed input is answered, not dropped by FastStream's decoder) and so has no
payload type; a worker reads cancels from a queue of its own whose name changes at every
start; replies and dead letters are no handler's return value; and messages get no
description, headers or examples. So the contract's subscribers stay out of FastStream's
part of the document, and `ContractAsyncAPI` writes their channels from the same code the
worker runs: bindings from the `topology` objects it declares, payload schemas from the
`contract` models it validates with, examples built as instances of those models.
Everything else the broker serves is documented by FastStream as usual.
"""

import json
from importlib.metadata import version
from typing import Any

from faststream.rabbit import RabbitBroker, RabbitExchange, RabbitQueue
from faststream.specification import AsyncAPI
from faststream.specification.asyncapi.utils import ref
from faststream.specification.asyncapi.v3_0_0.schema import (
    ApplicationSchema,
    Channel,
    Components,
    CorrelationId,
    Message,
    Operation,
    Reference,
)
from faststream.specification.asyncapi.v3_0_0.schema.bindings import (
    ChannelBinding,
    OperationBinding,
    amqp,
)
from faststream.specification.asyncapi.v3_0_0.schema.operations import Action
from faststream.specification.schema import bindings as spec_bindings
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from chatbus import topology
from chatbus.contract import (
    DEADLINE_HEADER,
    TENANT_HEADER,
    AssistantMessage,
    CancelRequest,
    ChatRequest,
    ChunkReply,
    ContractNames,
    DoneReply,
    ErrorCode,
    ErrorReply,
    Timings,
    Usage,
)
from chatbus.settings import UNBOUNDED, QueueBounds

_SCHEMA_REF = "#/components/schemas/{model}"
_CORRELATION_ID = CorrelationId(
    location="$message.header#/correlation_id",
    description="The AMQP correlation_id property. A request without one is identified "
    "by its message_id; every reply carries the request's id.",
)
_EXAMPLE_ID = "7f9c2ba4e88f827d616045507605853e"

DESCRIPTION = """\
An event-driven chat service: requesters publish chat requests to RabbitMQ, a pool of
stateless workers streams each completion from Ollama and publishes it back, chunk by chunk,
keyed by the request's correlation id.

Send a request: bind a queue of your own to `{replies}` with routing key = the correlation id
you will use (bind first, or the first replies are lost), or set the AMQP `reply_to`
property; then publish the request to the queue `{requests}` through the default exchange,
with content type `application/json` and the `correlation_id` property set.

Read the replies in order: chunks, then exactly one terminal reply (`done` or `error`) per
delivery attempt. If a worker dies mid-stream the request is delivered again and answered
again with a higher `attempt`: discard what an earlier attempt sent. A request that cannot be
answered ends in `{dead_letters}`.
"""


def _prose(text: str) -> str:
    """Paragraphs as single lines: Markdown renders them the same, and the YAML stays
    readable."""
    return "\n\n".join(" ".join(paragraph.split()) for paragraph in text.split("\n\n"))


class ContractAsyncAPI(AsyncAPI):
    def __init__(
        self,
        broker: RabbitBroker,
        names: ContractNames,
        delivery_limit: int,
        bounds: QueueBounds = UNBOUNDED,
    ) -> None:
        super().__init__(
            broker,
            title="chatbus",
            version=version("chatbus"),
            description=_prose(
                DESCRIPTION.format(
                    requests=names.requests_queue,
                    replies=names.replies_exchange,
                    dead_letters=names.dead_letter_queue,
                )
            ),
            schema_version="3.0.0",
        )
        self._names = names
        self._delivery_limit = delivery_limit
        self._bounds = bounds

    def to_specification(self) -> ApplicationSchema:
        document = super().to_specification()
        if not isinstance(document, ApplicationSchema):
            raise TypeError(f"expected an AsyncAPI 3 document, got {type(document).__name__}")
        contract = _Contract(
            self._names,
            self._delivery_limit,
            self._bounds,
            servers=list(document.servers or {}),
        )
        components = document.components or Components()
        components.messages = (components.messages or {}) | contract.messages
        components.schemas = (components.schemas or {}) | contract.schemas
        document.components = components
        document.channels = contract.channels | document.channels
        document.operations = contract.operations | document.operations
        return document


class _Contract:
    """The contract's channels, operations, messages and schemas."""

    def __init__(
        self, names: ContractNames, delivery_limit: int, bounds: QueueBounds, servers: list[str]
    ) -> None:
        self.channels: dict[str, Channel] = {}
        self.operations: dict[str, Operation] = {}
        self.messages: dict[str, Message] = {}
        _, definitions = models_json_schema(
            [(model, "validation") for model in (ChatRequest, ChunkReply, DoneReply, ErrorReply)]
            + [(CancelRequest, "validation")],
            ref_template=_SCHEMA_REF,
        )
        self.schemas: dict[str, Any] = definitions["$defs"]
        self._servers = [ref("servers", name) for name in servers]

        requests = topology.requests_queue(names, delivery_limit, bounds)
        self._channel(
            names.requests_queue,
            address=names.requests_queue,
            binding=_queue_binding(requests),
            description=f"""\
Where requests go: a durable quorum queue, published to through the default exchange
(routing key `{names.requests_queue}`) and shared by all workers; each takes at most
`PREFETCH` requests at once. A request is acknowledged only after its terminal reply is
confirmed by the broker. A malformed or invalid request is answered with `invalid_request`
and dead-lettered at once; one that fails unexpectedly is delivered again, and after
`DELIVERY_LIMIT` deliveries answered with `internal_error` and dead-lettered into
`{names.dead_letter_queue}`.

Declared with the arguments {_arguments(requests)}. With `MAX_QUEUED_REQUESTS`
(`x-max-length`) or `MAX_QUEUED_BYTES` (`x-max-length-bytes`) set, a full queue refuses
further requests: the publisher's confirm is a nack. A requester should take that as the
service being unavailable, and try again later.""",
            messages=[_request_message()],
        )
        self._channel(
            names.replies_exchange,
            address="{correlationId}",
            binding=_exchange_binding(topology.replies_exchange(names)),
            description="""\
Where replies go: a durable direct exchange, routed by the request's correlation id. Bind a
queue of your own with that routing key before publishing the request. A request with the
AMQP `reply_to` property is answered on that queue through the default exchange instead
(RabbitMQ's direct reply-to, `amq.rabbitmq.reply-to`, works too).

Replies are published mandatory: when one comes back unroutable (nobody is bound for the
correlation id any more), the worker stops the generation.""",
            messages=[_chunk_message(), _done_message(), _error_message()],
            parameters={
                "correlationId": {
                    "description": "The correlation id of the request being answered.",
                    "location": "$message.header#/correlation_id",
                }
            },
        )
        self._channel(
            names.cancel_exchange,
            address=None,
            binding=_exchange_binding(topology.cancel_exchange(names)),
            description="""\
Where cancels go: a durable fanout exchange. Every worker reads it through an exclusive queue
of its own, so the one running the request stops it (its Ollama stream is closed) and
answers `done` with `done_reason` `cancelled`. A cancel for a request not started yet is
kept for `CANCEL_MEMORY_SECONDS`, and the request is then answered `cancelled` without
calling Ollama.""",
            messages=[_cancel_message()],
        )
        self._channel(
            names.dead_letter_queue,
            address=names.dead_letter_queue,
            binding=_queue_binding(topology.dead_letter_queue(names, bounds)),
            description=f"""\
Requests that were not answered with a generation: invalid ones (after their
`invalid_request` reply), ones without any correlation or message id, and ones delivered
`DELIVERY_LIMIT` times. RabbitMQ moves them here from `{names.requests_queue}`
(at-least-once dead-lettering) with its `x-death` headers; nobody consumes them
automatically. `DLQ_MAX_LENGTH` (`x-max-length`: the oldest are dropped first) and
`DLQ_MAX_AGE` (`x-message-ttl`) bound how many are kept, and for how long.""",
            messages=[_dead_letter_message()],
        )

        self._operation(
            "receiveChatRequest",
            Action.RECEIVE,
            names.requests_queue,
            summary="Answer a chat request with a stream of replies.",
            binding=amqp.OperationBinding(cc=[names.requests_queue], ack=True),
            reply={
                "channel": ref("channels", names.replies_exchange),
                "messages": [
                    ref("channels", names.replies_exchange, "messages", name)
                    for name in self.channels[names.replies_exchange].messages
                ],
            },
        )
        self._operation(
            "sendReply",
            Action.SEND,
            names.replies_exchange,
            summary="Chunks, then one terminal reply (done or error) per delivery attempt.",
            # deliveryMode 1: replies are transient, they matter only while a requester waits.
            binding=amqp.OperationBinding(ack=False, mandatory=True, deliveryMode=1),
        )
        self._operation(
            "receiveCancel",
            Action.RECEIVE,
            names.cancel_exchange,
            summary="Stop a generation.",
            binding=amqp.OperationBinding(ack=True),
        )
        self._operation(
            "deadLetterRequest",
            Action.SEND,
            names.dead_letter_queue,
            summary="Requests given up on, by RabbitMQ's dead-lettering of rejected requests.",
            binding=None,
        )

    def _channel(
        self,
        name: str,
        *,
        address: str | None,
        binding: ChannelBinding,
        description: str,
        messages: list[Message],
        **extra: Any,
    ) -> None:
        refs: dict[str, Message | Reference] = {}
        for message in messages:
            assert message.name is not None
            self.messages[message.name] = message
            refs[message.name] = Reference(**ref("components", "messages", message.name))
        self.channels[name] = Channel(
            address=address,
            description=_prose(description),
            servers=self._servers,
            messages=refs,
            bindings=binding,
            **extra,
        )

    def _operation(
        self,
        operation_id: str,
        action: Action,
        channel: str,
        *,
        summary: str,
        binding: amqp.OperationBinding | None,
        **extra: Any,
    ) -> None:
        self.operations[operation_id] = Operation(
            action=action,
            channel=Reference(**ref("channels", channel)),
            summary=summary,
            bindings=OperationBinding(amqp=binding) if binding else None,
            messages=[
                Reference(**ref("channels", channel, "messages", name))
                for name in self.channels[channel].messages
            ],
            **extra,
        )


def _queue_binding(queue: RabbitQueue) -> ChannelBinding:
    return ChannelBinding(
        amqp=amqp.ChannelBinding.from_sub(
            spec_bindings.amqp.ChannelBinding(
                queue=spec_bindings.amqp.Queue.from_queue(queue),
                exchange=spec_bindings.amqp.Exchange.from_exchange(RabbitExchange()),
                virtual_host="/",
            )
        )
    )


def _exchange_binding(exchange: RabbitExchange) -> ChannelBinding:
    return ChannelBinding(
        amqp=amqp.ChannelBinding.from_pub(
            spec_bindings.amqp.ChannelBinding(
                queue=spec_bindings.amqp.Queue.from_queue(RabbitQueue("")),
                exchange=spec_bindings.amqp.Exchange.from_exchange(exchange),
                virtual_host="/",
            )
        )
    )


def _arguments(queue: RabbitQueue) -> str:
    return ", ".join(
        f"`{key}: {json.dumps(value)}`" for key, value in (queue.arguments or {}).items()
    )


def _message(
    model: type[BaseModel],
    *,
    name: str,
    summary: str,
    examples: list[BaseModel],
    **extra: Any,
) -> Message:
    return Message(
        name=name,
        title=name,
        summary=summary,
        description=model.__doc__,
        contentType="application/json",
        correlationId=_CORRELATION_ID,
        payload={"$ref": _SCHEMA_REF.format(model=model.__name__)},
        examples=[
            {"name": f"{name}{i}", "payload": example.model_dump(mode="json", exclude_none=True)}
            for i, example in enumerate(examples, 1)
        ],
        **extra,
    )


def _request_message() -> Message:
    return _message(
        ChatRequest,
        name="ChatRequest",
        summary="A conversation to continue, in the shape of Ollama's /api/chat request.",
        examples=[
            ChatRequest.model_validate(
                {
                    "model": "llama3.2",
                    "messages": [
                        {"role": "system", "content": "Answer in one sentence."},
                        {"role": "user", "content": "Why is the sky blue?"},
                    ],
                    "options": {"temperature": 0.2, "num_predict": 256},
                }
            ),
        ],
        headers={
            "type": "object",
            "properties": {
                DEADLINE_HEADER: {
                    "type": "number",
                    "description": "Absolute deadline, Unix epoch seconds. A request still "
                    "queued past it is answered `deadline_exceeded` without calling Ollama; "
                    "a generation running past it is stopped. The AMQP `expiration` property "
                    "is honoured as a deadline too.",
                },
                TENANT_HEADER: {
                    "type": "string",
                    "description": "The tenant the request is made for (the HTTP gateway "
                    "sets it from the caller's API key). Optional: the worker logs it and "
                    "counts requests by it; the answer does not depend on it.",
                },
            },
        },
    )


def _chunk_message() -> Message:
    return _message(
        ChunkReply,
        name="ChunkReply",
        summary="Part of the answer.",
        examples=[
            ChunkReply(correlation_id=_EXAMPLE_ID, seq=0, content="The"),
            ChunkReply(correlation_id=_EXAMPLE_ID, seq=1, content=" sky appears blue because"),
        ],
    )


def _done_message() -> Message:
    return _message(
        DoneReply,
        name="DoneReply",
        summary="Terminal: the whole answer, with usage and Ollama's timings.",
        examples=[
            DoneReply(
                correlation_id=_EXAMPLE_ID,
                seq=2,
                done_reason="stop",
                model="llama3.2",
                message=AssistantMessage(
                    content="The sky appears blue because of Rayleigh scattering."
                ),
                usage=Usage(prompt_tokens=26, completion_tokens=11),
                timings=Timings(
                    total_duration=111_095_042,
                    load_duration=95_042,
                    prompt_eval_duration=1_000_000,
                    eval_duration=110_000_000,
                ),
            )
        ],
    )


def _error_message() -> Message:
    return _message(
        ErrorReply,
        name="ErrorReply",
        summary="Terminal: why there is no (complete) answer; `code` is one of a closed set.",
        examples=[
            ErrorReply(
                correlation_id=_EXAMPLE_ID,
                seq=0,
                code=ErrorCode.MODEL_NOT_FOUND,
                message='model "llama9" not found, try pulling it first',
                retryable=False,
            ),
            ErrorReply(
                correlation_id=_EXAMPLE_ID,
                attempt=2,
                seq=0,
                code=ErrorCode.UPSTREAM_UNAVAILABLE,
                message="Ollama unreachable: ConnectError: All connection attempts failed",
                retryable=True,
            ),
        ],
    )


def _cancel_message() -> Message:
    return _message(
        CancelRequest,
        name="CancelRequest",
        summary="Stop the generation of one request.",
        examples=[CancelRequest(correlation_id=_EXAMPLE_ID)],
    )


def _dead_letter_message() -> Message:
    return Message(
        name="DeadLetter",
        title="DeadLetter",
        summary="A request given up on, exactly as it was published.",
        description="The body and properties of the original request, unchanged (it may be "
        "malformed: that can be why it is here), plus RabbitMQ's dead-lettering headers.",
        correlationId=_CORRELATION_ID,
        payload={"description": "The original request body, as published."},
        headers={
            "type": "object",
            "properties": {
                "x-death": {
                    "type": "array",
                    "description": "RabbitMQ's history of the message's dead-lettering: "
                    "queue, reason (rejected, delivery_limit, ...), count, time.",
                },
                "x-first-death-reason": {"type": "string"},
                "x-first-death-queue": {"type": "string"},
            },
        },
    )
