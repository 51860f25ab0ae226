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

import numpy as np
import pandas as pd
import torch

from medimg import metrics as M
from medimg import plots
from medimg.config import Params
from medimg.errors import ConfigError
from medimg.io import atomic_path, atomic_write_text
from medimg.train import build_model, predict, resolve_device

log = logging.getLogger(__name__)

N_BOOT = 1000  # bootstrap resamples of patients


def load_model(task: str, params: Params, model_file: Path) -> torch.nn.Module:
    """Build the task's model and load its weights (``weights_only``: no code runs)."""
    if not model_file.is_file():
        raise ConfigError(f"{model_file}: no trained model; run `medimg train --task {task}`")
    payload = torch.load(model_file, map_location="cpu", weights_only=True)
    model = build_model(task, getattr(params.train, task))
    model.load_state_dict(payload["model"])
    return model


def _predict_table(
    task: str, params: Params, model: torch.nn.Module, processed: Path, table: pd.DataFrame
) -> pd.DataFrame:
    from medimg.transforms import training_transforms

    device = resolve_device(params.train.device)
    model.to(device)
    amp = params.train.amp and device.type == "cuda"
    seg = task == "segment"
    transform = training_transforms(task, params.augment, train=False, with_label=seg)
    rows = []
    spacing = params.preprocess.spacing_mm
    for row in table.to_dict("records"):
        item = {"image": str(processed / row["image"])}
        if seg:
            item["label"] = str(processed / row["mask"])
        data = transform(item)
        prob = predict(model, data["image"][None], task, params.augment.patch_size, device, amp)
        out = {k: row[k] for k in ("key", "patient", "modality", "vendor", "label")}
        if seg:
            pred = prob[0].numpy() > 0.5
            truth = data["label"][0].numpy() > 0.5
            hd95, msd = M.surface_distances(pred, truth, spacing)
            out.update(dice=M.dice(pred, truth), hd95=hd95, msd=msd, lesion=bool(truth.any()),
                       predicted_voxels=int(pred.sum()))  # fmt: skip
        else:
            out["probability"] = float(prob[0])
        rows.append(out)
    return pd.DataFrame(rows)


def score_test_set(
    task: str, params: Params, model: torch.nn.Module, processed: Path
) -> pd.DataFrame:
    """One row per test case: the model's probability (classify) or Dice (segment)."""
    table = pd.read_parquet(processed / "manifest.parquet")
    return _predict_table(task, params, model, processed, table[table["split"] == "test"])


def _ci(frame: pd.DataFrame, statistic: Any) -> dict[str, float | None]:
    point, lo, hi = M.bootstrap_ci(frame, statistic, group="patient", n_boot=N_BOOT, seed=0)
    return {"value": _r(point), "ci_lower": _r(lo), "ci_upper": _r(hi)}


def _r(v: float) -> float | None:
    return None if v is None or not np.isfinite(v) else round(float(v), 4)


def _breakdowns(frame: pd.DataFrame, statistic: Any) -> dict[str, Any]:
    out = {}
    for col in ("vendor", "modality"):
        table = M.breakdown(frame, col, statistic, group="patient", n_boot=N_BOOT, seed=0)
        out[f"by_{col}"] = [
            {k: (_r(v) if isinstance(v, float) else v) for k, v in rec.items()}
            for rec in table.to_dict("records")
        ]
    return out


def evaluate(
    task: str,
    params: Params,
    processed: Path,
    model_file: Path,
    metrics_file: Path,
    plots_dir: Path,
) -> dict[str, Any]:
    """Evaluate ``task`` on the test patients; write metrics JSON and plots."""
    table = pd.read_parquet(processed / "manifest.parquet")
    test = table[table["split"] == "test"]
    if test.empty:
        raise ConfigError(f"{processed}: no test patients; raise split.test_fraction")
    model = load_model(task, params, model_file)
    plots_dir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "task": task,
        "n_test_series": len(test),
        "n_test_patients": int(test["patient"].nunique()),
        "ci": f"95% bootstrap over patients, {N_BOOT} resamples",
    }
    if task == "classify":
        val = table[table["split"] == str(params.train.fold)]
        val_pred = _predict_table(task, params, model, processed, val)
        threshold = M.youden_threshold(
            val_pred["label"].to_numpy(), val_pred["probability"].to_numpy()
        )
        pred = _predict_table(task, params, model, processed, test)
        y, p = pred["label"].to_numpy(), pred["probability"].to_numpy()

        def stat(fn: Any) -> Any:
            return lambda f: fn(f["label"].to_numpy(), f["probability"].to_numpy())

        result["threshold"] = _r(threshold)
        result["metrics"] = {
            "auroc": _ci(pred, stat(M.auroc)),
            "sensitivity": _ci(
                pred, stat(lambda a, b: M.sensitivity_specificity(a, b, threshold)[0])
            ),
            "specificity": _ci(
                pred, stat(lambda a, b: M.sensitivity_specificity(a, b, threshold)[1])
            ),
            "balanced_accuracy": _ci(pred, stat(lambda a, b: M.balanced_accuracy(a, b, threshold))),
            "ece": _ci(pred, stat(M.expected_calibration_error)),
        }
        result.update(_breakdowns(pred, stat(M.auroc)))
        plots.plot_roc(y, p, plots_dir)
        plots.plot_calibration(y, p, plots_dir)
        plots.plot_confusion(y, p, threshold, plots_dir)
    else:
        pred = _predict_table(task, params, model, processed, test)
        lesions = pred[pred["lesion"]]
        negatives = pred[~pred["lesion"]]

        def mean(col: str) -> Any:
            return lambda f: float(np.nanmean(f[col])) if len(f) else float("nan")

        result["metrics"] = {
            "dice": _ci(lesions, mean("dice")),
            "hd95_mm": _ci(lesions, mean("hd95")),
            "msd_mm": _ci(lesions, mean("msd")),
            "false_positive_rate": _ci(
                negatives.assign(fp=negatives["predicted_voxels"] > 0), mean("fp")
            )
            if len(negatives)
            else None,
        }
        result["n_test_series_with_lesion"] = len(lesions)
        result.update(_breakdowns(lesions, mean("dice")))
        plots.plot_per_case(lesions[["key", "dice"]], "dice", plots_dir, "dice_per_case", key="key")
    with atomic_path(plots_dir / "cases.csv") as tmp:  # per case, pseudonymous keys only
        pred.to_csv(tmp, index=False)
    train_metrics = metrics_file.parent / f"{task}_train.json"
    if train_metrics.is_file():
        plots.plot_training_curves(json.loads(train_metrics.read_text())["history"], plots_dir)
    atomic_write_text(metrics_file, json.dumps(result, indent=1, sort_keys=True))
    log.info(
        "%s test metrics: %s", task, {k: v and v["value"] for k, v in result["metrics"].items()}
    )
    return result
