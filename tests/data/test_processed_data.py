"""Data checks on the preprocessed output, recomputed from the files themselves."""

from __future__ import annotations

import json
from collections import Counter

import nibabel as nib
import numpy as np
import pandas as pd

from tests.helpers import Processed


def _load(p: Processed) -> tuple[pd.DataFrame, dict]:
    table = pd.read_parquet(p.processed / "manifest.parquet")
    splits = json.loads((p.processed / "splits.json").read_text())
    return table, splits


def test_no_patient_in_two_splits(tiny_processed: Processed) -> None:
    table, splits = _load(tiny_processed)
    assert table.groupby("patient")["split"].nunique().max() == 1
    assert (table["split"] == table["patient"].map(splits["patients"])).all()
    assert set(splits["patients"]) == set(table["patient"])
    # studies never straddle splits either
    assert table.groupby("study")["split"].nunique().max() == 1


def test_labels_and_reported_balance(tiny_processed: Processed) -> None:
    table, splits = _load(tiny_processed)
    assert set(table["label"]) == {0, 1}
    patient_label = table.groupby("patient")["label"].max()
    for split, summary in splits["summary"].items():
        patients = [p for p, s in splits["patients"].items() if s == split]
        assert summary["patients"] == len(patients)
        assert summary["positive_patients"] == int(patient_label[patients].sum())
        assert summary["series"] == int((table["split"] == split).sum())
    assert tiny_processed.qc["splits"] == splits["summary"]


def test_grids_intensities_and_mask_alignment(tiny_processed: Processed) -> None:
    table, _ = _load(tiny_processed)
    cfg = tiny_processed.params.preprocess
    seen = Counter()
    for row in table.itertuples():
        img = nib.load(tiny_processed.processed / row.image)
        assert img.shape == tuple(cfg.spatial_size)
        np.testing.assert_allclose(np.sqrt((img.affine[:3, :3] ** 2).sum(0)), cfg.spacing_mm, atol=1e-4)
        assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
        data = img.get_fdata()
        assert 0.0 <= data.min() and data.max() <= 1.0
        assert data.max() > 0.3 and data.mean() > 0.01  # the body is in view, not cropped away
        mask = nib.load(tiny_processed.processed / row.mask)
        assert mask.shape == img.shape
        np.testing.assert_allclose(mask.affine, img.affine, atol=1e-5)
        values = set(np.unique(np.asarray(mask.dataobj)).tolist())
        assert values <= {0, 1}
        assert (1 in values) == (row.label == 1)
        seen[row.modality] += 1
    assert seen["CT"] and seen["MR"]
