"""The RabbitMQ objects of the contract, shared by the worker and the requester client."""

from faststream.rabbit import ExchangeType, QueueType, RabbitExchange, RabbitQueue
from faststream.rabbit.schemas.queue import QuorumQueueArgs

from chatbus.contract import ContractNames
from chatbus.settings import UNBOUNDED, QueueBounds

__all__ = [
    "cancel_exchange",
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


def models_queue(names: ContractNames) -> RabbitQueue:
    """Shared by the workers and deleted with the last of them, so that a requester's
    mandatory publish comes back at once when no worker could answer it."""
    return RabbitQueue(names.models_queue, durable=False, auto_delete=True)
