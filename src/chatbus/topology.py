"""The RabbitMQ objects of the contract, shared by the worker and the requester client."""

from faststream.rabbit import ExchangeType, QueueType, RabbitExchange, RabbitQueue

from chatbus.contract import ContractNames

__all__ = [
    "cancel_exchange",
    "dead_letter_queue",
    "models_queue",
    "replies_exchange",
    "requests_queue",
]


def requests_queue(names: ContractNames, delivery_limit: int) -> RabbitQueue:
    """Quorum queue: replicated, counts deliveries, and dead-letters a request that failed
    `delivery_limit` times (or was rejected as invalid) into the dead-letter queue. The
    at-least-once strategy keeps a dead letter until the dead-letter queue confirms it."""
    return RabbitQueue(
        names.requests_queue,
        queue_type=QueueType.QUORUM,
        durable=True,
        arguments={
            "x-delivery-limit": delivery_limit,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": names.dead_letter_queue,
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        },
    )


def dead_letter_queue(names: ContractNames) -> RabbitQueue:
    return RabbitQueue(names.dead_letter_queue, queue_type=QueueType.QUORUM, durable=True)


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
