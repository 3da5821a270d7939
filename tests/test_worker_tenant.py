"""The x-tenant request header on the worker's side: in the request's log line, and counted by
tenant in a metric whose label values stay bounded whatever requesters send."""

import logging
import uuid
from collections.abc import Callable

import pytest
from aio_pika.abc import AbstractRobustConnection

from chatbus.contract import TENANT_HEADER
from chatbus.intake import request_tenant
from chatbus.observability import TenantLabels
from chatbus.settings import Settings
from chatbus.testing import running_worker
from tests.support import Requester, http, samples, user, value
from tests.test_intake import delivered


@pytest.mark.parametrize(
    ("header", "tenant"),
    [
        (None, None),
        ("acme", "acme"),
        (bytearray(b"acme"), "acme"),
        (42, "42"),
        ("x" * 500, "x" * 64),
    ],
)
def test_the_tenant_header_is_read_as_text_of_at_most_64_characters(
    header: object, tenant: str | None
) -> None:
    headers = None if header is None else {TENANT_HEADER: header}

    assert request_tenant(delivered(headers)) == tenant


def test_tenant_labels_keep_the_first_tenants_and_fold_the_rest_into_other() -> None:
    labels = TenantLabels()
    firsts = [f"tenant-{i}" for i in range(TenantLabels.LIMIT)]

    assert [labels.label(tenant) for tenant in firsts] == firsts
    assert labels.label("one-too-many") == TenantLabels.OTHER
    assert labels.label(firsts[0]) == firsts[0]  # a tenant seen before keeps its label
    assert labels.label(None) == ""


async def test_the_tenant_is_in_the_log_line_and_counted(
    make_settings: Callable[..., Settings],
    amqp: AbstractRobustConnection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = make_settings()
    tenant = f"acme-{uuid.uuid4().hex[:6]}"
    long_tenant = "x" * 500
    async with running_worker(settings) as app, http(app) as client:
        async with Requester(amqp, settings) as requester:
            with caplog.at_level(logging.INFO, logger="chatbus.worker"):
                tagged = await requester.chat(user(), headers={TENANT_HEADER: tenant})
                untagged = await requester.chat(user())
                long = await requester.chat(user(), headers={TENANT_HEADER: long_tenant})
        metrics = samples((await client.get("/metrics")).text)

    assert [r[-1]["type"] for r in (tagged, untagged, long)] == ["done"] * 3
    ended = {
        record.correlation_id: record  # type: ignore[attr-defined]
        for record in caplog.records
        if record.name == "chatbus.worker" and hasattr(record, "outcome")
    }
    assert ended[tagged[-1]["correlation_id"]].tenant == tenant  # type: ignore[attr-defined]
    assert not hasattr(ended[untagged[-1]["correlation_id"]], "tenant")
    assert ended[long[-1]["correlation_id"]].tenant == "x" * 64  # type: ignore[attr-defined]
    assert value(metrics, "chatbus_requests_total", tenant=tenant) == 1
    assert value(metrics, "chatbus_requests_total", tenant="") == 1
