"""Servers shared by the whole test session: one temporary Prefect server (its start costs
10-20 s) and one real MLflow tracking server (about 10-15 s on two cores); and the two
session runs built on them: the DVC project (project.py) and the tracked pipeline
(tracked.py)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.helpers import Cohort
from tests.integration.browser import chromium_path, headless_chromium, new_page
from tests.integration.mlflow_server import start_mlflow_server
from tests.integration.project import DvcProject, metrics_files, new_project
from tests.integration.tracked import Tracked, run_tracked_pipeline

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# MLflow clients in this process report usage unless told not to (the server gets its own).
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def mlflow_server_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the session's MLflow server keeps its database, artifacts and log."""
    return tmp_path_factory.mktemp("mlflow-server")


@pytest.fixture(scope="session")
def mlflow_server(mlflow_server_dir: Path) -> Iterator[str]:
    """URL of a real ``mlflow server`` (SQLite backend, proxied artifacts) for the session.

    Tests share it, so each should use its own experiment or run names. Talk to it with
    ``MlflowClient(tracking_uri=url)`` or ``monkeypatch.setenv("MLFLOW_TRACKING_URI", url)``,
    never by setting the tracking URI for the whole process.
    """
    with start_mlflow_server(mlflow_server_dir) as url:
        yield url


@pytest.fixture(scope="session")
def dvc_project(tmp_path_factory: pytest.TempPathFactory) -> DvcProject:
    """The repository copied into a fresh git repo with tiny params, after one `dvc repro`
    from nothing. Tests may change it but must leave the pipeline up to date."""
    project = new_project(tmp_path_factory.mktemp("dvc") / "project")
    out = project.dvc("repro")
    project.commit("first results")
    lock = (project.root / "dvc.lock").read_text()
    return DvcProject(project, out, metrics_files(project.root), lock)


@pytest.fixture(scope="session")
def tracked(
    mlflow_server: str,
    mlflow_server_dir: Path,
    tiny_cohort: Cohort,
    tmp_path_factory: pytest.TempPathFactory,
) -> Tracked:
    """The tracked pipeline's outcome (see tracked.py's docstring); do not modify."""
    root = tmp_path_factory.mktemp("tracked")
    return run_tracked_pipeline(tiny_cohort, root, mlflow_server, mlflow_server_dir)


@pytest.fixture(scope="session")
def chromium() -> str:
    """Path of Debian's Chromium (tests/integration/browser.py). Named first by the browser
    tests, so that a missing browser is reported before a server is started for nothing."""
    return chromium_path()


@pytest.fixture(scope="module")
def browser(chromium: str) -> Iterator[Browser]:
    """Headless Chromium, one per test module."""
    with headless_chromium(chromium) as b:
        yield b


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A page of its own browser context: no saved UI state."""
    with new_page(browser) as p:
        yield p
