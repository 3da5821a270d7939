"""The worker run for tests and benchmarks: in this process, or as a real process started
the way production starts it."""

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Self

from chatbus.service import WorkerApp, create_app
from chatbus.settings import Settings

__all__ = ["WorkerProcess", "running_worker", "settings_env"]


@asynccontextmanager
async def running_worker(settings: Settings) -> AsyncIterator[WorkerApp]:
    """The worker, started in this process, and stopped on leaving."""
    app = create_app(settings)
    await app.start()
    try:
        yield app
    finally:
        await app.stop()


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that makes `Settings()` in another process equal to `settings`."""
    env = {}
    for name, value in settings.model_dump(mode="json").items():
        env[name.upper()] = value if isinstance(value, str) else json.dumps(value)
    return env


class WorkerProcess:
    """The worker as a real process (`faststream run chatbus.service:app`), for tests that
    kill it. Its output is kept for the failure report."""

    STARTED = "FastStream app started successfully"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.output: list[str] = []
        self._process: asyncio.subprocess.Process | None = None
        self._drain: asyncio.Task[None] | None = None

    async def start(self, timeout: float = 30.0) -> Self:
        self._process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "faststream",
            "run",
            "chatbus.service:app",
            env=os.environ | settings_env(self.settings),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        started = asyncio.get_running_loop().create_future()
        self._drain = asyncio.create_task(self._read_output(started))
        try:
            async with asyncio.timeout(timeout):
                await started
        except TimeoutError:
            await self.kill()
            raise AssertionError("worker did not start:\n" + "".join(self.output)) from None
        return self

    async def _read_output(self, started: asyncio.Future[None]) -> None:
        assert self._process is not None
        assert self._process.stdout is not None
        async for line in self._process.stdout:
            self.output.append(line.decode(errors="replace"))
            if self.STARTED in self.output[-1] and not started.done():
                started.set_result(None)
        if not started.done():
            started.set_exception(AssertionError("worker exited:\n" + "".join(self.output)))

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    async def signal(self, signum: int) -> None:
        assert self._process is not None
        self._process.send_signal(signum)

    async def wait(self, timeout: float = 30.0) -> int:
        assert self._process is not None
        assert self._drain is not None
        async with asyncio.timeout(timeout):
            code = await self._process.wait()
            await self._drain
        return code

    async def kill(self) -> None:
        if self._process is not None and self._process.returncode is None:
            self._process.kill()
            await self.wait()
