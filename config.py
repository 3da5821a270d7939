"""Service settings, from the environment and an optional `.env` file."""

import os
import socket

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

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
