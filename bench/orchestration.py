"""What Prefect costs: per-task overhead, and the demo pipeline under Prefect versus the CLI.

1. Per-task overhead: a flow maps N no-op tasks on the default thread runner, side by side
   with a flow that calls the same function N times; (difference / N) in ms. Also the
   start-up of Prefect's temporary local server (the first flow of a process, when no
   server is configured), which happens once per process and is reported apart.
2. The demo pipeline from nothing, twice, each in its own scratch copy of the repository:
   the plain CLI (``dvc repro`` then ``medimg register`` for both tasks: what ``make demo``
   runs) and the ``pipeline`` flow (the same DVC stages as Prefect tasks, then registration
   and the gate), in a fresh process without a configured server, as a user runs it first.
   Prints both wall times and their ratio (goal <= 1.10).

Run: ``python bench/orchestration.py [--tasks N] [--epochs E]`` (``--epochs`` overrides the
training epochs of both models, to shorten the pipeline part; by default the demo params,
about 2 x 10 min on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cohort import BIN, PROJECT_ENV, run, scratch_project

FLOW = "from pipelines.pipeline import pipeline_flow; pipeline_flow(root='.')"


def task_overhead(n: int, repeats: int, settle: float = 5.0) -> None:
    from prefect import flow, task
    from prefect.cache_policies import NONE

    def work(i: int) -> int:
        return i * i

    noop = task(work, name="noop", cache_policy=NONE, persist_result=False)

    @flow(name="bench-tasks")
    def mapped(n: int) -> int:
        return sum(f.result() for f in noop.map(range(n)))

    @flow(name="bench-calls")
    def called(n: int) -> int:
        return sum(work(i) for i in range(n))

    t0 = time.perf_counter()
    called(1)  # the first flow of the process starts the temporary server
    print(
        f"first flow of a process (temporary local server start): {time.perf_counter() - t0:.1f} s"
    )
    with_tasks, plain = [], []
    for _ in range(repeats):  # alternate, so that load changes hit both alike
        # The server records a flow's task events after the flow returns: let it catch up
        # first, or that work lands in the next flow's clock.
        time.sleep(settle)
        t0 = time.perf_counter()
        called(n)
        plain.append(time.perf_counter() - t0)
        time.sleep(settle)
        t0 = time.perf_counter()
        mapped(n)
        with_tasks.append(time.perf_counter() - t0)
    a, b = statistics.median(with_tasks), statistics.median(plain)
    print(f"flow with {n} mapped tasks: median {a:.2f} s; with {n} plain calls: {b:.2f} s")
    print(f"per-task overhead: {1000 * (a - b) / n:.1f} ms (median of {repeats})")


def pipeline_ratio(epochs: int | None) -> None:
    def edit(params: dict[str, Any]) -> None:
        if epochs is not None:
            for name in ("classify", "segment"):
                params["train"][name]["epochs"] = epochs

    with tempfile.TemporaryDirectory(prefix="medimg-orch-bench-") as tmp:
        cli, pf = Path(tmp) / "cli", Path(tmp) / "prefect"
        for root in (cli, pf):
            root.mkdir()
            scratch_project(root, edit)
        t0 = time.perf_counter()
        run(cli, str(BIN / "dvc"), "repro")
        for name in ("segment", "classify"):
            run(cli, str(BIN / "medimg"), "register", "--task", name)
        t_cli = time.perf_counter() - t0
        print(f"plain CLI (dvc repro + medimg register x2): {t_cli:.0f} s")
        PROJECT_ENV["PREFECT_HOME"] = str(Path(tmp) / "prefect-home")
        t0 = time.perf_counter()
        run(pf, sys.executable, "-c", FLOW)
        t_pf = time.perf_counter() - t0
        print(f"pipeline flow (temporary server included): {t_pf:.0f} s")
        same = (cli / "metrics/classify.json").read_text() == (
            pf / "metrics/classify.json"
        ).read_text()
        print(f"same classification metrics from both: {same}")
        verdict = "met" if t_pf / t_cli <= 1.10 else "MISSED"
        print(f"wall-time ratio Prefect / CLI: {t_pf / t_cli:.3f} (goal <= 1.10: {verdict})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=200, help="no-op tasks per flow")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=None, help="override training epochs")
    parser.add_argument("--skip-pipeline", action="store_true")
    args = parser.parse_args()
    # A fresh Prefect home and no server: what a new user's first run gets. The folder goes
    # at exit, after Prefect's own exit handlers have stopped the temporary server
    # (registered first, so it runs last).
    home = tempfile.mkdtemp(prefix="medimg-prefect-home-")
    atexit.register(shutil.rmtree, home, True)
    os.environ["PREFECT_HOME"] = home
    os.environ.pop("PREFECT_API_URL", None)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # the default 20 s is too short for a loaded 2-core machine
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    task_overhead(args.tasks, args.repeats)
    if not args.skip_pipeline:
        pipeline_ratio(args.epochs)


if __name__ == "__main__":
    main()
