"""The mapping of the Ollama client's failures onto the contract's error codes, as the
README's table of codes states it: a call is retried only when Ollama was unavailable before
the first token; once tokens were sent, the requester has seen part of an answer."""

import httpx
import ollama
import pytest

from chatbus.errors import (
    ChatError,
    ChatTimeoutError,
    InvalidRequestError,
    ModelNotFoundError,
    UpstreamError,
    UpstreamUnavailableError,
)
from chatbus.upstream import classify_upstream_error

OLLAMA_TEXT = "what Ollama said"


def answered(status: int) -> ollama.ResponseError:
    """What the client raises for an HTTP error status, or (-1) for an error line mid-stream."""
    return ollama.ResponseError(OLLAMA_TEXT, status)


BEFORE, AFTER = False, True


@pytest.mark.parametrize(
    ("error", "tokens_sent", "failure", "retryable", "retry"),
    [
        pytest.param(answered(400), BEFORE, InvalidRequestError, False, False, id="400-before"),
        pytest.param(answered(400), AFTER, InvalidRequestError, False, False, id="400-after"),
        pytest.param(answered(404), BEFORE, ModelNotFoundError, False, False, id="404-before"),
        pytest.param(answered(404), AFTER, ModelNotFoundError, False, False, id="404-after"),
        pytest.param(answered(500), BEFORE, UpstreamUnavailableError, True, True, id="500-before"),
        pytest.param(answered(500), AFTER, UpstreamError, True, False, id="500-after"),
        pytest.param(answered(502), BEFORE, UpstreamUnavailableError, True, True, id="502-before"),
        pytest.param(answered(502), AFTER, UpstreamError, True, False, id="502-after"),
        pytest.param(answered(503), BEFORE, UpstreamUnavailableError, True, True, id="503-before"),
        pytest.param(answered(503), AFTER, UpstreamError, True, False, id="503-after"),
        pytest.param(answered(504), BEFORE, UpstreamUnavailableError, True, True, id="504-before"),
        pytest.param(answered(504), AFTER, UpstreamError, True, False, id="504-after"),
        pytest.param(answered(-1), BEFORE, UpstreamError, True, False, id="error_line-before"),
        pytest.param(answered(-1), AFTER, UpstreamError, True, False, id="error_line-after"),
        pytest.param(answered(401), BEFORE, UpstreamError, False, False, id="401-before"),
        pytest.param(answered(429), BEFORE, UpstreamError, False, False, id="429-before"),
        pytest.param(answered(429), AFTER, UpstreamError, False, False, id="429-after"),
        pytest.param(answered(501), BEFORE, UpstreamError, False, False, id="501-before"),
        pytest.param(
            httpx.ReadTimeout("timed out"),
            BEFORE,
            ChatTimeoutError,
            True,
            False,
            id="read_timeout-before",
        ),
        pytest.param(
            httpx.ReadTimeout("timed out"),
            AFTER,
            ChatTimeoutError,
            True,
            False,
            id="read_timeout-after",
        ),
        pytest.param(
            ValueError("not JSON"), BEFORE, UpstreamError, True, False, id="unreadable-before"
        ),
        pytest.param(
            ValueError("not JSON"), AFTER, UpstreamError, True, False, id="unreadable-after"
        ),
        pytest.param(
            httpx.ConnectError("refused"),
            BEFORE,
            UpstreamUnavailableError,
            True,
            True,
            id="connect-before",
        ),
        pytest.param(
            httpx.ConnectError("refused"), AFTER, UpstreamError, True, False, id="connect-after"
        ),
        pytest.param(
            ConnectionError("reset by peer"),
            BEFORE,
            UpstreamUnavailableError,
            True,
            True,
            id="connection-before",
        ),
        pytest.param(
            ConnectionError("reset by peer"),
            AFTER,
            UpstreamError,
            True,
            False,
            id="connection-after",
        ),
        pytest.param(
            httpx.RemoteProtocolError("peer closed"),
            BEFORE,
            UpstreamUnavailableError,
            True,
            True,
            id="dropped-before",
        ),
        pytest.param(
            httpx.RemoteProtocolError("peer closed"),
            AFTER,
            UpstreamError,
            True,
            False,
            id="dropped-after",
        ),
    ],
)
def test_classify_upstream_error(
    error: Exception, tokens_sent: bool, failure: type[ChatError], retryable: bool, retry: bool
) -> None:
    classified, retried = classify_upstream_error(error, tokens_sent=tokens_sent)

    assert type(classified) is failure
    assert classified.retryable is retryable
    assert retried is retry


@pytest.mark.parametrize("status", [400, 404, 429, 500, 503, -1])
def test_ollama_s_own_words_are_kept(status: int) -> None:
    classified, _ = classify_upstream_error(answered(status), tokens_sent=False)

    assert OLLAMA_TEXT in classified.message


@pytest.mark.parametrize("tokens_sent", [BEFORE, AFTER])
def test_an_unknown_exception_is_raised_again(tokens_sent: bool) -> None:
    bug = RuntimeError("a bug, not Ollama")

    with pytest.raises(RuntimeError) as raised:
        classify_upstream_error(bug, tokens_sent=tokens_sent)

    assert raised.value is bug
