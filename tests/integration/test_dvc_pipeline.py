"""The project's own dvc.yaml, run by the real ``dvc`` in a copy of the repository.

One long test, in the order a user meets these things: repro from nothing, a no-op
repro, a training parameter changed, an experiment, push to a remote and pull back.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from tests.integration.project import (
    STAGES,
    DvcProject,
    metrics_files,
    new_project,
    stages_run,
    tracked_outputs,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


def test_repro_noop_param_change_experiment_push_pull(
    dvc_project: DvcProject, tmp_path: Path
) -> None:
    project = dvc_project.project
    root = project.root

    # 1. from nothing: every stage ran and left its outputs, metrics and plots
    assert stages_run(dvc_project.first_repro) == STAGES
    for path in (
        "data/raw",
        "data/interim/manifest.parquet",
        "data/processed/manifest.parquet",
        "models/segment/model.pt",  # the folds' ensemble
        "models/segment/folds/1/model.pt",
        "models/classify/model_card.md",
        "plots/classify/roc.png",
        "plots/segment/dice_per_case.csv",
    ):
        assert (root / path).exists(), path
    metrics = json.loads(project.dvc("metrics", "show", "--json"))
    shown = json.dumps(metrics)
    assert '"auroc"' in shown and '"dice"' in shown and '"best_val_metric"' in shown
    classify = json.loads((root / "metrics/classify.json").read_text())
    assert 0.0 <= classify["metrics"]["auroc"]["value"] <= 1.0
    project.dvc("plots", "show", "-o", str(tmp_path / "plots-html"))
    assert (tmp_path / "plots-html" / "index.html").stat().st_size > 1000
    assert (root / "mlflow.db").is_file()  # tracked in MLflow meanwhile, outside DVC

    # 2. nothing changed: nothing runs
    out = project.dvc("repro")
    assert stages_run(out) == [], out
    assert json.loads(project.dvc("status", "--json")) == {}

    # 2b. one fold's model lost: that fold alone retrains, bit for bit as before, so
    # nothing downstream of it runs again (.dvcignore keeps the folder's checkpoint and
    # MLflow run file out of evaluation's dependency)
    (root / "models/segment/folds/1/model.pt").unlink()
    out = project.dvc("repro")
    assert stages_run(out) == ["train_segment@1"], out
    assert metrics_files(root) == dvc_project.first_metrics

    # 3. a classification training parameter, as an experiment (`dvc exp run -S`, which
    # reproduces in the workspace): only classification retrains and re-evaluates, and the
    # experiment reads back with its parameter and metrics
    out = project.dvc("exp", "run", "-S", "train.classify.lr=0.002", "-n", "lr-0.002")
    assert stages_run(out) == ["train_classify@0", "train_classify@1", "evaluate_classify"], out
    assert yaml.safe_load((root / "params.yaml").read_text())["train"]["classify"]["lr"] == 0.002
    shown = json.loads(project.dvc("exp", "show", "--json"))
    text = json.dumps(shown)
    assert "lr-0.002" in text and "0.002" in text and "auroc" in text
    assert json.loads(project.dvc("status", "--json")) == {}
    project.commit("classify lr 0.002")

    # 4. push everything, lose cache and outputs, pull: the same files
    remote = tmp_path / "remote"
    project.dvc("remote", "modify", "--local", "local", "url", str(remote))
    before = tracked_outputs(root)
    project.dvc("push")
    assert any(remote.rglob("*"))
    shutil.rmtree(root / ".dvc" / "cache")
    shutil.rmtree(root / "data")
    for weights in (root / "models").rglob("model.pt"):  # the ensembles and the folds'
        weights.unlink()
    project.dvc("pull")
    assert tracked_outputs(root) == before
    assert json.loads(project.dvc("status", "--json")) == {}


def test_two_repros_from_clean_give_identical_metrics(
    dvc_project: DvcProject, tmp_path: Path
) -> None:
    """Determinism on CPU: a second copy, reproduced from nothing in an environment that
    asks for other kernels and thread counts (as another machine would give), writes the
    same metrics files, byte for byte, as the first repro of the session's project: the
    reproducible mode pins them (tests/unit/test_runtime.py shows that unpinned they
    differ)."""
    second = new_project(tmp_path / "second")
    second.env |= {"ATEN_CPU_CAPABILITY": "default", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    second.dvc("repro")
    # per task: the test and cross-validation metrics, and each fold's training summary
    assert len(dvc_project.first_metrics) == 6, sorted(dvc_project.first_metrics)
    assert metrics_files(second.root) == dvc_project.first_metrics
    # and dvc.lock: every output (data, weights, model cards, plots) is the same file
    lock = yaml.safe_load((second.root / "dvc.lock").read_text())
    assert lock == yaml.safe_load(dvc_project.first_lock)
