"""Failures a person can cause, through the real commands: each ends at once with one line
on stderr that says what is wrong, never a traceback or a retry loop."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import REPO_ROOT

CHATBUS = str(Path(sys.executable).with_name("chatbus"))
BAD_URLS = ["localhost:5672", "notaurl", "amqp:/localhost", "amqp://guest:secret@host:port/"]
AT_ONCE = 20
"""Seconds: the commands used to retry forever; starting Python is all they may take."""


def run(command: list[str], cwd: Path, stdin: bytes = b"", **env: str) -> tuple[int, str]:
    """Exit status and stderr of `command`, run in `cwd` away from any .env."""
    clean = {k: v for k, v in os.environ.items() if k != "RABBITMQ_URL"}
    finished = subprocess.run(
        command,
        cwd=cwd,
        env=clean | env,
        input=stdin,
        capture_output=True,
        timeout=AT_ONCE,
        check=False,
    )
    return finished.returncode, finished.stderr.decode(errors="replace")


def one_line(stderr: str) -> str:
    assert stderr.endswith("\n"), stderr
    assert stderr.count("\n") == 1, stderr
    assert "Traceback" not in stderr
    return stderr.rstrip("\n")


@pytest.mark.parametrize("url", BAD_URLS)
def test_the_cli_refuses_a_malformed_rabbitmq_url_in_one_line(url: str, tmp_path: Path) -> None:
    code, stderr = run([CHATBUS, "ask", "hi"], tmp_path, RABBITMQ_URL=url)

    assert code == 1
    line = one_line(stderr)
    assert line.startswith("chatbus: RABBITMQ_URL: ")
    assert "secret" not in line


@pytest.mark.parametrize(
    ("command", "cwd"),
    [
        ([sys.executable, "-m", "faststream", "run", "chatbus.service:app"], None),
        ([sys.executable, "-m", "faststream", "run", "main:app"], REPO_ROOT),
        ([CHATBUS, "worker"], None),
    ],
    ids=["faststream run chatbus.service:app", "faststream run main:app", "chatbus worker"],
)
def test_the_worker_refuses_a_malformed_rabbitmq_url_in_one_line_with_status_2(
    command: list[str], cwd: Path | None, tmp_path: Path
) -> None:
    code, stderr = run(command, cwd or tmp_path, RABBITMQ_URL="localhost:5672")

    assert code == 2, stderr
    line = one_line(stderr)
    assert line == (
        "chatbus worker: RABBITMQ_URL: must start with amqp:// or amqps://, "
        "like amqp://guest:guest@localhost:5672/"
    )
