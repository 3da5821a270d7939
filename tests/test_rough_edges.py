"""Rough edges a new user hits (issue 15), checked without a broker: content types,
free-text fields that are echoed or logged, settings that cannot work, and what the client
refuses before it sends anything."""

import json
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from chatbus import topology
from chatbus.client import ChatClient
from chatbus.contract import NAMES
from chatbus.errors import InvalidRequestError, UpstreamError
from chatbus.intake import parse_request, request_deadline
from chatbus.service import create_app
from chatbus.settings import BusSettings, Limits, Settings, settings_problems
from chatbus.testing import settings_env

SHORT_ECHO = 120
"""No error message may echo more of a hostile value than a short prefix."""
PREFIX_CHARS = 40


def body(**fields: Any) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": "hi"}], **fields}).encode()


# --- 1. content types -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json; charset=utf-8",
        "application/json;charset=UTF-8",
        'application/json; charset="utf-8"',
        "APPLICATION/JSON",
        "Application/Json ; charset=utf8",
    ],
)
def test_json_is_accepted_whatever_its_case_and_with_a_utf8_charset(content_type: str) -> None:
    request = parse_request(body(), content_type, Limits(), "llama3.2")

    assert request.messages[0].content == "hi"


def test_a_charset_other_than_utf8_is_refused_by_name() -> None:
    with pytest.raises(InvalidRequestError, match="charset 'latin-1' is not supported"):
        parse_request(body(), "application/json; charset=latin-1", Limits(), "llama3.2")


@pytest.mark.parametrize("content_type", ["text/plain", "application/jsonx", "json"])
def test_other_media_types_are_refused(content_type: str) -> None:
    with pytest.raises(InvalidRequestError, match="content type must be application/json"):
        parse_request(body(), content_type, Limits(), "llama3.2")


# --- 4. nothing long is echoed -----------------------------------------------------------------


def test_a_model_name_over_max_model_chars_is_refused_without_being_echoed() -> None:
    name = "m" * 900_000

    with pytest.raises(InvalidRequestError) as raised:
        parse_request(body(model=name), "application/json", Limits(), "llama3.2")

    assert "max_model_chars=256" in raised.value.message
    assert len(raised.value.message) < SHORT_ECHO


def test_max_model_chars_is_a_setting() -> None:
    limits = Settings(max_model_chars=8).limits

    parse_request(body(model="m" * 8), None, limits, "llama3.2")
    with pytest.raises(InvalidRequestError, match="max_model_chars=8"):
        parse_request(body(model="m" * 9), None, limits, "llama3.2")


@pytest.mark.parametrize(
    ("raw", "content_type"),
    [
        (body(), "x" * 250),  # AMQP caps the content type at 255 bytes
        (body(), "application/json; charset=" + "x" * 200),
        (json.dumps({"messages": [], "x" * 100_000: 1}).encode(), None),
        (body(model="x" * 200), None),
    ],
)
def test_an_invalid_request_is_never_echoed_at_length(raw: bytes, content_type: str) -> None:
    limits = Limits(allowed_models=("llama3.2",))
    with pytest.raises(InvalidRequestError) as raised:
        parse_request(raw, content_type, limits, "llama3.2")

    assert "x" * PREFIX_CHARS in raised.value.message
    assert "x" * (PREFIX_CHARS + 1) not in raised.value.message


def test_thousands_of_schema_violations_are_counted_not_listed() -> None:
    raw = json.dumps({"messages": [{"role": "robot"}] * 400, "extra": 1}).encode()

    with pytest.raises(InvalidRequestError) as raised:
        parse_request(raw, None, Limits(), "llama3.2")

    assert raised.value.message.startswith("messages.0.role: Input should be")
    assert raised.value.message.endswith("(and 398 more)")


def test_the_error_message_of_a_long_deadline_header_shows_only_a_prefix() -> None:
    message = SimpleNamespace(headers={"x-deadline": "soon" * 10_000}, expiration=None)

    with pytest.raises(InvalidRequestError) as raised:
        request_deadline(message)  # type: ignore[arg-type]

    assert "x-deadline" in raised.value.message
    assert len(raised.value.message) < SHORT_ECHO


def test_no_error_message_is_longer_than_a_screen() -> None:
    error = UpstreamError("Ollama failed: " + "x" * 1_000_000, retryable=True)

    assert error.message.startswith("Ollama failed: xxx")
    assert len(error.message) < 1100
    assert "1000015 characters" in error.message


# --- 2. RABBITMQ_URL ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("localhost:5672", "must start with amqp:// or amqps://"),
        ("notaurl", "must start with amqp:// or amqps://"),
        ("amqp:/localhost", "must start with amqp:// or amqps://"),
        ("http://guest:secret@localhost/", "must start with amqp:// or amqps://"),
        ("amqp://guest:secret@:5672/", "has no host"),
        ("amqp://guest:secret@localhost:port/", "has a port that is not a number"),
        ("amqp://guest:secret@localhost:99999/", "has a port that is not a number"),
        ("amqp://guest:secret@rabbit-1/,", "address 2 is empty"),
        ("amqp://guest:secret@rabbit-1/,rabbit-2:x", "address 2 has a port that is not"),
        ("amqp://guest:secret@rabbit-1/,guest:secret@rabbit-2", "address 2 must be a whole URL"),
        ("amqp://guest:secret@rabbit-1/,rabbit-2/vhost", "address 2 must be a whole URL"),
    ],
)
def test_a_malformed_rabbitmq_url_is_named_without_its_password(url: str, problem: str) -> None:
    with pytest.raises(ValidationError) as raised:
        BusSettings(rabbitmq_url=url)

    line = settings_problems(raised.value)
    assert line.startswith(f"RABBITMQ_URL: {problem}")
    assert "\n" not in line
    assert "secret" not in line


@pytest.mark.parametrize(
    "url",
    [
        "amqp://guest:guest@localhost:5672/",
        "amqps://user:pw@rabbit.example.com/prod",
        "amqp://localhost",
        "amqp://[::1]:5672/%2F",
        "amqp://guest:guest@rabbit-1:5672/,rabbit-2:5672,rabbit-3",
        "amqp://guest:guest@rabbit-1/,amqps://other:pw@rabbit-2:5671/",
    ],
)
def test_usable_rabbitmq_urls_are_accepted(url: str) -> None:
    assert BusSettings(rabbitmq_url=url).rabbitmq_url == url


# --- 3. the client refuses what it cannot send, in one line --------------------------------------


async def test_the_client_refuses_text_that_is_not_utf8_before_sending_anything() -> None:
    client = ChatClient("amqp://guest:guest@127.0.0.1:1/")  # never connected

    with pytest.raises(InvalidRequestError, match="not valid UTF-8") as raised:
        await client.chat("caf\udce9")  # b"caf\xe9" as Python decodes arguments
    with pytest.raises(InvalidRequestError, match="not valid UTF-8"):
        client.stream([{"role": "user", "content": "hi"}], options={"stop": ["\udce9"]})

    assert raised.value.retryable is False


def test_the_clients_schema_violations_are_one_line() -> None:
    client = ChatClient("amqp://guest:guest@127.0.0.1:1/")

    with pytest.raises(InvalidRequestError) as raised:
        client.stream([{"role": "robot", "content": "hi"}] * 5, model="")

    assert "\n" not in raised.value.message
    assert raised.value.message.startswith("messages.0.role: Input should be ")
    assert raised.value.message.endswith("(and 3 more)")


# --- 5. bounded queues -------------------------------------------------------------------------


def test_queue_bounds_are_settings_and_left_out_of_the_arguments_when_unset(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    unbounded = Settings()
    assert topology.requests_queue(NAMES, 5, unbounded.queue_bounds).arguments == (
        topology.requests_queue(NAMES, 5).arguments
    )
    assert "x-max-length" not in (topology.requests_queue(NAMES, 5).arguments or {})
    assert topology.dead_letter_queue(NAMES).arguments == {"x-queue-type": "quorum"}

    for name, value in [
        ("MAX_QUEUED_REQUESTS", "10000"),
        ("MAX_QUEUED_BYTES", "50000000"),
        ("DLQ_MAX_LENGTH", "1000"),
        ("DLQ_MAX_AGE", "86400"),
    ]:
        monkeypatch.setenv(name, value)
    bounds = Settings().queue_bounds

    requests = topology.requests_queue(NAMES, 5, bounds).arguments or {}
    assert requests["x-max-length"] == 10_000
    assert requests["x-max-length-bytes"] == 50_000_000
    assert requests["x-overflow"] == "reject-publish"
    dead_letters = topology.dead_letter_queue(NAMES, bounds).arguments or {}
    assert dead_letters["x-max-length"] == 1000
    assert dead_letters["x-message-ttl"] == 86_400_000


@pytest.mark.parametrize("bounds", [{}, {"max_queued_requests": 10, "dlq_max_age": 0.5}])
def test_a_worker_process_gets_the_queue_bounds_it_was_given(
    monkeypatch: pytest.MonkeyPatch, bounds: dict[str, Any]
) -> None:
    given = Settings(**bounds)
    for name, value in settings_env(given).items():
        monkeypatch.setenv(name, value)

    assert Settings().queue_bounds == given.queue_bounds


# --- 8. what the README says of num_predict: over the limit is refused, whatever its type --------


@pytest.mark.parametrize(
    ("num_predict", "refused_as"),
    [
        (4097, "options.num_predict is 4097, over the limit max_num_predict=4096"),
        (4097.0, "options.num_predict is 4097.0, over the limit max_num_predict=4096"),
        (1e9, "options.num_predict is 1000000000.0, over the limit"),
        (-1, "options.num_predict -1 asks for no limit, over the limit max_num_predict=4096"),
        (-1.0, "options.num_predict -1.0 asks for no limit"),
        ("100000", 'options.num_predict must be a number, got "100000"'),
        (True, "options.num_predict must be a number, got true"),
    ],
)
def test_num_predict_over_the_limit_is_refused_whatever_its_type(
    num_predict: object, refused_as: str
) -> None:
    with pytest.raises(InvalidRequestError) as raised:
        parse_request(body(options={"num_predict": num_predict}), None, Limits(), "llama3.2")

    assert raised.value.message.startswith(refused_as)


@pytest.mark.parametrize("num_predict", [0, 1, 4096, 4096.0, 128.0])
def test_num_predict_within_the_limit_is_passed_on(num_predict: float) -> None:
    request = parse_request(body(options={"num_predict": num_predict}), None, Limits(), "m")

    assert request.options == {"num_predict": num_predict}


# --- 8. the side channel's unknown paths -------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/health", "/docs", "/metrics/x"])
async def test_an_unknown_side_channel_path_is_a_plain_404_listing_the_endpoints(
    path: str,
) -> None:
    app = create_app(Settings(http_port=0))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://worker") as http:
        response = await http.get(path)

    assert response.status_code == 404
    assert response.headers["content-type"] == "text/plain; charset=utf-8"
    assert response.text == (
        "404 Not Found. The worker's endpoints:\n"
        "/healthz\n/readyz\n/metrics\n/docs/asyncapi\n/docs/asyncapi.json\n"
    )


def test_an_escaped_lone_surrogate_is_refused_and_a_whole_pair_taken() -> None:
    emoji = json.dumps({"messages": [{"role": "user", "content": "hi \U0001f600"}]})
    assert "\\ud83d\\ude00" in emoji  # json.dumps escapes it as a surrogate pair

    assert parse_request(emoji.encode(), None, Limits(), "m").messages[0].content == "hi 😀"
    with pytest.raises(InvalidRequestError, match="not valid Unicode"):
        parse_request(body(options={"stop": ["caf\udce9"]}), None, Limits(), "m")
