"""The gateway served by uvicorn in this process, on a free port, in front of a worker's
queues, for the real `ollama` and `openai` clients to talk to."""

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import ollama
import openai
import uvicorn
from fastapi import FastAPI

from chatbus.gateway import GatewaySettings, create_gateway
from chatbus.settings import BusSettings, Settings
from tests.support import free_port


def gateway_settings(worker: Settings, **overrides: Any) -> GatewaySettings:
    """A gateway on the worker's broker and queues."""
    values: dict[str, Any] = {name: getattr(worker, name) for name in BusSettings.model_fields}
    values |= {"gateway_port": free_port(), "gateway_timeout": 30.0}
    return GatewaySettings(**(values | overrides))


@dataclass
class Gateway:
    settings: GatewaySettings
    app: FastAPI

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.settings.gateway_port}"

    def ollama(self, api_key: str | None = None) -> ollama.AsyncClient:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        return ollama.AsyncClient(host=self.url, headers=headers)

    def openai(self, api_key: str = "unused") -> openai.AsyncOpenAI:
        # No retries: a test sees each status the gateway answers.
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0)


@asynccontextmanager
async def running_gateway(worker: Settings, **overrides: Any) -> AsyncIterator[Gateway]:
    settings = gateway_settings(worker, **overrides)
    app = create_gateway(settings)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host="127.0.0.1",
            port=settings.gateway_port,
            log_config=None,
            access_log=False,
            lifespan="on",
        )
    )
    serving = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(10):
            while not server.started:
                if serving.done():
                    await serving  # raises what stopped it
                    raise AssertionError("the gateway stopped before it started")
                await asyncio.sleep(0.01)
        yield Gateway(settings, app)
    finally:
        server.should_exit = True
        await serving
