"""Preprocessing: deterministic, parameter-sensitive, and images and masks stay aligned
with the generator's ground truth through every transform (the transforms on their own:
test_transforms.py)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from medimg.dicom.deid import Pseudonymizer, load_or_create_salt
from medimg.dicom.synth import LESION, plan_cohort
from medimg.dicom.synth import _uid as synth_uid
from tests.helpers import Processed, process_cohort


def _digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_rerun_is_byte_identical_and_params_matter(
    tiny_processed: Processed, tmp_path: Path
) -> None:
    from medimg import stages

    before = _digests(tiny_processed.processed)
    out = tmp_path / "again"
    params = tiny_processed.params.model_copy(
        update={"data": tiny_processed.params.data.model_copy(update={"processed": out})}
    )
    stages.preprocess(params)
    assert _digests(out) == before
    changed = process_cohort(
        tiny_processed.cohort,
        tmp_path / "changed",
        salt=tiny_processed.root / "salt",
        ct_window_hu=(-150.0, 250.0),
    )
    after = _digests(changed.processed)
    assert after.keys() == before.keys()
    ct = pd.read_parquet(tiny_processed.processed / "manifest.parquet").query("modality == 'CT'")
    assert all(after[r] != before[r] for r in ct["image"])


def test_masks_follow_the_phantom_in_every_orientation(tiny_processed: Processed) -> None:
    """Processed mask voxels sit where the generator put the lesions, in patient space."""
    cfg = tiny_processed.params.synth
    phantoms, _, plans = plan_cohort(cfg)
    pseudo = Pseudonymizer(load_or_create_salt(tiny_processed.root / "salt"))
    by_key = {pseudo.key("series", synth_uid(cfg.seed, "series", p.series_index)): p for p in plans}
    table = pd.read_parquet(tiny_processed.processed / "manifest.parquet")
    seen = set()
    for row in table[table["label"] == 1].itertuples():
        plan = by_key[row.key]
        img = nib.load(tiny_processed.processed / row.mask)
        mask = np.asarray(img.dataobj) > 0
        ijk = np.indices(mask.shape).reshape(3, -1)
        ras = img.affine[:3, :3] @ ijk + img.affine[:3, 3:4]
        lps = ras * np.array([[-1.0], [-1.0], [1.0]])
        code, _ = phantoms[plan.patient_index].tissue(lps.reshape(3, *mask.shape))
        truth = code == LESION
        dice = 2 * (mask & truth).sum() / (mask.sum() + truth.sum())
        centroid_error = np.linalg.norm(
            img.affine[:3, :3] @ (np.argwhere(mask).mean(0) - np.argwhere(truth).mean(0))
        )
        assert dice > 0.6, (plan.orientation, dice)
        assert centroid_error < 6.0, (plan.orientation, centroid_error)  # under one voxel
        seen.add(plan.orientation)
    assert seen == {"axial", "coronal", "sagittal", "oblique"}


def test_preprocess_without_ingest_says_what_to_do(tmp_path: Path) -> None:
    from medimg.config import PreprocessParams, SplitParams
    from medimg.errors import DataError
    from medimg.preprocess import preprocess

    with pytest.raises(DataError, match="medimg ingest"):
        preprocess(PreprocessParams(), SplitParams(), tmp_path / "interim", tmp_path / "out")
