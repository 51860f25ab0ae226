"""The ingest flow on Dask (prefect-dask) writes exactly what the default thread runner writes.

Two ways in: a local cluster of worker processes that the task runner starts and closes
(everything a task receives must pickle), and a running scheduler named by
``ingest.dask_address`` in a params file.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import psutil
import pytest
import yaml

from medimg.config import DataParams, IngestParams, Params
from tests.helpers import Cohort

pytestmark = pytest.mark.slow


def _params(cohort: Cohort, out: Path, salt: Path, **ingest: object) -> Params:
    data = DataParams(raw=cohort.raw, labels=cohort.labels, masks=cohort.masks, interim=out)
    return Params(data=data, ingest=IngestParams(salt_file=salt, workers=2, **ingest))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def salt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fixed pseudonym key, so that every run here writes the same pseudonyms."""
    path = tmp_path_factory.mktemp("salt") / "salt"
    path.write_text("medimg-test-salt-24")
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def threads_out(
    prefect_server: None, tiny_cohort: Cohort, salt: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """data/interim as the flow writes it on the default runner (two threads)."""
    from pipelines.ingest import ingest_flow, task_runner

    out = tmp_path_factory.mktemp("threads") / "interim"
    runner = task_runner("threads", 2)
    state = ingest_flow.with_options(task_runner=runner)(
        _params(tiny_cohort, out, salt), return_state=True
    )
    assert state.is_completed()
    return out


@pytest.fixture
def dask_log() -> Iterator[list[str]]:
    """Messages of the Dask task runner's logger, whatever Prefect's handlers do."""
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("prefect.task_runner.dask")
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)


def _children() -> set[int]:
    """This process's descendants, but multiprocessing's resource tracker: one helper per
    Python process, started by the first process pool and meant to live as long as it."""
    return {
        p.pid
        for p in psutil.Process().children(recursive=True)
        if "resource_tracker" not in " ".join(p.cmdline())
    }


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*.nii*")}


def _assert_same_outputs(expected: Path, actual: Path) -> None:
    a = pd.read_parquet(expected / "manifest.parquet")
    b = pd.read_parquet(actual / "manifest.parquet")
    assert len(a) > 0
    pd.testing.assert_frame_equal(a, b)  # same rows in the same order, content hashes included
    for sub in ("volumes", "masks"):
        want, got = _files(expected / sub), _files(actual / sub)
        assert sorted(got) == sorted(want)
        assert [name for name in want if got[name] != want[name]] == [], f"{sub} differ"


def test_local_cluster_matches_threads(
    tiny_cohort: Cohort, salt: Path, threads_out: Path, tmp_path: Path, dask_log: list[str]
) -> None:
    from pipelines.ingest import ingest_flow, task_runner

    before = _children()
    runner = task_runner("dask", 2)
    state = ingest_flow.with_options(task_runner=runner)(
        _params(tiny_cohort, tmp_path / "interim", salt, runner="dask"), return_state=True
    )
    assert state.is_completed()
    assert any("Creating a new Dask cluster" in m and "LocalCluster" in m for m in dask_log)
    _assert_same_outputs(threads_out, tmp_path / "interim")
    leaked = [psutil.Process(pid).cmdline() for pid in _children() - before]
    assert leaked == [], "worker processes outlived the flow run"


def test_scheduler_address_from_params(
    tiny_cohort: Cohort, salt: Path, threads_out: Path, tmp_path: Path
) -> None:
    import distributed

    from pipelines.ingest import run

    # Worker threads in this process keep the test fast; the test above covers processes.
    with distributed.LocalCluster(
        n_workers=1,
        threads_per_worker=2,
        processes=False,
        protocol="tcp://",  # a real address, as a remote scheduler has (not inproc://)
        dashboard_address=None,
        scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
    ) as cluster:
        params = _params(
            tiny_cohort,
            tmp_path / "interim",
            salt,
            runner="dask",
            dask_address=cluster.scheduler_address,
        )
        params_file = tmp_path / "params.yaml"
        params_file.write_text(yaml.safe_dump(params.model_dump(mode="json")))
        summary = run(params_file, root=tmp_path)
        prefix = cluster.scheduler.task_prefixes.get("series_task")
        ran = 0 if prefix is None else prefix.state_counts["memory"]
    assert summary["n_processed"] > 0
    assert ran == summary["n_processed"], "the series tasks did not run on that scheduler"
    _assert_same_outputs(threads_out, tmp_path / "interim")
