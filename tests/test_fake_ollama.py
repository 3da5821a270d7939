"""The fake Ollama server, checked through the real ollama.AsyncClient and raw HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import sys
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, cast

import httpx
import ollama
import pytest

from chatbus.testing import Behaviour, FakeOllama
from chatbus.testing.fake_ollama import DEFAULT_THINKING, DEFAULT_TOKENS, RUN_ERROR, SERVER_BUSY

MESSAGES = [{"role": "user", "content": "Why is the sky blue?"}]
CREATED_AT = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?Z$")
WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
WEATHER_CALL: dict[str, Any] = {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}


@pytest.fixture
async def fake() -> AsyncIterator[FakeOllama]:
    async with FakeOllama() as server:
        yield server


@pytest.fixture
async def client(fake: FakeOllama) -> AsyncIterator[ollama.AsyncClient]:
    c = ollama.AsyncClient(host=fake.url, timeout=httpx.Timeout(5.0))
    yield c
    await close_client(c)


@pytest.fixture
async def http(fake: FakeOllama) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=fake.url, timeout=5.0) as c:
        yield c


async def close_client(client: ollama.AsyncClient) -> None:
    await client.close()  # type: ignore[no-untyped-call]  # unannotated in ollama 0.6.3


async def open_stream(
    client: ollama.AsyncClient, model: str, **kwargs: Any
) -> AsyncGenerator[ollama.ChatResponse, None]:
    """The streaming reply (an async generator, so it can be closed early)."""
    stream = await client.chat(model, MESSAGES, stream=True, **kwargs)
    return cast(AsyncGenerator[ollama.ChatResponse, None], stream)


async def read_into(
    parts: list[ollama.ChatResponse], client: ollama.AsyncClient, model: str
) -> None:
    async for part in await client.chat(model, MESSAGES, stream=True):
        parts.append(part)


async def collect(
    client: ollama.AsyncClient, model: str = "llama3.2", **kwargs: Any
) -> list[ollama.ChatResponse]:
    return [part async for part in await client.chat(model, MESSAGES, stream=True, **kwargs)]


# ----------------------------------------------------------------------------- /api/chat


async def test_stream_reassembles_tokens(fake: FakeOllama, client: ollama.AsyncClient) -> None:
    parts = await collect(client)

    *chunks, final = parts
    assert [p.message.content for p in chunks] == list(DEFAULT_TOKENS)
    assert all(p.done is False and p.done_reason is None for p in chunks)
    assert all(p.model == "llama3.2" and CREATED_AT.match(p.created_at or "") for p in parts)
    assert final.done is True
    assert final.done_reason == "stop"
    assert final.message.role == "assistant"
    assert final.message.content == ""
    assert final.eval_count == len(DEFAULT_TOKENS)
    assert final.prompt_eval_count is not None
    assert final.prompt_eval_count > 0
    for duration in (
        final.total_duration,
        final.load_duration,
        final.prompt_eval_duration,
        final.eval_duration,
    ):
        assert isinstance(duration, int)
        assert duration > 0
    assert final.total_duration is not None
    assert final.eval_duration is not None
    assert final.total_duration >= final.eval_duration

    assert fake.requests == [
        {"model": "llama3.2", "messages": MESSAGES, "stream": True, "tools": []}
    ]
    assert fake.completed_streams == 1
    assert fake.active_streams == 0


async def test_wire_format_and_keep_alive(fake: FakeOllama, http: httpx.AsyncClient) -> None:
    body = {"model": "llama3.2", "messages": MESSAGES}
    for _ in range(3):
        async with http.stream("POST", "/api/chat", json=body) as response:
            assert response.status_code == 200
            assert response.headers["content-type"] == "application/x-ndjson"
            assert response.headers["transfer-encoding"] == "chunked"
            lines = [json.loads(line) async for line in response.aiter_lines()]
        assert lines[0] == {
            "model": "llama3.2",
            "created_at": lines[0]["created_at"],
            "message": {"role": "assistant", "content": "The"},
            "done": False,
        }
        assert list(lines[-1]) == [
            "model",
            "created_at",
            "message",
            "done_reason",
            "done",
            "total_duration",
            "load_duration",
            "prompt_eval_count",
            "prompt_eval_duration",
            "eval_count",
            "eval_duration",
        ]
    assert fake.connections_opened == 1  # one keep-alive connection for all three


async def test_stream_false(fake: FakeOllama, client: ollama.AsyncClient) -> None:
    response = await client.chat("llama3.2", MESSAGES, stream=False)

    assert response.done is True
    assert response.done_reason == "stop"
    assert response.message.content == "".join(DEFAULT_TOKENS)
    assert response.message.thinking is None
    assert response.eval_count == len(DEFAULT_TOKENS)
    assert fake.requests[0]["stream"] is False
    assert fake.completed_streams == 1


async def test_think_streams_thinking_first(client: ollama.AsyncClient) -> None:
    parts = await collect(client, think=True)

    thinking = [p for p in parts if p.message.thinking]
    assert [p.message.thinking for p in thinking] == list(DEFAULT_THINKING)
    assert all(p.message.content == "" for p in thinking)
    assert parts[: len(thinking)] == thinking
    assert "".join(p.message.content or "" for p in parts) == "".join(DEFAULT_TOKENS)
    assert parts[-1].eval_count == len(DEFAULT_THINKING) + len(DEFAULT_TOKENS)

    whole = await client.chat("llama3.2", MESSAGES, think=True)
    assert whole.message.thinking == "".join(DEFAULT_THINKING)
    assert whole.message.content == "".join(DEFAULT_TOKENS)


async def test_tool_calls(fake: FakeOllama, client: ollama.AsyncClient) -> None:
    fake.models["tooly"] = Behaviour(tokens=[], tool_calls=[WEATHER_CALL])

    parts = await collect(client, "tooly", tools=[WEATHER_TOOL])
    assert len(parts) == 2
    call_chunk, final = parts
    assert call_chunk.done is False
    assert call_chunk.message.content == ""
    assert call_chunk.message.tool_calls is not None
    (call,) = call_chunk.message.tool_calls
    assert call.function.name == "get_weather"
    assert call.function.arguments == {"city": "Paris"}
    assert final.done is True
    assert final.done_reason == "stop"

    whole = await client.chat("tooly", MESSAGES, tools=[WEATHER_TOOL])
    assert whole.message.tool_calls is not None
    assert whole.message.tool_calls[0].function.name == "get_weather"

    # no tools in the request: the model cannot call any
    no_tools = await client.chat("tooly", MESSAGES)
    assert no_tools.message.tool_calls is None


async def test_num_predict_gives_length(client: ollama.AsyncClient) -> None:
    parts = await collect(client, options={"num_predict": 3})

    assert [p.message.content for p in parts[:-1]] == list(DEFAULT_TOKENS[:3])
    assert parts[-1].done_reason == "length"
    assert parts[-1].eval_count == 3

    bigger = await client.chat("llama3.2", MESSAGES, options={"num_predict": 100})
    assert bigger.done_reason == "stop"


async def test_empty_messages_loads_the_model(client: ollama.AsyncClient) -> None:
    response = await client.chat("llama3.2", [])
    assert response.done_reason == "load"
    assert response.message.content == ""

    unload = await client.chat("llama3.2", [], keep_alive=0)
    assert unload.done_reason == "unload"


async def test_latest_tag_and_runtime_models(fake: FakeOllama, client: ollama.AsyncClient) -> None:
    fake.models["qwen3:4b"] = Behaviour(tokens=["hi"])

    assert (await client.chat("llama3.2:latest", MESSAGES)).model == "llama3.2:latest"
    assert (await client.chat("qwen3:4b", MESSAGES)).message.content == "hi"
    with pytest.raises(ollama.ResponseError):
        await client.chat("qwen3", MESSAGES)  # qwen3:latest is a different model


async def test_first_token_delay(fake: FakeOllama, client: ollama.AsyncClient) -> None:
    fake.models["cold"] = Behaviour(first_token_delay=0.2)

    started = time.perf_counter()
    stream = await open_stream(client, "cold")
    async with contextlib.aclosing(stream):
        first = await anext(stream)
        waited = time.perf_counter() - started
        parts = [first] + [part async for part in stream]

    assert waited >= 0.2
    assert parts[-1].load_duration is not None
    assert parts[-1].load_duration >= 200_000_000


# ----------------------------------------------------------------------------- errors


async def test_unknown_model_is_404(fake: FakeOllama, client: ollama.AsyncClient) -> None:
    with pytest.raises(ollama.ResponseError) as info:
        await collect(client, "nope")
    assert info.value.status_code == 404
    assert info.value.error == 'model "nope" not found, try pulling it first'

    with pytest.raises(ollama.ResponseError) as info:
        await client.chat("nope", MESSAGES)
    assert info.value.status_code == 404
    assert "not found" in info.value.error
    assert fake.active_streams == fake.completed_streams == 0


async def test_bad_requests_are_400(fake: FakeOllama, http: httpx.AsyncClient) -> None:
    cases: list[tuple[bytes, str]] = [
        (b"", "missing request body"),
        (b'{"model": "llama3.2", "messages": [', ""),
        (b'{"messages": []}', "model is required"),
        (b"[1, 2]", "json: cannot unmarshal array into Go value of type api.ChatRequest"),
    ]
    for body, message in cases:
        response = await http.post("/api/chat", content=body)
        assert response.status_code == 400, body
        assert response.headers["content-type"] == "application/json; charset=utf-8"
        assert response.json()["error"].startswith(message)
    assert fake.completed_streams == 0


async def test_status_503_body(fake: FakeOllama, client: ollama.AsyncClient) -> None:
    fake.models["busy"] = Behaviour(status=503)

    async with httpx.AsyncClient(base_url=fake.url) as http:
        response = await http.post("/api/chat", json={"model": "busy", "messages": MESSAGES})
    assert response.status_code == 503
    assert response.json() == {
        "error": "server busy, please try again.  maximum pending requests exceeded"
    }

    with pytest.raises(ollama.ResponseError) as info:
        await collect(client, "busy")
    assert info.value.status_code == 503
    assert info.value.error == SERVER_BUSY


@pytest.mark.parametrize("status", [400, 404, 500])
async def test_other_status_faults(
    fake: FakeOllama, client: ollama.AsyncClient, status: int
) -> None:
    fake.models["broken"] = Behaviour(status=status)
    with pytest.raises(ollama.ResponseError) as info:
        await client.chat("broken", MESSAGES)
    assert info.value.status_code == status
    assert info.value.error

    fake.models["custom"] = Behaviour(status=status, error_message="boom")
    with pytest.raises(ollama.ResponseError, match="boom"):
        await collect(client, "custom")


async def test_fail_times_then_recover(fake: FakeOllama, client: ollama.AsyncClient) -> None:
    fake.models["flaky"] = Behaviour(status=503, fail_times=2)

    for _ in range(2):
        with pytest.raises(ollama.ResponseError) as info:
            await collect(client, "flaky")
        assert info.value.status_code == 503
    parts = await collect(client, "flaky")
    assert parts[-1].done_reason == "stop"
    assert len(fake.requests) == 3
    assert fake.models["flaky"].faults_served == 2


async def test_error_after_n_chunks(fake: FakeOllama, client: ollama.AsyncClient) -> None:
    fake.models["crashy"] = Behaviour(error_after=3)

    parts: list[ollama.ChatResponse] = []
    with pytest.raises(ollama.ResponseError) as info:
        await read_into(parts, client, "crashy")
    assert info.value.status_code == -1
    assert info.value.error == RUN_ERROR
    assert [p.message.content for p in parts] == list(DEFAULT_TOKENS[:3])
    await fake.wait_for(lambda: fake.errored_streams == 1)

    assert (await client.chat("llama3.2", MESSAGES)).done is True


async def test_error_before_output_is_500(fake: FakeOllama, client: ollama.AsyncClient) -> None:
    fake.models["crash0"] = Behaviour(error_after=0)
    with pytest.raises(ollama.ResponseError) as info:
        await collect(client, "crash0")
    assert info.value.status_code == 500

    fake.models["crash-whole"] = Behaviour(error_after=5)
    with pytest.raises(ollama.ResponseError) as info:
        await client.chat("crash-whole", MESSAGES, stream=False)
    assert info.value.status_code == 500
    assert info.value.error == RUN_ERROR


async def test_disconnect_after_n_chunks(fake: FakeOllama, client: ollama.AsyncClient) -> None:
    fake.models["dropper"] = Behaviour(disconnect_after=2)

    parts: list[ollama.ChatResponse] = []
    with pytest.raises(httpx.RemoteProtocolError):
        await read_into(parts, client, "dropper")
    assert len(parts) == 2

    with pytest.raises(httpx.RemoteProtocolError):
        await client.chat("dropper", MESSAGES, stream=False)
    await fake.wait_for(lambda: fake.errored_streams == 2)
    assert fake.aborted_streams == 0


async def test_stall_after_read_timeout(fake: FakeOllama) -> None:
    fake.models["staller"] = Behaviour(stall_after=2)
    client = ollama.AsyncClient(host=fake.url, timeout=httpx.Timeout(5.0, read=0.3))

    parts: list[ollama.ChatResponse] = []
    with pytest.raises(httpx.ReadTimeout):
        await read_into(parts, client, "staller")
    assert len(parts) == 2
    await fake.wait_aborted()
    assert fake.active_streams == 0
    await close_client(client)


async def test_client_timeout_during_cold_load_is_seen(fake: FakeOllama) -> None:
    fake.models["frozen"] = Behaviour(first_token_delay=30.0)
    client = ollama.AsyncClient(host=fake.url, timeout=httpx.Timeout(5.0, read=0.2))

    with pytest.raises(httpx.ReadTimeout):
        await client.chat("frozen", MESSAGES, stream=False)
    await fake.wait_aborted(timeout=1.0)
    assert fake.active_streams == 0
    await close_client(client)


async def test_client_closing_early_is_seen(fake: FakeOllama, client: ollama.AsyncClient) -> None:
    # a long delay between tokens: the abort must be seen during the delay
    fake.models["slow"] = Behaviour(tokens=["a"] * 10, token_delay=30.0)

    stream = await open_stream(client, "slow")
    async with contextlib.aclosing(stream):
        async for _ in stream:
            break
    await fake.wait_aborted(timeout=1.0)
    assert fake.stats()["aborted_streams"] == 1
    assert fake.completed_streams == 0
    assert fake.active_streams == 0


async def test_concurrent_streams_are_counted(fake: FakeOllama, client: ollama.AsyncClient) -> None:
    fake.models["hold"] = Behaviour(stall_after=1)

    tasks = [asyncio.create_task(collect(client, "hold")) for _ in range(3)]
    await fake.wait_for(lambda: fake.active_streams == 3)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await fake.wait_aborted(3)
    assert fake.max_active_streams == 3

    fake.reset_stats()
    assert fake.stats() == {
        "requests": 0,
        "active_streams": 0,
        "max_active_streams": 0,
        "completed_streams": 0,
        "aborted_streams": 0,
        "errored_streams": 0,
        "connections_opened": 0,
        "model_loads": 0,
        "model_unloads": 0,
    }


async def test_wait_for_times_out(fake: FakeOllama) -> None:
    with pytest.raises(TimeoutError, match="aborted_streams"):
        await fake.wait_aborted(timeout=0.05)


# ----------------------------------------------------------------------------- loaded models


async def loaded(client: ollama.AsyncClient) -> list[str]:
    return [model.model or "" for model in (await client.ps()).models]


async def test_models_available_per_server() -> None:
    async with (
        FakeOllama(models={"a": Behaviour(), "b:7b": Behaviour()}) as first,
        FakeOllama(models={"c": Behaviour()}) as second,
    ):
        one = ollama.AsyncClient(host=first.url, timeout=httpx.Timeout(5.0))
        two = ollama.AsyncClient(host=second.url, timeout=httpx.Timeout(5.0))
        assert [m.model for m in (await one.list()).models] == ["a:latest", "b:7b"]
        assert [m.model for m in (await two.list()).models] == ["c:latest"]
        assert (await one.chat("b:7b", MESSAGES)).done is True
        with pytest.raises(ollama.ResponseError) as info:
            await two.chat("a", MESSAGES)
        assert info.value.status_code == 404
        await close_client(one)
        await close_client(two)


async def test_a_model_not_loaded_is_loaded_once(
    fake: FakeOllama, client: ollama.AsyncClient
) -> None:
    fake.load_time = 0.2
    assert await loaded(client) == []

    first = await client.chat("llama3.2", MESSAGES)
    assert first.load_duration is not None
    assert first.load_duration >= 200_000_000
    assert await loaded(client) == ["llama3.2:latest"]
    second = await client.chat("llama3.2", MESSAGES)
    assert second.load_duration is not None
    assert second.load_duration < 200_000_000
    assert (fake.model_loads, fake.model_unloads) == (1, 0)


async def test_concurrent_requests_share_one_load(
    fake: FakeOllama, client: ollama.AsyncClient
) -> None:
    fake.load_time = 0.1

    answers = await asyncio.gather(*(client.chat("llama3.2", MESSAGES) for _ in range(5)))

    assert all(answer.done for answer in answers)
    assert fake.model_loads == 1


async def test_max_loaded_models_unloads_the_least_recently_used(
    fake: FakeOllama, client: ollama.AsyncClient
) -> None:
    fake.models.update({"a": Behaviour(), "b": Behaviour(), "c": Behaviour()})
    fake.max_loaded_models = 2

    for model in ("a", "b", "a", "c"):
        await client.chat(model, MESSAGES)
    assert await loaded(client) == ["c:latest", "a:latest"]
    assert fake.loaded_models() == ["c:latest", "a:latest"]
    assert (fake.model_loads, fake.model_unloads) == (3, 1)

    await client.chat("b", MESSAGES)
    assert await loaded(client) == ["b:latest", "c:latest"]
    assert fake.stats()["model_loads"] == 4
    assert fake.stats()["model_unloads"] == 2


async def test_a_swap_waits_for_the_requests_using_the_model(
    fake: FakeOllama, client: ollama.AsyncClient
) -> None:
    fake.models["a"] = Behaviour(tokens=["x"] * 4, token_delay=0.05)
    fake.models["b"] = Behaviour()
    fake.max_loaded_models = 1
    events: list[str] = []

    async def read(model: str) -> None:
        async for part in await client.chat(model, MESSAGES, stream=True):
            if part.done:
                events.append(f"{model} done")
            elif f"{model} first" not in events:
                events.append(f"{model} first")

    running = asyncio.create_task(read("a"))
    await fake.wait_for(lambda: fake.active_streams == 1)
    await read("b")
    await running

    assert events == ["a first", "a done", "b first", "b done"]
    assert (fake.model_loads, fake.model_unloads) == (2, 1)


async def test_keep_alive_zero_unloads_after_the_request(
    fake: FakeOllama, client: ollama.AsyncClient
) -> None:
    await client.chat("llama3.2", MESSAGES, keep_alive=0)
    assert await loaded(client) == []
    assert (fake.model_loads, fake.model_unloads) == (1, 1)

    await client.chat("llama3.2", [])  # preload, as Ollama's docs show it
    assert await loaded(client) == ["llama3.2:latest"]
    await client.chat("llama3.2", [], keep_alive=0)
    assert await loaded(client) == []
    assert (fake.model_loads, fake.model_unloads) == (2, 2)


async def test_a_load_goes_on_when_the_request_gives_up(fake: FakeOllama) -> None:
    fake.load_time = 0.5
    impatient = ollama.AsyncClient(host=fake.url, timeout=httpx.Timeout(5.0, read=0.1))

    with pytest.raises(httpx.ReadTimeout):
        await impatient.chat("llama3.2", MESSAGES)
    await fake.wait_aborted()
    assert fake.model_loads == 0
    await fake.wait_for(lambda: fake.model_loads == 1)
    assert fake.loaded_models() == ["llama3.2:latest"]
    await close_client(impatient)


# ----------------------------------------------------------------------------- other endpoints


async def test_other_endpoints(
    fake: FakeOllama, client: ollama.AsyncClient, http: httpx.AsyncClient
) -> None:
    root = await http.get("/")
    assert (root.status_code, root.text) == (200, "Ollama is running")
    assert (await http.head("/")).status_code == 200

    version = await http.get("/api/version")
    assert version.status_code == 200
    assert re.fullmatch(r"\d+\.\d+\.\d+", version.json()["version"])

    tags = (await http.get("/api/tags")).json()
    (model,) = tags["models"]
    assert model["name"] == model["model"] == "llama3.2:latest"
    assert {"modified_at", "size", "digest", "details"} <= set(model)
    listed = await client.list()
    assert [m.model for m in listed.models] == ["llama3.2:latest"]

    shown = await client.show("llama3.2")
    assert shown.details is not None
    assert shown.details.family == "llama"
    assert shown.capabilities is not None
    assert "completion" in shown.capabilities
    with pytest.raises(ollama.ResponseError) as info:
        await client.show("nope")
    assert info.value.status_code == 404
    assert "not found" in info.value.error

    assert (await client.ps()).models == []
    await client.chat("llama3.2", MESSAGES)
    assert [m.model for m in (await client.ps()).models] == ["llama3.2:latest"]

    missing = await http.get("/api/nothing")
    assert missing.status_code == 404
    assert missing.text == "404 page not found"
    assert missing.headers["content-type"].startswith("text/plain")
    assert (await http.get("/api/chat")).status_code == 405


async def test_raw_pipelined_requests_and_chunked_body(fake: FakeOllama) -> None:
    body = b"".join(
        b"%x\r\n%s\r\n" % (len(part), part)
        for part in (b'{"model":"llama', b'3.2","messages":[],"stream":1}', b"")
    )
    reader, writer = await asyncio.open_connection(fake.host, fake.port)
    writer.write(
        b"GET /api/version HTTP/1.1\r\nHost: x\r\n\r\n"
        b"POST /api/chat HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        + body
        + b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    data = await asyncio.wait_for(reader.read(), 5.0)  # until the server closes
    writer.close()

    assert data.count(b"HTTP/1.1 ") == 3
    assert b'{"version":' in data
    assert b"ChatRequest.stream of type bool" in data
    assert data.endswith(b"Ollama is running")


@contextlib.asynccontextmanager
async def fake_process(*arguments: str) -> AsyncIterator[tuple[str, asyncio.StreamReader]]:
    """`python -m chatbus.testing.fake_ollama ARGUMENTS`: its URL, then the rest of its
    output. Leaving the block stops it with SIGTERM, and expects it to exit 0."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "chatbus.testing.fake_ollama",
        *arguments,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        url = (await asyncio.wait_for(process.stdout.readline(), 10.0)).decode().strip()
        yield url, process.stdout
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 5.0) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_module_entry_point_with_loads() -> None:
    async with fake_process(
        "--port=0", "--model=m1", "--model=m2", "--load-time=0.05", "--max-loaded-models=1"
    ) as (url, output):
        client = ollama.AsyncClient(host=url, timeout=httpx.Timeout(5.0))
        first = await client.chat("m1", MESSAGES)
        for model in ("m2", "m1"):
            await client.chat(model, MESSAGES)
        assert [m.model for m in (await client.ps()).models] == ["m1:latest"]
        await close_client(client)
    stats = json.loads(await asyncio.wait_for(output.readline(), 5.0))
    assert first.load_duration is not None
    assert first.load_duration >= 50_000_000
    assert (stats["model_loads"], stats["model_unloads"]) == (3, 2)
    assert stats["completed_streams"] == 3


async def test_module_entry_point() -> None:
    async with fake_process("--port", "0", "--tokens", "3", "--model", "m1", "--model", "m2") as (
        url,
        _,
    ):
        assert url.startswith("http://127.0.0.1:")
        client = ollama.AsyncClient(host=url, timeout=httpx.Timeout(5.0))
        response = await client.chat("m2", MESSAGES)
        await close_client(client)
        assert response.eval_count == 3
