"""The worker's tunables. The service shell reads them from the environment."""

from pydantic import BaseModel, Field

from chatbus import contract


class WorkerOptions(BaseModel):
    default_model: str = Field(
        default="llama3.2", description="Model used when a request names none."
    )

    requests_queue: str = contract.REQUESTS_QUEUE
    replies_exchange: str = contract.REPLIES_EXCHANGE
    cancel_exchange: str = contract.CANCEL_EXCHANGE
    dead_letter_queue: str = contract.DEAD_LETTER_QUEUE
    models_queue: str = contract.MODELS_QUEUE

    prefetch: int = Field(
        default=4, ge=1, description="Concurrent generations per worker (channel prefetch)."
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

    publish_timeout: float = Field(
        default=10.0, gt=0, description="Seconds to wait for the broker to confirm a reply."
    )

    ollama_connect_timeout: float = Field(default=5.0, gt=0)
    first_token_timeout: float = Field(
        default=120.0, gt=0, description="Seconds to the first token; covers a cold model load."
    )
    idle_timeout: float = Field(default=60.0, gt=0, description="Seconds allowed between tokens.")
    total_timeout: float = Field(
        default=600.0,
        gt=0,
        description="Seconds for a whole generation; keep below RabbitMQ's consumer_timeout.",
    )
    retry_budget: float = Field(
        default=20.0, ge=0, description="Seconds spent retrying an unavailable Ollama."
    )
    retry_initial_backoff: float = Field(default=0.5, gt=0)
    retry_max_backoff: float = Field(default=8.0, gt=0)

    flush_window: float = Field(
        default=0.05,
        ge=0,
        description="Seconds tokens are gathered into one chunk after the first; 0 sends one "
        "chunk per Ollama token.",
    )
    max_chunk_chars: int = Field(default=2048, ge=1, description="A chunk is sent once this long.")

    max_request_bytes: int = Field(default=1_048_576, ge=1)
    max_prompt_chars: int = Field(default=200_000, ge=1)
    max_messages: int = Field(default=500, ge=1)
    max_num_predict: int = Field(
        default=4096, ge=1, description="Cap on options.num_predict; also applied when unset."
    )
    allowed_models: list[str] = Field(
        default_factory=list, description="If not empty, the only models requests may name."
    )
    cancel_memory_seconds: float = Field(
        default=600.0, gt=0, description="How long a cancel for a request not yet seen is kept."
    )
    log_content: bool = Field(
        default=False, description="Log prompt and reply text (debugging only)."
    )
