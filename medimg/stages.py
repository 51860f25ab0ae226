"""One function per pipeline stage. The CLI, the DVC stages and the Prefect tasks all call
these, so each stage has exactly one implementation.

Stages take the validated :class:`~medimg.config.Params` and a project root; paths in the
params are relative to that root. Heavy imports stay inside the functions.
"""

from __future__ import annotations

from pathlib import Path

from medimg.config import Params
from medimg.dicom.synth import Progress


def _at(root: Path, path: Path) -> Path:
    return path if path.is_absolute() else root / path


def synth(
    params: Params, root: Path = Path("."), progress: Progress | None = None
) -> dict[str, int]:
    """Write the built-in synthetic cohort to the paths in ``params.data``."""
    from medimg.dicom.synth import synth_cohort

    d = params.data
    return synth_cohort(
        params.synth,
        raw_dir=_at(root, d.raw),
        masks_dir=_at(root, d.masks),
        labels_csv=_at(root, d.labels),
        truth_csv=_at(root, d.synth_truth),
        progress=progress,
    )
