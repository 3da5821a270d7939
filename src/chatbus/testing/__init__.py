"""Testing kit: a fake Ollama server that speaks the real HTTP API.

``FakeOllama`` is an asyncio HTTP/1.1 server (stdlib only) that imitates the
Ollama server closely enough for the real ``ollama.AsyncClient`` (or plain
httpx) to talk to it: ``POST /api/chat`` (NDJSON streaming over chunked
transfer encoding, or one JSON object with ``"stream": false``), ``GET
/api/tags``, ``POST /api/show``, ``GET /api/ps``, ``GET /api/version`` and
``GET /`` ("Ollama is running").  Unknown paths answer ``404 page not found``.

Quick start::

    from chatbus.testing import Behaviour, FakeOllama

    async with FakeOllama() as fake:            # serves model "llama3.2"
        fake.models["slow"] = Behaviour(token_delay=0.05)
        client = ollama.AsyncClient(host=fake.url)
        async for part in await client.chat("llama3.2", messages=[...], stream=True):
            ...
        await fake.wait_completed()

Behaviour is chosen per model name, so concurrent tests and worker subprocesses
select it by the ``model`` they send.  ``name`` and ``name:latest`` are the
same model; a name that is not in ``fake.models`` gets 404
``model "NAME" not found, try pulling it first``.

A chat request replays ``Behaviour.tokens`` as ``done: false`` chunks (with
``think`` set, ``Behaviour.thinking`` first as ``message.thinking`` chunks;
with ``tools`` in the request and ``Behaviour.tool_calls`` set, one more chunk
carrying ``message.tool_calls``), then a final chunk with ``done: true``,
``done_reason`` and the usage fields (``total_duration``, ``load_duration``,
``prompt_eval_count``, ``prompt_eval_duration``, ``eval_count``,
``eval_duration``; nanoseconds).  ``options.num_predict`` smaller than the
number of tokens truncates the reply and gives ``done_reason: "length"``.
An empty ``messages`` list answers ``done_reason: "load"`` (``"unload"`` with
``keep_alive: 0``), as Ollama does.

Timing and fault modes (fields of :class:`Behaviour`):

``token_delay``
    Seconds between chunks.
``first_token_delay``
    Seconds before the status line, headers and first chunk (Ollama sends the
    headers with the first chunk): a cold model load.
``status`` (400, 404, 500, 503, ...)
    Answer at once with that status and Ollama's JSON error body, e.g. 503
    ``{"error": "server busy, please try again.  maximum pending requests
    exceeded"}``.  ``error_message`` overrides the text.
``error_after=N``
    Send N chunks, then an NDJSON line ``{"error": "..."}`` and end the body
    (HTTP 200 kept; ``ollama`` raises ``ResponseError`` with status_code -1).
    With N=0, or with ``"stream": false``, the answer is HTTP 500 with the error.
``disconnect_after=N``
    Send N chunks, then close the TCP connection without finishing the chunked
    body (httpx raises ``RemoteProtocolError``).
``stall_after=N``
    Send N chunks, then nothing more; the connection stays open until the
    client gives up (use a client read timeout).
``fail_times=N``
    Only the first N chat requests for the model hit the fault(s) above; later
    ones are served normally (retry-then-recover tests).  ``None`` = always.

The fault counters (N) count ``done: false`` chunks of any kind.

Loaded models, as Ollama's scheduler keeps them (per server, settable at any time):
``FakeOllama(load_time=S, max_loaded_models=N)``.  A chat for a model that is not
loaded first waits ``load_time`` seconds for its load (reported in ``load_duration``);
concurrent requests for it share the load, and one load runs at a time.  With
``max_loaded_models`` models loaded, loading another unloads the least recently used one
once the requests using it have ended.  ``GET /api/ps`` lists the loaded models;
``keep_alive: 0`` unloads after the request.  ``fake.model_loads`` and
``fake.model_unloads`` count the swaps, ``fake.loaded_models()`` names what is loaded.
Each server has its own ``fake.models``: run several to have servers with different models.

Observability: ``fake.requests`` (every ``/api/chat`` JSON body, in order),
``active_streams``, ``max_active_streams``, ``completed_streams``,
``aborted_streams`` (the client closed the connection before the reply was
complete; detected at once, even during a delay, by watching the socket),
``errored_streams`` (injected faults), ``connections_opened``, ``model_loads``,
``model_unloads``; ``stats()``,
``reset_stats()``.  Wait for a condition without polling with
``await fake.wait_for(lambda: ..., timeout)``, ``wait_aborted(n)``,
``wait_completed(n)`` or ``wait_idle()``; they raise ``TimeoutError``.

The worker itself: ``running_worker(settings)`` runs it in this process (an async
context manager); ``WorkerProcess(settings)`` as a real process, started as production
starts it, for tests that kill it.

Standalone: ``python -m chatbus.testing.fake_ollama --host 127.0.0.1 --port 11434
[--tokens N] [--token-delay S] [--first-token-delay S] [--model NAME ...]
[--load-time S] [--max-loaded-models N] [--behaviour 'NAME={"error_after": 2}' ...]``
prints its URL, serves until SIGINT/SIGTERM, then prints its ``stats()`` as a JSON line;
``--behaviour`` adds a model with its own :class:`Behaviour` (its fields
as JSON), so the fault modes work across processes too.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from chatbus.testing.fake_ollama import Behaviour, FakeOllama
    from chatbus.testing.workers import WorkerProcess, running_worker, settings_env

_MODULE_OF = {
    "Behaviour": "fake_ollama",
    "FakeOllama": "fake_ollama",
    "WorkerProcess": "workers",
    "running_worker": "workers",
    "settings_env": "workers",
}
__all__ = ["Behaviour", "FakeOllama", "WorkerProcess", "running_worker", "settings_env"]


def __getattr__(name: str) -> Any:
    # Imported lazily so that ``python -m chatbus.testing.fake_ollama`` does not find
    # the module already imported by its package (runpy warns about that), and the fake
    # needs none of the worker's imports.
    if name in _MODULE_OF:
        module = importlib.import_module(f"chatbus.testing.{_MODULE_OF[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
