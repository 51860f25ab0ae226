"""Fault injection in the ingest flow: a flaky storage write is retried into success, a
permanent one fails the run and leaves nothing partial behind.

Storage cannot be made to fail for real here, so the atomic write of one series' volume
is made to raise ``EIO`` once the temporary file is written and closed, as a network file
system reports a lost write at ``close``. The flow runs in this process on the threads
runner (so the patch applies) against the session's temporary Prefect server, and the
task runs are read back through its API. The back-off of the series task (5 s, 30 s) is
set to zero for the test, its retry count and retry condition are the flow's own.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest

from medimg import stages
from medimg.config import DataParams, IngestParams, Params
from tests.helpers import Cohort

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

SALT = "medimg-test-salt-faults"  # fixed: the same series keys in every session


def _params(cohort: Cohort, out: Path, salt: Path) -> Params:
    data = DataParams(raw=cohort.raw, labels=cohort.labels, masks=cohort.masks, interim=out)
    return Params(data=data, ingest=IngestParams(salt_file=salt, workers=2))


@pytest.fixture
def salt(tmp_path: Path) -> Path:
    path = tmp_path / "salt"
    path.write_text(SALT)
    path.chmod(0o600)
    return path


@pytest.fixture
def clean(tiny_cohort: Cohort, tmp_path: Path, salt: Path) -> pd.DataFrame:
    """The manifest of a fault-free run of the plain stage."""
    stages.ingest(_params(tiny_cohort, tmp_path / "clean", salt))
    return pd.read_parquet(tmp_path / "clean" / "manifest.parquet")


def _victim(manifest: pd.DataFrame) -> str:
    """A series whose task writes two files (mask, then volume): the first one with a mask."""
    with_mask = manifest[manifest["mask"].notna()]
    return str((with_mask if len(with_mask) else manifest)["key"].iloc[0])


class StorageFaults:
    """Makes the atomic write of ``key``'s volume raise EIO ``times`` times, then work."""

    def __init__(self, key: str, times: int) -> None:
        self.key = key
        self.left = times
        self.injected = 0
        self.lock = threading.Lock()  # series are written from several threads

    def wrap(self, real: Callable[..., Any]) -> Callable[..., Any]:
        @contextlib.contextmanager
        def atomic_path(target: Path, suffix: str = ".tmp") -> Iterator[Path]:
            with real(target, suffix) as tmp:
                yield tmp
                # The temporary file is complete and closed here: fail before the rename.
                if Path(target).parent.name == "volumes" and Path(target).name.startswith(
                    f"{self.key}."
                ):
                    with self.lock:
                        fail = self.left > 0
                        self.left -= fail
                        self.injected += fail
                    if fail:
                        raise OSError(errno.EIO, os.strerror(errno.EIO))

        return atomic_path


@pytest.fixture
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """The flow's series task with its retries and retry condition, without the back-off.

    ``ingest_flow`` looks ``series_task`` up in its module when it runs, so the copy made by
    ``with_options`` is the one it maps.
    """
    import pipelines.ingest

    task = pipelines.ingest.series_task
    assert task.retries == 2
    monkeypatch.setattr(pipelines.ingest, "series_task", task.with_options(retry_delay_seconds=0))


def _inject(monkeypatch: pytest.MonkeyPatch, faults: StorageFaults) -> None:
    import medimg.volume

    monkeypatch.setattr(medimg.volume, "atomic_path", faults.wrap(medimg.volume.atomic_path))


def _run_flow(params: Params) -> Any:
    from pipelines.ingest import ingest_flow, task_runner

    return ingest_flow.with_options(task_runner=task_runner("threads", 2))(
        params, return_state=True
    )


def _task_runs(
    flow_run_id: Any, done: Callable[[dict[str, Any]], bool], timeout: float = 30.0
) -> dict[str, Any]:
    """The flow run's task runs by name, once ``done`` holds for them.

    Task run states reach the server as events and are recorded a moment later, so the
    API is polled rather than read once.
    """
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    runs: dict[str, Any] = {}
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            found = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            )
            runs = {r.name: r for r in found}
            if done(runs):
                return runs
            time.sleep(0.5)
    pytest.fail(f"task runs not recorded as expected within {timeout} s: {_describe(runs)}")


def _describe(runs: dict[str, Any]) -> dict[str, tuple[str | None, int]]:
    return {name: (r.state_name, r.run_count) for name, r in runs.items()}


def _state_names(task_run_id: Any) -> list[str]:
    from prefect import get_client

    with get_client(sync_client=True) as client:
        states = client.read_task_run_states(task_run_id)
    return [s.name for s in sorted(states, key=lambda s: s.timestamp)]


def _identifiers(cohort: Cohort) -> set[str]:
    """Every patient name and ID in the cohort's headers and labels."""
    found = set(pd.read_csv(cohort.labels, dtype=str)["patient_id"])
    for path in (p for p in cohort.raw.rglob("*") if p.is_file()):
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientID"])
        found.add(str(ds.PatientID))
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientName"])
        found.update(part for part in str(ds.PatientName).split("^") if len(part) > 2)
    return {v for v in found if v}


def test_flaky_storage_write_is_retried_into_success(
    prefect_server: None,
    tiny_cohort: Cohort,
    tmp_path: Path,
    salt: Path,
    clean: pd.DataFrame,
    fast_retries: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    key = _victim(clean)
    faults = StorageFaults(key, times=1)
    _inject(monkeypatch, faults)
    out = tmp_path / "flow"

    state = _run_flow(_params(tiny_cohort, out, salt))

    assert faults.injected == 1
    assert state.is_completed(), state.message
    pd.testing.assert_frame_equal(pd.read_parquet(out / "manifest.parquet"), clean)
    n_series = len(clean)
    series = f"ingest-{key}"
    runs = _task_runs(
        state.state_details.flow_run_id,
        lambda r: (
            sum(n.startswith("ingest-") for n in r) == n_series
            and all(t.state_name == "Completed" for t in r.values())
        ),
    )
    assert runs[series].run_count == 2, _describe(runs)
    names = _state_names(runs[series].id)
    # without a back-off Prefect goes straight to Retrying (AwaitingRetry with a delay)
    assert names.count("Retrying") == 1 and names.index("Retrying") > names.index("Running")
    assert names[-1] == "Completed", names
    others = {n: r.run_count for n, r in runs.items() if n != series}
    assert set(others.values()) == {1}, others


def test_permanent_storage_fault_fails_run_and_leaves_nothing_partial(
    prefect_server: None,
    tiny_cohort: Cohort,
    tmp_path: Path,
    salt: Path,
    clean: pd.DataFrame,
    fast_retries: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    key = _victim(clean)
    faults = StorageFaults(key, times=10**6)
    _inject(monkeypatch, faults)
    out = tmp_path / "flow"

    state = _run_flow(_params(tiny_cohort, out, salt))

    assert state.is_failed()
    assert faults.injected == 3  # the first try and both retries
    series = f"ingest-{key}"
    runs = _task_runs(
        state.state_details.flow_run_id,
        lambda r: series in r and r[series].state_name == "Failed",
    )
    assert runs[series].run_count == 3, _describe(runs)
    # The run says which series failed, by its pseudonymous key and never by patient.
    message = f"{state.message} {runs[series].state.message}"
    assert key in message, message
    leaked = {v for v in _identifiers(tiny_cohort) if v in message}
    assert not leaked, f"patient identifiers in the error message: {leaked}"
    # Nothing partial: finalize never ran, no temporaries, every file whole.
    assert not (out / "manifest.parquet").exists()
    assert not [n for n in runs if n.startswith("finalize-ingest")], _describe(runs)
    files = [p for p in out.rglob("*") if p.is_file()]
    temporaries = [p for p in files if p.name.startswith(".") or ".tmp" in p.name]
    assert not temporaries, temporaries
    assert not (out / "volumes" / f"{key}.nii.gz").exists()
    assert not (out / "records" / f"{key}.json").exists()
    for path in files:
        if path.name.endswith((".nii", ".nii.gz")):
            img = nib.load(path)
            assert np.asarray(img.dataobj).shape == img.shape, path  # reads to the end
