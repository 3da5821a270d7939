"""A worker killed mid-answer, seen through the gateway. The broker redelivers the request and
another worker answers it again from the start (attempt 2). The gateway hides that when the
client has seen nothing of the first attempt, or did not ask for a stream; a stream that
already showed part of the first attempt ends with an error instead, since what was sent
cannot be taken back."""

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import ollama
import pytest

from chatbus.settings import Settings
from chatbus.testing import FakeOllama, WorkerProcess, running_worker
from tests.gateway_support import Gateway, running_gateway
from tests.support import model, requests_for

QUESTION: Any = [{"role": "user", "content": "Why is the sky blue?"}]
TOKENS = [f"t{i} " for i in range(30)]
MakeSettings = Callable[..., Settings]


@asynccontextmanager
async def gateway_before_a_killable_worker(
    make_settings: MakeSettings,
) -> AsyncIterator[tuple[Gateway, WorkerProcess, Settings]]:
    """A gateway on queues of their own, and the worker process the test kills."""
    settings = make_settings()
    killed = await WorkerProcess(settings).start()
    try:
        async with running_gateway(settings) as gateway:
            yield gateway, killed, settings
    finally:
        await killed.kill()


async def test_a_stream_that_showed_part_of_the_answer_ends_with_an_error(
    make_settings: MakeSettings, fake_ollama: FakeOllama
) -> None:
    slow = model(fake_ollama, token_delay=0.05, tokens=TOKENS)
    async with gateway_before_a_killable_worker(make_settings) as (gateway, killed, settings):
        stream = await gateway.ollama().chat(slow, QUESTION, stream=True)
        assert isinstance(stream, AsyncGenerator)
        first = await anext(stream)
        aborted = fake_ollama.aborted_streams
        await killed.kill()
        async with running_worker(settings):
            with pytest.raises(ollama.ResponseError) as raised:
                await read_all(stream)
            # The killed worker's call, then the second attempt's, which the gateway
            # cancelled when it ended the stream.
            await fake_ollama.wait_aborted(aborted + 2, timeout=10)

    assert first.message.content == "t0 "
    assert "stopped mid-answer" in raised.value.error
    assert requests_for(fake_ollama, slow) == 2


async def test_a_stream_that_showed_nothing_yet_gets_the_second_attempt_whole(
    make_settings: MakeSettings, fake_ollama: FakeOllama
) -> None:
    cold = model(fake_ollama, first_token_delay=0.5, tokens=TOKENS)
    async with gateway_before_a_killable_worker(make_settings) as (gateway, killed, settings):
        stream = await gateway.ollama().chat(cold, QUESTION, stream=True)
        reading = asyncio.create_task(read_all(stream))
        await fake_ollama.wait_for(lambda: requests_for(fake_ollama, cold) == 1)
        await killed.kill()
        async with running_worker(settings):
            parts = await reading

    assert "".join(part.message.content or "" for part in parts) == "".join(TOKENS)
    assert parts[-1].done_reason == "stop"
    assert requests_for(fake_ollama, cold) == 2


async def test_an_answer_not_streamed_is_the_second_attempts(
    make_settings: MakeSettings, fake_ollama: FakeOllama
) -> None:
    slow = model(fake_ollama, token_delay=0.02, tokens=TOKENS)
    async with gateway_before_a_killable_worker(make_settings) as (gateway, killed, settings):
        answering = asyncio.create_task(
            gateway.openai().chat.completions.create(model=slow, messages=QUESTION)
        )
        await fake_ollama.wait_for(lambda: requests_for(fake_ollama, slow) == 1)
        await killed.kill()
        async with running_worker(settings):
            completion = await answering

    assert completion.choices[0].message.content == "".join(TOKENS)
    assert requests_for(fake_ollama, slow) == 2


async def read_all(stream: object) -> list[ollama.ChatResponse]:
    assert isinstance(stream, AsyncGenerator)
    return [part async for part in stream]
