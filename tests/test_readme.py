"""The README's examples are the tested code."""

import asyncio
import json
import re
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from chatbus.settings import Settings
from chatbus.testing import WorkerProcess
from chatbus.testing.fake_ollama import DEFAULT_TOKENS
from tests.support import DIRECT_REPLY_TO, REPO_ROOT, node_with

README = Path(__file__).parent.parent / "README.md"


def readme_python_block(after: str, language: str = "python") -> str:
    text = README.read_text()
    start = text.index(after)
    match = re.search(rf"```{language}\n(.*?)```", text[start:], re.DOTALL)
    assert match, f"no {language} block after {after!r}"
    return match.group(1)


def run_as_the_readme_says(code: str, settings: Settings) -> dict[str, Any]:
    """Define what a README example defines, its `ChatClient` pointed at this run's broker
    and names."""
    default = 'ChatClient("amqp://guest:guest@localhost:5672/"'
    assert default in code
    code = code.replace(default, f"ChatClient({settings.rabbitmq_url!r}, names=names")
    namespace: dict[str, Any] = {"names": settings.names}
    exec(compile(code, str(README), "exec"), namespace)
    return namespace


async def test_raw_aio_pika_example_streams_the_answer(worker: Settings) -> None:
    code = readme_python_block("The same with nothing but")
    # Run it against this run's own names and broker, and from this event loop.
    code = (
        code.replace('"chat.requests"', repr(worker.requests_queue))
        .replace('"chat.replies"', repr(worker.replies_exchange))
        .replace('"amqp://guest:guest@localhost:5672/"', repr(worker.rabbitmq_url))
    )
    body, last_line = code.rstrip().rsplit("\n", 1)
    assert last_line.startswith("print(asyncio.run(ask(")
    namespace: dict[str, Any] = {}
    exec(compile(body, str(README), "exec"), namespace)

    answer = await namespace["ask"]("Why is the sky blue?")

    assert answer.startswith("The sky")
    assert DIRECT_REPLY_TO not in answer


async def test_client_library_example_runs(
    worker: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    example = run_as_the_readme_says(readme_python_block("## The client library"), worker)

    await example["main"]()

    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == f"{''.join(DEFAULT_TOKENS)} {len(DEFAULT_TOKENS)} stop"
    assert "llama3.2:latest" in printed[1]


async def test_testing_kit_example_runs_against_the_fake_and_the_worker(
    make_settings: Callable[..., Settings],
) -> None:
    section = "## Testing your service against it"
    argv = shlex.split(readme_python_block(section, "sh"))
    assert argv[:3] == ["python", "-m", "chatbus.testing.fake_ollama"]
    argv[0] = sys.executable
    argv[argv.index("--port") + 1] = "0"  # a free one
    fake = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE)
    try:
        assert fake.stdout is not None
        async with asyncio.timeout(10):
            url = (await fake.stdout.readline()).decode().strip()
        settings = make_settings(ollama_host=url)
        worker = await WorkerProcess(settings).start()  # `faststream run main:app`
        try:
            example = run_as_the_readme_says(readme_python_block(section), settings)
            await example["test_answers_and_failures"]()
        finally:
            await worker.kill()
    finally:
        fake.terminate()
        await fake.wait()


async def test_node_amqplib_example_streams_the_answer(worker: Settings) -> None:
    node = node_with("amqplib")
    code = (
        readme_python_block("And with Node's", language="js")
        .replace('"chat.requests"', json.dumps(worker.requests_queue))
        .replace('"chat.replies"', json.dumps(worker.replies_exchange))
        .replace('"amqp://guest:guest@localhost:5672/"', json.dumps(worker.rabbitmq_url))
    )
    process = await asyncio.create_subprocess_exec(
        node,
        "--input-type=commonjs",
        "-e",
        code,
        cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(30):
        stdout, stderr = await process.communicate()

    assert process.returncode == 0, stderr.decode()
    streamed, answer = stdout.decode().rstrip("\n").split("\n")
    assert streamed == answer == "".join(DEFAULT_TOKENS)
