"""What a fake Ollama server keeps loaded: Ollama's scheduler in miniature.

Ollama answers a chat only with its model loaded. Asking for a model that is not loaded
loads it (seconds to minutes on real hardware, ``load_time`` here); one load runs at a
time; with ``OLLAMA_MAX_LOADED_MODELS`` models loaded, the least recently used one is
unloaded first, as soon as the requests using it have ended, and requests for it arriving
meanwhile wait for it to be loaded again. A model stays loaded for ``keep_alive`` (five
minutes) after its last request, or is unloaded at once after a request with
``keep_alive: 0``. Requests waiting for the same load share it.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable

KEEP_ALIVE_SECONDS = 300.0


class Runner:
    """One model loaded, or being loaded, and the requests holding it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.users = 0
        self.loaded = False
        self.expires_at = 0.0
        self.idle = asyncio.Event()
        self.idle.set()
        self.loading: asyncio.Task[None] | None = None

    def hold(self) -> None:
        self.users += 1
        self.idle.clear()
        self.expires_at = time.time() + KEEP_ALIVE_SECONDS

    def drop(self) -> None:
        self.users -= 1
        self.expires_at = time.time() + KEEP_ALIVE_SECONDS
        if self.users == 0:
            self.idle.set()


class LoadedModels:
    """The models of one server. ``max_loaded`` None: no bound."""

    def __init__(
        self, load_time: float, max_loaded: int | None, on_change: Callable[[], None]
    ) -> None:
        self.load_time = load_time
        self.max_loaded = max_loaded
        self.loads = 0
        self.unloads = 0
        self._on_change = on_change
        # Least recently used first.
        self._runners: OrderedDict[str, Runner] = OrderedDict()
        # Chosen to make room, still answering the requests that hold them.
        self._unloading: list[Runner] = []
        self._one_load_at_a_time = asyncio.Lock()

    def loaded(self) -> list[Runner]:
        """The loaded models, the most recently used first."""
        self._expire()
        current = [runner for runner in reversed(self._runners.values()) if runner.loaded]
        return current + self._unloading

    async def acquire(self, name: str) -> Runner:
        """The model's runner, loaded (after a load when it was not), held until `release`."""
        self._expire()
        runner = self._runners.get(name)
        if runner is None:
            runner = self._runners[name] = Runner(name)
            runner.loading = asyncio.create_task(self._load(runner))
        self._runners.move_to_end(name)
        runner.hold()
        if runner.loading is not None:
            try:
                # Shielded: a request that gives up does not stop the load, as in Ollama.
                await asyncio.shield(runner.loading)
            except BaseException:
                runner.drop()
                raise
        return runner

    def release(self, runner: Runner, *, unload: bool) -> None:
        runner.drop()
        if unload and runner.users == 0:
            self._unload(runner)

    def unload(self, name: str) -> None:
        """A `keep_alive: 0` request without messages: unload the model once it is idle."""
        runner = self._runners.get(name)
        if runner is not None and runner.loaded and runner.users == 0:
            self._unload(runner)

    async def close(self) -> None:
        loads = [r.loading for r in self._runners.values() if r.loading is not None]
        for task in loads:
            task.cancel()
        await asyncio.gather(*loads, return_exceptions=True)

    async def _load(self, runner: Runner) -> None:
        async with self._one_load_at_a_time:
            while self.max_loaded is not None and self._loaded_count() >= self.max_loaded:
                victim = self._least_recently_used()
                # Gone from the table at once: requests for it now wait for a new load.
                del self._runners[victim.name]
                self._unloading.append(victim)
                try:
                    await victim.idle.wait()
                finally:
                    self._unloading.remove(victim)
                self.unloads += 1
                self._on_change()
            if self.load_time > 0:
                await asyncio.sleep(self.load_time)
            runner.loaded = True
            runner.loading = None
            self.loads += 1
            self._on_change()

    def _loaded_count(self) -> int:
        return sum(runner.loaded for runner in self._runners.values())

    def _least_recently_used(self) -> Runner:
        loaded = [runner for runner in self._runners.values() if runner.loaded]
        return next((runner for runner in loaded if runner.users == 0), loaded[0])

    def _unload(self, runner: Runner) -> None:
        if self._runners.get(runner.name) is runner:
            del self._runners[runner.name]
            self.unloads += 1
            self._on_change()

    def _expire(self) -> None:
        now = time.time()
        for runner in list(self._runners.values()):
            if runner.loaded and runner.users == 0 and runner.expires_at < now:
                self._unload(runner)
