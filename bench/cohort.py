"""Shared by the benchmark scripts: scratch params for a synthetic cohort, project copies.

Params put every data path of a synthetic cohort under a scratch folder; a project copy is
this repository's files in a fresh git repository, to run the pipeline in.

Not a benchmark itself (``make bench`` runs it too: it only prints its help). The
integration tests import :func:`copy_project` from here as ``bench.cohort``; so this module
imports nothing from ``tests`` and nothing beyond the project's own dependencies.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from medimg.config import DataParams, IngestParams, Params, SynthParams

BENCH_SALT = "medimg-bench-synthetic-data-only"  # fixed: the same splits on every run
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# What a project copy's commands run with: this environment's tools, the demo's public key.
PROJECT_ENV = {
    **os.environ,
    "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
    "MEDIMG_SALT": "medimg-demo-synthetic-data-only",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "GIT_AUTHOR_NAME": "bench",
    "GIT_AUTHOR_EMAIL": "bench@example.invalid",
    "GIT_COMMITTER_NAME": "bench",
    "GIT_COMMITTER_EMAIL": "bench@example.invalid",
}
for _name in ("MLFLOW_TRACKING_URI", "MEDIMG_MLFLOW_URI", "PREFECT_API_URL"):
    PROJECT_ENV.pop(_name, None)


def run(root: Path, *args: str, env: dict[str, str] | None = None) -> str:
    """Run a command in a project copy (with ``env``, default :data:`PROJECT_ENV`); exit
    with its output if it fails."""
    done = subprocess.run(
        args, cwd=root, env=PROJECT_ENV if env is None else env, capture_output=True, text=True
    )
    if done.returncode:
        sys.exit(f"{' '.join(args)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return done.stdout


# The demo's committed reference (what `dvc metrics diff` compares a reproduction with):
# pipeline outputs, so a project copy, which has other params, starts without them.
REFERENCE = ("dvc.lock", "metrics/", "plots/", "models/")


def copy_project(dest: Path) -> None:
    """Copy this repository's files (tracked, or new and not ignored; no outputs, and not
    the demo's committed reference outputs, :data:`REFERENCE`) into ``dest``. The
    integration tests' project copies use it too (tests/integration/project.py).
    """
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, listed):
        if name.decode().startswith(REFERENCE):
            continue
        src = REPO / name.decode()
        if src.is_file():
            (dest / name.decode()).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name.decode())


def scratch_project(
    root: Path, edit: Callable[[dict[str, Any]], None], exclude: tuple[str, ...] = ()
) -> None:
    """This repository's files copied into ``root`` (:func:`copy_project`) as a git
    repository, with ``edit`` applied to its params.yaml. Into an earlier copy, the files
    are updated and committed when they changed (``exclude``: git patterns of what the
    bench itself keeps there, never committed)."""
    copy_project(root)
    params = yaml.safe_load((root / "params.yaml").read_text())
    edit(params)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(root, "git", "init", "-q")
    if exclude:
        (root / ".git" / "info").mkdir(parents=True, exist_ok=True)
        (root / ".git" / "info" / "exclude").write_text("".join(f"{p}\n" for p in exclude))
    run(root, "git", "add", "-A")
    changed = subprocess.run(["git", "diff", "--cached", "--quiet"], cwd=root, env=PROJECT_ENV)
    if changed.returncode:
        run(root, "git", "commit", "-qm", "bench")


def scratch_params(root: Path, n_patients: int) -> Params:
    """Every data path under ``root``; a fixed pseudonym key, so runs are comparable."""
    salt = root / "salt"
    root.mkdir(parents=True, exist_ok=True)
    salt.write_text(BENCH_SALT)
    salt.chmod(0o600)
    return Params(
        data=DataParams(
            raw=root / "raw",
            masks=root / "masks",
            labels=root / "labels.csv",
            synth_truth=root / "truth.csv",
            interim=root / "interim",
            processed=root / "processed",
            models=root / "models",
            metrics=root / "metrics",
            plots=root / "plots",
        ),
        synth=SynthParams(n_patients=n_patients),
        ingest=IngestParams(salt_file=salt),
    )


if __name__ == "__main__":
    print(__doc__.splitlines()[0])
