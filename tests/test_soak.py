"""The chaos soak's short run, as CI runs it: `python -m bench.soak` with 1,000 requests,
a worker SIGKILLed and replaced every 3 s and one broker restart, on a RabbitMQ node of its
own. Nothing may be lost, no attempt may have two terminal replies, and no worker may exit
by itself."""

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest

from chatbus.testing.cluster import available

pytestmark = [pytest.mark.slow, pytest.mark.rabbitmq]

REPO_ROOT = Path(__file__).parent.parent


async def test_the_short_soak_loses_nothing_and_duplicates_nothing(tmp_path: Path) -> None:
    if (reason := available()) is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.soak",
        "--requests=1000",
        "--rate=40",
        "--kill-every=3",
        "--restarts=1",
        "--json",
        f"--output={tmp_path / 'soak.json'}",
        cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(420):
        out, err = await process.communicate()
    assert out, err.decode()
    results = json.loads(out)
    tally = results["tally"]

    assert tally["accepted"] == 1000
    assert (tally["lost"], tally["lost_ids"]) == (0, [])
    assert tally["duplicate_terminals"] == 0
    assert results["exits"] == []
    assert results["kills"] >= 2
    assert results["restarts"] == 1
    assert tally["answered"] + tally["dead_lettered"] == 1000
    assert process.returncode == 0
