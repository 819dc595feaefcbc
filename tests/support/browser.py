"""Chromium for the browser tests: Debian's package, driven by Playwright's Python package.

No browser is downloaded (``playwright install`` is never run): ``CONNECTORS_TEST_CHROMIUM``
names the executable, ``/usr/bin/chromium`` by default, and ``.ci/run`` installs it when missing.
Without it the browser tests are skipped, or fail under ``CI=true``.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Final

import pytest
from axe_playwright_python.async_playwright import Axe
from playwright.async_api import Browser, Page, async_playwright

# Chromium's own background traffic off, so that nothing leaves loopback.
FLAGS: Final = (
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


def chromium_path() -> str | None:
    path = os.environ.get("CONNECTORS_TEST_CHROMIUM", "/usr/bin/chromium")
    return path if Path(path).is_file() and os.access(path, os.X_OK) else None


@asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    path = chromium_path()
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("Chromium is not installed (apt-get install chromium) and CI=true")
        pytest.skip("Chromium not installed: set CONNECTORS_TEST_CHROMIUM to run the browser tests")
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=path, args=list(FLAGS))
        try:
            yield browser
        finally:
            await browser.close()


async def assert_accessible(page: Page) -> None:
    """axe-core (WCAG 2.x A and AA rules, and its best practices) finds no violation on the page."""
    results = await Axe().run(page)
    violations = results.response["violations"]
    assert not violations, [
        (violation["id"], violation["help"], [node["target"] for node in violation["nodes"]])
        for violation in violations
    ]
