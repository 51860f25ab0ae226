"""The model card: what the model is, what it saw, and the environment it was trained in."""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

import pandas as pd

from medimg import runtime, versions
from medimg.config import TaskTrainParams
from medimg.report import write_model_card
from medimg.tasks import TASKS
from medimg.train import TrainResult
from tests.helpers import write_lock


def _card(tmp_path: Path, environment: dict[str, str]) -> str:
    manifest = tmp_path / "manifest.parquet"
    pd.DataFrame(
        {
            "patient": ["p1", "p2", "p3"],
            "split": ["0", "1", "test"],
            "modality": ["CT", "MR", "CT"],
            "vendor": ["X", "Y", "X"],
        }
    ).to_parquet(manifest)
    result = TrainResult("classify", best_epoch=2, best_metric=0.75, epochs_run=3)
    result.environment = environment
    path = tmp_path / "model_card.md"
    write_model_card(
        path, TASKS["classify"], TaskTrainParams(), result, manifest=manifest, fold=1, seed=7
    )
    return path.read_text()


def test_the_card_names_the_installed_versions_and_the_lock(tmp_path: Path) -> None:
    installed = versions.installed_distributions()
    lock = write_lock(tmp_path / "cpu.lock", {"numpy": version("numpy"), "monai": version("monai")})
    env = runtime.environment(False) | versions.lock_record(lock, installed)
    card = _card(tmp_path, env)
    (section,) = [line for line in card.splitlines() if line.startswith("**Environment.**")]
    assert f"python {env['version.python']}, torch {version('torch')}, " in section
    for name in versions.PACKAGES:
        assert f"{name} {version(name)}" in section
    digest = env["lock.sha256"]
    assert f"Installed from the lock with sha256 `{digest}`, every locked package at its" in section

    drifted = write_lock(tmp_path / "old.lock", {"mlflow": "0.0.1"})
    env = runtime.environment(False) | versions.lock_record(drifted, installed)
    assert f"except mlflow {version('mlflow')} (lock 0.0.1)." in _card(tmp_path, env)
    env = runtime.environment(False) | versions.lock_record(None, installed)
    assert "Not installed from a lock (docs/installation.md)." in _card(tmp_path, env)
