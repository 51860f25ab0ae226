"""Robustness of the demo's results: its training and evaluation for several seeds.

The demo's recipe (this repository's params.yaml: cohort, cross-validation, both tasks)
runs once per seed in a scratch copy of the project, on one synthetic cohort made and
preprocessed once. Then the first seed runs again in a process that asks for other CPU
kernels and another thread count (``ATEN_CPU_CAPABILITY=default``, one thread), as
another machine would: in reproducible mode its metrics files must be identical.

Printed per run: the test metrics of both tasks (headline, and the worst class or
structure), the cross-validation (out-of-fold) ones; then over the seeds their mean,
standard deviation and minimum, and whether every seed reaches the demo's targets
(per class AUROC >= 0.90, per structure Dice >= 0.80, on the test patients).

The full run (5 seeds, 120 patients) takes hours on two cores: ``--seeds 2 --patients
40 --epochs 3`` gives a quick look (its numbers are not the demo's). ``--keep DIR`` keeps the
runs' folders, metrics and models there, and makes the run resumable: started again with
the same ``--keep DIR``, it reuses the cohort and every finished run whose inputs are
unchanged (the params and the contents of the code the training and evaluation stages of
dvc.yaml depend on, hashed as DVC would decide to rerun them), so that the seeds of a long
run can be spread over several sittings (``--seeds 0,1`` now, ``--seeds 5`` later).
``--reference`` takes seed 0 from the committed ``metrics/`` (what ``make demo`` wrote on
the code and params of ``dvc.lock``) instead of training it again.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from cohort import BIN, PROJECT_ENV, REPO, run, scratch_project

TARGETS = {"classify": 0.90, "segment": 0.80}  # per class AUROC, per structure Dice
TASKS = ("segment", "classify")
OTHER_MACHINE = {"ATEN_CPU_CAPABILITY": "default", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _task_values(result: dict[str, Any], part: str) -> dict[str, float]:
    """Headline metric and the per class / per structure ones of ``metrics/<task>.json``
    (``part``: the test set or ``cv``)."""
    block = result if part == "test" else result.get("cv") or {}
    metrics = block.get("metrics") or {}
    name = next(k for k in ("macro_auroc", "auroc", "dice") if metrics.get(k))
    out = {name: float(metrics[name]["value"])}
    owners = block.get("per_class") or block.get("per_structure") or {}
    key = "auroc" if name != "dice" else "dice"
    for owner, m in owners.items():
        if (m.get(key) or {}).get("value") is not None:
            out[f"{owner}:{key}"] = float(m[key]["value"])
    return out


def code_hash(root: Path, prefixes: tuple[str, ...]) -> str:
    """SHA-256 over the code files that the stages of ``root``'s dvc.yaml named by
    ``prefixes`` depend on (their paths and contents: what makes DVC rerun them)."""
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    deps: set[str] = set()
    for name, stage in stages.items():
        if name.startswith(prefixes):
            deps.update(d for d in (stage.get("do") or stage).get("deps", []) if "${" not in d)
    digest = hashlib.sha256()
    for dep in sorted(deps):
        digest.update(dep.encode() + b"\0" + (root / dep).read_bytes() + b"\0")
    return digest.hexdigest()


def _inputs(
    root: Path, prefixes: tuple[str, ...], params: dict[str, Any], env: dict[str, str]
) -> str:
    """What a finished run or cohort must match to be reused: params, code, machine settings."""
    pinned = {k: env.get(k, "") for k in OTHER_MACHINE}
    text = json.dumps([params, code_hash(root, prefixes), pinned], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _run_seed(root: Path, seed: int, tag: str, env: dict[str, str]) -> dict[str, Any]:
    """One seed's training and evaluation of both tasks, outputs under ``runs/<tag>``;
    a finished run with the same inputs (``runs/<tag>/done.json``) is reused."""
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train"]["seed"] = seed
    out = root / "runs" / tag
    for key in ("models", "metrics", "plots"):
        params["data"][key] = str(out / key)
    params["tracking"]["enabled"] = False  # the bench measures the numbers, not MLflow
    inputs = _inputs(root, ("train_", "evaluate_"), params, env)
    done = out / "done.json"
    if done.is_file() and (record := json.loads(done.read_text()))["inputs"] == inputs:
        print(f"# {tag}: reused (finished earlier with the same inputs)", flush=True)
        return {**record, "reused": True}
    out.mkdir(parents=True, exist_ok=True)
    pfile = out / "params.yaml"
    pfile.write_text(yaml.safe_dump(params, sort_keys=False))
    t0 = time.perf_counter()
    for task in TASKS:
        for command in ("train", "evaluate"):
            run(root, str(BIN / "medimg"), command, "--task", task, "--params", str(pfile), env=env)
    files = {task: (out / "metrics" / f"{task}.json").read_text() for task in TASKS}
    record = {
        "tag": tag, "seed": seed, "seconds": time.perf_counter() - t0, "files": files,
        "inputs": inputs, "commit": _commit(), "finished": time.strftime("%Y-%m-%d %H:%M"),
    }  # fmt: skip
    tmp = done.with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    tmp.replace(done)
    return record


def _commit() -> str:
    """This repository's commit, with "+changes" when its tracked files differ from it."""
    head = run(REPO, "git", "rev-parse", "--short", "HEAD").strip()
    dirty = run(REPO, "git", "status", "--porcelain", "--untracked-files=no").strip()
    return head + ("+changes" if dirty else "")


def seed_list(text: str) -> list[int]:
    """``--seeds``: a count N (seeds 0..N-1) or a comma-separated list (``1,2``)."""
    if "," in text:
        return [int(v) for v in text.split(",") if v.strip()]
    return list(range(int(text)))


def _row(r: dict[str, Any]) -> dict[str, float]:
    values: dict[str, float] = {}
    for task in TASKS:
        result = json.loads(r["files"][task])
        for part in ("test", "cv"):
            for k, v in _task_values(result, part).items():
                values[f"{task}.{part}.{k}"] = v
    return values


def _meets_targets(values: dict[str, float]) -> bool:
    """Every class's and structure's test metric at or above its task's target."""
    checks = []
    for task, target in TARGETS.items():
        mine = {k: v for k, v in values.items() if k.startswith(f"{task}.test.")}
        per = [v for k, v in mine.items() if ":" in k]  # per class or structure
        head = [v for k, v in mine.items() if ":" not in k]
        checks += [v >= target for v in (per or head)]
    return all(checks)


def report(runs: list[dict[str, Any]], other: dict[str, Any] | None) -> str:
    rows = {r["tag"]: _row(r) for r in runs}
    names = sorted({k for v in rows.values() for k in v})
    lines = ["metric," + ",".join(rows) + ",mean,sd,min"]
    for name in names:
        vals = [rows[t].get(name, math.nan) for t in rows]
        finite = [v for v in vals if math.isfinite(v)]
        sd = statistics.stdev(finite) if len(finite) > 1 else 0.0
        cells = [f"{v:.4f}" for v in vals]
        mean, low = statistics.fmean(finite), min(finite)
        lines.append(f"{name},{','.join(cells)},{mean:.4f},{sd:.4f},{low:.4f}")
    for r in runs:
        ok = _meets_targets(rows[r["tag"]])
        lines.append(
            f"# {r['tag']}: {r['seconds'] / 60:.1f} min, commit {r.get('commit', '?')}, "
            f"{r.get('finished', '')}{' (reused)' if r.get('reused') else ''}; targets "
            f"(AUROC >= {TARGETS['classify']} per class, Dice >= {TARGETS['segment']} "
            f"per structure): {'met' if ok else 'NOT met'}"
        )
    if other is not None:
        same = other["files"] == runs[0]["files"]
        lines.append(
            f"# {other['tag']} ({' '.join(f'{k}={v}' for k, v in OTHER_MACHINE.items())}): "
            f"metrics files {'identical to' if same else 'DIFFERENT from'} {runs[0]['tag']}'s"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--seeds", type=seed_list, default=list(range(5)), help="N (seeds 0..N-1) or a list: 1,2"
    )
    parser.add_argument("--patients", type=int, help="cohort size (default: params.yaml's)")
    parser.add_argument("--epochs", type=int, help="both tasks' epochs (default: params.yaml's)")
    parser.add_argument("--no-other-machine", action="store_true", help="skip the ISA run")
    parser.add_argument("--keep", type=Path, help="keep the project copy and runs here")
    parser.add_argument(
        "--reference",
        action="store_true",
        help="seed 0 from this checkout's committed metrics/ (the demo's reference, which "
        "tests/unit/test_reference.py keeps in step with the code) instead of training it",
    )
    args = parser.parse_args()
    if args.reference and (args.patients or args.epochs or _params_seed() != 0):
        parser.error("--reference is the demo's own recipe: no --patients or --epochs")

    def edit(params: dict[str, Any]) -> None:
        if args.patients:
            params["synth"]["n_patients"] = args.patients
        if args.epochs:
            for task in TASKS:
                params["train"][task]["epochs"] = args.epochs
        params["tracking"]["enabled"] = False

    with tempfile.TemporaryDirectory(prefix="medimg-robustness-") as tmp:
        root = args.keep or Path(tmp) / "project"
        root.mkdir(parents=True, exist_ok=True)
        _cohort(root, edit)
        runs = [reference_run()] if args.reference else []
        for seed in [s for s in args.seeds if not (args.reference and s == 0)]:
            runs.append(_run_seed(root, seed, f"seed{seed}", PROJECT_ENV))
            print(f"# seed {seed}: {runs[-1]['seconds'] / 60:.1f} min", flush=True)
        other = None
        if not args.no_other_machine:
            env = {**PROJECT_ENV, **OTHER_MACHINE}
            other = _run_seed(root, runs[0]["seed"], f"seed{runs[0]['seed']}-other-isa", env)
        print(report(runs, other))


def _params_seed() -> int:
    return int(yaml.safe_load((REPO / "params.yaml").read_text())["train"].get("seed", 0))


def reference_run() -> dict[str, Any]:
    """Seed 0 as the committed reference: ``metrics/<task>.json`` that ``make demo`` wrote
    (``dvc.lock`` records the code and params they came from)."""
    files = {task: (REPO / "metrics" / f"{task}.json").read_text() for task in TASKS}
    return {"tag": "seed0-reference", "seed": 0, "seconds": math.nan, "files": files,
            "commit": _commit(), "finished": "committed reference", "reused": True}  # fmt: skip


def _cohort(root: Path, edit: Any) -> None:
    """The project copy with the cohort made and preprocessed, reused when its params and
    code are those of an earlier run in the same folder (``root/cohort.json``)."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    edit(params)
    sections = {k: params[k] for k in ("synth", "structures", "ingest", "preprocess", "split")}
    inputs = _inputs(REPO, ("synth", "ingest", "preprocess"), sections, PROJECT_ENV)
    marker = root / "cohort.json"
    reuse = marker.is_file() and json.loads(marker.read_text())["inputs"] == inputs
    scratch_project(root, edit, exclude=("/runs/", "/cohort.json"))  # this checkout's code
    if reuse:
        print("# cohort reused (made earlier with the same params and code)", flush=True)
        return
    marker.unlink(missing_ok=True)
    t0 = time.perf_counter()
    for command in ("synth", "ingest", "preprocess"):
        run(root, str(BIN / "medimg"), command)
    marker.write_text(json.dumps({"inputs": inputs}))
    print(f"# cohort made and preprocessed in {(time.perf_counter() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
