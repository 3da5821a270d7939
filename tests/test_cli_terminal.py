"""The CLI as a person sees it in a terminal: chat's banner and leaving it with Ctrl-D, and
what `ask` says while the first token is long in coming."""

import asyncio
import os
import pty
from collections.abc import Callable
from pathlib import Path

from chatbus.settings import Settings
from chatbus.testing import FakeOllama, running_worker
from chatbus.testing.fake_ollama import DEFAULT_TOKENS
from tests.support import model, start_chatbus


async def read_terminal(master: int, until: bytes, seen: bytearray) -> None:
    """Reads what the program wrote to its terminal into `seen`, until `until` is there
    (or the program closed its side)."""
    loop = asyncio.get_running_loop()
    readable = asyncio.Event()
    loop.add_reader(master, readable.set)
    try:
        async with asyncio.timeout(15):
            while until not in seen:
                await readable.wait()
                readable.clear()
                try:
                    chunk = os.read(master, 1024)
                except BlockingIOError:
                    continue
                except OSError:  # EIO: the program closed the terminal
                    return
                if not chunk:
                    return
                seen += chunk
    finally:
        loop.remove_reader(master)


async def test_chat_starts_with_a_banner_and_ctrl_d_leaves_a_clean_line(
    worker: Settings, tmp_path: Path
) -> None:
    master, terminal = pty.openpty()
    os.set_blocking(master, False)
    chat = await start_chatbus(
        worker,
        tmp_path,
        *("chat", "--model", "llama3.2"),
        stdin=terminal,
        stdout=terminal,
        stderr=terminal,
    )
    os.close(terminal)
    seen = bytearray()
    try:
        await read_terminal(master, b">>> ", seen)
        os.write(master, b"\x04")  # Ctrl-D
        async with asyncio.timeout(15):
            await chat.wait()
        await read_terminal(master, b">>> \r\n", seen)
    finally:
        os.close(master)

    assert chat.returncode == 0
    assert bytes(seen).decode() == (
        "chatbus chat · model: llama3.2 · /model NAME, /reset, /exit or Ctrl-D to leave"
        " · Ctrl-C stops an answer\r\n>>> \r\n"
    )


async def test_ask_says_it_is_still_waiting_when_the_first_token_is_slow(
    make_settings: Callable[..., Settings], fake_ollama: FakeOllama, tmp_path: Path
) -> None:
    settings = make_settings(first_token_timeout=30)
    cold = model(fake_ollama, first_token_delay=7)
    async with running_worker(settings):
        ask = await start_chatbus(settings, tmp_path, "ask", "--model", cold, "hi")
        assert ask.stderr is not None
        async with asyncio.timeout(30):
            # The notice comes 5 s after the request, the usage line after the answer, 7 s.
            notice = (await ask.stderr.readline()).decode()
        async with asyncio.timeout(30):
            stdout, stderr = await ask.communicate()

    assert notice.startswith("(no answer yet after 5 s: no worker may have taken the request")
    assert notice.endswith("Ctrl-C cancels)\n")
    assert ask.returncode == 0
    assert stdout.decode() == "".join(DEFAULT_TOKENS) + "\n"
    assert "first token after 7." in stderr.decode()
