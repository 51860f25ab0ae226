"""A copy of this repository with tiny params, as a git + DVC project, for integration
tests that run the real ``dvc`` (and Prefect flows over it)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from medimg.config import Params, SplitParams, TaskTrainParams, TrainParams
from tests.conftest import TINY_SYNTH, tool_path

REPO = Path(__file__).resolve().parents[2]
STAGES = [
    "synth",
    "ingest",
    "preprocess",
    "train_segment",
    "evaluate_segment",
    "train_classify",
    "evaluate_classify",
]


def copy_project(dest: Path) -> None:
    """The repository's files (tracked, or new and not ignored), without outputs."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, listed):
        src = REPO / name.decode()
        if src.is_file():
            (dest / name.decode()).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name.decode())


def tiny_params() -> dict:
    small = {"arch": "resnet10", "batch_size": 4}
    train = TrainParams(
        classify=TaskTrainParams(
            **small, epochs=2, pretrained="models/segment/model.pt", freeze_encoder_epochs=1
        ),
        segment=TaskTrainParams(**small, epochs=1),
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
    """md5 of every file DVC tracks in the cache (data and weights)."""
    files = [*(root / "data").rglob("*"), *(root / "models").rglob("model.pt")]
    return {
        str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest()
        for p in files
        if p.is_file() and p.name != "quarantine.csv"
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


@pytest.fixture(scope="session")
def dvc_project(tmp_path_factory: pytest.TempPathFactory) -> DvcProject:
    """The repository copied into a fresh git repo with tiny params, after one `dvc repro`
    from nothing. Tests may change it but must leave the pipeline up to date."""
    project = new_project(tmp_path_factory.mktemp("dvc") / "project")
    out = project.dvc("repro")
    project.commit("first results")
    return DvcProject(project, out, metrics_files(project.root))


def new_project(root: Path) -> Project:
    """A fresh git repository at ``root`` holding the repository with tiny params."""
    root.mkdir()
    copy_project(root)
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params(), sort_keys=False))
    project = Project(root)
    project.run("git", "init", "-q")
    project.commit("tiny medimg project")
    return project
