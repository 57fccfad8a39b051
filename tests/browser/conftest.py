"""Playwright driving Debian's Chromium (the one on PATH: Playwright cannot download its own
browsers here) against a real `cortex serve` with a token. Without a Chromium the tests are
skipped with the reason, except under CI, where `.ci/run` installs it and its absence fails."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from browser import support
from helpers import Server, start_server, stop_server

# Headless Chromium as root, in a container, on a machine without a GPU, with no network
# beyond loopback: no sandbox (it needs user namespaces), no GPU process, no background
# fetches, and /tmp instead of a small /dev/shm.
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-dev-shm-usage",
    "--disable-extensions",
    "--no-first-run",
]


@pytest.fixture(scope="session")
def chromium() -> str:
    path = os.environ.get("CORTEX_TEST_CHROMIUM") or shutil.which("chromium")
    if path is None:
        message = (
            "no `chromium` on PATH: the dashboard's browser tests need Debian's chromium "
            "(apt-get install chromium chromium-driver; .ci/run installs it)"
        )
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def browser(chromium: str) -> Iterator[Browser]:
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server of its own, with a token: the dashboard signs in as a person would."""
    srv = start_server(tmp_path_factory.mktemp("dashboard"), CORTEX_AUTH_TOKEN=support.TOKEN)
    yield srv
    stop_server(srv)


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A fresh tab (its own session storage); an uncaught error in the page fails the test."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    tab = context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda err: errors.append(str(err)))
    expect.set_options(timeout=10_000)
    yield tab
    context.close()
    assert not errors, f"the page raised: {errors}"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for path in support.saved:
        terminalreporter.write_line(f"dashboard screenshot: {path}")
