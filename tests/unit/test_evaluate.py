"""Evaluation: metrics JSON with patient-level CIs that agree with the per-case table."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from tests.helpers import Processed, train_params


@pytest.mark.slow
@pytest.mark.parametrize("task", ["classify", "segment"])
def test_evaluate_writes_metrics_with_cis_and_plots(
    tiny_processed: Processed, tmp_path: Path, task: str
) -> None:
    from medimg import stages

    test = pd.read_parquet(tiny_processed.processed / "manifest.parquet").query("split == 'test'")
    # Every check below needs test patients of both labels (AUROC, sensitivity, specificity)
    # and series with and without a lesion (Dice and distances, false positive rate). The
    # fixed salts of tests/helpers.process_cohort give the tiny cohort's test set a patient
    # of each label; should the cohort or the salts change, choose salts that keep both.
    assert set(test["label"]) == {0, 1}, "the test split must hold patients of both labels"
    lesion = test["lesion_voxels"] > 0
    assert lesion.any() and not lesion.all(), "the test split must hold lesion and no-lesion"

    params = train_params(tiny_processed, tmp_path, epochs=2)
    stages.train(params, task)
    result = stages.evaluate(params, task)
    saved = json.loads((tmp_path / "metrics" / f"{task}.json").read_text())
    assert saved == json.loads(json.dumps(result))
    cases = pd.read_csv(tmp_path / "plots" / task / "cases.csv")
    assert sorted(cases["key"]) == sorted(test["key"])
    assert saved["n_test_patients"] == test["patient"].nunique()
    if task == "classify":
        auc = roc_auc_score(cases["label"], cases["probability"])
        assert saved["metrics"]["auroc"]["value"] == pytest.approx(auc, abs=1e-4)
        for name in ("roc", "calibration", "confusion", "training"):
            assert (tmp_path / "plots" / task / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    else:
        lesions, negatives = cases[cases["lesion"]], cases[~cases["lesion"]]
        assert len(lesions) and len(negatives)  # as in the manifest, both kinds of series
        assert saved["metrics"]["dice"]["value"] == pytest.approx(
            float(np.mean(lesions["dice"])), abs=1e-4
        )
        assert saved["metrics"]["false_positive_rate"]["value"] == pytest.approx(
            float(np.mean(negatives["predicted_voxels"] > 0)), abs=1e-4
        )
        # surface distances need a predicted voxel on some lesion series
        assert (lesions["predicted_voxels"] > 0).any(), "the segmenter predicted nothing"
        assert (tmp_path / "plots" / task / "dice_per_case.png").is_file()
    for name, m in saved["metrics"].items():  # with both classes, every one is defined
        assert m is not None and None not in (m["value"], m["ci_lower"], m["ci_upper"]), name
        assert m["ci_lower"] <= m["value"] + 1e-9 <= m["ci_upper"] + 2e-9, name
    assert {r["vendor"] for r in saved["by_vendor"]} <= set(cases["vendor"])
