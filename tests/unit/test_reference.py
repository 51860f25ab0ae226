"""The demo's committed reference: what `make demo` followed by `dvc metrics diff` and
`git status dvc.lock metrics/` compares a reproduction with (README, issue "Results that
hold"). It must belong to this pipeline, and project copies must start without it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import yaml

from bench.cohort import REFERENCE, copy_project

REPO = Path(__file__).resolve().parents[2]


def _tracked() -> set[str]:
    out = subprocess.run(
        ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    return set(out.splitlines())


def test_the_reference_is_committed_for_every_stage_of_the_pipeline() -> None:
    tracked = _tracked()
    assert {"dvc.lock", "metrics/segment.json", "metrics/classify.json"} <= tracked
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    want = set()
    for name, stage in stages.items():
        if "foreach" in stage:
            want |= {f"{name}@{k}" for k in params["train"]["folds"]}
        else:
            want.add(name)
    lock = yaml.safe_load((REPO / "dvc.lock").read_text())["stages"]
    assert set(lock) == want
    for name, entry in lock.items():  # every output DVC does not cache is committed
        for out in entry.get("outs", []):
            path = out["path"]
            if path.endswith((".json", ".md")) and not path.startswith("data/"):
                assert path in tracked, f"{name}: {path}"


def test_the_reference_metrics_hold_test_and_out_of_fold_results() -> None:
    for task, key in (("segment", "per_structure"), ("classify", "per_class")):
        metrics = json.loads((REPO / "metrics" / f"{task}.json").read_text())
        assert metrics["ensemble"]["members"] == 3
        assert set(metrics["cv"]) >= {"metrics", key, "n_patients", "folds"}
        assert metrics[key] and metrics["cv"][key].keys() == metrics[key].keys()


def test_project_copies_leave_the_reference_out(tmp_path: Path) -> None:
    copy_project(tmp_path)
    assert (tmp_path / "dvc.yaml").is_file() and (tmp_path / "params.yaml").is_file()
    left = [p for p in tmp_path.rglob("*") if str(p.relative_to(tmp_path)).startswith(REFERENCE)]
    assert left == []
    assert any(name.startswith(REFERENCE) for name in _tracked())  # there was one to leave


def _lookup(params: dict, dotted: str) -> object:
    value: object = params
    for part in dotted.split("."):
        value = value[part]  # type: ignore[index]
    return value


def test_the_reference_was_computed_with_this_code_and_these_params() -> None:
    """The committed dvc.lock matches the repository: every code dependency it records has
    the md5 of the file as committed, and every parameter the value params.yaml gives it.
    So a stage's code or params cannot change without the reference being made again
    (`make demo` in a fresh clone); otherwise a reproduction reruns and differs."""
    import hashlib

    tracked = _tracked()
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    lock = yaml.safe_load((REPO / "dvc.lock").read_text())["stages"]
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    stale = []
    for name, entry in lock.items():
        for dep in entry.get("deps", []):
            if dep["path"] in tracked:  # code; data deps are the pipeline's own outputs
                md5 = hashlib.md5((REPO / dep["path"]).read_bytes()).hexdigest()
                if md5 != dep["md5"]:
                    stale.append(f"{name}: {dep['path']}")
        recorded = (entry.get("params") or {}).get("params.yaml", {})
        for key, value in recorded.items():
            if _lookup(params, key) != value:
                stale.append(f"{name}: params {key}")
        stage = stages[name.split("@")[0]]
        declared = (stage.get("do") or stage).get("params", [])
        stale += [f"{name}: new param {k}" for k in declared if k not in recorded]
    assert stale == [], "dvc.lock is stale; make the reference again: " + ", ".join(stale)
