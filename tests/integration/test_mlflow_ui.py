"""The MLflow UI of a real tracking server shows our runs, in a real (headless) Chromium.

Driven by Playwright with Debian's ``chromium`` (Playwright cannot download its own browser
here). Screenshots of each page go to ``$MEDIMG_TEST_ARTIFACTS`` (default
``<repo>/test-artifacts/``), also when an assertion fails. A missing browser fails the
tests, never skips them: ``make test`` installs it (its ``system-packages`` step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.integration.browser import screenshot
from tests.integration.tracked import Tracked

if TYPE_CHECKING:
    from playwright.sync_api import Page

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

REPO = Path(__file__).resolve().parents[2]


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


def _open_runs_table(runs: TrackedRuns, page: Page) -> None:
    """The experiment as medimg links it (``medimg summary``, the pipeline's artifact)."""
    from playwright.sync_api import expect

    from medimg.config import TrackingParams
    from medimg.tracking import experiment_url

    page.goto(experiment_url(TrackingParams(uri=runs.url), REPO, runs.experiment_id))
    # the model-training view's runs table, not MLflow 3's GenAI overview (its default)
    expect(page.get_by_role("heading", name="Runs", level=2)).to_be_visible()
    assert "genai" not in page.url, page.url
    for name in runs.run_names:
        expect(page.get_by_role("link", name=name, exact=True)).to_be_visible()


@pytest.mark.usefixtures("chromium")
def test_experiment_page_lists_runs_with_metric(tracked_runs: TrackedRuns, page: Page) -> None:
    from playwright.sync_api import expect

    runs = tracked_runs
    try:
        _open_runs_table(runs, page)
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
        screenshot(page, "mlflow-ui-experiment.png")


@pytest.mark.usefixtures("chromium")
def test_two_selected_runs_compare_with_their_differing_params(
    tracked_runs: TrackedRuns, page: Page
) -> None:
    """As a person compares: tick two runs in the runs table, press Compare."""
    from mlflow import MlflowClient
    from playwright.sync_api import expect

    runs = tracked_runs
    client = MlflowClient(tracking_uri=runs.url)
    logged = [client.get_run(run_id).data.params for run_id in runs.run_ids]
    differing = sorted(k for k in logged[0] if logged[0][k] != logged[1].get(k))
    assert "train.classify.pretrained" in differing  # the second run started from the first
    try:
        _open_runs_table(runs, page)
        for name in runs.run_names:
            row = page.get_by_role("row").filter(
                has=page.get_by_role("link", name=name, exact=True)
            )
            row.get_by_role("checkbox", name="Press Space to toggle row selection").check()
        page.get_by_role("button", name="Compare", exact=True).click()
        expect(
            page.get_by_role("heading", name="Comparing 2 Runs from 1 Experiment")
        ).to_be_visible()
        # Run details: one column per run, in the order they were ticked
        names = page.get_by_role("row").filter(
            has=page.get_by_role("rowheader", name="Run Name:", exact=True)
        )
        expect(names.get_by_role("cell")).to_have_text(list(runs.run_names))  # as ticked
        # Parameters, differences only: each differing param with both runs' values
        page.get_by_role("switch", name="Parameters - Show diff only").click()
        for key in differing:
            row = page.get_by_role("row").filter(
                has=page.get_by_role("rowheader", name=key, exact=True)
            )
            shown = [logged[0][key], logged[1].get(key, "")]
            expect(row.get_by_role("cell")).to_have_text(shown)
        same = next(k for k in logged[0] if logged[0][k] == logged[1].get(k))
        expect(page.get_by_role("rowheader", name=same, exact=True)).to_have_count(0)
        # Metrics: each name links to its plot; the values sit in a grid beside the names.
        expect(page.get_by_role("link", name=runs.metric_key, exact=True)).to_be_visible()
        for value in runs.metric_values:
            text = mlflow_format_metric(value)
            expect(page.get_by_role("grid").get_by_text(text, exact=True).first).to_be_visible()
        page.get_by_role("link", name=runs.metric_key, exact=True).scroll_into_view_if_needed()
    finally:
        screenshot(page, "mlflow-ui-compare-runs.png")
