"""What the worker reads from a request message before it calls Ollama: the deadline, the
delivery attempt, cancels that came first, and the request within every limit.

The messages are aio-pika's own `IncomingMessage`s, their properties sent through pamqp's
wire encoding and back, so the headers have the types a worker really receives."""

import json
from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, cast

import pytest
from aio_pika import IncomingMessage
from aiormq.abc import AbstractChannel, DeliveredMessage
from pamqp import commands, frame
from pamqp.header import ContentHeader

from chatbus import intake
from chatbus.contract import DEADLINE_HEADER
from chatbus.errors import InvalidRequestError
from chatbus.intake import RecentCancels, delivery_attempt, parse_request, request_deadline
from chatbus.settings import Limits

EPOCH = 1_795_303_520  # 2026-11-22, Unix seconds
DEFAULT_LIMITS = Limits()


def delivered(
    headers: dict[str, Any] | None = None,
    *,
    expiration_ms: str | None = None,
    timestamp: datetime | None = None,
    redelivered: bool = False,
) -> IncomingMessage:
    """A message as aio-pika hands it to a consumer."""
    properties = commands.Basic.Properties(
        headers=headers, expiration=expiration_ms, timestamp=timestamp
    )
    _, _, header = frame.unmarshal(frame.marshal(ContentHeader(0, 0, properties), 1))
    assert isinstance(header, ContentHeader)
    delivery = commands.Basic.Deliver(
        consumer_tag="test", delivery_tag=1, redelivered=redelivered, routing_key="chat.requests"
    )
    # Only acking needs the channel, and these messages are never acked.
    no_channel = cast(AbstractChannel, None)
    return IncomingMessage(DeliveredMessage(delivery, header, b"{}", no_channel))


class FakeClock:
    """Stands in for the `time` module inside `chatbus.intake`."""

    def __init__(self, now: float) -> None:
        self.now = now

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock(EPOCH)
    monkeypatch.setattr(intake, "time", fake)
    return fake


# ----------------------------------------------------------------------------- deadline


@pytest.mark.parametrize(
    ("header", "deadline"),
    [
        pytest.param(EPOCH, EPOCH, id="int"),
        # pamqp sends a float in 32 bits (as the README warns): this one is exact in 32 bits.
        pytest.param(1_795_303_424.0, 1_795_303_424.0, id="float"),
        pytest.param(Decimal(EPOCH), EPOCH, id="decimal"),
        pytest.param(f"{EPOCH}.250", EPOCH + 0.25, id="decimal_string"),
        pytest.param(f"{EPOCH}", EPOCH, id="integer_string"),
        pytest.param(
            bytearray(f"{EPOCH}".encode()),
            EPOCH,
            id="byte_array",
        ),
        pytest.param(datetime.fromtimestamp(EPOCH, UTC), EPOCH, id="amqp_timestamp"),
    ],
)
def test_x_deadline_header(header: object, deadline: float) -> None:
    assert request_deadline(delivered({DEADLINE_HEADER: header})) == deadline


@pytest.mark.parametrize(
    "header",
    [
        pytest.param("soon", id="word"),
        pytest.param("", id="empty"),
        pytest.param(True, id="bool"),
        pytest.param([EPOCH], id="array"),
        pytest.param({"at": EPOCH}, id="table"),
        pytest.param(
            "nan",
            id="nan",
        ),
    ],
)
def test_a_garbage_x_deadline_is_an_invalid_request(header: object) -> None:
    with pytest.raises(InvalidRequestError) as raised:
        request_deadline(delivered({DEADLINE_HEADER: header}))

    assert DEADLINE_HEADER in raised.value.message
    assert not raised.value.retryable


def test_no_deadline() -> None:
    assert request_deadline(delivered()) is None


def test_expiration_counts_from_the_timestamp() -> None:
    sent = datetime.fromtimestamp(EPOCH, UTC)

    deadline = request_deadline(delivered(expiration_ms="30000", timestamp=sent))

    assert deadline == EPOCH + 30


def test_expiration_without_a_timestamp_counts_from_now(clock: FakeClock) -> None:
    clock.now = EPOCH + 100

    assert request_deadline(delivered(expiration_ms="1500")) == EPOCH + 101.5


@pytest.mark.parametrize(
    ("header", "deadline"),
    [
        pytest.param(EPOCH + 10, EPOCH + 10, id="header_first"),
        pytest.param(EPOCH + 60, EPOCH + 30, id="expiration_first"),
    ],
)
def test_header_and_expiration_the_earlier_wins(header: int, deadline: int) -> None:
    message = delivered(
        {DEADLINE_HEADER: header},
        expiration_ms="30000",
        timestamp=datetime.fromtimestamp(EPOCH, UTC),
    )

    assert request_deadline(message) == deadline


# ----------------------------------------------------------------------------- attempt


@pytest.mark.parametrize(
    ("headers", "redelivered", "attempt"),
    [
        pytest.param(None, False, 1, id="first"),
        pytest.param(None, True, 2, id="redelivered_without_count"),
        pytest.param({"x-delivery-count": 1}, True, 2, id="count_1"),
        pytest.param({"x-delivery-count": 4}, True, 5, id="count_4"),
        pytest.param({"x-delivery-count": "4"}, True, 2, id="count_not_a_number"),
        pytest.param({"x-delivery-count": -1}, False, 1, id="count_negative"),
    ],
)
def test_delivery_attempt(headers: dict[str, Any] | None, redelivered: bool, attempt: int) -> None:
    assert delivery_attempt(delivered(headers, redelivered=redelivered)) == attempt


# ----------------------------------------------------------------------------- cancels


def test_a_cancel_is_taken_once() -> None:
    cancels = RecentCancels(ttl=60.0)
    cancels.add("a")

    assert cancels.pop("a")
    assert not cancels.pop("a")
    assert not cancels.pop("never-cancelled")


def test_a_cancel_is_kept_for_its_ttl(clock: FakeClock) -> None:
    cancels = RecentCancels(ttl=10.0)
    cancels.add("kept")
    cancels.add("expired")

    clock.now += 10.0
    assert cancels.pop("kept")
    clock.now += 0.001
    assert not cancels.pop("expired")


def test_a_cancel_added_again_is_kept_from_then(clock: FakeClock) -> None:
    cancels = RecentCancels(ttl=10.0)
    cancels.add("a")
    clock.now += 8.0
    cancels.add("a")
    clock.now += 8.0

    assert cancels.pop("a")


def test_the_oldest_cancels_go_past_max_entries() -> None:
    cancels = RecentCancels(ttl=60.0, max_entries=2)
    for correlation_id in ("a", "b", "a", "c"):
        cancels.add(correlation_id)

    assert [cancels.pop(c) for c in ("a", "b", "c")] == [True, False, True]


# ----------------------------------------------------------------------------- the request


def body(**fields: Any) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": "hello"}]} | fields).encode()


def parse(
    raw: bytes,
    limits: Limits = DEFAULT_LIMITS,
    content_type: str | None = "application/json",
    default_model: str = "llama3.2",
) -> None:
    parse_request(raw, content_type, limits, default_model)


THREE_MESSAGES = body(
    messages=[
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    ]
)


@pytest.mark.parametrize(
    ("raw", "limit", "value"),
    [
        pytest.param(THREE_MESSAGES, "max_request_bytes", len(THREE_MESSAGES), id="bytes"),
        pytest.param(THREE_MESSAGES, "max_messages", 3, id="messages"),
        pytest.param(THREE_MESSAGES, "max_prompt_chars", len("Be brief.HiHello"), id="chars"),
        pytest.param(body(options={"num_predict": 50}), "max_num_predict", 50, id="num_predict"),
    ],
)
def test_a_request_at_a_limit_passes_and_one_over_fails_naming_it(
    raw: bytes, limit: str, value: int
) -> None:
    at_limit: dict[str, Any] = {limit: value}
    one_under: dict[str, Any] = {limit: value - 1}
    parse(raw, replace(DEFAULT_LIMITS, **at_limit))

    with pytest.raises(InvalidRequestError) as raised:
        parse(raw, replace(DEFAULT_LIMITS, **one_under))

    assert f"{value}, over the limit {limit}={value - 1}" in raised.value.message
    assert not raised.value.retryable


@pytest.mark.parametrize(
    "num_predict",
    [
        pytest.param(-1, id="negative"),
        pytest.param(-2, id="other_negative"),
        pytest.param(
            4097.0,
            id="float",
        ),
        pytest.param(
            -1.0,
            id="negative_float",
        ),
    ],
)
def test_num_predict_unlimited_or_over_the_limit_fails(num_predict: float) -> None:
    with pytest.raises(InvalidRequestError, match="max_num_predict"):
        parse(body(options={"num_predict": num_predict}), Limits(max_num_predict=4096))


def test_no_num_predict_passes() -> None:
    parse(body(options={"temperature": 0.2}), Limits(max_num_predict=1))


@pytest.mark.parametrize(
    ("model", "default_model", "allowed", "passes"),
    [
        pytest.param("llama3.2", "llama3.2", ("llama3.2", "qwen3"), True, id="allowed"),
        pytest.param("mistral", "llama3.2", ("llama3.2", "qwen3"), False, id="not_allowed"),
        pytest.param(None, "mistral", ("llama3.2",), False, id="default_not_allowed"),
        pytest.param(None, "qwen3", ("llama3.2", "qwen3"), True, id="default_allowed"),
        pytest.param("mistral", "llama3.2", (), True, id="no_list_allows_all"),
    ],
)
def test_allowed_models(
    model: str | None, default_model: str, allowed: tuple[str, ...], passes: bool
) -> None:
    raw = body(model=model) if model else body()
    limits = Limits(allowed_models=allowed)
    if passes:
        parse(raw, limits, default_model=default_model)
        return
    with pytest.raises(InvalidRequestError, match="allowed_models"):
        parse(raw, limits, default_model=default_model)


@pytest.mark.parametrize("content_type", [None, "", "application/json"])
def test_json_content_types_pass(content_type: str | None) -> None:
    request = parse_request(body(), content_type, DEFAULT_LIMITS, "llama3.2")

    assert request.messages[0].content == "hello"


@pytest.mark.parametrize("content_type", ["text/plain", "application/xml", "application/msgpack"])
def test_other_content_types_fail(content_type: str) -> None:
    with pytest.raises(InvalidRequestError, match="content type must be application/json"):
        parse(body(), content_type=content_type)


@pytest.mark.parametrize("raw", [b"{", b"", b"\xff\xfe", b"hello"])
def test_invalid_json_fails(raw: bytes) -> None:
    with pytest.raises(InvalidRequestError, match="body is not valid JSON"):
        parse(raw)


@pytest.mark.parametrize(
    ("raw", "where"),
    [
        pytest.param(b"{}", "messages: Field required", id="no_messages"),
        pytest.param(body(messages=[]), "messages: List should have at least 1 item", id="empty"),
        pytest.param(
            body(messages=[{"role": "robot", "content": "hi"}]), "messages.0.role: ", id="role"
        ),
        pytest.param(body(temperature=0.2), "temperature: Extra inputs", id="unknown_field"),
        pytest.param(body(think="very"), "think", id="think"),
        pytest.param(b"[]", "body: ", id="not_an_object"),
    ],
)
def test_a_schema_violation_fails_naming_the_field(raw: bytes, where: str) -> None:
    with pytest.raises(InvalidRequestError) as raised:
        parse(raw)

    assert where in raised.value.message
    assert not raised.value.retryable
