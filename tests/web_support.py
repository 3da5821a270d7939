"""Helpers for tests of HTTP apps: a real uvicorn server on a free port, a reader of
server-sent events, and the system's headless Chromium."""

import asyncio
import json
import os
import shutil
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from selenium import webdriver
from starlette.types import ASGIApp

from chatbus.client import ChatClient, ChatEvent
from chatbus.contract import ChatRequest
from chatbus.gateway.sessions import Ask, Limits, Sessions, TenantOf, no_tenants, sessions_router
from chatbus.history import HistoryStore


@asynccontextmanager
async def serving(app: ASGIApp) -> AsyncIterator[str]:
    """`app` served by uvicorn on 127.0.0.1 (a port the system picks); yields its base URL."""
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
    )
    task = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(10):
            while not server.started:  # uvicorn sets a flag, no event
                if task.done():
                    task.result()
                    raise AssertionError("the server stopped before it started")
                await asyncio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


async def sse_events(response: httpx.Response) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """The (event, data) pairs of a text/event-stream response, as they arrive."""
    kind, data = "message", ""
    async for line in response.aiter_lines():
        if line.startswith("event:"):
            kind = line.removeprefix("event:").strip()
        elif line.startswith("data:"):
            data += line.removeprefix("data:").strip()
        elif line == "" and data:
            yield kind, json.loads(data)
            kind, data = "message", ""


def asking(client: ChatClient) -> Ask:
    """The bus through the client alone (the gateway's Bus adds its checks)."""

    def ask(request: ChatRequest, tenant: str) -> AsyncGenerator[ChatEvent, None]:
        return client.stream(request.messages, model=request.model, options=request.options)

    return ask


def sessions_app(
    client: ChatClient, store: HistoryStore, limits: Limits, tenant_of: TenantOf = no_tenants
) -> FastAPI:
    """The sessions router in an app of its own, as the gateway mounts it, with a model
    listing in the shape of the gateway's `/api/tags` for the page's picker."""
    app = FastAPI()
    app.include_router(sessions_router(Sessions(store, asking(client), limits), tenant_of))

    @app.get("/api/tags")
    async def tags() -> dict[str, list[dict[str, str]]]:
        return {"models": [{"name": model.name} for model in await client.models()]}

    return app


def chromium(user_data_dir: Path) -> webdriver.Chrome:
    """Debian's headless Chromium through its chromedriver, given by path so that Selenium
    Manager downloads nothing. Skipped when they are missing, a failure under CI=true
    (`.ci/run` installs them)."""
    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if binary is None or driver is None:
        reason = "needs Debian's chromium and chromium-driver (apt-get install them)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in (
        "--headless=new",
        "--no-sandbox",  # tests run as root
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        # Without these Chromium keeps calling Google's hosts, which this network refuses.
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=900,700",
        f"--user-data-dir={user_data_dir}",
    ):
        options.add_argument(flag)
    return webdriver.Chrome(
        service=webdriver.ChromeService(executable_path=driver), options=options
    )
