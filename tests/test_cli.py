"""The `chatbus` command, run as a real process against the real worker."""

import asyncio
import contextlib
import json
import os
import re
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aio_pika.abc import AbstractRobustConnection

from chatbus.settings import Settings
from chatbus.testing import FakeOllama, settings_env
from chatbus.testing.fake_ollama import DEFAULT_TOKENS
from tests.support import free_port, how_it_ended, model, observing

CHATBUS = str(Path(sys.executable).with_name("chatbus"))
ANSWER = "".join(DEFAULT_TOKENS)
USAGE = re.compile(
    r"^llama3\.2 · \d+ prompt \+ 11 completion tokens · first token after \d+\.\d\ds"
    r" · \d+\.\d tokens/s$"
)


class Cli:
    """One run of `chatbus`, with the worker's settings in its environment."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    @classmethod
    async def start(cls, settings: Settings, cwd: Path, *args: str, **env: str) -> "Cli":
        process = await asyncio.create_subprocess_exec(
            CHATBUS,
            *args,
            cwd=cwd,  # away from any .env of the repository
            env=os.environ | settings_env(settings) | env,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            # Ctrl-C as in a terminal, even when the tests run where SIGINT is ignored.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        return cls(process)

    async def line(self, stream: asyncio.StreamReader | None) -> str:
        assert stream is not None
        async with asyncio.timeout(10):
            return (await stream.readline()).decode()

    @contextlib.asynccontextmanager
    async def interrupted_mid_answer(
        self, amqp: AbstractRobustConnection, worker: Settings
    ) -> AsyncIterator[None]:
        """Ctrl-C once the answer (in --json) has started; the worker must end it cancelled."""
        first = json.loads(await self.line(self.process.stdout))
        async with observing(amqp, worker.replies_exchange, first["correlation_id"]) as replies:
            self.process.send_signal(signal.SIGINT)
            yield
            assert (await how_it_ended(replies))["done_reason"] == "cancelled"

    async def write(self, text: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(text.encode())
        await self.process.stdin.drain()

    async def finish(self, stdin: str = "") -> tuple[int, str, str]:
        async with asyncio.timeout(30):
            out, err = await self.process.communicate(stdin.encode())
        assert self.process.returncode is not None
        return self.process.returncode, out.decode(), err.decode()


@pytest.fixture
def run(worker: Settings, tmp_path: Path) -> Callable[..., Any]:
    async def run(*args: str, stdin: str = "", **env: str) -> tuple[int, str, str]:
        cli = await Cli.start(worker, tmp_path, *args, **env)
        return await cli.finish(stdin)

    return run


async def test_ask_streams_the_answer_then_a_usage_line(run: Callable[..., Any]) -> None:
    code, out, err = await run("ask", "Why", "is", "the", "sky", "blue?")

    assert code == 0, err
    assert out == ANSWER + "\n"
    assert USAGE.match(err.strip()), err


async def test_ask_sends_the_system_prompt_options_and_a_question_from_stdin(
    run: Callable[..., Any], fake_ollama: FakeOllama
) -> None:
    question = f"Why? {uuid.uuid4().hex}"
    code, _, err = await run(
        "ask",
        "--system",
        "Be brief.",
        "--option",
        "temperature=0.5",
        "--option",
        'stop=["\\n"]',
        "--think",
        stdin=question + "\n",
    )

    assert code == 0, err
    sent = next(r for r in fake_ollama.requests if r["messages"][-1]["content"] == question)
    assert sent["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": question},
    ]
    assert sent["options"]["temperature"] == 0.5
    assert sent["options"]["stop"] == ["\n"]
    assert sent["think"] is True


async def test_ask_json_prints_every_event_as_a_line(run: Callable[..., Any]) -> None:
    code, out, err = await run("ask", "--json", "Why is the sky blue?")

    assert code == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    assert [e["type"] for e in events] == ["chunk"] * len(DEFAULT_TOKENS) + ["done"]
    assert "".join(e["content"] for e in events[:-1]) == ANSWER
    assert events[-1]["message"]["content"] == ANSWER


async def test_models_lists_the_workers_models(run: Callable[..., Any]) -> None:
    code, out, err = await run("models")

    assert code == 0, err
    header, *rows = out.splitlines()
    assert header.split() == ["NAME", "PARAMETERS", "QUANTIZATION", "SIZE", "MODIFIED"]
    assert any(row.split()[0] == "llama3.2:latest" for row in rows)

    code, out, err = await run("models", "--json")
    assert code == 0, err
    assert "llama3.2:latest" in [m["name"] for m in json.loads(out)]


async def test_failures_exit_non_zero_with_a_clear_message(
    run: Callable[..., Any], fake_ollama: FakeOllama
) -> None:
    code, out, err = await run("ask", "--model", "no-such-model", "hi")
    assert (code, out) == (1, "")
    assert err.startswith('chatbus: model_not_found: model "no-such-model" not found')

    slow = model(fake_ollama, first_token_delay=2.0)
    code, _, err = await run("ask", "--model", slow, "--timeout", "0.3", "hi")
    assert code == 1
    assert err.startswith("chatbus: deadline_exceeded:")

    url = f"amqp://guest:secret@127.0.0.1:{free_port()}/"
    code, _, err = await run("ask", "hi", RABBITMQ_URL=url)
    assert code == 1
    assert "chatbus: cannot connect to RabbitMQ at amqp://guest:******@127.0.0.1" in err
    assert "secret" not in err

    code, _, err = await run("ask", stdin="")
    assert (code, err) == (1, "chatbus: nothing to ask: give a question or pipe one in\n")

    code, _, err = await run("ask", "--option", "temperature", "hi")
    assert code == 2
    assert "expected KEY=VALUE" in err


async def test_ctrl_c_cancels_the_generation(
    worker: Settings,
    tmp_path: Path,
    fake_ollama: FakeOllama,
    amqp: AbstractRobustConnection,
) -> None:
    slow = model(fake_ollama, tokens=["x"] * 200, token_delay=0.05)
    cli = await Cli.start(worker, tmp_path, "ask", "--json", "--model", slow, "hi")
    async with cli.interrupted_mid_answer(amqp, worker):
        code, _, err = await cli.finish()

    assert code == 130
    assert err.strip() == "chatbus: cancelled"


async def test_chat_keeps_the_history_and_obeys_commands(
    run: Callable[..., Any], fake_ollama: FakeOllama
) -> None:
    first, second, third = (f"{word} {uuid.uuid4().hex}" for word in ("one", "two", "three"))
    # Listed by the fake, yet not found: the failed turn reaches it, so its history shows.
    missing = model(fake_ollama, status=404)
    code, out, err = await run(
        "chat",
        "--system",
        "Be brief.",
        stdin=f"{first}\n/model {missing}\n{second}\n/model llama3.2\n/reset\n{third}\n",
    )

    assert code == 0, err
    assert out == f"{ANSWER}\n{ANSWER}\n"
    assert f'chatbus: model_not_found: model "{missing}"' in err
    assert "(history cleared)" in err
    contents = [[m["content"] for m in r["messages"]] for r in fake_ollama.requests]
    assert ["Be brief.", first] in contents
    assert ["Be brief.", first, ANSWER, second] in contents  # the failed turn left no trace
    assert ["Be brief.", third] in contents


async def test_ctrl_c_in_chat_cancels_the_answer_and_the_chat_goes_on(
    worker: Settings,
    tmp_path: Path,
    fake_ollama: FakeOllama,
    amqp: AbstractRobustConnection,
) -> None:
    slow = model(fake_ollama, tokens=["x"] * 200, token_delay=0.05)
    cli = await Cli.start(worker, tmp_path, "chat", "--json", "--model", slow)
    await cli.write("hi\n")
    async with cli.interrupted_mid_answer(amqp, worker):
        while (await cli.line(cli.process.stderr)).strip() != "(cancelled)":
            pass
    code, out, err = await cli.finish("/model llama3.2\nhi again\n")

    assert code == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    assert events[-1]["type"] == "done"
    assert events[-1]["message"]["content"] == ANSWER
    # The cancelled turn is not part of the history.
    assert fake_ollama.requests[-1]["messages"] == [{"role": "user", "content": "hi again"}]
