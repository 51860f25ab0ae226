"""Cross-validation and the fold ensemble (``train.folds``), as nnU-Net and Auto3DSeg do.

Training writes one model per fold to ``models/<task>/folds/<k>/`` (each validated on
fold k's patients, trained on the other folds'). Evaluation then:

1. scores every listed fold's patients with the model that did not train on them: the
   out-of-fold (OOF) predictions, one per non-test series when every fold is listed;
2. fits the classifier's temperature on the OOF probabilities (:mod:`medimg.calibration`)
   and, for a binary diagnosis, chooses its decision threshold on them (Youden);
3. computes the cross-validation metrics over the OOF cases, with the same patient-level
   intervals as the test metrics (``metrics/<task>.json``'s ``cv`` entry);
4. joins the fold models into one :class:`~medimg.models.ensemble.Ensemble` (mean of
   probabilities, each member's temperature-scaled first), saves it as
   ``models/<task>/model.pt``, the model that is logged, registered and used by
   ``medimg predict``, and scores the test patients with it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from medimg.config import Params
from medimg.errors import ConfigError
from medimg.io import atomic_path, atomic_write_text, remove_spare
from medimg.models.ensemble import Ensemble
from medimg.tasks import TaskSpec

FOLDS = "folds"  # models/<task>/folds/<k>/


def fold_dir(model_dir: Path, fold: int) -> Path:
    """Where fold ``fold``'s model of a cross-validation is trained."""
    return model_dir / FOLDS / str(fold)


def fold_metrics_file(metrics_dir: Path, task: str, fold: int) -> Path:
    """The training summary of fold ``fold`` (``metrics/<task>_train_fold<k>.json``)."""
    return metrics_dir / f"{task}_train_fold{fold}.json"


def load_members(
    task: TaskSpec | str, params: Params, model_dir: Path, folds: list[int]
) -> tuple[TaskSpec, list[torch.nn.Module]]:
    """The spec and the trained model of every fold in ``folds``.

    Raises:
        ConfigError: a fold has no trained model, or the folds' outputs differ.
    """
    from medimg.scoring import load_trained

    spec: TaskSpec | None = None
    members = []
    for k in folds:
        file = fold_dir(model_dir, k) / "model.pt"
        if not file.is_file():
            name = task if isinstance(task, str) else task.name
            raise ConfigError(
                f"{file}: fold {k} has no trained model; run `medimg train --task {name} "
                f"--fold {k}` (or all folds: `medimg train --task {name}`)"
            )
        got, model = load_trained(task, params, file)
        if spec is not None and got.describe() != spec.describe():
            raise ConfigError(
                f"{file}: fold {k} was trained for outputs {list(got.labels)}, fold "
                f"{folds[0]} for {list(spec.labels)}; retrain the folds with one config"
            )
        spec = got
        members.append(model)
    assert spec is not None  # folds is never empty (config validation)
    return spec, members


def out_of_fold(
    spec: TaskSpec,
    params: Params,
    processed: Path,
    members: list[torch.nn.Module],
    folds: list[int],
    table: pd.DataFrame,
) -> pd.DataFrame:
    """Every listed fold's series scored by the model that held that fold out."""
    from medimg.scoring import predict_table

    parts = []
    for k, model in zip(folds, members, strict=True):
        part = predict_table(spec, params, model, processed, table[table["split"] == str(k)])
        parts.append(part.assign(fold=k))
    return pd.concat(parts, ignore_index=True)


def save_ensemble(
    ensemble: Ensemble, spec: TaskSpec, params: Params, model_dir: Path, folds: list[int]
) -> None:
    """``model_dir/model.pt`` (the ensemble's weights, with what loading it needs) and
    ``config.json`` (the first fold's resolved config)."""
    from medimg.checkpoint import save, weights_payload

    made_of = params.model_dump_for_model()  # what the folds were made of, as theirs
    payload = weights_payload(ensemble, spec.name, made_of, spec.describe())
    payload["members"] = len(folds)
    payload["folds"] = json.dumps(folds)
    save(payload, model_dir / "model.pt")  # byte for byte the same for the same weights
    remove_spare(model_dir / "model.pt")
    config = fold_dir(model_dir, folds[0]) / "config.json"
    if config.is_file():
        with atomic_path(model_dir / "config.json") as tmp:
            shutil.copyfile(config, tmp)


def evaluate_cv(
    spec: TaskSpec,
    params: Params,
    processed: Path,
    model_dir: Path,
    plots_dir: Path,
    members: list[torch.nn.Module],
    table: pd.DataFrame,
) -> tuple[dict[str, Any], pd.DataFrame]:
    """Steps 1 to 4 of the module docstring over the processed manifest ``table``: the
    ``metrics/<task>.json`` entries, and the test cases as the ensemble scored them."""
    from medimg.scoring import predict_table

    folds = params.cv_folds() or []
    oof = out_of_fold(spec, params, processed, members, folds, table)
    temperature, calibrated, calibration = spec.calibrate(oof)
    ensemble = Ensemble(members)  # T = 1: the test cases before calibration
    held_out = table[table["split"] == "test"]
    raw = predict_table(spec, params, ensemble, processed, held_out)
    ensemble.temperature = torch.tensor(float(temperature))  # each member's, then the mean
    test = raw if temperature == 1.0 else predict_table(spec, params, ensemble, processed, held_out)
    save_ensemble(ensemble, spec, params, model_dir, folds)
    if calibration:
        calibration["test_ece_before"] = spec.calibration_error(raw)
        calibration["test_ece_after"] = spec.calibration_error(test)
    cv_dir = plots_dir / "cv"
    cv_dir.mkdir(parents=True, exist_ok=True)
    cv = spec.summarise(calibrated, lambda: calibrated, cv_dir)
    with atomic_path(cv_dir / "cases.csv") as tmp:  # pseudonymous keys only
        calibrated.to_csv(tmp, index=False)
    result = spec.summarise(test, lambda: calibrated, plots_dir)
    result["cv"] = {
        "n_series": len(oof),
        "n_patients": int(oof["patient"].nunique()),
        "folds": folds,
        **{k: v for k, v in cv.items() if k in ("metrics", "per_class", "per_structure")},
    }
    result["ensemble"] = {
        "members": len(folds),
        "combination": "mean of the fold models' probabilities, each scaled by the temperature",
        "calibration": calibration or None,
    }
    return result, test


def write_ensemble_card(
    model_dir: Path, spec: TaskSpec, params: Params, histories: list[Path], result: dict[str, Any]
) -> None:
    """``model_dir/model_card.md``: the first fold's card, then what the ensemble is made
    of (each fold's training, the calibration) and its cross-validation metrics."""
    from medimg.report import metric_rows

    folds = params.cv_folds() or []
    first = fold_dir(model_dir, folds[0]) / "model_card.md"
    card = first.read_text() if first.is_file() else f"# medimg {spec.name} model\n"
    lines = [
        card.rstrip("\n"),
        "",
        f"**Ensemble.** The mean of the probabilities of {len(folds)} fold models"
        f" (folds {folds}), each validated on its own fold's patients and trained on the"
        " others'. The card above is the first fold's.",
        "",
        "| fold | epochs run | best epoch | best validation |",
        "| --- | --- | --- | --- |",
    ]
    for k, history in zip(folds, histories, strict=True):
        if history.is_file():
            h = json.loads(history.read_text())
            best = h.get("best_val_metric")
            lines.append(f"| {k} | {h.get('epochs_run')} | {h.get('best_epoch')} | {best} |")
    calibration = (result.get("ensemble") or {}).get("calibration")
    if calibration:
        lines += [
            "",
            f"**Calibration.** Temperature {calibration['temperature']} (fitted on"
            f" {calibration['fitted_on']}): out-of-fold ECE {calibration['oof_ece_before']}"
            f" before, {calibration['oof_ece_after']} after; test ECE"
            f" {calibration['test_ece_before']} before, {calibration['test_ece_after']} after.",
        ]
    rows = metric_rows(result.get("cv") or {})
    lines += ["", "**Cross-validation** (out-of-fold, 95 % patient-level bootstrap):", ""]
    lines += [
        f"- {(owner + ' ') if owner else ''}{name}: {m['value']}"
        f" ({m['ci_lower']} to {m['ci_upper']})"
        for owner, name, m in rows
    ]
    atomic_write_text(model_dir / "model_card.md", "\n".join(lines) + "\n")
