"""The RabbitMQ objects of the contract, shared by the worker and the requester client."""

from faststream.rabbit import ExchangeType, QueueType, RabbitExchange, RabbitQueue

from chatbus.contract import ContractNames

__all__ = [
    "MODELS_QUEUE_EXPIRES",
    "cancel_exchange",
    "consumer_arguments",
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
