"""Headless Chromium for the UI tests (the MLflow UI, the Prefect UI), driven by Playwright
with Debian's ``chromium``: Playwright cannot download its own browser here. A missing
browser fails the tests, never skips them: ``make test`` installs it (its
``system-packages`` step). Screenshots go to ``$MEDIMG_TEST_ARTIFACTS`` (default
``<repo>/test-artifacts/``), also when an assertion fails.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import pytest

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

REPO = Path(__file__).resolve().parents[2]
UI_TIMEOUT_MS = 30_000  # a single-page app's first render takes 2-5 s on two busy cores
VIEWPORT = {"width": 2200, "height": 1200}  # wide enough to show an added metric column


def _unavailable(reason: str) -> NoReturn:
    pytest.fail(f"{reason}; `make test` installs it (make system-packages)")


def chromium_path() -> str:
    """Path of Debian's Chromium, once Playwright is importable too."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        _unavailable("playwright is not installed: pip install -e '.[dev]'")
    executable = shutil.which("chromium")
    if executable is None:
        _unavailable("chromium is not on PATH: apt-get install chromium")
    return executable


@contextmanager
def headless_chromium(executable: str) -> Iterator[Browser]:
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=UI_TIMEOUT_MS)
    with sync_playwright() as playwright:
        # No proxy: the servers listen on the loopback interface.
        browser = playwright.chromium.launch(
            executable_path=executable, headless=True, args=["--no-proxy-server"]
        )
        try:
            yield browser
        finally:
            browser.close()


@contextmanager
def new_page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport=VIEWPORT)  # fresh storage: no saved UI state
    context.set_default_timeout(UI_TIMEOUT_MS)
    try:
        yield context.new_page()
    finally:
        context.close()


def artifacts_dir() -> Path:
    folder = Path(os.environ.get("MEDIMG_TEST_ARTIFACTS") or REPO / "test-artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def screenshot(page: Page, name: str) -> None:
    page.screenshot(path=artifacts_dir() / name, full_page=True)
