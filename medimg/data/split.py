"""Patient-level splits: k folds plus a held-out test set that never leak a patient.

Each patient is placed by a hash of its pseudonym: a number u in [0, 1) that never
changes, so adding patients never moves an existing one. ``u < test_fraction`` puts the
patient in the test set, the rest is cut into ``n_folds`` equal ranges. Every series and
study of a patient follows the patient. Hashing balances labels only in expectation, so
the class balance of every split is reported (see :func:`split_summary`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from medimg.config import SplitParams

TEST = "test"


def unit_hash(salt: str, patient: str) -> float:
    """A stable number in [0, 1) for a patient."""
    digest = hashlib.sha256(f"{salt}\0{patient}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign(patient: str, cfg: SplitParams) -> str:
    """``"test"`` or the fold number (as text) of one patient."""
    u = unit_hash(cfg.salt, patient)
    if u < cfg.test_fraction:
        return TEST
    fold = int((u - cfg.test_fraction) / (1.0 - cfg.test_fraction) * cfg.n_folds)
    return str(min(fold, cfg.n_folds - 1))


def assign_all(patients: Mapping[str, int], cfg: SplitParams) -> dict[str, str]:
    """Split of every patient (``patients`` maps pseudonym to label)."""
    return {p: assign(p, cfg) for p in sorted(patients)}


def split_summary(
    splits: Mapping[str, str],
    patient_labels: Mapping[str, int],
    series_per_patient: Mapping[str, int],
) -> dict[str, dict[str, int]]:
    """Patients, positive patients (a class other than the first, 0) and series in each
    split, and its patients per class index (``class_<index>``)."""
    out: dict[str, dict[str, int]] = {}
    for patient, split in splits.items():
        s = out.setdefault(split, {"patients": 0, "positive_patients": 0, "series": 0})
        s["patients"] += 1
        s["positive_patients"] += int(patient_labels[patient] != 0)
        s["series"] += series_per_patient.get(patient, 0)
        name = f"class_{int(patient_labels[patient])}"
        s[name] = s.get(name, 0) + 1
    return {k: dict(sorted(v.items())) for k, v in sorted(out.items())}
