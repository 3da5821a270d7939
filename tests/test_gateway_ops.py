"""The gateway's operations side and its place in a fleet: health, readiness, metrics, logs,
API keys and tenants, no worker or a full queue, several gateways at once, and the
`chatbus gateway` command."""

import asyncio
import json
import logging
import os
import signal
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import ollama
import openai
import pytest
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from chatbus.gateway import GatewaySettings
from chatbus.settings import Settings
from chatbus.testing import FakeOllama, running_worker, settings_env
from chatbus.testing.fake_ollama import DEFAULT_TOKENS
from tests.gateway_support import Gateway, gateway_settings, running_gateway
from tests.support import REPO_ROOT, model, samples, value
from tests.test_readme import readme_python_block

ANSWER = "".join(DEFAULT_TOKENS)
QUESTION = [{"role": "user", "content": "Why is the sky blue?"}]
MakeSettings = Callable[..., Settings]


async def until_ready(http: httpx.AsyncClient, ready: bool, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while ((await http.get("/readyz")).status_code == 200) != ready:
        assert time.monotonic() < deadline, f"/readyz did not become ready={ready}"
        await asyncio.sleep(0.1)


async def test_health_and_readiness(gateway: Gateway) -> None:
    async with httpx.AsyncClient(base_url=gateway.url) as http:
        health = await http.get("/healthz")
        ready = await http.get("/readyz")

    assert (health.status_code, health.json()) == (200, {"status": "alive"})
    assert (ready.status_code, ready.json()) == (
        200,
        {"ready": True, "checks": {"rabbitmq": "ok", "workers": "ok"}},
    )


async def test_without_a_worker_requests_are_503_and_readiness_follows_the_workers(
    make_settings: MakeSettings, fake_ollama: FakeOllama
) -> None:
    settings = make_settings()
    async with (
        running_gateway(settings) as gateway,
        httpx.AsyncClient(base_url=gateway.url, timeout=30) as http,
    ):
        not_ready = await http.get("/readyz")
        refused = await http.post("/api/chat", json={"model": "llama3.2", "messages": QUESTION})
        with pytest.raises(openai.InternalServerError) as openai_refused:
            await gateway.openai().chat.completions.create(
                model="llama3.2", messages=[{"role": "user", "content": "hi"}]
            )
        async with running_worker(settings):
            await until_ready(http, True)
            answered = await gateway.ollama().chat("llama3.2", QUESTION)

    assert not_ready.status_code == 503
    assert not_ready.json()["checks"] == {
        "rabbitmq": "ok",
        "workers": f"no worker is consuming {settings.requests_queue!r}",
    }
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "1"
    assert refused.json() == {"error": f"no worker is consuming {settings.requests_queue!r}"}
    assert openai_refused.value.status_code == 503
    assert isinstance(openai_refused.value.body, dict)
    assert openai_refused.value.body["code"] == "service_unavailable"
    assert answered.message.content == ANSWER


async def test_a_full_request_queue_is_503(
    make_settings: MakeSettings, amqp: AbstractRobustConnection
) -> None:
    settings = make_settings()
    channel = await amqp.channel()
    # A request queue at its length limit, with a consumer that takes nothing more.
    full = await channel.declare_queue(
        settings.requests_queue,
        durable=True,
        arguments={"x-max-length": 0, "x-overflow": "reject-publish"},
    )

    async def busy_worker(message: AbstractIncomingMessage) -> None:
        """Stands for the workers, which are busy: the queue is full."""

    await full.consume(busy_worker, no_ack=True)
    async with (
        running_gateway(settings) as gateway,
        httpx.AsyncClient(base_url=gateway.url, timeout=30) as http,
    ):
        refused = await http.post("/api/chat", json={"model": "llama3.2", "messages": QUESTION})
    await channel.close()

    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "1"
    assert "it is full" in refused.json()["error"]


async def test_metrics_count_requests_by_route_status_and_tenant(
    gateway: Gateway, fake_ollama: FakeOllama
) -> None:
    async with httpx.AsyncClient(base_url=gateway.url) as http:
        before = samples((await http.get("/metrics")).text)
        await gateway.ollama().chat(model(fake_ollama), QUESTION)
        with pytest.raises(ollama.ResponseError):
            await gateway.ollama().chat("no-such-model", QUESTION)
        await http.get("/no/such/path")
        after = samples((await http.get("/metrics")).text)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    chat = {"route": "/api/chat", "tenant": ""}
    assert moved("chatbus_gateway_requests_total", **chat, status="200") == 1
    assert moved("chatbus_gateway_requests_total", **chat, status="404") == 1
    assert moved("chatbus_gateway_requests_total", route="unmatched", status="404", tenant="") == 1
    first_byte = "chatbus_gateway_time_to_first_byte_seconds_count"
    assert moved(first_byte, route="/api/chat") == 2
    assert value(after, "process_resident_memory_bytes") > 0


async def test_one_log_line_per_request_without_the_prompt(
    gateway: Gateway, fake_ollama: FakeOllama, caplog: pytest.LogCaptureFixture
) -> None:
    name = model(fake_ollama)
    secret = f"my secret question {uuid.uuid4().hex}"
    with caplog.at_level(logging.INFO, logger="chatbus.gateway"):
        await gateway.ollama().chat(name, [{"role": "user", "content": secret}])
        with pytest.raises(openai.NotFoundError):
            await gateway.openai().chat.completions.create(
                model="no-such-model", messages=[{"role": "user", "content": secret}]
            )

    lines = [record for record in caplog.records if record.name == "chatbus.gateway"]
    fields = [
        {k: getattr(r, k, None) for k in ("path", "status", "model", "outcome")} for r in lines
    ]
    assert fields == [
        {"path": "/api/chat", "status": 200, "model": name, "outcome": "stop"},
        {
            "path": "/v1/chat/completions",
            "status": 404,
            "model": "no-such-model",
            "outcome": "model_not_found",
        },
    ]
    assert all(getattr(record, "correlation_id", None) for record in lines)
    assert all(record.first_byte_ms > 0 for record in lines)  # type: ignore[attr-defined]
    assert secret not in caplog.text
    assert all(secret not in json.dumps(vars(record), default=str) for record in lines)


# --- API keys and tenants -----------------------------------------------------------------


async def test_api_keys_name_the_tenant_that_reaches_the_worker(
    worker: Settings, fake_ollama: FakeOllama, caplog: pytest.LogCaptureFixture
) -> None:
    keys = {"key-of-acme": "acme", "key-of-beta": "beta"}
    name = model(fake_ollama)
    async with (
        running_gateway(worker, gateway_api_keys=keys) as gateway,
        httpx.AsyncClient(base_url=gateway.url) as http,
    ):
        with pytest.raises(ollama.ResponseError) as no_key:
            await gateway.ollama().chat(name, QUESTION)
        with pytest.raises(openai.AuthenticationError) as wrong_key:
            await gateway.openai("key-of-nobody").chat.completions.create(
                model=name, messages=[{"role": "user", "content": "hi"}]
            )
        not_bearer = await http.get("/api/tags", headers={"Authorization": "Basic key-of-acme"})
        health = await http.get("/healthz")
        with caplog.at_level(logging.INFO, logger="chatbus.worker"):
            answered = await gateway.ollama("key-of-acme").chat(name, QUESTION)
            completed = await gateway.openai("key-of-beta").chat.completions.create(
                model=name, messages=[{"role": "user", "content": "hi"}]
            )
        metrics = samples((await http.get("/metrics")).text)

    assert no_key.value.status_code == 401
    assert wrong_key.value.status_code == 401
    assert wrong_key.value.response.headers["www-authenticate"] == "Bearer"
    assert isinstance(wrong_key.value.body, dict)
    assert wrong_key.value.body["code"] == "invalid_api_key"
    assert not_bearer.status_code == 401
    assert health.status_code == 200
    assert answered.message.content == ANSWER
    assert completed.choices[0].message.content == ANSWER
    tenants = [
        getattr(record, "tenant", None)
        for record in caplog.records
        if record.name == "chatbus.worker" and hasattr(record, "outcome")
    ]
    assert tenants == ["acme", "beta"]
    requests = "chatbus_gateway_requests_total"
    assert value(metrics, requests, route="/api/chat", status="200", tenant="acme") == 1
    assert value(metrics, requests, route="/api/chat", status="200", tenant="") == 0
    assert value(metrics, requests, route="/api/chat", status="401", tenant="") == 1


def test_api_keys_are_read_as_json_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_API_KEYS", '{"key-1": "acme", "key-2": "beta"}')
    assert GatewaySettings().gateway_api_keys == {"key-1": "acme", "key-2": "beta"}
    monkeypatch.setenv("GATEWAY_API_KEYS", '{"key-1": ""}')
    with pytest.raises(ValueError, match="tenant"):
        GatewaySettings()


# --- several gateways, and the command ---------------------------------------------------


async def test_two_gateways_serve_the_same_workers_at_once(
    worker: Settings, gateway: Gateway, fake_ollama: FakeOllama
) -> None:
    paced = model(fake_ollama, token_delay=0.01)

    async def ask(through: Gateway, index: int) -> str:
        parts = await through.ollama().chat(paced, QUESTION, stream=True)
        return "".join([part.message.content or "" async for part in parts])

    async with running_gateway(worker) as second:
        answers = await asyncio.gather(
            *(ask(through, i) for i in range(6) for through in (gateway, second))
        )

    assert answers == [ANSWER] * 12


async def test_the_gateway_command_serves_until_sigterm(
    worker: Settings, fake_ollama: FakeOllama
) -> None:
    settings = gateway_settings(worker)
    env = (
        os.environ
        | settings_env(worker)
        | {
            "GATEWAY_PORT": str(settings.gateway_port),
            "LOG_FORMAT": "json",
        }
    )
    process = await asyncio.create_subprocess_exec(
        Path(sys.executable).parent / "chatbus",
        "gateway",
        cwd=REPO_ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        url = f"http://127.0.0.1:{settings.gateway_port}"
        async with httpx.AsyncClient(base_url=url) as http:
            deadline = time.monotonic() + 20
            while True:
                try:
                    if (await http.get("/readyz")).status_code == 200:
                        break
                except httpx.ConnectError:
                    pass
                assert time.monotonic() < deadline, "the gateway did not get ready"
                await asyncio.sleep(0.1)
        answered = await ollama.AsyncClient(host=url).chat(model(fake_ollama), QUESTION)
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            output, _ = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()

    assert answered.message.content == ANSWER
    assert process.returncode == 0
    lines = [json.loads(line) for line in output.decode().splitlines()]
    [request_line] = [line for line in lines if line.get("path") == "/api/chat"]
    assert request_line["logger"] == "chatbus.gateway"
    assert request_line["outcome"] == "stop"


async def test_the_request_queue_names_come_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("REQUESTS_QUEUE", "elsewhere.requests")
    settings = GatewaySettings()
    assert settings.requests_queue == "elsewhere.requests"
    assert (settings.gateway_host, settings.gateway_port) == ("127.0.0.1", 8080)


async def test_the_readme_example_runs_against_the_gateway(
    gateway: Gateway, capsys: pytest.CaptureFixture[str]
) -> None:
    code = readme_python_block("## Gateway").replace("http://127.0.0.1:8080", gateway.url)
    # The example's clients block: in a thread, while this event loop serves the gateway.
    await asyncio.to_thread(exec, compile(code, "README.md", "exec"), {})

    assert capsys.readouterr().out == f"{ANSWER}\n{ANSWER}"
