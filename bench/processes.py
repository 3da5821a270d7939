"""The processes a run measures, each on its own: the fake Ollama, the worker, the gateway."""

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Self
from urllib.parse import urlsplit

import httpx

from chatbus.settings import Settings
from chatbus.testing import WorkerProcess, settings_env

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class FakeOllamaProcess:
    """`python -m chatbus.testing.fake_ollama`, so that its CPU is not the requester's. After
    it stops, `stats` holds its counters (the fake prints them when it stops)."""

    def __init__(
        self,
        tokens: int,
        token_delay: float = 0.0,
        *,
        models: Sequence[str] = (),
        load_time: float = 0.0,
        max_loaded_models: int | None = None,
    ) -> None:
        self.tokens = tokens
        self.token_delay = token_delay
        self._options = [f"--model={model}" for model in models] + [f"--load-time={load_time}"]
        if max_loaded_models is not None:
            self._options.append(f"--max-loaded-models={max_loaded_models}")
        self.url = ""
        self.stats: dict[str, int] = {}
        self._process: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> Self:
        self._process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "chatbus.testing.fake_ollama",
            "--port=0",
            f"--tokens={self.tokens}",
            f"--token-delay={self.token_delay}",
            *self._options,
            stdout=asyncio.subprocess.PIPE,
        )
        assert self._process.stdout is not None
        async with asyncio.timeout(10):
            self.url = (await self._process.stdout.readline()).decode().strip()
        if not self.url:
            raise RuntimeError("the fake Ollama did not start")
        return self

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._process is not None
        if self._process.returncode is not None:
            return  # killed
        self._process.send_signal(signal.SIGTERM)
        assert self._process.stdout is not None
        async with asyncio.timeout(10):
            self.stats = json.loads(await self._process.stdout.readline())
            await self._process.wait()

    async def kill(self) -> None:
        """As a crash: SIGKILL, its connections reset, nothing answers on its port."""
        assert self._process is not None
        self._process.kill()
        await self._process.wait()


@contextlib.asynccontextmanager
async def worker_process(settings: Settings) -> AsyncIterator[WorkerProcess]:
    """The worker started as production starts it (`faststream run main:app`)."""
    worker = await WorkerProcess(settings).start()
    try:
        yield worker
    finally:
        await worker.signal(signal.SIGTERM)
        await worker.wait()


@dataclass
class GatewayProcess:
    pid: int
    url: str


_LISTENING = re.compile(r"Uvicorn running on (http://[\w.:]+)")


@contextlib.asynccontextmanager
async def gateway_process(settings: Settings) -> AsyncIterator[GatewayProcess]:
    """`chatbus gateway` in front of the worker's queues, as production starts it, on a port
    it picks; ready once its /readyz says a worker consumes."""
    process = await asyncio.create_subprocess_exec(
        Path(sys.executable).parent / "chatbus",
        "gateway",
        env=os.environ | settings_env(settings) | {"GATEWAY_PORT": "0"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output: list[str] = []
    listening: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    draining = asyncio.create_task(_drain(process, output, listening))
    try:
        async with asyncio.timeout(30):
            url = await listening
            await _until_ready(url)
        yield GatewayProcess(process.pid, url)
    except (TimeoutError, EOFError):
        raise RuntimeError("the gateway did not get ready:\n" + "".join(output)) from None
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        await process.wait()
        await draining


async def _drain(
    process: asyncio.subprocess.Process, output: list[str], listening: asyncio.Future[str]
) -> None:
    """Keeps the gateway's output (its pipe must not fill up) and finds its address in it."""
    assert process.stdout is not None
    async for line in process.stdout:
        output.append(line.decode(errors="replace"))
        if not listening.done() and (found := _LISTENING.search(output[-1])):
            listening.set_result(found.group(1))
    if not listening.done():
        listening.set_exception(EOFError())


async def _until_ready(url: str) -> None:
    """Polls: the gateway learns of the workers from RabbitMQ, and tells only when asked."""
    async with httpx.AsyncClient(base_url=url) as http:
        while True:
            if (await http.get("/readyz")).status_code == 200:
                return
            await asyncio.sleep(0.1)


def broker_pid(rabbitmq_url: str) -> int | None:
    """The process listening on the broker's AMQP port, when it runs on this machine."""
    port = urlsplit(rabbitmq_url).port or 5672
    listing = subprocess.run(
        ["ss", "-Hltnp", f"sport = :{port}"], capture_output=True, text=True, check=False
    ).stdout
    found = re.search(r"pid=(\d+)", listing)
    return int(found[1]) if found else None


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/statm") as statm:
        return int(statm.read().split()[1]) * _PAGE_SIZE / 2**20


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time the process has used."""
    with open(f"/proc/{pid}/stat") as stat:
        # Fields after the command name, which is in parentheses and may hold spaces.
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


class PeakRss:
    """Samples a process's resident memory while the block runs."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self._pid = pid
        self._interval = interval
        self.peak_mb = 0.0
        self._sampler: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        self._sampler = asyncio.create_task(self._sample())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._sampler is not None
        self._sampler.cancel()
        await asyncio.wait([self._sampler])
        self.peak_mb = max(self.peak_mb, rss_mb(self._pid))

    async def _sample(self) -> None:
        while True:
            self.peak_mb = max(self.peak_mb, rss_mb(self._pid))
            await asyncio.sleep(self._interval)
