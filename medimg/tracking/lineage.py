"""Lineage: what ties a run to its inputs (git commit, DVC hashes, Prefect flow run, test
set). No MLflow here: plain hashes and tags that :mod:`medimg.tracking.runs` records."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from medimg.config import Params
from medimg.tasks import get_task


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"train": {"lr": 1}}`` -> ``{"train.lr": "1"}``; lists become JSON text."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        else:
            out[name] = json.dumps(value) if isinstance(value, list | tuple) else str(value)
    return out


def file_md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def dvc_dir_md5(folder: Path) -> str:
    """The hash DVC 3 gives a tracked folder (``<md5>.dir``): the md5 of the JSON list of
    ``{"md5", "relpath"}`` entries, sorted by path. Equals ``dvc add``'s (tested)."""
    entries = [
        {"md5": file_md5(p), "relpath": p.relative_to(folder).as_posix()}
        for p in sorted(folder.rglob("*"), key=lambda q: q.relative_to(folder).as_posix())
        if p.is_file()
    ]
    text = json.dumps(entries, sort_keys=True).encode("utf-8")
    return hashlib.md5(text, usedforsecurity=False).hexdigest() + ".dir"


def _git(root: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, timeout=30, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def prefect_flow_run_id() -> str | None:
    """The id of the Prefect flow run this process works for, if any: the pipeline flow
    (pipelines/pipeline.py) exports it to the stage commands it runs. Read from the
    environment, so that the library needs no Prefect import."""
    return os.environ.get("PREFECT__FLOW_RUN_ID") or None


def test_set_digest(manifest: pd.DataFrame) -> str:
    """Names the test patients (pseudonyms, hashed again): equal digests, same test set."""
    keys = sorted(manifest.loc[manifest["split"] == "test", "key"].astype(str))
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]


def _source(root: Path) -> tuple[Path, str] | None:
    """The repository of the run's code and its commit: the project's repository, else
    the one medimg's own code was installed from; None outside git."""
    for repo in (root, Path(__file__).resolve().parents[1]):
        commit = _git(repo, "rev-parse", "HEAD")
        if commit:
            return repo, commit
    return None


def run_name(params: Params, task: str, root: Path, what: str) -> str:
    """``train-fold0-classify-resnet10-1a2b3c4-20261202-081500``: what the run is (with
    its fold), its task and encoder, the short commit of its code, then when it started,
    so that the MLflow UI's runs table tells runs apart by what differs between them."""
    arch = get_task(task).train_params(params.train).arch
    source = _source(root)
    commit = source[1][:7] if source else "nogit"
    return "-".join([what, task, arch, commit, time.strftime("%Y%m%d-%H%M%S")])


def lineage_tags(params: Params, root: Path, processed: Path) -> dict[str, str]:
    """Tags that tie a run to its inputs."""
    tags: dict[str, str] = {}
    source = _source(root)
    if source:
        repo, tags["mlflow.source.git.commit"] = source
        status = _git(repo, "status", "--porcelain", "--untracked-files=no")
        tags["medimg.git.dirty"] = str(bool(status)).lower()
    if processed.is_dir():
        tags["medimg.dvc.processed_md5"] = dvc_dir_md5(processed)
        tags["medimg.test_set"] = test_set_digest(pd.read_parquet(processed / "manifest.parquet"))
    params_file = root / "params.yaml"
    if params_file.is_file():
        tags["medimg.dvc.params_md5"] = file_md5(params_file)
    resolved = json.dumps(params.model_dump(mode="json"), sort_keys=True).encode()
    tags["medimg.params_sha256"] = hashlib.sha256(resolved).hexdigest()[:16]
    flow_run = prefect_flow_run_id()
    if flow_run:
        tags["prefect.flow_run_id"] = flow_run
    return tags
