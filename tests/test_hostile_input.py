"""Careless and hostile requests through the real worker: what issue 15 found, end to end."""

import json
import logging
from typing import Any

import pytest

from tests.support import Requester, user


async def test_json_with_a_charset_or_in_capitals_is_answered(requester: Requester) -> None:
    for content_type in ("application/json; charset=utf-8", "APPLICATION/JSON"):
        replies = await requester.chat(user(), content_type=content_type)

        assert replies[-1]["type"] == "done", replies[-1]


async def test_a_huge_model_name_is_refused_in_a_short_reply_and_a_short_log_line(
    requester: Requester, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="chatbus.worker"):
        replies = await requester.chat(user(model="m" * 900_000))

    error = replies[-1]
    assert (error["type"], error["code"]) == ("error", "invalid_request")
    assert "max_model_chars=256" in error["message"]
    assert len(json.dumps(error)) < 1000
    lines: list[dict[str, Any]] = [
        {"message": r.getMessage(), **r.__dict__} for r in caplog.records
    ]
    assert all(len(str(line)) < 10_000 for line in lines)


async def test_an_escaped_lone_surrogate_is_an_invalid_request(requester: Requester) -> None:
    body = b'{"messages": [{"role": "user", "content": "caf\\udce9"}]}'

    replies = await requester.chat(body)

    assert (replies[-1]["type"], replies[-1].get("code")) == ("error", "invalid_request")
