"""Evaluation: metrics JSON with patient-level CIs that agree with the per-case table."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from tests.conftest import Processed
from tests.unit.test_train import _params


@pytest.mark.slow
@pytest.mark.parametrize("task", ["classify", "segment"])
def test_evaluate_writes_metrics_with_cis_and_plots(
    tiny_processed: Processed, tmp_path: Path, task: str
) -> None:
    from medimg import stages

    params = _params(tiny_processed, tmp_path, epochs=2)
    stages.train(params, task)
    result = stages.evaluate(params, task)
    saved = json.loads((tmp_path / "metrics" / f"{task}.json").read_text())
    assert saved == json.loads(json.dumps(result))
    cases = pd.read_csv(tmp_path / "plots" / task / "cases.csv")
    test = pd.read_parquet(tiny_processed.processed / "manifest.parquet").query("split == 'test'")
    assert sorted(cases["key"]) == sorted(test["key"])
    assert saved["n_test_patients"] == test["patient"].nunique()
    for name, m in saved["metrics"].items():
        if m and m["value"] is not None and m["ci_lower"] is not None:
            assert m["ci_lower"] <= m["value"] + 1e-9 <= m["ci_upper"] + 2e-9, name
    if task == "classify":
        if cases["label"].nunique() == 2:
            auc = roc_auc_score(cases["label"], cases["probability"])
            assert saved["metrics"]["auroc"]["value"] == pytest.approx(auc, abs=1e-4)
        for name in ("roc", "calibration", "confusion", "training"):
            assert (tmp_path / "plots" / task / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    else:
        lesions = cases[cases["lesion"]]
        assert saved["metrics"]["dice"]["value"] == pytest.approx(
            float(np.mean(lesions["dice"])), abs=1e-4
        )
        assert (tmp_path / "plots" / task / "dice_per_case.png").is_file()
    assert {r["vendor"] for r in saved["by_vendor"]} <= set(cases["vendor"])
