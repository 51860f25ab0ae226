"""A copy of this repository with tiny params, as a git + DVC project, for integration
tests that run the real ``dvc`` (and Prefect flows over it). The session's project is the
``dvc_project`` fixture (tests/integration/conftest.py); the copy itself is the benchmarks'
:func:`bench.cohort.copy_project`, the one implementation of it."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from bench.cohort import copy_project
from medimg.config import Params, SplitParams, TaskTrainParams, TrainParams
from tests.helpers import TINY_SYNTH, tool_path

STAGES = [  # with the two folds of tiny_params's cross-validation (dvc.yaml's foreach)
    "synth",
    "ingest",
    "preprocess",
    "train_segment@0",
    "train_segment@1",
    "evaluate_segment",
    "train_classify@0",
    "train_classify@1",
    "evaluate_classify",
]


def tiny_params() -> dict:
    small = {"arch": "resnet10", "batch_size": 4}
    train = TrainParams(
        classify=TaskTrainParams(
            **small, epochs=2, pretrained="models/segment/model.pt", freeze_encoder_epochs=1
        ),
        segment=TaskTrainParams(**small, epochs=1),
        folds=[0, 1],  # both folds: out-of-fold metrics and the ensemble, as in the demo
    )
    params = Params(
        synth=TINY_SYNTH,
        split=SplitParams(salt="medimg-split-v1", n_folds=2, test_fraction=0.25),
        train=train,
    )
    return params.model_dump(mode="json")


def metrics_files(root: Path) -> dict[str, str]:
    """The text of every metrics file the pipeline writes (``metrics/*.json``)."""
    return {p.name: p.read_text() for p in sorted((root / "metrics").glob("*.json"))}


def tracked_outputs(root: Path) -> dict[str, str]:
    """md5 of every file DVC tracks in the cache (data and weights; not what .dvcignore
    leaves on the machine that wrote it)."""
    files = [*(root / "data").rglob("*"), *(root / "models").rglob("model.pt")]
    return {
        str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest()
        for p in files
        if p.is_file() and p.name != "quarantine.csv" and p.suffix != ".fingerprint"
    }


class Project:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.env = {
            **os.environ,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "MEDIMG_SALT": "medimg-test-salt-24",  # the fixed pseudonym key of the tests
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "GIT_AUTHOR_NAME": "medimg test",
            "GIT_AUTHOR_EMAIL": "test@example.invalid",
            "GIT_COMMITTER_NAME": "medimg test",
            "GIT_COMMITTER_EMAIL": "test@example.invalid",
        }
        self.env.pop("MLFLOW_TRACKING_URI", None)
        self.env.pop("MEDIMG_MLFLOW_URI", None)

    def run(self, *args: str) -> str:
        done = subprocess.run(
            args, cwd=self.root, env=self.env, capture_output=True, text=True, timeout=900
        )
        assert done.returncode == 0, (
            f"{' '.join(args)}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
        return done.stdout + done.stderr

    def dvc(self, *args: str) -> str:
        return self.run(tool_path("dvc"), *args)

    def commit(self, message: str) -> None:
        self.run("git", "add", "-A")
        self.run("git", "commit", "-q", "-m", message)


def stages_run(output: str) -> list[str]:
    return [s for s in STAGES if f"Running stage '{s}'" in output]


@dataclass
class DvcProject:
    project: Project
    first_repro: str  # what the first `dvc repro` printed
    first_metrics: dict[str, str]  # metrics files after it
    first_lock: str  # dvc.lock after it


def new_project(root: Path) -> Project:
    """A fresh git repository at ``root`` holding the repository with tiny params."""
    root.mkdir()
    copy_project(root)
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params(), sort_keys=False))
    project = Project(root)
    project.run("git", "init", "-q")
    project.commit("tiny medimg project")
    return project
