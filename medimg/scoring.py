"""Scoring a trained model on preprocessed cases: the model back from its ``model.pt``
(one network, or a cross-validation's ensemble) and one row per case of what the task
measures. :mod:`medimg.evaluate` and :mod:`medimg.cv` score with these."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import torch

from medimg.config import Params
from medimg.data.manifest import read_classes
from medimg.errors import ConfigError
from medimg.runtime import resolve_device
from medimg.tasks import TaskSpec, configured_task, get_task


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
