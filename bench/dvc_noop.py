"""How long `dvc repro` takes when nothing changed, on the demo-sized pipeline.

Copies the repository into a scratch git repo, runs the whole pipeline once with the demo
cohort (training cut to one epoch: the no-op check does not depend on it), then times a
no-op `dvc repro` and, side by side, `dvc version` (the interpreter and DVC start-up
alone). Prints the median of each, their ratio, and the target (no-op under 2 s).

Run: ``python bench/dvc_noop.py [--repeats N] [--here]`` (``--here``: time the no-op in
this repository, after `make demo`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from cohort import BIN, REPO, run, scratch_project


def timed(root: Path, *args: str) -> float:
    t0 = time.perf_counter()
    run(root, *args)
    return time.perf_counter() - t0


def one_epoch_untracked(params: dict) -> None:
    for task in ("classify", "segment"):
        params["train"][task]["epochs"] = 1
    params["tracking"]["enabled"] = False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--here", action="store_true", help="time this repository's pipeline")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="medimg-dvc-bench-") as tmp:
        root = REPO if args.here else Path(tmp)
        if not args.here:
            scratch_project(root, one_epoch_untracked)
            t0 = time.perf_counter()
            run(root, str(BIN / "dvc"), "repro")
            first = time.perf_counter() - t0
            print(f"first dvc repro (demo cohort, 1 epoch per model): {first:.0f} s")
        dvc = str(BIN / "dvc")
        status = run(root, dvc, "status")
        if "changed" in status or "modified" in status:
            sys.exit(f"the pipeline is not up to date, run `dvc repro` first:\n{status}")
        files = sum(1 for p in (root / "data").rglob("*") if p.is_file())
        noop, startup = [], []
        for _ in range(args.repeats):  # alternate, so load changes hit both alike
            startup.append(timed(root, dvc, "version"))
            noop.append(timed(root, dvc, "repro"))
        a, b = statistics.median(noop), statistics.median(startup)
        print(f"pipeline data files: {files}")
        print(
            f"no-op dvc repro: median {a:.2f} s of {args.repeats} ({min(noop):.2f}-{max(noop):.2f})"
        )
        print(f"dvc version (start-up alone): median {b:.2f} s")
        verdict = "met" if a < 2 else "MISSED"
        print(f"ratio no-op repro / start-up: {a / b:.2f}x; target no-op < 2 s: {verdict}")


if __name__ == "__main__":
    main()
