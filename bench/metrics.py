"""The patient-level bootstrap against the statistic alone, measured side by side.

``medimg.metrics.bootstrap_ci`` resamples patients (every row of each drawn patient) and
computes the statistic on each resample. The reference computes the same statistic the same
number of times on the unresampled frame: what any bootstrap of that statistic must spend,
so the ratio says how much the resampling itself costs. The cohort is the evaluation's
shape: a number of patients with two series each, one label and one probability per series.
The two contenders run alternately, ``--repeats`` times each, and the median counts.

Run: ``python bench/metrics.py [--patients 100] [--n-boot 1000] [--repeats 5]`` (or
``make bench``). Prints the resamples per second of both, the ratio, and the target (1,000
resamples of 100 patients, mean of a column, under 1 s).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import pandas as pd

from medimg.metrics import auroc, bootstrap_ci

TARGET_S = 1.0  # 1,000 resamples of 100 patients (200 rows), mean of a column


def cohort(n_patients: int, seed: int = 3, rows_per_patient: int = 2) -> pd.DataFrame:
    """Per-series rows: patient, label, and a probability that leans towards the label."""
    rng = np.random.default_rng(seed)
    patient = np.repeat(np.arange(n_patients), rows_per_patient)
    y = rng.integers(0, 2, patient.size)
    p = np.clip(0.3 * y + rng.normal(0.35, 0.2, patient.size), 0, 1)
    return pd.DataFrame({"patient": [f"p{i:03d}" for i in patient], "y": y, "p": p})


def statistic_alone(frame: pd.DataFrame, fn: Callable[[pd.DataFrame], float], n: int) -> None:
    for _ in range(n):
        fn(frame)


def median_times(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median wall time of each contender, run in turn ``repeats`` times."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):  # alternate, so load changes hit both alike
        for name, run in runs.items():
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=100)
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    frame = cohort(args.patients)
    measures: dict[str, Callable[[pd.DataFrame], float]] = {
        "mean": lambda f: float(f["p"].mean()),  # the target's statistic
        "auroc": lambda f: auroc(f["y"].to_numpy(), f["p"].to_numpy()),  # evaluate's headline
    }
    print(f"cohort: {args.patients} patients, {len(frame)} rows; {args.n_boot} resamples")
    boot_s: dict[str, float] = {}
    for name, fn in measures.items():
        t = median_times(
            {
                "bootstrap": lambda fn=fn: bootstrap_ci(frame, fn, n_boot=args.n_boot),
                "alone": lambda fn=fn: statistic_alone(frame, fn, args.n_boot),
            },
            args.repeats,
        )
        boot, alone = t["bootstrap"], t["alone"]
        boot_s[name] = boot
        print(f"{name}: bootstrap_ci {args.n_boot / boot:.0f} resamples/s ({boot:.3f} s)")
        print(f"{name}: statistic alone {args.n_boot / alone:.0f} calls/s ({alone:.3f} s)")
        print(f"{name}: ratio bootstrap / statistic alone: {boot / alone:.2f}x")
    if (args.patients, args.n_boot) == (100, 1000):
        verdict = "met" if boot_s["mean"] < TARGET_S else "MISSED"
        print(f"target: 1,000 resamples of 100 patients (mean) under {TARGET_S:.0f} s: {verdict}")


if __name__ == "__main__":
    main()
