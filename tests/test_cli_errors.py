"""Failures a person can cause, through the real commands: each ends at once with one line
on stderr that says what is wrong, never a traceback or a retry loop."""

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from yarl import URL

from tests.support import CHATBUS, REPO_ROOT, free_port

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


def test_a_refused_port_is_one_line_without_the_librarys_own(tmp_path: Path) -> None:
    url = f"amqp://guest:secret@127.0.0.1:{free_port()}/"

    code, stderr = run([CHATBUS, "ask", "hi"], tmp_path, RABBITMQ_URL=url)

    assert code == 1
    line = one_line(stderr)
    assert line.startswith("chatbus: cannot connect to RabbitMQ at amqp://guest:******@127.0.0.1")


def test_a_virtual_host_that_does_not_exist_is_named_in_one_line(
    rabbitmq_url: str, tmp_path: Path
) -> None:
    vhost = f"no-such-vhost-{uuid.uuid4().hex[:8]}"
    url = str(URL(rabbitmq_url).with_path(f"/{vhost}"))

    code, stderr = run([CHATBUS, "ask", "hi"], tmp_path, RABBITMQ_URL=url)

    assert code == 1
    line = one_line(stderr)
    assert line.startswith("chatbus: RabbitMQ at ")
    assert f"refused virtual host '{vhost}': it does not exist, or user " in line


@pytest.mark.parametrize("locale", ["C.UTF-8", "C"])
def test_input_that_is_not_utf8_is_refused_in_one_line(
    rabbitmq_url: str, tmp_path: Path, locale: str
) -> None:
    code, stderr = run(
        [CHATBUS, "ask"], tmp_path, stdin=b"caf\xe9", RABBITMQ_URL=rabbitmq_url, LC_ALL=locale
    )

    assert code == 1
    assert one_line(stderr).startswith(
        "chatbus: invalid_request: the request holds text that is not valid UTF-8"
    )


def test_a_schema_violation_from_the_command_line_is_one_line(
    rabbitmq_url: str, tmp_path: Path
) -> None:
    code, stderr = run([CHATBUS, "ask", "--model", "", "hi"], tmp_path, RABBITMQ_URL=rabbitmq_url)

    assert code == 1
    assert (
        one_line(stderr)
        == "chatbus: invalid_request: model: String should have at least 1 character"
    )
