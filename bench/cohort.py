"""Shared by the benchmark scripts: params for a synthetic cohort under a scratch folder.

Not a benchmark itself (``make bench`` runs it too: it only prints its help).
"""

from __future__ import annotations

from pathlib import Path

from medimg.config import DataParams, IngestParams, Params, SynthParams

BENCH_SALT = "medimg-bench-synthetic-data-only"  # fixed: the same splits on every run


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
