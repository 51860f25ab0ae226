"""One frozen spec per task: everything that differs between diagnosis and segmentation.

Training, evaluation, the registry, the MLflow model, prediction and the CLI ask a
:class:`TaskSpec` instead of branching on a task's name: which params section configures
it, which network it builds, its loss, how a batch is scored, how a volume is predicted,
its validation metric (and direction), how the test set is summarised and plotted, its
registry name and gate metric, and what its model card says. Adding a task means adding
a spec here (and its network to :mod:`medimg.models.build`).

Example:
    >>> get_task("classify").val_metric
    'auroc'
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
import torch
from torch import nn

from medimg import metrics as M
from medimg import plots
from medimg.config import GateParams, RegistryParams, TaskTrainParams, TrainParams
from medimg.errors import ConfigError
from medimg.infer import foreground_map, plain, volume_probability
from medimg.models.build import build_model
from medimg.stats import breakdowns, rounded, with_ci

Batch = dict[str, Any]  # a collated loader batch: "image" (B, 1, ...) and the targets
Item = dict[str, Any]  # one transformed item: "image" (1, R, A, S), "y", maybe "label"


@dataclass(frozen=True)
class TaskSpec(ABC):
    """What a task is; subclasses implement how it trains, predicts and is evaluated."""

    name: str  # params section train.<name>, CLI --task, models/<name>/, metrics/<name>.json
    val_metric: str  # key of the validation and headline test metric
    val_metric_title: str  # the same metric in logs and the CLI
    val_metric_card: str  # the same metric in the model card, with what it is measured on
    maximize: bool  # direction of val_metric: True when higher is better
    with_masks: bool  # items carry a voxel label map; training samples patches from it
    output: str  # what a model of this task says about one volume (model card)
    architecture: str  # the network family (model card)
    slices: str  # how a 2D model of this task treats a volume (model card)

    # -- configuration --------------------------------------------------------------
    @abstractmethod
    def train_params(self, train: TrainParams) -> TaskTrainParams:
        """The task's own section of ``train``."""

    @abstractmethod
    def registry_name(self, registry: RegistryParams) -> str:
        """The registered model's name."""

    @abstractmethod
    def gate_metric(self, gate: GateParams) -> str:
        """The metric the promotion gate compares (higher is better)."""

    def build(self, cfg: TaskTrainParams) -> nn.Module:
        """The task's network, randomly initialised."""
        return build_model(self.name, cfg)

    # -- training -------------------------------------------------------------------
    @abstractmethod
    def loss(self) -> nn.Module:
        """The training loss (a fresh module)."""

    @abstractmethod
    def batch_loss(
        self, loss_fn: nn.Module, out: torch.Tensor, batch: Batch, device: torch.device
    ) -> torch.Tensor:
        """``loss_fn`` of the model's output ``out`` for ``batch``'s targets."""

    @abstractmethod
    def predict(
        self,
        model: nn.Module,
        image: torch.Tensor,
        roi_size: Sequence[int],
        device: torch.device,
        amp: bool = False,
    ) -> torch.Tensor:
        """Probabilities for volumes (B, 1, R, A, S): (B,) or (B, R, A, S), on the CPU."""

    @abstractmethod
    def validation_batch(
        self, prob: torch.Tensor, chunk: Sequence[Item]
    ) -> tuple[list[float], list[Any]]:
        """Per item of ``chunk``: its validation loss, and what the metric needs."""

    @abstractmethod
    def validation_metric(self, outputs: Sequence[Any]) -> float:
        """The validation metric over every item's output (NaN when undefined)."""

    # -- evaluation -----------------------------------------------------------------
    @abstractmethod
    def case_values(
        self, prob: torch.Tensor, data: Item, spacing: Sequence[float]
    ) -> dict[str, Any]:
        """A test case's row of ``cases.csv`` from its probability (1, ...) and data."""

    @abstractmethod
    def summarise(
        self, cases: pd.DataFrame, validation: Callable[[], pd.DataFrame], plots_dir: Path
    ) -> dict[str, Any]:
        """The test set's ``metrics`` (with intervals), breakdowns and task-specific
        entries of ``metrics/<task>.json``; writes the task's plots. ``validation`` scores
        the validation fold when a summary needs it (a decision threshold)."""

    @abstractmethod
    def gate_cases(self, cases: pd.DataFrame) -> pd.DataFrame:
        """The cases the gate compares on."""

    @abstractmethod
    def case_score(self, metric: str) -> str:
        """The column of ``cases.csv`` that ``metric`` is computed from."""

    @abstractmethod
    def score(
        self, metric: str, y: npt.NDArray[Any], values: npt.NDArray[Any], cut: float
    ) -> float:
        """``metric`` over cases with labels ``y`` and case scores ``values``."""

    # -- prediction -----------------------------------------------------------------
    @abstractmethod
    def output_shape(self, size: Sequence[int]) -> tuple[int, ...]:
        """Shape of the logged model's output for inputs of ``(-1, 1, *size)``."""

    @property
    @abstractmethod
    def has_threshold(self) -> bool:
        """Whether evaluation chooses a decision threshold that prediction applies."""


@dataclass(frozen=True)
class Classification(TaskSpec):
    """Diagnosis: one logit per volume, sigmoid, binary cross-entropy, AUROC."""

    def train_params(self, train: TrainParams) -> TaskTrainParams:
        return train.classify

    def registry_name(self, registry: RegistryParams) -> str:
        return registry.classify_name

    def gate_metric(self, gate: GateParams) -> str:
        return gate.classify_metric

    def loss(self) -> nn.Module:
        return nn.BCEWithLogitsLoss()

    def batch_loss(
        self, loss_fn: nn.Module, out: torch.Tensor, batch: Batch, device: torch.device
    ) -> torch.Tensor:
        return loss_fn(out.squeeze(1).float(), batch["y"].float().to(device))

    def predict(
        self,
        model: nn.Module,
        image: torch.Tensor,
        roi_size: Sequence[int],
        device: torch.device,
        amp: bool = False,
    ) -> torch.Tensor:
        return volume_probability(model, image, device, amp)

    def validation_batch(
        self, prob: torch.Tensor, chunk: Sequence[Item]
    ) -> tuple[list[float], list[Any]]:
        # the loss from the same probability: no second forward pass
        p = prob.clamp(1e-7, 1 - 1e-7)
        y = torch.tensor([float(d["y"]) for d in chunk])
        losses = (-(y * torch.log(p) + (1 - y) * torch.log(1 - p))).tolist()
        return losses, list(zip(prob.tolist(), [int(v) for v in y.tolist()], strict=True))

    def validation_metric(self, outputs: Sequence[Any]) -> float:
        scores = [s for s, _ in outputs]
        labels = [y for _, y in outputs]
        return M.auroc(np.array(labels), np.array(scores))

    def case_values(
        self, prob: torch.Tensor, data: Item, spacing: Sequence[float]
    ) -> dict[str, Any]:
        return {"probability": float(prob[0])}

    def summarise(
        self, cases: pd.DataFrame, validation: Callable[[], pd.DataFrame], plots_dir: Path
    ) -> dict[str, Any]:
        val = validation()
        threshold = M.youden_threshold(val["label"].to_numpy(), val["probability"].to_numpy())
        y, p = cases["label"].to_numpy(), cases["probability"].to_numpy()

        def stat(fn: Any) -> Any:
            return lambda f: fn(f["label"].to_numpy(), f["probability"].to_numpy())

        def at_cut(fn: Any) -> Any:
            return stat(lambda a, b: fn(a, b, threshold))

        sens_spec = M.sensitivity_specificity
        result: dict[str, Any] = {
            "threshold": rounded(threshold),
            "metrics": {
                "auroc": with_ci(cases, stat(M.auroc)),
                "sensitivity": with_ci(cases, at_cut(lambda a, b, t: sens_spec(a, b, t)[0])),
                "specificity": with_ci(cases, at_cut(lambda a, b, t: sens_spec(a, b, t)[1])),
                "balanced_accuracy": with_ci(cases, at_cut(M.balanced_accuracy)),
                "ece": with_ci(cases, stat(M.expected_calibration_error)),
            },
            **breakdowns(cases, stat(M.auroc)),
        }
        plots.plot_roc(y, p, plots_dir)
        plots.plot_calibration(y, p, plots_dir)
        plots.plot_confusion(y, p, threshold, plots_dir)
        return result

    def gate_cases(self, cases: pd.DataFrame) -> pd.DataFrame:
        return cases

    def case_score(self, metric: str) -> str:
        return "probability"

    def score(
        self, metric: str, y: npt.NDArray[Any], values: npt.NDArray[Any], cut: float
    ) -> float:
        if metric == "auroc":
            return M.auroc(y, values)
        return M.balanced_accuracy(y, values, cut)

    def output_shape(self, size: Sequence[int]) -> tuple[int, ...]:
        return (-1,)

    @property
    def has_threshold(self) -> bool:
        return True


@dataclass(frozen=True)
class Segmentation(TaskSpec):
    """Lesion segmentation: background and lesion channels, softmax, Dice + CE, Dice."""

    def train_params(self, train: TrainParams) -> TaskTrainParams:
        return train.segment

    def registry_name(self, registry: RegistryParams) -> str:
        return registry.segment_name

    def gate_metric(self, gate: GateParams) -> str:
        return gate.segment_metric

    def loss(self) -> nn.Module:
        from monai.losses import DiceCELoss

        # Dice on the lesion channel only: with the background in, an all-background
        # prediction already scores half the loss on small lesions.
        return DiceCELoss(to_onehot_y=True, softmax=True, include_background=False)

    def batch_loss(
        self, loss_fn: nn.Module, out: torch.Tensor, batch: Batch, device: torch.device
    ) -> torch.Tensor:
        return loss_fn(out.float(), plain(batch["label"]).to(device))

    def predict(
        self,
        model: nn.Module,
        image: torch.Tensor,
        roi_size: Sequence[int],
        device: torch.device,
        amp: bool = False,
    ) -> torch.Tensor:
        return foreground_map(model, image, roi_size, device, amp)

    def validation_batch(
        self, prob: torch.Tensor, chunk: Sequence[Item]
    ) -> tuple[list[float], list[Any]]:
        losses, dices = [], []
        for d, item_prob in zip(chunk, prob, strict=True):
            truth = torch.as_tensor(d["label"])[0].numpy() > 0.5
            pred = item_prob.numpy() > 0.5
            score = M.dice(pred, truth)
            dices.append(score if truth.any() else None)  # Dice of volumes with a lesion
            losses.append(1.0 - score)
        return losses, dices

    def validation_metric(self, outputs: Sequence[Any]) -> float:
        dices = [d for d in outputs if d is not None]
        return float(np.mean(dices)) if dices else math.nan

    def case_values(
        self, prob: torch.Tensor, data: Item, spacing: Sequence[float]
    ) -> dict[str, Any]:
        pred = prob[0].numpy() > 0.5
        truth = data["label"][0].numpy() > 0.5
        hd95, msd = M.surface_distances(pred, truth, spacing)
        return {
            "dice": M.dice(pred, truth),
            "hd95": hd95,
            "msd": msd,
            "lesion": bool(truth.any()),
            "predicted_voxels": int(pred.sum()),
        }

    def summarise(
        self, cases: pd.DataFrame, validation: Callable[[], pd.DataFrame], plots_dir: Path
    ) -> dict[str, Any]:
        lesions = cases[cases["lesion"]]
        negatives = cases[~cases["lesion"]]

        def mean(col: str) -> Any:
            return lambda f: float(np.nanmean(f[col])) if len(f) else float("nan")

        fp = negatives.assign(fp=negatives["predicted_voxels"] > 0)
        result: dict[str, Any] = {
            "metrics": {
                "dice": with_ci(lesions, mean("dice")),
                "hd95_mm": with_ci(lesions, mean("hd95")),
                "msd_mm": with_ci(lesions, mean("msd")),
                "false_positive_rate": with_ci(fp, mean("fp")) if len(negatives) else None,
            },
            "n_test_series_with_lesion": len(lesions),
            **breakdowns(lesions, mean("dice")),
        }
        plots.plot_per_case(lesions[["key", "dice"]], "dice", plots_dir, "dice_per_case", key="key")
        return result

    def gate_cases(self, cases: pd.DataFrame) -> pd.DataFrame:
        return cases[cases["lesion"].astype(bool)]

    def case_score(self, metric: str) -> str:
        return metric

    def score(
        self, metric: str, y: npt.NDArray[Any], values: npt.NDArray[Any], cut: float
    ) -> float:
        return float(np.nanmean(values)) if len(values) else math.nan

    def output_shape(self, size: Sequence[int]) -> tuple[int, ...]:
        return (-1, *size)

    @property
    def has_threshold(self) -> bool:
        return False


CLASSIFY = Classification(
    name="classify",
    val_metric="auroc",
    val_metric_title="AUROC",
    val_metric_card="AUROC",
    maximize=True,
    with_masks=False,
    output="Diagnosis: probability that a CT or MR volume shows a lesion (one logit).",
    architecture="MONAI ResNet",
    slices="on axial slices, slice logits pooled by a top-k mean",
)
SEGMENT = Segmentation(
    name="segment",
    val_metric="dice",
    val_metric_title="Dice",
    val_metric_card="mean Dice (volumes with a lesion)",
    maximize=True,
    with_masks=True,
    output="Segmentation: lesion probability per voxel (background / lesion).",
    architecture="ResNet encoder in a MONAI FlexibleUNet",
    slices="on axial slices, predicted slice by slice",
)

# every task, in the order the pipeline runs them (the classifier starts from the
# segmenter's encoder in the demo)
TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in (SEGMENT, CLASSIFY)}


def get_task(task: str | TaskSpec) -> TaskSpec:
    """The spec of ``task`` (a name or a spec).

    Raises:
        ConfigError: an unknown task name, naming the known ones.
    """
    if isinstance(task, TaskSpec):
        return task
    try:
        return TASKS[task]
    except KeyError:
        raise ConfigError(f"task must be one of {tuple(TASKS)}, got {task!r}") from None
