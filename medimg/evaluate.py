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
import torch

from medimg import plots
from medimg.config import Params
from medimg.data.manifest import read_classes
from medimg.errors import ConfigError
from medimg.io import atomic_path, atomic_write_text
from medimg.runtime import environment, pin_reproducible, resolve_device
from medimg.stats import N_BOOT
from medimg.tasks import TaskSpec, configured_task, get_task

log = logging.getLogger(__name__)


def load_trained(
    task: TaskSpec | str, params: Params, model_file: Path
) -> tuple[TaskSpec, torch.nn.Module]:
    """The task's spec with the outputs the model was trained for, and the model with its
    weights (``weights_only``: no code runs)."""
    spec = get_task(task)
    if not model_file.is_file():
        raise ConfigError(f"{model_file}: no trained model; run `medimg train --task {spec.name}`")
    payload = torch.load(model_file, map_location="cpu", weights_only=True)
    if isinstance(task, str):  # a name: the outputs the weights were saved with
        spec = spec.configure(params).from_description(json.loads(payload.get("outputs", "{}")))
    cfg = spec.train_params(params.train)
    if payload.get("members"):  # a cross-validation's ensemble (medimg.cv)
        from medimg.models.ensemble import build_ensemble

        model: torch.nn.Module = build_ensemble(lambda: spec.build(cfg), int(payload["members"]))
    else:
        model = spec.build(cfg)
    model.load_state_dict(payload["model"])
    return spec, model


def load_model(task: TaskSpec | str, params: Params, model_file: Path) -> torch.nn.Module:
    """Build the task's model and load its weights (:func:`load_trained`)."""
    return load_trained(task, params, model_file)[1]


def predict_table(
    spec: TaskSpec, params: Params, model: torch.nn.Module, processed: Path, table: pd.DataFrame
) -> pd.DataFrame:
    """One row per case of ``table``: its identifiers and the task's case values."""
    from medimg.transforms import IMAGE, LABEL, training_transforms

    device = resolve_device(params.train.device)
    model.to(device)
    amp = params.train.amp and device.type == "cuda"
    masks = spec.with_masks
    transform = training_transforms(params.augment, train=False, with_label=masks)
    rows = []
    spacing = params.preprocess.spacing_mm
    for row in table.to_dict("records"):
        item = {IMAGE: str(processed / row["image"])}
        if masks:
            item[LABEL] = str(processed / row["mask"])
        data = transform(item)
        prob = spec.predict(model, data[IMAGE][None], params.augment.patch_size, device, amp)
        out = {k: row[k] for k in ("key", "patient", "modality", "vendor", "label")}
        rows.append(out | spec.case_values(prob, data, spacing))
    return pd.DataFrame(rows)


def score_test_set(
    task: TaskSpec | str, params: Params, model: torch.nn.Module, processed: Path
) -> pd.DataFrame:
    """One row per test case: the model's probability (classify) or Dice (segment)."""
    table = pd.read_parquet(processed / "manifest.parquet")
    spec = configured_task(task, params, read_classes(processed)) if isinstance(task, str) else task
    return predict_table(spec, params, model, processed, table[table["split"] == "test"])


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

        spec, members = cv.load_members(task, params, model_file.parent, folds)
        model_dir = model_file.parent
        result.update(cv.evaluate_cv(spec, params, processed, model_dir, plots_dir, members))
        pred = result.pop("_cases")
        histories = [cv.fold_metrics_file(metrics_file.parent, spec.name, k) for k in folds]
        cv.write_ensemble_card(model_file.parent, spec, params, histories, result)
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
