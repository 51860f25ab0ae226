"""The MLflow UI of a real tracking server shows our runs, in a real (headless) Chromium.

Driven by Playwright with Debian's ``chromium`` (Playwright cannot download its own browser
here). Screenshots of each page go to ``$MEDIMG_TEST_ARTIFACTS`` (default
``<repo>/test-artifacts/``), also when an assertion fails. A missing browser fails the
tests, never skips them: ``make test`` installs it (its ``system-packages`` step).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import pytest

from tests.integration.tracked import Tracked

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

REPO = Path(__file__).resolve().parents[2]
UI_TIMEOUT_MS = 30_000  # the SPA's first render takes 2-5 s on two busy cores
VIEWPORT = {"width": 2200, "height": 1200}  # wide enough to show an added metric column


@dataclass(frozen=True)
class TrackedRuns:
    """Runs on the tracking server at ``url``, all in one experiment, each with a metric."""

    url: str
    experiment_id: str
    run_ids: tuple[str, ...]
    run_names: tuple[str, ...]
    metric_key: str
    metric_values: tuple[float, ...]


@pytest.fixture(scope="module")
def tracked_runs(tracked: Tracked) -> TrackedRuns:
    """The two training runs of the tracked pipeline (train, evaluate, register over HTTP)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracked.url)  # no process-wide tracking URI
    runs = [client.get_run(run_id) for run_id in tracked.run_ids]
    return TrackedRuns(
        url=tracked.url,
        experiment_id=runs[0].info.experiment_id,
        run_ids=tuple(tracked.run_ids),
        run_names=tuple(run.info.run_name for run in runs),
        metric_key="test_auroc",
        metric_values=tuple(run.data.metrics["test_auroc"] for run in runs),
    )


def _unavailable(reason: str) -> NoReturn:
    pytest.fail(f"{reason}; `make test` installs it (make system-packages)")


@pytest.fixture(scope="session")
def chromium() -> str:
    """Path of Debian's Chromium, once Playwright is importable too.

    Session-scoped and named first by the browser tests, so that a missing browser is
    reported before the MLflow server is started for nothing.
    """
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        _unavailable("playwright is not installed: pip install -e '.[dev]'")
    executable = shutil.which("chromium")
    if executable is None:
        _unavailable("chromium is not on PATH: apt-get install chromium")
    return executable


@pytest.fixture(scope="module")
def browser(chromium: str) -> Iterator[Browser]:
    """Headless Chromium driven by Playwright, for this module only."""
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=UI_TIMEOUT_MS)
    with sync_playwright() as playwright:
        # No proxy: the server listens on the loopback interface.
        browser = playwright.chromium.launch(
            executable_path=chromium, headless=True, args=["--no-proxy-server"]
        )
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
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


def js_number(value: float) -> str:
    """``value`` as JavaScript's ``String(value)`` writes it (the runs table's cells)."""
    if value == int(value) and abs(value) < 1e21:
        return str(int(value))
    if 1e-6 <= abs(value) < 1e21:
        return format(Decimal(repr(value)), "f")
    mantissa, exponent = repr(value).split("e")
    return f"{mantissa}e{int(exponent):+d}"


def mlflow_format_metric(value: float) -> str:
    """``value`` as MLflow's ``Utils.formatMetric`` writes it (the compare-runs page)."""
    if value == 0:
        return "0"
    if abs(value) < 1e-3:
        mantissa, exponent = f"{value:.3e}".split("e")
        return f"{mantissa}e{int(exponent):+d}"
    scale = 1000 if abs(value) < 10 else 100 if abs(value) < 100 else 10
    return js_number(math.floor(value * scale + 0.5) / scale)  # JavaScript's Math.round


def test_number_formats_match_the_ui() -> None:
    assert [js_number(v) for v in (0.8125, 1.0, 0.8333333333333334, 1e-5, 1.5e-7)] == [
        "0.8125",
        "1",
        "0.8333333333333334",
        "0.00001",
        "1.5e-7",
    ]
    assert [mlflow_format_metric(v) for v in (0.8125, 0.6875, 1.0, 0.00012345678, 0.0)] == [
        "0.813",
        "0.688",
        "1",
        "1.235e-4",
        "0",
    ]


def _screenshot(page: Page, name: str) -> None:
    page.screenshot(path=artifacts_dir() / name, full_page=True)


@pytest.mark.usefixtures("chromium")
def test_experiment_page_lists_runs_with_metric(tracked_runs: TrackedRuns, page: Page) -> None:
    from playwright.sync_api import expect

    runs = tracked_runs
    # An experiment without an `mlflow.experimentKind` tag opens on the GenAI overview in
    # MLflow 3.17, so go straight to the runs table of the "Model training" view.
    page.goto(f"{runs.url}/#/experiments/{runs.experiment_id}/runs?workflowType=machine_learning")
    try:
        for name in runs.run_names:
            expect(page.get_by_role("link", name=name, exact=True)).to_be_visible()
        # Metric columns are hidden by default: add ours with the column selector.
        page.get_by_role("button", name="Columns").click()
        page.get_by_title(runs.metric_key, exact=True).click()
        page.keyboard.press("Escape")
        header = page.get_by_role("columnheader", name=runs.metric_key, exact=True)
        expect(header.first).to_be_visible()
        # The grid splits each row in two (pinned names, scrolling cells): pair them by index.
        for name, value in zip(runs.run_names, runs.metric_values, strict=True):
            name_row = page.get_by_role("row").filter(
                has=page.get_by_role("link", name=name, exact=True)
            )
            row_index = name_row.get_attribute("aria-rowindex")
            cell = page.locator(
                f'[role="row"][aria-rowindex="{row_index}"] '
                f'[role="gridcell"][col-id="metrics.`{runs.metric_key}`"]'
            )
            expect(cell).to_have_text(js_number(value))
    finally:
        _screenshot(page, "mlflow-ui-experiment.png")


@pytest.mark.usefixtures("chromium")
def test_compare_runs_page_shows_runs_and_metric(tracked_runs: TrackedRuns, page: Page) -> None:
    from playwright.sync_api import expect

    runs = tracked_runs
    query = urllib.parse.urlencode(
        {"runs": json.dumps(list(runs.run_ids)), "experiments": json.dumps([runs.experiment_id])}
    )
    page.goto(f"{runs.url}/#/compare-runs?{query}")
    try:
        expect(page.get_by_text(f"Comparing {len(runs.run_ids)} Runs")).to_be_visible()
        # Run details: one column per run, in the order of the `runs` parameter.
        names = page.get_by_role("row").filter(
            has=page.get_by_role("rowheader", name="Run Name:", exact=True)
        )
        expect(names.get_by_role("cell")).to_have_text(list(runs.run_names))
        # Metrics: each name links to its plot; the values sit in a grid beside the names.
        expect(page.get_by_role("link", name=runs.metric_key, exact=True)).to_be_visible()
        for value in runs.metric_values:
            text = mlflow_format_metric(value)
            expect(page.get_by_role("grid").get_by_text(text, exact=True).first).to_be_visible()
        # The page scrolls inside its main panel: bring the metrics into the screenshot.
        page.get_by_role("link", name=runs.metric_key, exact=True).scroll_into_view_if_needed()
    finally:
        _screenshot(page, "mlflow-ui-compare-runs.png")
