"""A real Prefect server, the pipeline deployment served against it, one run to the end.

The deployment is served by ``python -m pipelines.deployments`` (what ``make serve``
runs) over the tiny DVC project; the test checks the deployment's schedule, triggers a
run through the API, waits for it to complete, then reads its artifact and the outputs.
The server is ``medimg prefect-server`` on a port other than Prefect's default, and a
headless Chromium (tests/integration/browser.py) checks that its UI shows what the API
holds: both deployments, and the run's report with links into the MLflow UI.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.helpers import free_port, tool_path
from tests.integration.browser import headless_chromium, new_page, screenshot
from tests.integration.project import DvcProject

if TYPE_CHECKING:
    from playwright.sync_api import Page

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _stop(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@contextlib.contextmanager
def _process(args: list[str], log: Path, **kwargs: object) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("ab") as out:
        proc = subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **kwargs
        )  # type: ignore[call-overload]
    try:
        yield proc
    finally:
        _stop(proc)


@contextlib.contextmanager
def prefect_server(workdir: Path) -> Iterator[int]:
    """``medimg prefect-server`` (``make prefect-server``) with its UI, on a free loopback
    port: not Prefect's default 4200, where its UI works without our help. Yields the port."""
    port = free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(workdir),
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{workdir}/prefect.db",
    }
    env.pop("PREFECT_UI_ENABLED", None)
    args = [tool_path("medimg"), "prefect-server", "--port", str(port)]
    log = workdir / "server.log"
    with _process(args, log, env=env) as proc:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        yield port


async def _wait_for_run(deployment_name: str, timeout: float) -> tuple[object, object, list]:
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    async with get_client() as client:
        deadline = time.monotonic() + 60
        while True:  # the served deployment registers itself
            with contextlib.suppress(Exception):
                deployment = await client.read_deployment_by_name(deployment_name)
                break
            assert time.monotonic() < deadline, "the deployment never appeared"
            await asyncio.sleep(1)
        run = await run_deployment(deployment_name, timeout=0)
        deadline = time.monotonic() + timeout
        while True:
            run = await client.read_flow_run(run.id)
            if run.state is not None and run.state.is_final():
                break
            assert time.monotonic() < deadline, f"flow run still {run.state}"
            await asyncio.sleep(2)
        artifacts = await client.read_artifacts()
        mine = [a for a in artifacts if a.flow_run_id == run.id]
        return deployment, run, mine


def test_served_pipeline_deployment_runs_to_completion(
    chromium: str, dvc_project: DvcProject, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = dvc_project.project
    root = project.root
    # one fold's weights are lost: the run must retrain that fold, bit for bit as before,
    # and skip the rest (what a parameter change retrains, test_dvc_pipeline shows)
    (root / "models/classify/folds/1/model.pt").unlink()
    (tmp_path / "server").mkdir()
    with prefect_server(tmp_path / "server") as port:
        api = f"http://127.0.0.1:{port}/api"
        monkeypatch.setenv("PREFECT_API_URL", api)
        env = {**project.env, "PREFECT_API_URL": api}
        serve = [sys.executable, "-m", "pipelines.deployments", "--root", str(root)]
        serve += ["--params", str(root / "params.yaml")]
        # this server, also when the session's test harness (another server) is active
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with (
            _process(serve, tmp_path / "serve.log", env=env, cwd=root),
            temporary_settings(updates={PREFECT_API_URL: api}),
        ):
            deployment, run, artifacts = asyncio.run(
                _wait_for_run("pipeline/nightly-retrain", timeout=600)
            )
            # as a person sees it: the UI of this port, not the default port's (the
            # browser only now: Playwright's event loop would stop asyncio.run above)
            with headless_chromium(chromium) as browser, new_page(browser) as page:
                ui_shows_the_deployments_and_the_report(page, port, run)
    log = (tmp_path / "serve.log").read_text()
    assert run.state.is_completed(), f"{run.state}\n{log[-4000:]}"  # type: ignore[attr-defined]
    # scheduled by cron in the configured time zone
    schedule = deployment.schedules[0].schedule  # type: ignore[attr-defined]
    assert schedule.cron == "0 2 * * *" and schedule.timezone == "UTC"
    # the report: what ran, what was skipped, metrics with CIs, the gate
    [report] = [a for a in artifacts if a.key == "medimg-pipeline"]
    text = report.data
    assert "| train_classify@1 | ran |" in text
    assert "| train_classify@0 | up to date, skipped |" in text
    assert "| evaluate_classify | up to date, skipped |" in text  # the same weights
    assert "| train_segment@0 | up to date, skipped |" in text
    assert "| ingest | up to date, skipped |" in text
    assert "| classify | auroc |" in text and "| segment | dice |" in text
    assert "## Registry" in text and "## Ingest QC" in text
    # dvc.lock is true again and the MLflow run knows its flow run
    assert json.loads(project.dvc("status", "--json")) == {}
    record = json.loads((root / "models/classify/folds/1/mlflow_run.json").read_text())
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    tags = client.get_run(record["run_id"]).data.tags
    assert tags["prefect.flow_run_id"] == str(run.id)  # type: ignore[attr-defined]
    assert project.run("git", "status", "--porcelain", "dvc.lock").strip() == ""


def ui_shows_the_deployments_and_the_report(page: Page, port: int, run: object) -> None:
    """The Prefect UI served on ``port``: both deployments; the run's report artifact,
    rendered, with its links to the MLflow runs."""
    from playwright.sync_api import expect

    ui = f"http://127.0.0.1:{port}"
    try:
        page.goto(f"{ui}/deployments")
        expect(page.get_by_text("2 Deployments")).to_be_visible()
        # each deployment's own link (its flow's link beside it may bear the same name)
        deployments = page.locator('a[href*="/deployments/deployment/"]')
        expect(deployments).to_have_text(["nightly-retrain", "predict-inbox"])  # A to Z
        screenshot(page, "prefect-ui-deployments.png")
        page.goto(f"{ui}/runs/flow-run/{run.id}")  # type: ignore[attr-defined]
        expect(page.get_by_text("Completed").first).to_be_visible()
        page.get_by_role("tablist", name="Tab").get_by_text("Artifacts", exact=True).click()
        page.get_by_role("link", name="medimg-pipeline").first.click()
        report = page.get_by_role("article").filter(
            has=page.get_by_role("heading", name="medimg pipeline run")
        )
        expect(report).to_be_visible()
        expect(report.get_by_role("cell", name="train_classify@0", exact=True)).to_be_visible()
        links = report.get_by_role("link")
        expect(links.first).to_be_visible()
        hrefs = {links.nth(i).get_attribute("href") for i in range(links.count())}
        assert hrefs and all(
            h and "/#/experiments/" in h and "/runs/" in h and "workflowType=machine_learning" in h
            for h in hrefs
        ), hrefs
    finally:
        screenshot(page, "prefect-ui-pipeline-report.png")
