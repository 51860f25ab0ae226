"""Segmentation of :attr:`~medimg.tasks.base.TaskSpec.structures`: background and one
channel per structure, softmax, Dice + cross-entropy; evaluated per structure (Dice,
HD95, mean and normalised surface distance, Metrics Reloaded), each with an interval
from a bootstrap over patients, and their mean over structures.

Overlapping structures are one label map with a precedence (the later structure in
``structures`` wins, lesions after the organs that hold them): one softmax, one label-map
NIfTI and one SEG segment per structure, as nnU-Net and most RTSTRUCT exports number them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
import torch
from torch import nn

from medimg import metrics as M
from medimg import plots
from medimg.config import GateParams, Params, RegistryParams, TaskTrainParams, TrainParams
from medimg.infer import foreground_map, plain
from medimg.stats import MeanOfMeans, breakdowns, with_ci
from medimg.tasks.base import Batch, Item, TaskSpec

SCORES = ("dice", "hd95", "msd", "nsd")  # per structure and case, in cases.csv


def nanmean(values: Any) -> float:
    """The mean of the defined values; NaN (without a warning) when there is none."""
    v = np.asarray(values, dtype=float)
    v = v[~np.isnan(v)]
    return float(v.mean()) if v.size else math.nan


@dataclass(frozen=True)
class Segmentation(TaskSpec):
    """Segmentation of :attr:`labels` (``("lesion",)``: one lesion channel)."""

    labels: tuple[str, ...] = ("lesion",)

    # -- configuration --------------------------------------------------------------
    def configure(self, params: Params, classes: Sequence[str] | None = None) -> TaskSpec:
        return replace(
            self,
            labels=tuple(s.name for s in params.structures),
            structures=tuple(params.structures),
            tolerance_mm=getattr(params.train.segment, "nsd_tolerance_mm", self.tolerance_mm),
        )

    @property
    def single(self) -> bool:
        """One structure: the probability map is its channel alone, as before structures."""
        return len(self.labels) == 1

    @property
    def n_outputs(self) -> int:
        return len(self.labels) + 1

    def train_params(self, train: TrainParams) -> TaskTrainParams:
        return train.segment

    def registry_name(self, registry: RegistryParams) -> str:
        return registry.segment_name

    def gate_metric(self, gate: GateParams) -> str:
        return gate.segment_metric

    # -- training -------------------------------------------------------------------
    def loss(self, cfg: TaskTrainParams | None = None, y: Sequence[float] = ()) -> nn.Module:
        from monai.losses import DiceCELoss

        # Dice on the structures' channels only: with the background in, an
        # all-background prediction already scores half the loss on small lesions.
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
        channels = "foreground" if self.single else "all"
        return foreground_map(model, image, roi_size, device, amp, channels=channels)

    def label_map(self, prob: torch.Tensor | npt.NDArray[Any]) -> npt.NDArray[np.uint8]:
        """The predicted label map of one volume's probabilities ((R, A, S) foreground of
        one structure, or (K + 1, R, A, S))."""
        p = np.asarray(prob)
        if self.single:
            return (p > 0.5).astype(np.uint8)
        return np.argmax(p, axis=0).astype(np.uint8)

    def validation_batch(
        self, prob: torch.Tensor, chunk: Sequence[Item]
    ) -> tuple[list[float], list[Any]]:
        losses, outputs = [], []
        for d, item_prob in zip(chunk, prob, strict=True):
            truth = np.rint(torch.as_tensor(d["label"])[0].numpy()).astype(np.uint8)
            pred = self.label_map(item_prob.numpy())
            dices: list[float | None] = []
            for k in range(1, len(self.labels) + 1):
                present = bool((truth == k).any())
                dices.append(M.dice(pred == k, truth == k) if present else None)
            scored = [v for v in dices if v is not None]
            losses.append(1.0 - float(np.mean(scored)) if scored else float(pred.any()))
            outputs.append(dices)  # Dice of the structures each volume has
        return losses, outputs

    def validation_metric(self, outputs: Sequence[Any]) -> float:
        per_structure = []
        for k in range(len(self.labels)):
            values = [o[k] for o in outputs if o[k] is not None]
            if values:
                per_structure.append(float(np.mean(values)))
        return float(np.mean(per_structure)) if per_structure else math.nan

    # -- evaluation -----------------------------------------------------------------
    def case_values(
        self, prob: torch.Tensor, data: Item, spacing: Sequence[float]
    ) -> dict[str, Any]:
        pred = self.label_map(prob[0].numpy())
        truth = np.rint(np.asarray(data["label"][0])).astype(np.uint8)
        scores = M.structure_scores(pred, truth, len(self.labels), spacing, self.tolerance_mm)
        if self.single:
            s = scores[0]
            return {
                "dice": s["dice"], "hd95": s["hd95"], "msd": s["msd"], "nsd": s["nsd"],
                "lesion": bool(s["present"]), "predicted_voxels": int(s["predicted_voxels"]),
            }  # fmt: skip
        row: dict[str, Any] = {}
        for name, s in zip(self.labels, scores, strict=True):
            row |= {f"{m}_{name}": s[m] for m in SCORES}
            row[f"present_{name}"] = bool(s["present"])
            row[f"predicted_voxels_{name}"] = int(s["predicted_voxels"])
        present = [s["dice"] for s in scores if s["present"]]
        row["dice"] = float(np.mean(present)) if present else math.nan  # over its structures
        row["lesion"] = bool(present)  # has any structure: a case the gate compares
        return row

    def summarise(
        self, cases: pd.DataFrame, validation: Callable[[], pd.DataFrame], plots_dir: Path
    ) -> dict[str, Any]:
        def mean(col: str) -> MeanOfMeans:
            return MeanOfMeans((col,))

        if self.single:
            return self._summarise_single(cases, plots_dir, mean)
        per: dict[str, Any] = {}
        for name in self.labels:
            has = cases[cases[f"present_{name}"].astype(bool)]
            per[name] = {
                "dice": with_ci(has, mean(f"dice_{name}")),
                "hd95_mm": with_ci(has, mean(f"hd95_{name}")),
                "msd_mm": with_ci(has, mean(f"msd_{name}")),
                "nsd": with_ci(has, mean(f"nsd_{name}")),
                "n_test_series": len(has),
            }

        def over_structures(score: str) -> MeanOfMeans:
            # each structure's mean over the cases that have it, then their mean
            names = self.labels
            return MeanOfMeans(
                tuple(f"{score}_{n}" for n in names), tuple(f"present_{n}" for n in names)
            )

        tidy = pd.DataFrame(
            [
                {"key": r["key"], "structure": n, "dice": r[f"dice_{n}"]}
                for r in cases.to_dict("records")
                for n in self.labels
                if r[f"present_{n}"]
            ]
        )
        plots.plot_per_structure(tidy, plots_dir)
        return {
            "structures": list(self.labels),
            "nsd_tolerance_mm": self.tolerance_mm,
            "metrics": {  # the mean over structures of each structure's mean
                "dice": with_ci(cases, over_structures("dice")),
                "hd95_mm": with_ci(cases, over_structures("hd95")),
                "msd_mm": with_ci(cases, over_structures("msd")),
                "nsd": with_ci(cases, over_structures("nsd")),
            },
            "per_structure": per,
            **breakdowns(cases, over_structures("dice")),
        }

    def _summarise_single(
        self, cases: pd.DataFrame, plots_dir: Path, mean: Callable[[str], Any]
    ) -> dict[str, Any]:
        lesions = cases[cases["lesion"]]
        negatives = cases[~cases["lesion"]]
        fp = negatives.assign(fp=negatives["predicted_voxels"] > 0)
        result: dict[str, Any] = {
            "nsd_tolerance_mm": self.tolerance_mm,
            "metrics": {
                "dice": with_ci(lesions, mean("dice")),
                "hd95_mm": with_ci(lesions, mean("hd95")),
                "msd_mm": with_ci(lesions, mean("msd")),
                "nsd": with_ci(lesions, mean("nsd")),
                "false_positive_rate": with_ci(fp, mean("fp")) if len(negatives) else None,
            },
            "n_test_series_with_lesion": len(lesions),
            **breakdowns(lesions, mean("dice")),
        }
        plots.plot_per_case(lesions[["key", "dice"]], "dice", plots_dir, "dice_per_case", key="key")
        return result

    def gate_cases(self, cases: pd.DataFrame) -> pd.DataFrame:
        return cases[cases["lesion"].astype(bool)]

    def case_score(self, metric: str) -> str | list[str]:
        return metric

    def score(
        self, metric: str, y: npt.NDArray[Any], values: npt.NDArray[Any], cut: float
    ) -> float:
        return nanmean(values)

    # -- prediction -----------------------------------------------------------------
    def output_shape(self, size: Sequence[int]) -> tuple[int, ...]:
        return (-1, *size) if self.single else (-1, len(self.labels) + 1, *size)

    @property
    def has_threshold(self) -> bool:
        return False
