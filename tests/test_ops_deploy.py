"""What is deployed: the image, the compose file, and the AsyncAPI document of the contract.

There is no Docker engine on the machines that run these tests: the compose files are
checked against the compose specification's schema, the Dockerfile by hadolint, the
AsyncAPI document by the official AsyncAPI parser (from npm, installed by `.ci/run`).
"""

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from chatbus.contract import (
    CancelRequest,
    ChatRequest,
    ErrorCode,
    reply_adapter,
)
from chatbus.settings import Settings
from tests.support import REPO_ROOT, healthcheck_command, node_with

VENV_BIN = Path(sys.executable).parent
ASYNCAPI = REPO_ROOT / "docs" / "asyncapi.yaml"
COMPOSE_FILES = ["docker-compose.yml", "docker-compose.gpu.yml", "docker-compose.two-gpus.yml"]


def run(*command: str | Path, **options: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(c) for c in command], capture_output=True, text=True, check=False, **options
    )


def compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
    return document


def test_compose_files_follow_the_compose_specification() -> None:
    result = run(
        VENV_BIN / "check-jsonschema",
        "--builtin-schema",
        "vendor.compose-spec",
        *COMPOSE_FILES,
        cwd=REPO_ROOT,
    )

    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_starts_the_worker_after_its_dependencies_and_lets_it_scale() -> None:
    services = compose()["services"]
    worker = services["worker"]

    assert worker["depends_on"] == {
        "rabbitmq": {"condition": "service_healthy"},
        "ollama": {"condition": "service_healthy"},
        "ollama-pull": {"condition": "service_completed_successfully"},
    }
    assert "healthcheck" in services["rabbitmq"]
    assert "healthcheck" in services["ollama"]
    assert services["rabbitmq"]["image"].startswith("rabbitmq:4.")
    assert services["rabbitmq"]["image"].endswith("-management")
    assert services["ollama-pull"]["command"][0] == "pull"
    # --scale needs no fixed name and no fixed host port.
    assert "container_name" not in worker
    assert all(port.endswith("::8000") for port in worker["ports"])
    # Every setting it passes is one the worker reads.
    assert set(worker["environment"]) <= {name.upper() for name in Settings.model_fields}
    # In-flight generations get their grace period before docker kills the worker.
    grace = int(worker["stop_grace_period"].removesuffix("s"))
    assert grace > Settings.model_fields["graceful_timeout"].default
    volumes = {v.split(":")[0] for s in services.values() for v in s.get("volumes", [])}
    assert volumes == set(compose()["volumes"])


def test_the_gpu_override_reserves_gpus_for_ollama() -> None:
    override = yaml.safe_load((REPO_ROOT / "docker-compose.gpu.yml").read_text())
    devices = override["services"]["ollama"]["deploy"]["resources"]["reservations"]["devices"]

    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]


def test_the_two_gpus_override_points_the_worker_at_both_ollamas() -> None:
    base = compose()["services"]
    override = yaml.safe_load((REPO_ROOT / "docker-compose.two-gpus.yml").read_text())
    services = override["services"]
    worker = services["worker"]

    hosts = Settings(ollama_hosts=worker["environment"]["OLLAMA_HOSTS"]).ollama_servers
    assert [server.id for server in hosts] == ["ollama:11434", "ollama-2:11434"]
    # The worker sends each server as many generations as the server runs at once.
    parallel = {
        services[name]["environment"]["OLLAMA_NUM_PARALLEL"] for name in ("ollama", "ollama-2")
    }
    assert parallel == {worker["environment"]["OLLAMA_NUM_PARALLEL"]}
    assert set(worker["environment"]) <= {name.upper() for name in Settings.model_fields}
    assert worker["depends_on"] == {"ollama-2": {"condition": "service_healthy"}}
    # The second server is the first one again, on its own GPU, with the same models.
    second = services["ollama-2"]
    assert (second["image"], second["volumes"]) == (
        base["ollama"]["image"],
        base["ollama"]["volumes"],
    )
    assert second["healthcheck"] == base["ollama"]["healthcheck"]
    gpus = [
        services[name]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"]
        for name in ("ollama", "ollama-2")
    ]
    assert gpus == [["0"], ["1"]]


def test_dockerfile_passes_hadolint() -> None:
    result = run(VENV_BIN / "hadolint", "Dockerfile", cwd=REPO_ROOT)

    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_builds_from_the_lock_and_runs_the_worker_unprivileged() -> None:
    lines = (REPO_ROOT / "Dockerfile").read_text().splitlines()
    instructions = [line.split(maxsplit=1) for line in lines if line and line[0].isupper()]
    bases = [rest for word, rest in instructions if word == "FROM"]

    assert len(bases) == 2  # a build stage, and a final stage without uv or compilers
    assert all(":" in base and "latest" not in base for base in bases)
    assert "uv sync --frozen --no-dev" in "\n".join(lines)
    user = next(rest for word, rest in reversed(instructions) if word == "USER")
    assert not user.startswith(("0", "root"))
    assert json.loads(next(rest for word, rest in instructions if word == "CMD")) == [
        "faststream",
        "run",
        "chatbus.service:app",
    ]
    assert "/healthz" in healthcheck_command()[-1]


def fresh_asyncapi(tmp_path: Path) -> str:
    """What `faststream docs gen` makes of the code now, with the contract's default names
    whatever the environment or a `.env` file says."""
    environment = {
        name: value
        for name, value in os.environ.items()
        if name.lower() not in Settings.model_fields
    }
    out = tmp_path / "asyncapi.yaml"
    result = run(
        VENV_BIN / "faststream",
        "docs",
        "gen",
        "main:app",
        "--yaml",
        "--out",
        out,
        "--app-dir",
        REPO_ROOT,
        cwd=tmp_path,
        env=environment,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return out.read_text()


def test_the_committed_asyncapi_document_is_what_the_code_generates(tmp_path: Path) -> None:
    assert ASYNCAPI.read_text() == fresh_asyncapi(tmp_path), (
        "docs/asyncapi.yaml is stale: regenerate it with "
        "`uv run faststream docs gen main:app --yaml --out docs/asyncapi.yaml`"
    )


def test_the_asyncapi_document_describes_the_whole_contract() -> None:
    document = yaml.safe_load(ASYNCAPI.read_text())
    channels, messages = document["channels"], document["components"]["messages"]
    schemas = document["components"]["schemas"]

    assert {"chat.requests", "chat.replies", "chat.cancel", "chat.requests.dlq"} <= set(channels)
    assert set(channels["chat.replies"]["messages"]) == {"ChunkReply", "DoneReply", "ErrorReply"}
    assert channels["chat.requests"]["bindings"]["amqp"]["queue"]["durable"] is True
    assert channels["chat.replies"]["bindings"]["amqp"]["exchange"]["type"] == "direct"
    assert channels["chat.cancel"]["bindings"]["amqp"]["exchange"]["type"] == "fanout"
    assert "x-delivery-limit" in channels["chat.requests"]["description"]
    for name in ("ChatRequest", "ChunkReply", "DoneReply", "ErrorReply", "CancelRequest"):
        message = messages[name]
        assert message["summary"], name
        assert message["description"], name
        assert message["correlationId"]["location"] == "$message.header#/correlation_id"
        assert message["examples"], name
    for field in schemas["ChatRequest"]["properties"].values():
        assert field.get("description") or "$ref" in field or "anyOf" in field
    assert schemas["ErrorCode"]["enum"] == [code.value for code in ErrorCode]
    assert all(f"`{code.value}`" in schemas["ErrorCode"]["description"] for code in ErrorCode)
    assert "x-deadline" in messages["ChatRequest"]["headers"]["properties"]
    operation = document["operations"]["receiveChatRequest"]
    assert operation["reply"]["channel"] == {"$ref": "#/channels/chat.replies"}
    assert document["operations"]["sendReply"]["bindings"]["amqp"]["mandatory"] is True


def test_the_asyncapi_examples_are_valid_messages() -> None:
    messages = yaml.safe_load(ASYNCAPI.read_text())["components"]["messages"]

    for example in messages["ChatRequest"]["examples"]:
        ChatRequest.model_validate(example["payload"])
    for name in ("ChunkReply", "DoneReply", "ErrorReply"):
        for example in messages[name]["examples"]:
            assert type(reply_adapter.validate_python(example["payload"])).__name__ == name
    for example in messages["CancelRequest"]["examples"]:
        CancelRequest.model_validate(example["payload"])


def test_the_asyncapi_document_passes_the_official_parser() -> None:
    node = node_with("@asyncapi/parser")

    result = run(node, REPO_ROOT / "tests" / "validate_asyncapi.mjs", ASYNCAPI, cwd=REPO_ROOT)

    assert result.returncode == 0, result.stdout + result.stderr
