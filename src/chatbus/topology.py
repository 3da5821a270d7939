"""The RabbitMQ objects of the contract, shared by the worker and the requester client."""

from faststream.rabbit import ExchangeType, QueueType, RabbitExchange, RabbitQueue
from faststream.rabbit.schemas.queue import QuorumQueueArgs

from chatbus.contract import ContractNames
from chatbus.settings import UNBOUNDED, QueueBounds

__all__ = [
    "MODELS_QUEUE_EXPIRES",
    "cancel_exchange",
    "consumer_arguments",
    "dead_letter_queue",
    "models_queue",
    "replies_exchange",
    "requests_queue",
]


def requests_queue(
    names: ContractNames, delivery_limit: int, bounds: QueueBounds = UNBOUNDED
) -> RabbitQueue:
    """Quorum queue: replicated, counts deliveries, and dead-letters a request that failed
    `delivery_limit` times (or was rejected as invalid) into the dead-letter queue. The
    at-least-once strategy keeps a dead letter until the dead-letter queue confirms it.
    Once full (`bounds`), it refuses publishes (reject-publish: the publisher gets a nack)
    rather than let a flood grow it until the broker's memory alarm blocks every publisher.
    An unset bound is left out, not sent as a default: RabbitMQ refuses to declare a queue
    again with arguments other than those it was created with."""
    arguments: QuorumQueueArgs = {
        "x-delivery-limit": delivery_limit,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": names.dead_letter_queue,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }
    if bounds.max_queued_requests is not None:
        arguments["x-max-length"] = bounds.max_queued_requests
    if bounds.max_queued_bytes is not None:
        arguments["x-max-length-bytes"] = bounds.max_queued_bytes
    return RabbitQueue(
        names.requests_queue, queue_type=QueueType.QUORUM, durable=True, arguments=arguments
    )


def dead_letter_queue(names: ContractNames, bounds: QueueBounds = UNBOUNDED) -> RabbitQueue:
    """Nobody consumes it. Its bounds drop the oldest dead letters (drop-head, the quorum
    queue's default overflow) and those older than `dlq_max_age`."""
    arguments: QuorumQueueArgs = {}
    if bounds.dlq_max_length is not None:
        arguments["x-max-length"] = bounds.dlq_max_length
    if bounds.dlq_max_age is not None:
        arguments["x-message-ttl"] = round(bounds.dlq_max_age * 1000)
    return RabbitQueue(
        names.dead_letter_queue, queue_type=QueueType.QUORUM, durable=True, arguments=arguments
    )


def replies_exchange(names: ContractNames) -> RabbitExchange:
    """Requesters bind their own queue here with routing key = their correlation id."""
    return RabbitExchange(names.replies_exchange, type=ExchangeType.DIRECT, durable=True)


def cancel_exchange(names: ContractNames) -> RabbitExchange:
    """Every worker binds its own exclusive queue, so each sees every cancel."""
    return RabbitExchange(names.cancel_exchange, type=ExchangeType.FANOUT, durable=True)


MODELS_QUEUE_EXPIRES = 10.0
"""Seconds `chat.models` outlives its last consumer."""


def models_queue(names: ContractNames) -> RabbitQueue:
    """Shared by the workers, and deleted by RabbitMQ (`x-expires`) MODELS_QUEUE_EXPIRES
    seconds after the last of them stopped consuming it, so that a requester's mandatory
    publish then comes back at once. Durable: RabbitMQ 4 deprecates transient queues that
    are not exclusive (the form this queue had before)."""
    return RabbitQueue(
        names.models_queue,
        durable=True,
        arguments={"x-expires": int(MODELS_QUEUE_EXPIRES * 1000)},
    )


def consumer_arguments(total_timeout: float, publish_timeout: float) -> dict[str, int]:
    """The request consumer's own acknowledgement timeout (RabbitMQ 3.12 and later; earlier
    versions ignore it and apply their `consumer_timeout`, 30 minutes by default): above
    the longest a request may take before its ack, a generation of `total_timeout`
    followed by its terminal reply's confirm, with a minute to spare. A consumer argument,
    not a queue argument: RabbitMQ refuses to redeclare an existing queue with an argument
    it was not declared with."""
    return {"x-consumer-timeout": int((total_timeout + publish_timeout + 60) * 1000)}
