"""Logs and traces of a running worker."""

import asyncio
import json
import logging
import re
import signal
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from aio_pika.abc import AbstractRobustConnection
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from chatbus.observability import JsonFormatter, TextFormatter
from chatbus.settings import Settings
from chatbus.testing import WorkerProcess, running_worker
from chatbus.testing.fake_ollama import DEFAULT_TOKENS
from tests.support import Requester, healthcheck_command, user


async def test_the_service_logs_json_lines_and_serves_http_on_its_port(
    make_settings: Callable[..., Settings], amqp: AbstractRobustConnection
) -> None:
    settings = make_settings(log_format="json", http_host="127.0.0.1", http_port=0)
    secret = f"my secret question {uuid.uuid4().hex}"
    correlation_id = uuid.uuid4().hex
    worker = await WorkerProcess(settings).start()
    try:
        port = int(
            next(
                m.group(1)
                for line in worker.output
                if (m := re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", line))
            )
        )
        async with Requester(amqp, settings) as requester:
            replies = await requester.chat(user(secret), correlation_id=correlation_id)
        # Run as the container's HEALTHCHECK runs (python on PATH, HTTP_PORT set).
        health = await asyncio.create_subprocess_exec(
            *healthcheck_command(),
            env={"HTTP_PORT": str(port), "PATH": str(Path(sys.executable).parent)},
        )
        assert await health.wait() == 0
        await worker.signal(signal.SIGTERM)
        assert await worker.wait() == 0
    finally:
        await worker.kill()

    assert replies[-1]["type"] == "done"
    lines = [json.loads(line) for line in worker.output]  # every line is one JSON object
    request_lines = [line for line in lines if line.get("correlation_id") == correlation_id]
    assert len(request_lines) == 1
    line = request_lines[0]
    assert line["level"] == "INFO"
    assert line["logger"] == "chatbus.worker"
    assert line["attempt"] == 1
    assert line["model"] == "llama3.2"
    assert line["outcome"] == "stop"
    assert isinstance(line["duration_ms"], int)
    assert isinstance(line["first_token_ms"], int)
    assert all(secret not in output for output in worker.output)
    assert all("".join(DEFAULT_TOKENS) not in output for output in worker.output)


def test_text_logs_show_the_extra_fields() -> None:
    record = logging.makeLogRecord(
        {
            "name": "chatbus.worker",
            "levelname": "INFO",
            "msg": "request done: %s",
            "args": ("stop",),
            "correlation_id": "abc",
            "outcome": "stop",
        }
    )

    text = TextFormatter().format(record)
    entry = json.loads(JsonFormatter().format(record))

    assert text.endswith(
        "INFO    chatbus.worker: request done: stop correlation_id=abc outcome=stop"
    )
    assert entry["message"] == "request done: stop"
    assert (entry["correlation_id"], entry["outcome"]) == ("abc", "stop")


class OtlpCollector:
    """An OTLP/HTTP trace receiver: what the worker's exporter sends, decoded."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = ExportTraceServiceRequest.FromString(body)
                for resource_spans in request.resource_spans:
                    for scope_spans in resource_spans.scope_spans:
                        collector.spans.extend(scope_spans.spans)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @contextmanager
    def running(self) -> Iterator["OtlpCollector"]:
        thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._server.shutdown()
            thread.join()


async def test_trace_context_flows_from_the_request_through_ollama_to_the_replies(
    make_settings: Callable[..., Settings], amqp: AbstractRobustConnection
) -> None:
    trace_id = uuid.uuid4().hex
    parent_span_id = uuid.uuid4().hex[:16]
    with OtlpCollector().running() as collector:
        settings = make_settings(otel_enabled=True, otel_exporter_otlp_endpoint=collector.url)
        async with running_worker(settings), Requester(amqp, settings) as requester:
            replies = await requester.send(
                user(), headers={"traceparent": f"00-{trace_id}-{parent_span_id}-01"}
            )
            reply_headers = []
            while True:
                message = await asyncio.wait_for(replies.messages.get(), 10)
                reply_headers.append(message.headers)
                if json.loads(message.body)["type"] != "chunk":
                    break
        # Stopping the worker flushed its spans to the collector.
    spans = [span for span in collector.spans if span.trace_id.hex() == trace_id]

    by_name = {span.name: span for span in spans}
    process = by_name[f"{settings.requests_queue} process"]
    assert process.parent_span_id.hex() == parent_span_id
    # Every reply carries the trace context of the request's processing.
    assert {tuple(str(h["traceparent"]).split("-")[1:3]) for h in reply_headers} == {
        (trace_id, process.span_id.hex())
    }
    ollama = by_name["chat llama3.2"]
    assert ollama.kind == Span.SpanKind.SPAN_KIND_CLIENT
    assert ollama.parent_span_id == process.span_id
    attributes = {a.key: a.value.string_value for a in ollama.attributes}
    assert attributes["gen_ai.request.model"] == "llama3.2"


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_log_format_setting_is_validated(log_format: str) -> None:
    assert Settings(log_format=log_format).log_format == log_format
    with pytest.raises(ValueError, match="log_format"):
        Settings(log_format="xml")


def test_http_side_channel_defaults_to_port_8000() -> None:
    assert Settings.model_fields["http_port"].default == 8000
