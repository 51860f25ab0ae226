"""Evaluation on held-out test patients, the way a clinical reader would trust it.

Classification: AUROC, sensitivity and specificity at a threshold chosen on the
validation fold (Youden), balanced accuracy and calibration (ECE, reliability diagram).
Segmentation: Dice, HD95 and mean surface distance per case, by sliding windows. Every
headline metric carries a 95 % confidence interval from a bootstrap over patients (never
over series, which would understate the uncertainty), and breakdowns by vendor and
modality. Writes ``metrics/<task>.json`` and ``plots/<task>/``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pandas as pd

from medimg import plots
from medimg.config import Params
from medimg.errors import ConfigError
from medimg.io import atomic_path, atomic_write_text
from medimg.runtime import environment, pin_reproducible
from medimg.scoring import load_model, load_trained, predict_table, score_test_set
from medimg.stats import N_BOOT
from medimg.tasks import TaskSpec

log = logging.getLogger(__name__)

__all__ = ["evaluate", "load_model", "load_trained", "predict_table", "score_test_set"]


def evaluate(
    task: TaskSpec | str,
    params: Params,
    processed: Path,
    model_file: Path,
    metrics_file: Path,
    plots_dir: Path,
) -> dict[str, Any]:
    """Evaluate ``task`` on the test patients; write metrics JSON and plots."""
    t = params.train
    env = pin_reproducible(t.threads) if t.reproducible else environment(False)
    table = pd.read_parquet(processed / "manifest.parquet")
    test = table[table["split"] == "test"]
    if test.empty:
        raise ConfigError(f"{processed}: no test patients; raise split.test_fraction")
    plots_dir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "n_test_series": len(test),
        "n_test_patients": int(test["patient"].nunique()),
        "ci": f"95% bootstrap over patients, {N_BOOT} resamples",
        "reproducible": env["reproducible"] == "true",  # the rest of env: the MLflow run
    }
    folds = params.cv_folds()
    if folds is None:  # one model, its threshold chosen on its validation fold
        spec, model = load_trained(task, params, model_file)
        val = table[table["split"] == str(params.train.fold)]
        pred = predict_table(spec, params, model, processed, test)

        def validation() -> pd.DataFrame:
            return predict_table(spec, params, model, processed, val)

        result.update(spec.summarise(pred, validation, plots_dir))
        histories = [metrics_file.parent / f"{spec.name}_train.json"]
    else:  # cross-validation: out-of-fold metrics, the ensemble on the test patients
        from medimg import cv

        model_dir = model_file.parent
        spec, members = cv.load_members(task, params, model_dir, folds)
        found, pred = cv.evaluate_cv(spec, params, processed, model_dir, plots_dir, members, table)
        result.update(found)
        histories = [cv.fold_metrics_file(metrics_file.parent, spec.name, k) for k in folds]
        cv.write_ensemble_card(model_dir, spec, params, histories, result)
    result["task"] = spec.name
    with atomic_path(plots_dir / "cases.csv") as tmp:  # per case, pseudonymous keys only
        pred.to_csv(tmp, index=False)
    for i, history in enumerate(h for h in histories if h.is_file()):
        where = plots_dir if i == 0 else plots_dir / "cv" / history.stem
        where.mkdir(parents=True, exist_ok=True)  # the first fold's curves, the others in cv/
        plots.plot_training_curves(json.loads(history.read_text())["history"], where)
    atomic_write_text(metrics_file, json.dumps(result, indent=1, sort_keys=True))
    log.info(
        "%s test metrics: %s",
        spec.name,
        {k: v and v["value"] for k, v in result["metrics"].items()},
    )
    return result
