"""Against a real Ollama: run when OLLAMA_HOST (default localhost:11434) answers and has a
model, skipped otherwise."""

import os
from collections.abc import Callable

import httpx
import pytest
from aio_pika.abc import AbstractRobustConnection

from chatbus.settings import Settings
from chatbus.testing import running_worker
from tests.support import Requester, user

OLLAMA_HOST = os.environ.get("OLLAMA_HOST", "http://localhost:11434")


def _first_model() -> str | None:
    try:
        models = httpx.get(f"{OLLAMA_HOST}/api/tags", timeout=2).json()["models"]
    except (httpx.HTTPError, ValueError, KeyError):
        return None
    return str(models[0]["name"]) if models else None


MODEL = _first_model()
pytestmark = pytest.mark.skipif(MODEL is None, reason=f"no Ollama with a model at {OLLAMA_HOST}")


async def test_a_real_model_streams_an_answer(
    make_settings: Callable[..., Settings], amqp: AbstractRobustConnection
) -> None:
    settings = make_settings(ollama_host=OLLAMA_HOST, first_token_timeout=300, idle_timeout=60)
    async with running_worker(settings), Requester(amqp, settings) as requester:
        replies = await (await requester.send(user("Say hello.", model=MODEL))).until_terminal(300)

    done = replies[-1]
    assert done["type"] == "done", done
    assert done["message"]["content"]
    assert done["usage"]["completion_tokens"] > 0
