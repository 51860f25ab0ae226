"""The task spec: everything that differs between diagnosis and segmentation.

Training, evaluation, the registry, the MLflow model, prediction and the CLI ask a
:class:`TaskSpec` instead of branching on a task's name: which params section configures
it, which network it builds, its loss, how a batch is scored, how a volume is predicted,
its validation metric (and direction), how the test set is summarised and plotted, its
registry name and gate metric, and what its model card says. Adding a task means adding
a spec here (and its network to :mod:`medimg.models.build`).

A spec is frozen. Its outputs are part of its configuration, not new branches: the
diagnosis' class names and the segmentation's structures (:meth:`TaskSpec.configure`),
so one spec serves a binary diagnosis and a three-class one, one lesion and five
structures.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy.typing as npt
import pandas as pd
import torch
from torch import nn

from medimg.config import (
    GateParams,
    Params,
    RegistryParams,
    StructureParams,
    TaskTrainParams,
    TrainParams,
)
from medimg.models.build import build_model

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
    labels: tuple[str, ...] = ()  # the outputs' names: class names (diagnosis) or
    # structure names (segmentation), in index / label-map order
    structures: tuple[StructureParams, ...] = field(default=(), repr=False)  # with codes
    tolerance_mm: float = 3.0  # segmentation: normalised surface distance tolerance

    # -- outputs --------------------------------------------------------------------
    @abstractmethod
    def configure(self, params: Params, classes: Sequence[str] | None = None) -> TaskSpec:
        """This spec with the outputs ``params`` give (and ``classes``, the class names a
        labels file gave when ``train.classify.classes`` is not set)."""

    @property
    @abstractmethod
    def n_outputs(self) -> int:
        """Logits (diagnosis) or channels (segmentation) of the network."""

    def describe(self) -> dict[str, Any]:
        """The outputs, as saved with a model (:meth:`from_description` reads them back)."""
        return {
            "labels": list(self.labels),
            "structures": [s.model_dump(mode="json") for s in self.structures],
            "tolerance_mm": self.tolerance_mm,
        }

    def for_cases(self, cases: pd.DataFrame) -> TaskSpec:
        """This spec with the outputs a per-case table (``cases.csv``) was scored with."""
        return self

    def from_description(self, meta: dict[str, Any]) -> TaskSpec:
        """This spec with the outputs a saved model describes (binary defaults when it
        predates them)."""
        from dataclasses import replace

        if "labels" not in meta:
            return self
        return replace(
            self,
            labels=tuple(meta["labels"]),
            structures=tuple(StructureParams(**s) for s in meta.get("structures", [])),
            tolerance_mm=float(meta.get("tolerance_mm", self.tolerance_mm)),
        )

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
        """The task's network, randomly initialised, with :attr:`n_outputs` outputs."""
        return build_model(self.name, cfg, self.n_outputs)

    def training_classes(self) -> tuple[str, ...] | None:
        """Classes that every training set must hold a case of (None: no such rule)."""
        return None

    def sample_weights(self, cfg: TaskTrainParams, y: Sequence[float]) -> list[float] | None:
        """Per training item, its weight in a balanced sampler (None: plain shuffling)."""
        return None

    # -- training -------------------------------------------------------------------
    @abstractmethod
    def loss(self, cfg: TaskTrainParams | None = None, y: Sequence[float] = ()) -> nn.Module:
        """The training loss (a fresh module); ``y``, the training labels, for weights."""

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
        """Probabilities for volumes (B, 1, R, A, S), on the CPU: (B,) or (B, K) per volume,
        (B, R, A, S) or (B, K + 1, R, A, S) per voxel."""

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

    def calibrate(self, oof: pd.DataFrame) -> tuple[float, pd.DataFrame, dict[str, Any]]:
        """A temperature fitted on out-of-fold cases, those cases with it applied, and
        what it changed (:mod:`medimg.calibration`); a task without one keeps T = 1."""
        return 1.0, oof, {}

    def with_temperature(self, cases: pd.DataFrame, temperature: float) -> pd.DataFrame:
        """``cases`` with their probabilities scaled by ``temperature``."""
        return cases

    def calibration_error(self, cases: pd.DataFrame) -> float | None:
        """The expected calibration error of a per-case table (None: no probabilities)."""
        return None

    @abstractmethod
    def gate_cases(self, cases: pd.DataFrame) -> pd.DataFrame:
        """The cases the gate compares on."""

    @abstractmethod
    def case_score(self, metric: str) -> str | list[str]:
        """The column (or columns) of ``cases.csv`` that ``metric`` is computed from."""

    @abstractmethod
    def score(
        self, metric: str, y: npt.NDArray[Any], values: npt.NDArray[Any], cut: float
    ) -> float:
        """``metric`` over cases with labels ``y`` and case scores ``values`` (n,) or
        (n, columns)."""

    # -- prediction -----------------------------------------------------------------
    @abstractmethod
    def output_shape(self, size: Sequence[int]) -> tuple[int, ...]:
        """Shape of the logged model's output for inputs of ``(-1, 1, *size)``."""

    @property
    @abstractmethod
    def has_threshold(self) -> bool:
        """Whether evaluation chooses a decision threshold that prediction applies."""
