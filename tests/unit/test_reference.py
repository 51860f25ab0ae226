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
