"""The sessions API of the gateway over real HTTP and WebSocket clients, against the real
worker and the fake Ollama; the page's files and the gateway's answer at `/`."""

import asyncio
import base64
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus
from websockets.typing import Subprotocol

from chatbus.settings import Settings
from chatbus.testing import FakeOllama
from chatbus.testing.fake_ollama import DEFAULT_TOKENS
from tests.gateway_support import Gateway, running_gateway
from tests.support import model, requests_for
from tests.test_readme import readme_python_block
from tests.web_support import sse_events

pytestmark = pytest.mark.rabbitmq

ANSWER = "".join(DEFAULT_TOKENS)
KEYS = {"key-a": "a", "key-b": "b"}

Serve = Callable[..., contextlib.AbstractAsyncContextManager["Served"]]


@dataclass
class Served:
    gateway: Gateway
    http: httpx.AsyncClient

    def ws(self, session_id: str, **kwargs: Any) -> Any:
        return connect(f"{self.gateway.url.replace('http', 'ws', 1)}/ws/{session_id}", **kwargs)


@pytest.fixture
def serve(worker: Settings, tmp_path: Path) -> Serve:
    @contextlib.asynccontextmanager
    async def start(**settings: Any) -> AsyncIterator[Served]:
        """The gateway in front of the shared worker, with sessions in a SQLite file of
        its own unless `settings` (the gateway's) say otherwise."""
        history_url = f"sqlite:///{tmp_path / uuid.uuid4().hex}.sqlite3"
        async with (
            running_gateway(worker, **({"history_url": history_url} | settings)) as gateway,
            httpx.AsyncClient(base_url=gateway.url, timeout=20) as http,
        ):
            yield Served(gateway, http)

    return start


@pytest.fixture
async def served(serve: Serve) -> AsyncIterator[Served]:
    async with serve() as served:
        yield served


@pytest.fixture
async def keyed(serve: Serve) -> AsyncIterator[Served]:
    """A gateway with API keys on."""
    async with serve(gateway_api_keys=KEYS) as served:
        yield served


def new_session() -> str:
    return uuid.uuid4().hex


async def chat_sse(
    http: httpx.AsyncClient, body: dict[str, Any], **kwargs: Any
) -> list[tuple[str, dict[str, Any]]]:
    async with http.stream("POST", "/chat", json=body, **kwargs) as response:
        assert response.status_code == 200, await response.aread()
        assert response.headers["content-type"].startswith("text/event-stream")
        return [event async for event in sse_events(response)]


async def history_of(served: Served, session_id: str, **kwargs: Any) -> list[dict[str, Any]]:
    response = await served.http.get(f"/history/{session_id}", **kwargs)
    if response.status_code == 404:
        return []
    assert response.status_code == 200, response.text
    messages: list[dict[str, Any]] = response.json()["messages"]
    return messages


def sent_messages(fake: FakeOllama, model_name: str) -> list[list[dict[str, Any]]]:
    """What each request for the model sent to Ollama as `messages`."""
    return [r["messages"] for r in fake.requests if r.get("model") == model_name]


async def test_sse_turns_stream_and_build_the_history(
    served: Served, fake_ollama: FakeOllama
) -> None:
    name = model(fake_ollama)
    sid = new_session()
    body = {
        "session_id": sid,
        "message": "Why is the sky blue?",
        "model": name,
        "system": "Be brief.",
    }
    events = await chat_sse(served.http, body)

    kinds = [kind for kind, _ in events]
    assert kinds == ["chunk"] * len(DEFAULT_TOKENS) + ["done"]
    assert all(data["type"] == kind for kind, data in events)
    assert "".join(data["content"] for kind, data in events if kind == "chunk") == ANSWER
    done = events[-1][1]
    assert done["message"]["content"] == ANSWER
    assert done["done_reason"] == "stop"
    assert done["usage"]["completion_tokens"] == len(DEFAULT_TOKENS)

    await chat_sse(served.http, {"session_id": sid, "message": "And at sunset?"})
    first, second = sent_messages(fake_ollama, name)
    assert first == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Why is the sky blue?"},
    ]
    assert second == [
        *first,
        {"role": "assistant", "content": ANSWER},
        {"role": "user", "content": "And at sunset?"},
    ], "the second turn carries the system prompt, the first turn, and uses the same model"

    response = await served.http.get(f"/history/{sid}")
    assert response.status_code == 200
    view = response.json()
    assert view["session_id"] == sid
    assert view["model"] == name
    assert view["system"] == "Be brief."
    assert view["messages"] == [
        {"role": "user", "content": "Why is the sky blue?"},
        {"role": "assistant", "content": ANSWER},
        {"role": "user", "content": "And at sunset?"},
        {"role": "assistant", "content": ANSWER},
    ]
    assert view["created_at"] < view["updated_at"] < view["expires_at"]


async def test_a_json_answer_with_stream_false(served: Served, fake_ollama: FakeOllama) -> None:
    name = model(fake_ollama)
    sid = new_session()
    response = await served.http.post(
        "/chat", json={"session_id": sid, "message": "Hi", "model": name, "stream": False}
    )
    assert response.status_code == 200
    done = response.json()
    assert done["type"] == "done"
    assert done["message"]["content"] == ANSWER
    assert [m["content"] for m in await history_of(served, sid)] == ["Hi", ANSWER]


@pytest.mark.parametrize(
    ("body", "names"),
    [
        ({"session_id": "short", "message": "Hi"}, "session id"),
        ({"session_id": "a" * 20 + "/..", "message": "Hi"}, "session id"),
        ({"session_id": "a" * 20, "message": ""}, "message"),
        ({"session_id": "a" * 20, "message": "Hi", "temperature": 1}, "temperature"),
        ({"session_id": "a" * 20, "message": "x" * 101}, "max_prompt_chars=100"),
        ({"session_id": "a" * 20, "message": "Hi", "system": "x" * 99}, "max_prompt_chars=100"),
        (
            {"session_id": "a" * 20, "message": "Hi", "options": {"x": "y" * 300}},
            "max_request_bytes",
        ),
    ],
)
async def test_invalid_requests_are_refused_before_the_bus(
    serve: Serve, fake_ollama: FakeOllama, body: dict[str, Any], names: str
) -> None:
    before = len(fake_ollama.requests)
    async with serve(max_request_bytes=300, max_prompt_chars=100) as served:
        for stream in (True, False):
            response = await served.http.post("/chat", json=body | {"stream": stream})
            assert response.status_code == 400, response.text
            error = response.json()
            assert error["code"] == "invalid_request"
            assert names in error["message"]
            assert error["retryable"] is False
    assert len(fake_ollama.requests) == before


async def test_errors_end_the_stream_and_leave_the_history_as_it_was(
    served: Served, fake_ollama: FakeOllama
) -> None:
    sid = new_session()
    good = model(fake_ollama)
    await chat_sse(served.http, {"session_id": sid, "message": "first", "model": good})

    failing = model(fake_ollama, error_after=2)
    events = await chat_sse(served.http, {"session_id": sid, "message": "second", "model": failing})
    assert [kind for kind, _ in events] == ["chunk", "chunk", "error"]
    assert events[-1][1]["code"] == "upstream_error"
    assert events[-1][1]["correlation_id"]

    missing = f"missing-{uuid.uuid4().hex[:6]}"
    events = await chat_sse(served.http, {"session_id": sid, "message": "third", "model": missing})
    assert [kind for kind, _ in events] == ["error"]
    assert events[0][1]["code"] == "model_not_found"
    response = await served.http.post(
        "/chat", json={"session_id": sid, "message": "third", "model": missing, "stream": False}
    )
    assert response.status_code == 404
    assert response.json()["code"] == "model_not_found"

    assert [m["content"] for m in await history_of(served, sid)] == ["first", ANSWER]


def outcomes(caplog: pytest.LogCaptureFixture) -> list[str]:
    """How each request ended, as the gateway's log lines say."""
    return [vars(record)["outcome"] for record in caplog.records if hasattr(record, "outcome")]


async def test_a_client_that_leaves_cancels_the_generation(
    served: Served, fake_ollama: FakeOllama, caplog: pytest.LogCaptureFixture
) -> None:
    slow = model(fake_ollama, token_delay=0.2)
    sid = new_session()
    aborted = fake_ollama.aborted_streams
    with caplog.at_level(logging.INFO, logger="chatbus.gateway"):
        async with served.http.stream(
            "POST", "/chat", json={"session_id": sid, "message": "Hi", "model": slow}
        ) as response:
            async for kind, _ in sse_events(response):
                assert kind == "chunk"
                break  # leaves after the first chunk: the connection closes
        await fake_ollama.wait_aborted(aborted + 1, timeout=3)
        async with asyncio.timeout(3):
            # Polled: the gateway writes its log line when the response has ended.
            while not outcomes(caplog):  # noqa: ASYNC110
                await asyncio.sleep(0.01)
    assert outcomes(caplog) == ["disconnected"]

    json_request = asyncio.create_task(
        served.http.post(
            "/chat", json={"session_id": sid, "message": "Hi", "model": slow, "stream": False}
        )
    )
    await fake_ollama.wait_for(lambda: requests_for(fake_ollama, slow) == 2, timeout=5)
    json_request.cancel()
    await fake_ollama.wait_aborted(aborted + 2, timeout=3)
    assert await history_of(served, sid) == []


async def test_history_get_delete_and_tenants(keyed: Served, fake_ollama: FakeOllama) -> None:
    served = keyed
    name = model(fake_ollama)
    sid = new_session()
    alice = {"Authorization": "Bearer key-a"}
    bob = {"Authorization": "Bearer key-b"}
    assert (await served.http.get(f"/history/{sid}", headers=alice)).status_code == 404
    await chat_sse(
        served.http, {"session_id": sid, "message": "alice's", "model": name}, headers=alice
    )

    assert (await served.http.get(f"/history/{sid}", headers=bob)).status_code == 404
    assert (await served.http.delete(f"/history/{sid}", headers=bob)).status_code == 404
    for refused in (
        await served.http.get(f"/history/{sid}"),
        await served.http.get(f"/history/{sid}", headers={"Authorization": "Bearer nope"}),
        await served.http.delete(f"/history/{sid}", headers={"Authorization": "key-a"}),
        await served.http.post("/chat", json={"session_id": sid, "message": "Hi"}),
    ):
        assert refused.status_code == 401
        assert refused.headers["www-authenticate"] == "Bearer"
        assert refused.json()["code"] == "invalid_api_key"

    await chat_sse(served.http, {"session_id": sid, "message": "bob's", "model": name}, headers=bob)
    assert sent_messages(fake_ollama, name)[-1] == [{"role": "user", "content": "bob's"}]
    assert [m["content"] for m in await history_of(served, sid, headers=alice)] == [
        "alice's",
        ANSWER,
    ]

    assert (await served.http.delete(f"/history/{sid}", headers=alice)).status_code == 204
    assert (await served.http.get(f"/history/{sid}", headers=alice)).status_code == 404
    assert (await served.http.delete(f"/history/{sid}", headers=alice)).status_code == 404
    assert len(await history_of(served, sid, headers=bob)) == 2
    assert (await served.http.get("/history/bad", headers=bob)).status_code == 400
    metrics = (await served.http.get("/metrics")).text
    assert 'chatbus_gateway_requests_total{route="/chat",status="200",tenant="a"} 1.0' in metrics


async def test_two_turns_at_once_are_answered_one_after_the_other(
    served: Served, fake_ollama: FakeOllama
) -> None:
    slow = model(fake_ollama, token_delay=0.05)
    sid = new_session()
    first = asyncio.create_task(
        chat_sse(served.http, {"session_id": sid, "message": "one", "model": slow})
    )
    await fake_ollama.wait_for(lambda: requests_for(fake_ollama, slow) == 1, timeout=5)
    second = asyncio.create_task(
        chat_sse(served.http, {"session_id": sid, "message": "two", "model": slow})
    )
    first_events, second_events = await asyncio.gather(first, second)
    assert first_events[-1][0] == second_events[-1][0] == "done"
    assert sent_messages(fake_ollama, slow)[1] == [
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": ANSWER},
        {"role": "user", "content": "two"},
    ], "the second turn waited for the first and was sent with it"
    assert [m["content"] for m in await history_of(served, sid)] == ["one", ANSWER, "two", ANSWER]


async def test_the_bus_gets_the_latest_turns_that_fit_its_limits(
    serve: Serve, fake_ollama: FakeOllama
) -> None:
    name = model(fake_ollama, tokens=["ok"])
    sid = new_session()
    async with serve(max_messages=6, max_prompt_chars=30) as served:
        for n in range(4):
            await chat_sse(
                served.http,
                {"session_id": sid, "message": f"question {n}", "model": name, "system": "S"},
            )
        # System, two turns and the question: 6 messages but 35 characters > 30: one turn fits.
        assert sent_messages(fake_ollama, name)[-1] == [
            {"role": "system", "content": "S"},
            {"role": "user", "content": "question 2"},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "question 3"},
        ]
        assert len(await history_of(served, sid)) == 8, "the stored history keeps every turn"


async def test_history_is_trimmed_to_its_maximum(serve: Serve, fake_ollama: FakeOllama) -> None:
    name = model(fake_ollama, tokens=["ok"])
    sid = new_session()
    async with serve(history_max_messages=4) as served:
        for n in range(3):
            await chat_sse(served.http, {"session_id": sid, "message": f"q{n}", "model": name})
        assert [m["content"] for m in await history_of(served, sid)] == ["q1", "ok", "q2", "ok"]


async def next_event(socket: ClientConnection) -> dict[str, Any]:
    async with asyncio.timeout(10):
        event: dict[str, Any] = json.loads(await socket.recv())
    return event


async def until_terminal(socket: ClientConnection) -> list[dict[str, Any]]:
    events = [await next_event(socket)]
    while events[-1]["type"] in ("chunk", "restarted"):
        events.append(await next_event(socket))
    return events


async def test_websocket_turns_in_order_and_bad_messages(
    served: Served, fake_ollama: FakeOllama
) -> None:
    name = model(fake_ollama, token_delay=0.01)
    sid = new_session()
    async with served.ws(sid) as socket:
        await socket.send(json.dumps({"message": "one", "model": name}))
        await socket.send(json.dumps({"message": "two"}))
        first = await until_terminal(socket)
        second = await until_terminal(socket)
        for events in (first, second):
            assert [e["type"] for e in events] == ["chunk"] * len(DEFAULT_TOKENS) + ["done"]
            assert "".join(e["content"] for e in events[:-1]) == ANSWER
        assert first[-1]["correlation_id"] != second[-1]["correlation_id"]

        for bad in (
            "not json",
            json.dumps({"message": "x", "stream": True}),
            json.dumps({"cancel": False}),
        ):
            await socket.send(bad)
            error = await next_event(socket)
            assert error["type"] == "error"
            assert error["code"] == "invalid_request"
        await socket.send(json.dumps({"message": "x" * 300_000}))
        error = await next_event(socket)
        assert error["code"] == "invalid_request"
        assert "max_" in error["message"]

    assert [m["content"] for m in await history_of(served, sid)] == ["one", ANSWER, "two", ANSWER]
    assert sent_messages(fake_ollama, name)[1][:2] == [
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": ANSWER},
    ]


async def test_websocket_cancel_and_close_stop_the_generation(
    served: Served, fake_ollama: FakeOllama
) -> None:
    slow = model(fake_ollama, token_delay=0.2)
    sid = new_session()
    aborted = fake_ollama.aborted_streams
    async with served.ws(sid) as socket:
        await socket.send(json.dumps({"message": "Hi", "model": slow}))
        assert (await next_event(socket))["type"] == "chunk"
        await socket.send(json.dumps({"cancel": True}))
        events = await until_terminal(socket)
        assert events[-1]["type"] == "error"
        assert events[-1]["code"] == "cancelled"
        await fake_ollama.wait_aborted(aborted + 1, timeout=3)

        await socket.send(json.dumps({"message": "again", "model": slow}))
        assert (await next_event(socket))["type"] == "chunk"
    await fake_ollama.wait_aborted(aborted + 2, timeout=3)
    assert await history_of(served, sid) == []


async def test_websocket_refuses_bad_session_ids_and_keys(keyed: Served) -> None:
    for session_id, headers in (
        ("bad", {"Authorization": "Bearer key-a"}),
        (new_session(), {"Authorization": "Bearer nope"}),
        (new_session(), {}),
    ):
        with pytest.raises(InvalidStatus, match="HTTP 403"):
            async with keyed.ws(session_id, additional_headers=headers):
                pass


async def test_history_text_never_reaches_the_logs(
    served: Served, fake_ollama: FakeOllama, caplog: pytest.LogCaptureFixture
) -> None:
    secret_question = f"secret-{uuid.uuid4().hex}"
    secret_answer = f"private-{uuid.uuid4().hex}"
    name = model(fake_ollama, tokens=[secret_answer])
    sid = new_session()
    # INFO, the service's level, for every library (aiormq logs whole AMQP frames at DEBUG);
    # DEBUG for our own.
    with caplog.at_level(logging.INFO), caplog.at_level(logging.DEBUG, logger="chatbus"):
        await chat_sse(served.http, {"session_id": sid, "message": secret_question, "model": name})
        async with served.ws(sid) as socket:
            await socket.send(json.dumps({"message": secret_question}))
            await until_terminal(socket)
        await served.http.get(f"/history/{sid}")
    [chat_line] = [vars(r) for r in caplog.records if getattr(r, "path", None) == "/chat"]
    assert (chat_line["outcome"], chat_line["model"], chat_line["status"]) == ("stop", name, 200)
    assert chat_line["correlation_id"]
    for record in caplog.records:
        text = record.getMessage() + str(record.__dict__)
        assert secret_question not in text
        assert secret_answer not in text


async def test_the_page_for_browsers_and_ollamas_answer_for_other_clients(
    served: Served,
) -> None:
    browsers_accept = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
    page = await served.http.get("/", headers={"Accept": browsers_accept})
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert page.headers["vary"] == "Accept"
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for accept in ("*/*", "application/json", None):
        headers = {"Accept": accept} if accept else {}
        probe = await served.http.get("/", headers=headers)
        assert (probe.status_code, probe.text) == (200, "Ollama is running")
        assert probe.headers["vary"] == "Accept"
    assert (await served.http.head("/")).status_code == 200
    for path, kind in (("/web/chat.js", "text/javascript"), ("/web/chat.css", "text/css")):
        assert path in page.text
        response = await served.http.get(path)
        assert response.status_code == 200
        assert response.headers["content-type"].startswith(kind)
        assert response.text.strip()


async def test_a_browser_gives_its_key_as_a_subprotocol(
    keyed: Served, fake_ollama: FakeOllama
) -> None:
    served = keyed
    name = model(fake_ollama)
    sid = new_session()
    alice = {"Authorization": "Bearer key-a"}
    await chat_sse(served.http, {"session_id": sid, "message": "one", "model": name}, headers=alice)

    def offering(key: str) -> list[Subprotocol]:
        encoded = base64.urlsafe_b64encode(key.encode()).decode().rstrip("=")
        return [Subprotocol("chatbus"), Subprotocol(f"bearer.{encoded}")]

    async with served.ws(sid, subprotocols=offering("key-a")) as socket:
        assert socket.subprotocol == "chatbus"
        await socket.send(json.dumps({"message": "two"}))
        assert (await until_terminal(socket))[-1]["type"] == "done"
    assert [m["content"] for m in await history_of(served, sid, headers=alice)] == [
        "one",
        ANSWER,
        "two",
        ANSWER,
    ]
    with pytest.raises(InvalidStatus, match="403"):
        async with served.ws(sid, subprotocols=offering("key-c")):
            pass


@pytest.mark.redis
async def test_two_gateways_share_sessions_in_redis(
    serve: Serve, fake_ollama: FakeOllama, redis_url: str, redis_prefix: str
) -> None:
    """Turns sent to one session through two gateways at once: answered one after the
    other (the second with the first in its history), both seen from either gateway."""
    in_redis = {
        "history_url": redis_url,
        "history_key_prefix": f"{redis_prefix}{uuid.uuid4().hex[:8]}:",
    }
    slow = model(fake_ollama, token_delay=0.05)
    sid = new_session()
    async with serve(**in_redis) as one, serve(**in_redis) as two:
        first = asyncio.create_task(
            chat_sse(one.http, {"session_id": sid, "message": "one", "model": slow})
        )
        await fake_ollama.wait_for(lambda: requests_for(fake_ollama, slow) == 1, timeout=5)
        second = asyncio.create_task(
            chat_sse(two.http, {"session_id": sid, "message": "two", "model": slow})
        )
        await asyncio.gather(first, second)
        assert sent_messages(fake_ollama, slow)[1][:2] == [
            {"role": "user", "content": "one"},
            {"role": "assistant", "content": ANSWER},
        ], "the second gateway waited for the first gateway's turn and sent it along"
        for served in (one, two):
            assert [m["content"] for m in await history_of(served, sid)] == [
                "one",
                ANSWER,
                "two",
                ANSWER,
            ]
        assert (await two.http.delete(f"/history/{sid}")).status_code == 204
        assert (await one.http.get(f"/history/{sid}")).status_code == 404


async def test_a_history_store_that_fails_is_a_503_and_the_ollama_api_still_answers(
    serve: Serve, fake_ollama: FakeOllama, tmp_path: Path
) -> None:
    name = model(fake_ollama)
    sid = new_session()
    async with serve(history_url=f"sqlite:///{tmp_path}/no-such-folder/h.sqlite3") as served:
        refused = await served.http.post(
            "/chat", json={"session_id": sid, "message": "Hi", "model": name, "stream": False}
        )
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["code"] == "history_unavailable"
        assert refused.json()["retryable"] is True
        events = await chat_sse(served.http, {"session_id": sid, "message": "Hi", "model": name})
        assert [(kind, data["code"]) for kind, data in events] == [("error", "history_unavailable")]
        assert (await served.http.get(f"/history/{sid}")).status_code == 503

        answer = await served.gateway.ollama().chat(name, [{"role": "user", "content": "Hi"}])
        assert answer.message.content == ANSWER


async def test_the_readme_websocket_example_runs_against_the_gateway(
    served: Served, fake_ollama: FakeOllama, capsys: pytest.CaptureFixture[str]
) -> None:
    code = readme_python_block("The same over the WebSocket").replace(
        "ws://localhost:8080", served.gateway.url.replace("http", "ws", 1)
    )
    # The example runs its own event loop: in a thread, while this one serves the gateway.
    await asyncio.to_thread(exec, compile(code, "README.md", "exec"), {})

    assert capsys.readouterr().out == f"{ANSWER}{ANSWER}\n"
    assert sent_messages(fake_ollama, "llama3.2")[-1] == [
        {"role": "user", "content": "Why is the sky blue?"}
    ]
