"""The README's examples are the tested code."""

import re
from pathlib import Path
from typing import Any

from config import Settings
from tests.support import DIRECT_REPLY_TO

README = Path(__file__).parent.parent / "README.md"


def readme_python_block(after: str) -> str:
    text = README.read_text()
    start = text.index(after)
    match = re.search(r"```python\n(.*?)```", text[start:], re.DOTALL)
    assert match, f"no python block after {after!r}"
    return match.group(1)


async def test_raw_aio_pika_example_streams_the_answer(worker: Settings) -> None:
    code = readme_python_block("The same with nothing but")
    # Run it against this run's own names and broker, and from this event loop.
    code = (
        code.replace('"chat.requests"', repr(worker.requests_queue))
        .replace('"chat.replies"', repr(worker.replies_exchange))
        .replace('"amqp://guest:guest@localhost:5672/"', repr(worker.rabbitmq_url))
    )
    body, last_line = code.rstrip().rsplit("\n", 1)
    assert last_line.startswith("print(asyncio.run(ask(")
    namespace: dict[str, Any] = {}
    exec(compile(body, str(README), "exec"), namespace)

    answer = await namespace["ask"]("Why is the sky blue?")

    assert answer.startswith("The sky")
    assert DIRECT_REPLY_TO not in answer
