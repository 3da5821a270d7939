"""Settings, from the environment and an optional `.env` file.

`BusSettings` is what every party on the bus reads (the broker's URL and the contract's
names): the CLI and the gateway use it as it is. `Settings` adds the worker's own. Each
setting is one environment variable of the same name in capitals (`RABBITMQ_URL`,
`IDLE_TIMEOUT`, ...); the parts of the worker take them grouped into the small frozen
objects below, whose class attributes are the defaults.
"""

import os
import socket
from dataclasses import dataclass
from typing import Literal, Self

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError
from pydantic_settings import BaseSettings, SettingsConfigDict
from yarl import URL

from chatbus.contract import NAMES, ContractNames
from chatbus.pool import PoolOptions, ServerSpec, parse_hosts, pool_servers

__all__ = [
    "DEFAULT_RABBITMQ_URL",
    "UNBOUNDED",
    "BusSettings",
    "Chunking",
    "Limits",
    "LogFormat",
    "QueueBounds",
    "RequestLimitSettings",
    "Retries",
    "Settings",
    "Timeouts",
    "rabbitmq_url_problem",
    "settings_problems",
]

DEFAULT_RABBITMQ_URL = "amqp://guest:guest@localhost:5672/"

LogFormat = Literal["json", "text"]


@dataclass(frozen=True)
class Timeouts:
    """Seconds. The generation loop enforces first_token, idle and total itself; the
    Ollama client's own timeouts are only a backstop."""

    ollama_connect: float = 5.0
    first_token: float = 120.0
    """Covers a cold model load."""
    idle: float = 60.0
    """Between two tokens."""
    total: float = 600.0
    """A whole generation; keep it below RabbitMQ's consumer_timeout."""
    publish: float = 10.0
    """For the broker to confirm a reply (and for a reconnecting channel)."""


@dataclass(frozen=True)
class Retries:
    """How long, and how often, an unavailable Ollama is called again before the first
    token; the backoff doubles from `initial_backoff` up to `max_backoff`, with jitter."""

    budget: float = 20.0
    initial_backoff: float = 0.5
    max_backoff: float = 8.0


@dataclass(frozen=True)
class Chunking:
    """How tokens are gathered into chunk replies: the first token goes at once, the
    following within `flush_window` seconds, or as soon as `max_chars` are waiting."""

    flush_window: float = 0.05
    max_chars: int = 2048


@dataclass(frozen=True)
class Limits:
    """What a request may ask for; a request over a limit is answered `invalid_request`
    naming the setting."""

    max_request_bytes: int = 1_048_576
    max_prompt_chars: int = 200_000
    max_messages: int = 500
    max_num_predict: int = 4096
    """Also applied when a request sets no num_predict (Ollama's default is no limit)."""
    max_model_chars: int = 256
    """The model name is echoed in replies and logs."""
    allowed_models: tuple[str, ...] = ()
    """If not empty, the only models requests may name."""


@dataclass(frozen=True)
class QueueBounds:
    """How much the request queue and the dead-letter queue may hold; None is no bound.
    RabbitMQ fixes a queue's arguments when the queue is created: see the README to change
    them on a running deployment."""

    max_queued_requests: int | None = None
    """Requests waiting in the request queue (`x-max-length`); a publish past it is
    refused (reject-publish), which the client raises as `ServiceUnavailableError`."""
    max_queued_bytes: int | None = None
    """Bytes of request bodies waiting in the request queue (`x-max-length-bytes`)."""
    dlq_max_length: int | None = None
    """Dead letters kept (`x-max-length`); past it the oldest is dropped."""
    dlq_max_age: float | None = None
    """Seconds a dead letter is kept (`x-message-ttl`)."""


UNBOUNDED = QueueBounds()


class BusSettings(BaseSettings):
    """The broker and the contract's names: what every party on the bus reads."""

    # "null" unsets a setting whose default is none (as settings_env writes one).
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", env_parse_none_str="null")

    rabbitmq_url: str = Field(default=DEFAULT_RABBITMQ_URL)
    reconnect_interval: float = Field(
        default=5.0, gt=0, description="Seconds between attempts to reconnect to RabbitMQ."
    )
    requests_queue: str = NAMES.requests_queue
    replies_exchange: str = NAMES.replies_exchange
    cancel_exchange: str = NAMES.cancel_exchange
    dead_letter_queue: str = NAMES.dead_letter_queue
    models_queue: str = NAMES.models_queue

    @field_validator("rabbitmq_url")
    @classmethod
    def _usable_url(cls, url: str) -> str:
        problem = rabbitmq_url_problem(url)
        if problem:
            raise PydanticCustomError("rabbitmq_url", problem)
        return url

    @property
    def names(self) -> ContractNames:
        return ContractNames(
            requests_queue=self.requests_queue,
            replies_exchange=self.replies_exchange,
            cancel_exchange=self.cancel_exchange,
            dead_letter_queue=self.dead_letter_queue,
            models_queue=self.models_queue,
        )


def rabbitmq_url_problem(url: str) -> str | None:
    """What makes `RABBITMQ_URL` unusable, or None. It holds one URL, or several
    comma-separated addresses of a cluster's nodes: the first a whole URL, each other one a
    URL or only `host[:port]`. The value is not quoted back: it may hold a password."""
    entries = [entry.strip() for entry in url.split(",")]
    for number, entry in enumerate(entries, start=1):
        where = f"address {number} " if len(entries) > 1 else ""
        if not entry:
            return f"{where}is empty"
        host_and_port = number > 1 and "://" not in entry
        try:
            parsed = URL(f"amqp://{entry}" if host_and_port else entry)
        except ValueError:
            return f"{where}has a port that is not a number from 0 to 65535"
        if host_and_port and (parsed.user is not None or parsed.path not in ("", "/")):
            return f"{where}must be a whole URL or only host[:port]"
        if parsed.scheme not in ("amqp", "amqps") or "://" not in str(parsed):
            return f"{where}must start with amqp:// or amqps://, like {DEFAULT_RABBITMQ_URL}"
        if not parsed.host:
            return f"{where}has no host: amqp://[USER:PASSWORD@]HOST[:PORT]/[VHOST]"
    return None


def settings_problems(error: ValidationError) -> str:
    """A failed settings validation in one line, each problem under its variable's name."""
    return "; ".join(
        f"{'.'.join(str(part) for part in problem['loc']).upper()}: {problem['msg']}"
        for problem in error.errors()
    )


class RequestLimitSettings(BaseModel):
    """The limits on a request's size, which a requester that builds requests (the gateway's
    sessions) checks before it sends, under the same names as the worker that enforces them,
    so that one environment sets both."""

    max_request_bytes: int = Field(default=Limits.max_request_bytes, ge=1)
    max_prompt_chars: int = Field(default=Limits.max_prompt_chars, ge=1)
    max_messages: int = Field(default=Limits.max_messages, ge=1)


class Settings(BusSettings, RequestLimitSettings):
    """The worker's settings."""

    ollama_host: str = Field(default="http://localhost:11434")
    ollama_hosts: str = Field(
        default="",
        description="Comma-separated Ollama base URLs: the pool of servers the worker spreads "
        "its calls over (`URL#parallel=N` for a server of its own parallelism); when empty, "
        "OLLAMA_HOST alone.",
    )
    ollama_num_parallel: int = Field(
        default=4, ge=1, description="Generations each Ollama server runs at once."
    )
    ollama_failure_threshold: int = Field(
        default=PoolOptions.failure_threshold,
        ge=1,
        description="Failures in a row that open an Ollama server's circuit.",
    )
    ollama_cooldown: float = Field(
        default=PoolOptions.cooldown,
        gt=0,
        description="Seconds an open circuit sends nothing before the server is checked again.",
    )
    ollama_refresh_interval: float = Field(
        default=PoolOptions.refresh_interval,
        gt=0,
        description="Seconds between checks of each Ollama server's health and models.",
    )
    default_model: str = Field(
        default="llama3.2", description="Model used when a request names none."
    )
    log_level: str = Field(default="INFO")
    log_format: LogFormat = Field(
        default="json", description="json: one object per line; text: for people."
    )
    log_content: bool = Field(
        default=False, description="Log prompt and reply text (debugging only)."
    )
    connection_name: str = Field(
        default_factory=lambda: f"chatbus-worker@{socket.gethostname()}:{os.getpid()}",
        description="The AMQP connection name this worker shows in RabbitMQ.",
    )

    prefetch: int = Field(
        default=4,
        ge=1,
        description="Concurrent generations per worker (channel prefetch); when not set, the "
        "pool's capacity: the sum of its servers' parallelism.",
    )
    delivery_limit: int = Field(
        default=5,
        ge=1,
        description="The request queue's x-delivery-limit: a request returned more often "
        "than this (worker crashes, lost connections, failures) is dead-lettered.",
    )
    graceful_timeout: float = Field(
        default=30.0, gt=0, description="Seconds in-flight generations get to finish on shutdown."
    )
    cancel_memory_seconds: float = Field(
        default=600.0, gt=0, description="How long a cancel for a request not yet seen is kept."
    )

    publish_timeout: float = Field(default=Timeouts.publish, gt=0)
    ollama_connect_timeout: float = Field(default=Timeouts.ollama_connect, gt=0)
    first_token_timeout: float = Field(default=Timeouts.first_token, gt=0)
    idle_timeout: float = Field(default=Timeouts.idle, gt=0)
    total_timeout: float = Field(default=Timeouts.total, gt=0)

    retry_budget: float = Field(default=Retries.budget, ge=0)
    retry_initial_backoff: float = Field(default=Retries.initial_backoff, gt=0)
    retry_max_backoff: float = Field(default=Retries.max_backoff, gt=0)

    flush_window: float = Field(default=Chunking.flush_window, ge=0)
    max_chunk_chars: int = Field(default=Chunking.max_chars, ge=1)

    max_num_predict: int = Field(default=Limits.max_num_predict, ge=1)
    max_model_chars: int = Field(default=Limits.max_model_chars, ge=1)
    allowed_models: list[str] = Field(default_factory=list)

    max_queued_requests: int | None = Field(
        default=QueueBounds.max_queued_requests,
        ge=0,
        description="Requests the request queue may hold; a full queue refuses publishes.",
    )
    max_queued_bytes: int | None = Field(
        default=QueueBounds.max_queued_bytes,
        ge=0,
        description="Bytes of requests the request queue may hold.",
    )
    dlq_max_length: int | None = Field(
        default=QueueBounds.dlq_max_length,
        ge=0,
        description="Dead letters kept; the oldest is dropped past it.",
    )
    dlq_max_age: float | None = Field(
        default=QueueBounds.dlq_max_age, gt=0, description="Seconds a dead letter is kept."
    )

    http_host: str = Field(
        default="127.0.0.1",
        description="Address of the HTTP side channel (health, metrics, AsyncAPI page); "
        "0.0.0.0 in the container.",
    )
    http_port: int = Field(
        default=8000, ge=0, le=65535, description="Its port; 0 picks a free one."
    )
    ready_timeout: float = Field(
        default=2.0, gt=0, description="Seconds each readiness check may take."
    )
    ready_ollama_cache_seconds: float = Field(
        default=5.0, ge=0, description="How long /readyz reuses Ollama's last answer."
    )
    otel_enabled: bool = Field(
        default=False, description="Send OpenTelemetry traces to the OTLP endpoint."
    )
    otel_exporter_otlp_endpoint: str = Field(
        default="http://localhost:4318",
        description="Base URL of the OTLP/HTTP collector (/v1/traces is appended).",
    )
    otel_service_name: str = Field(default="chatbus-worker")

    @field_validator("ollama_host", "ollama_hosts")
    @classmethod
    def _servers(cls, hosts: str) -> str:
        if hosts:
            try:
                parse_hosts(hosts, default_parallel=1)
            except ValueError as error:
                raise PydanticCustomError("ollama_hosts", str(error)) from None
        return hosts

    @model_validator(mode="after")
    def _prefetch_follows_the_pool(self) -> Self:
        if "prefetch" not in self.model_fields_set:
            self.prefetch = sum(server.parallel for server in self.ollama_servers)
        return self

    @property
    def ollama_servers(self) -> list[ServerSpec]:
        return pool_servers(
            self.ollama_hosts, self.ollama_host, default_parallel=self.ollama_num_parallel
        )

    @property
    def pool(self) -> PoolOptions:
        return PoolOptions(
            failure_threshold=self.ollama_failure_threshold,
            cooldown=self.ollama_cooldown,
            refresh_interval=self.ollama_refresh_interval,
            check_timeout=self.ready_timeout,
        )

    @property
    def timeouts(self) -> Timeouts:
        return Timeouts(
            ollama_connect=self.ollama_connect_timeout,
            first_token=self.first_token_timeout,
            idle=self.idle_timeout,
            total=self.total_timeout,
            publish=self.publish_timeout,
        )

    @property
    def retries(self) -> Retries:
        return Retries(
            budget=self.retry_budget,
            initial_backoff=self.retry_initial_backoff,
            max_backoff=self.retry_max_backoff,
        )

    @property
    def chunking(self) -> Chunking:
        return Chunking(flush_window=self.flush_window, max_chars=self.max_chunk_chars)

    @property
    def queue_bounds(self) -> QueueBounds:
        return QueueBounds(
            max_queued_requests=self.max_queued_requests,
            max_queued_bytes=self.max_queued_bytes,
            dlq_max_length=self.dlq_max_length,
            dlq_max_age=self.dlq_max_age,
        )

    @property
    def limits(self) -> Limits:
        return Limits(
            max_request_bytes=self.max_request_bytes,
            max_prompt_chars=self.max_prompt_chars,
            max_messages=self.max_messages,
            max_num_predict=self.max_num_predict,
            max_model_chars=self.max_model_chars,
            allowed_models=tuple(self.allowed_models),
        )
