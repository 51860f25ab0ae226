"""The one-screen summary of ``medimg summary`` on a project that has not run yet."""

from __future__ import annotations

from pathlib import Path

import pytest

from medimg.config import Params
from medimg.summary import registry_line, summary


def test_a_summary_before_any_run_says_so_and_creates_no_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before ``make demo`` there are no metrics and no MLflow store: the summary says
    what to run, and asking it leaves no empty ``mlflow.db`` behind (MLflow creates a
    SQLite store when one is opened)."""
    # the project's own store: not one that an earlier test in this process pointed MLflow at
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MEDIMG_MLFLOW_URI", raising=False)
    params = Params()  # tracking.uri sqlite:///mlflow.db, relative to the project root
    text = "\n".join(summary(params, tmp_path))
    assert "segment: not evaluated yet" in text and "classify: not evaluated yet" in text
    store = (tmp_path / "mlflow.db").resolve()
    line = registry_line(params, "segment", tmp_path)  # metrics there, registry not yet
    assert (
        line == f"  registry: no store yet at {store}, medimg-segmenter not registered (make demo)"
    )
    assert f"runs                   no store yet at {store} (dvc repro logs them)" in text
    assert not store.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []
