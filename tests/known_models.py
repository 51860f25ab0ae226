"""Models whose output is known in advance, and a project to predict with them.

The cohort (:data:`EXACT_SYNTH`) is CT on 6 mm isotropic grids without noise; its lesions
are the only tissue between 110 and 200 HU, so a "model" that thresholds that band returns
exactly the lesion. Both band models go through the real path: ``tracking.log_model``
(safetensors + config), registration with the champion alias in a SQLite store, loading by
``models:/`` URI (see tests/unit/test_predict.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medimg import tracking
from medimg.config import (
    AugmentParams,
    DataParams,
    IngestParams,
    Params,
    PredictParams,
    PreprocessParams,
    SynthParams,
    TrackingParams,
)
from tests.helpers import Cohort

# Known-output cohort: 40 x 40 pixels of 6.0 mm (240 / 40), 6 mm slices, no noise.
EXACT_SYNTH = SynthParams(
    seed=3,
    n_patients=4,
    positive_fraction=1.0,
    mr_fraction=0.0,
    matrix=40,
    n_slices=14,
    fov_mm=(240.0, 240.0),
    slice_spacing_mm=(6.0, 6.0),
    lesion_radius_mm=(14.0, 20.0),
    noise_hu=0.0,
    centre_jitter_mm=3.0,
    shuffle_instance_fraction=0.5,
    descending_fraction=0.5,
)
# The lesion band, HU, and in the model's scaled units (the CT window mapped to [0, 1]).
# Solid lesions are 145 +- 25 HU; below the band are liver (100 HU) and discs (80 HU),
# above it bone (650 HU, clamped to the window's top).
BAND_HU = (110.0, 200.0)
_LOW, _HIGH = PreprocessParams().ct_window_hu
BAND = tuple((hu - _LOW) / (_HIGH - _LOW) for hu in BAND_HU)
SALT = "medimg-predict-test-salt"


class Identity3d(nn.Module):
    """A 1x1x1 convolution that passes its input through (a 3D model, to the loader)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 1, kernel_size=1)
        with torch.no_grad():
            self.conv.weight.fill_(1.0)
            self.conv.bias.fill_(0.0)


class BandSegmenter(Identity3d):
    """Lesion logits +20 inside the intensity band, -20 outside (2 channels)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("band", torch.tensor(BAND))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, R, A, S)
        x = self.conv(x)
        inside = ((x > self.band[0]) & (x < self.band[1])).float()
        return torch.cat([torch.zeros_like(x), 40.0 * inside - 20.0], dim=1)


class BandClassifier(Identity3d):
    """Positive (logit +20) when any voxel lies in the band."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("band", torch.tensor(BAND))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, R, A, S) -> (B, 1)
        x = self.conv(x)
        inside = ((x > self.band[0]) & (x < self.band[1])).flatten(1).any(dim=1)
        return (40.0 * inside.float() - 20.0)[:, None]


class BandStructures(Identity3d):
    """Two structures: ``body`` (any tissue above the CT window's floor) and ``lesion``
    (the band, which wins): background, body and lesion logits."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("band", torch.tensor(BAND))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, R, A, S) -> (B, 3, ...)
        x = self.conv(x)
        inside = ((x > self.band[0]) & (x < self.band[1])).float()
        body = (x > 0.05).float()
        return torch.cat([torch.zeros_like(x), 40.0 * body - 20.0, 80.0 * inside - 20.0], dim=1)


class BandGrades(Identity3d):
    """Three classes by the share of band voxels: none (0), small (< 0.4 %), large."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("band", torch.tensor(BAND))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, R, A, S) -> (B, 3)
        x = self.conv(x)
        share = ((x > self.band[0]) & (x < self.band[1])).flatten(1).float().mean(dim=1)
        any_ = (share > 0).float()
        large = (share > 0.004).float()
        return torch.stack([20.0 * (1 - any_), 20.0 * any_ * (1 - large), 20.0 * large], dim=1)


def known_model(task: str, cfg: Any, outputs: int | None = None) -> nn.Module:
    """Stands in for ``medimg.models.build.build_model`` when MLflow loads the model: the
    band models, with three outputs (classes) or three channels (two structures)."""
    several = outputs is not None and outputs > (1 if task == "classify" else 2)
    if task == "classify":
        return BandGrades() if several else BandClassifier()
    return BandStructures() if several else BandSegmenter()


def register_known(params: Params, task: str, root: Path, threshold: float = 0.5) -> str:
    """Log the band model of ``task`` as a run's model, mark it evaluated and register it
    (first version: champion). Returns ``models:/<name>@champion``."""
    client = tracking.configure(params, root)
    exp = tracking.experiment_id(client, params, task, root)
    run_id = client.create_run(exp, run_name=f"known-{task}").info.run_id
    model_dir = root / "models" / task
    model_dir.mkdir(parents=True, exist_ok=True)
    from medimg.tasks import configured_task

    outputs = configured_task(task, params).n_outputs
    torch.save({"model": known_model(task, None, outputs).state_dict()}, model_dir / "model.pt")
    uri = tracking.log_model(params, task, model_dir, run_id)
    (model_dir / tracking.RUN_FILE).write_text(json.dumps({"run_id": run_id, "model_uri": uri}))
    client.set_tag(run_id, "medimg.evaluated", "true")
    client.log_dict(run_id, {"threshold": threshold}, f"{task}.json")
    decision = tracking.register(params, task, root, model_dir)
    assert decision.promoted
    return f"models:/{tracking.registered_name(params, task)}@champion"


def project_params(root: Path, cohort: Cohort, **predict: Any) -> Params:
    salt = root / "salt"
    if not salt.exists():
        salt.write_text(SALT)
        salt.chmod(0o600)
    return Params(
        data=DataParams(raw=cohort.raw),
        ingest=IngestParams(salt_file=salt, workers=1),
        augment=AugmentParams(patch_size=(32, 32, 32)),
        tracking=TrackingParams(uri=f"sqlite:///{root / 'mlflow.db'}", retry_wait_s=0.1),
        predict=PredictParams(**predict),
    )
