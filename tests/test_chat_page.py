"""The chat page in Debian's headless Chromium, driven by Selenium, against the gateway,
the real worker and the fake Ollama.

Selenium blocks, so each browser step runs in a thread while the event loop serves the
gateway and the worker.
"""

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TypeVar

import pytest
from selenium.webdriver import Chrome
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.select import Select
from selenium.webdriver.support.wait import WebDriverWait

from chatbus.settings import Settings
from chatbus.testing import FakeOllama
from chatbus.testing.fake_ollama import DEFAULT_TOKENS
from tests.gateway_support import running_gateway
from tests.support import model
from tests.web_support import chromium

pytestmark = [pytest.mark.rabbitmq, pytest.mark.browser]

ANSWER = "".join(DEFAULT_TOKENS)
SCREENSHOT_ENV = "CHATBUS_PAGE_SCREENSHOT"
"""Set to a path (docs/chat-page.png) to keep a screenshot of the page for the README."""

_T = TypeVar("_T")


@pytest.fixture
async def page_url(worker: Settings, tmp_path: Path) -> AsyncIterator[str]:
    history_url = f"sqlite:///{tmp_path / 'history.sqlite3'}"
    async with running_gateway(worker, history_url=history_url) as gateway:
        yield f"{gateway.url}/"


@pytest.fixture
async def browser(tmp_path: Path) -> AsyncIterator[Chrome]:
    driver = await asyncio.to_thread(chromium, tmp_path / "chromium")
    yield driver
    await asyncio.to_thread(driver.quit)


async def step(call: Callable[[], _T]) -> _T:
    return await asyncio.to_thread(call)


def until(driver: Chrome, condition: Callable[[Chrome], _T], timeout: float = 10) -> _T:
    return WebDriverWait(driver, timeout, poll_frequency=0.02).until(condition)


def messages(driver: Chrome) -> list[tuple[str, str]]:
    """(role, text) of each message shown, oldest first."""
    shown = driver.find_elements(By.CSS_SELECTOR, "#conversation .message")
    return [
        (
            "user" if "user" in (element.get_attribute("class") or "").split() else "assistant",
            element.text,
        )
        for element in shown
    ]


def streaming_text(driver: Chrome) -> str | None:
    """The text of the answer being streamed, or None when no answer streams."""
    found = driver.find_elements(By.CSS_SELECTOR, ".message.assistant.streaming")
    return found[0].text if found else None


def connected(driver: Chrome) -> bool:
    return bool(driver.find_element(By.ID, "status").text == "connected")


def partial_answer(driver: Chrome) -> str:
    """The answer being streamed once some but not all of it is shown, else ''."""
    text = streaming_text(driver)
    return text if text and text != ANSWER else ""


def ended_answer(driver: Chrome) -> str:
    """The last message's text once no answer streams, else ''."""
    shown = messages(driver)
    return shown[-1][1] if shown and streaming_text(driver) is None else ""


def shown_error(driver: Chrome) -> str:
    error = driver.find_element(By.ID, "error")
    return str(error.text) if error.is_displayed() else ""


def open_page(driver: Chrome, url: str, model_name: str) -> None:
    driver.get(url)
    until(driver, connected)
    picker = Select(driver.find_element(By.ID, "model"))
    listed = f"{model_name}:latest"  # as Ollama lists it
    until(driver, lambda _: any(o.get_attribute("value") == listed for o in picker.options))
    picker.select_by_value(listed)


def ask(driver: Chrome, question: str) -> None:
    box = driver.find_element(By.ID, "message")
    box.send_keys(question)
    box.send_keys(Keys.ENTER)


async def test_a_question_streams_its_answer_and_the_conversation_survives_a_reload(
    page_url: str, browser: Chrome, fake_ollama: FakeOllama
) -> None:
    slow = model(fake_ollama, token_delay=0.15)
    await step(lambda: open_page(browser, page_url, slow))
    await step(lambda: ask(browser, "Why is the sky blue?"))

    # Streamed: part of the answer is on the page while the rest is still coming.
    partial = await step(lambda: until(browser, partial_answer))
    assert ANSWER.startswith(partial)
    await step(lambda: until(browser, lambda d: streaming_text(d) is None))
    assert await step(lambda: messages(browser)) == [
        ("user", "Why is the sky blue?"),
        ("assistant", ANSWER),
    ]

    await step(lambda: ask(browser, "Say that again, please."))
    await step(lambda: until(browser, lambda d: len(messages(d)) == 4 and ended_answer(d)))

    await step(browser.refresh)
    shown = await step(lambda: until(browser, lambda d: len(messages(d)) == 4 and messages(d)))
    assert shown == [
        ("user", "Why is the sky blue?"),
        ("assistant", ANSWER),
        ("user", "Say that again, please."),
        ("assistant", ANSWER),
    ]
    assert not await step(lambda: browser.find_element(By.ID, "error").is_displayed())
    if path := os.environ.get(SCREENSHOT_ENV):
        await step(lambda: until(browser, connected))
        await step(lambda: browser.save_screenshot(path))


async def test_stop_cancels_the_generation_and_keeps_nothing(
    page_url: str, browser: Chrome, fake_ollama: FakeOllama
) -> None:
    slow = model(fake_ollama, token_delay=0.3)
    await step(lambda: open_page(browser, page_url, slow))
    aborted = fake_ollama.aborted_streams
    await step(lambda: ask(browser, "Tell me a long story."))
    await step(lambda: until(browser, lambda d: bool(streaming_text(d))))
    await step(lambda: browser.find_element(By.ID, "stop").click())

    await fake_ollama.wait_aborted(aborted + 1, timeout=5)
    answer = await step(lambda: until(browser, ended_answer))
    assert answer.endswith("stopped")
    assert not await step(lambda: browser.find_element(By.ID, "stop").is_displayed())

    await step(browser.refresh)
    await step(lambda: until(browser, connected))
    assert await step(lambda: messages(browser)) == [], "a stopped turn is not kept"


async def test_errors_are_shown_in_words(
    page_url: str, browser: Chrome, fake_ollama: FakeOllama
) -> None:
    failing = model(fake_ollama, status=404)  # Ollama no longer has it
    await step(lambda: open_page(browser, page_url, failing))
    await step(lambda: ask(browser, "Hello?"))
    error = await step(lambda: until(browser, shown_error))
    assert "That model is not available" in error
    assert "model_not_found" in error
