"""Service settings, from the environment and an optional `.env` file."""

import os
import socket

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from chatbus.observability import LogFormat
from chatbus.options import WorkerOptions


class Settings(WorkerOptions, BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore")

    rabbitmq_url: str = Field(default="amqp://guest:guest@localhost:5672/")
    ollama_host: str = Field(default="http://localhost:11434")
    log_level: str = Field(default="INFO")
    reconnect_interval: float = Field(
        default=5.0, gt=0, description="Seconds between attempts to reconnect to RabbitMQ."
    )
    connection_name: str = Field(
        default_factory=lambda: f"chatbus-worker@{socket.gethostname()}:{os.getpid()}",
        description="The AMQP connection name this worker shows in RabbitMQ.",
    )

    http_host: str = Field(
        default="127.0.0.1",
        description="Address of the HTTP side channel (health, metrics, AsyncAPI page); "
        "0.0.0.0 in the container.",
    )
    http_port: int = Field(
        default=8000, ge=0, le=65535, description="Its port; 0 picks a free one."
    )
    log_format: LogFormat = Field(
        default="json", description="json: one object per line; text: for people."
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
