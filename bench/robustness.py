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
runs' folders, metrics and models there.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from cohort import BIN, PROJECT_ENV, run, scratch_project

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


def _run_seed(root: Path, seed: int, tag: str, env: dict[str, str]) -> dict[str, Any]:
    """One seed's training and evaluation of both tasks, outputs under ``runs/<tag>``."""
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train"]["seed"] = seed
    out = root / "runs" / tag
    for key in ("models", "metrics", "plots"):
        params["data"][key] = str(out / key)
    params["tracking"]["enabled"] = False  # the bench measures the numbers, not MLflow
    out.mkdir(parents=True, exist_ok=True)
    pfile = out / "params.yaml"
    pfile.write_text(yaml.safe_dump(params, sort_keys=False))
    t0 = time.perf_counter()
    for task in TASKS:
        for command in ("train", "evaluate"):
            run(root, str(BIN / "medimg"), command, "--task", task, "--params", str(pfile), env=env)
    files = {task: (out / "metrics" / f"{task}.json").read_text() for task in TASKS}
    return {"tag": tag, "seed": seed, "seconds": time.perf_counter() - t0, "files": files}


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
            f"# {r['tag']}: {r['seconds'] / 60:.1f} min; targets "
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
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1")
    parser.add_argument("--patients", type=int, help="cohort size (default: params.yaml's)")
    parser.add_argument("--epochs", type=int, help="both tasks' epochs (default: params.yaml's)")
    parser.add_argument("--no-other-machine", action="store_true", help="skip the ISA run")
    parser.add_argument("--keep", type=Path, help="keep the project copy and runs here")
    args = parser.parse_args()

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
        scratch_project(root, edit)
        t0 = time.perf_counter()
        for command in ("synth", "ingest", "preprocess"):
            run(root, str(BIN / "medimg"), command)
        print(f"# cohort made and preprocessed in {(time.perf_counter() - t0) / 60:.1f} min")
        runs = []
        for seed in range(args.seeds):
            runs.append(_run_seed(root, seed, f"seed{seed}", PROJECT_ENV))
            print(f"# seed {seed}: {runs[-1]['seconds'] / 60:.1f} min", flush=True)
        other = None
        if not args.no_other_machine:
            other = _run_seed(root, 0, "seed0-other-isa", {**PROJECT_ENV, **OTHER_MACHINE})
        print(report(runs, other))


if __name__ == "__main__":
    main()
