"""The README's way to try everything without Docker or Ollama, run as it is written:
the bundled fake Ollama, the worker, then the CLI."""

import asyncio
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

from chatbus.settings import Settings
from chatbus.testing import WorkerProcess
from chatbus.testing.fake_ollama import DEFAULT_TOKENS
from tests.support import REPO_ROOT, start_chatbus


def readme_commands(after: str) -> list[list[str]]:
    text = (REPO_ROOT / "README.md").read_text()
    block = text[text.index(after) :].split("```sh\n", 1)[1].split("```", 1)[0]
    return [shlex.split(line) for line in block.splitlines()]


async def test_the_fake_ollama_worker_and_cli_work_as_the_readme_says(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    fake_command, worker_command, ask_command = readme_commands("No Ollama at hand?")
    assert fake_command[:5] == ["uv", "run", "python", "-m", "chatbus.testing.fake_ollama"]
    assert worker_command == ["uv", "run", "faststream", "run", "main:app"]
    assert ask_command[:3] == ["uv", "run", "chatbus"]
    fake_command[fake_command.index("--port") + 1] = "0"  # a free one
    fake = await asyncio.create_subprocess_exec(
        sys.executable, *fake_command[3:], stdout=asyncio.subprocess.PIPE
    )
    try:
        assert fake.stdout is not None
        async with asyncio.timeout(10):
            url = (await fake.stdout.readline()).decode().strip()
        settings = make_settings(ollama_host=url)
        worker = await WorkerProcess(settings).start()  # `faststream run` of the same app
        try:
            ask = await start_chatbus(settings, tmp_path, *ask_command[3:])
            async with asyncio.timeout(30):
                stdout, stderr = await ask.communicate()
        finally:
            await worker.kill()
    finally:
        fake.terminate()
        await fake.wait()

    assert ask.returncode == 0, stderr.decode()
    assert stdout.decode() == "".join(DEFAULT_TOKENS) + "\n"
