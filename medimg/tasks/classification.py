"""Diagnosis: one label per volume, from two classes (one logit, sigmoid, a decision
threshold chosen on the validation fold) or more (one logit per class, softmax, argmax).

Evaluation follows Metrics Reloaded's recommendations for image-level classification:
AUROC (one-vs-rest per class and their macro mean), balanced accuracy, Matthews
correlation, per-class sensitivity and specificity, the confusion matrix and the expected
calibration error, each headline metric with a 95 % interval from a bootstrap over
patients, and the macro AUROC by vendor and modality.
"""

from __future__ import annotations

import logging
from collections import Counter
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
from medimg import multiclass as MC
from medimg import plots
from medimg.calibration import apply_temperature, fit_temperature, nll
from medimg.config import GateParams, Params, RegistryParams, TaskTrainParams, TrainParams
from medimg.infer import volume_probability
from medimg.stats import OnColumns, breakdowns, rounded, with_ci
from medimg.tasks.base import Batch, Item, TaskSpec

BINARY = ("0", "1")
log = logging.getLogger(__name__)


def probability_column(name: str) -> str:
    """The ``cases.csv`` / ``predictions.csv`` column of class ``name``'s probability."""
    return f"probability_{name}"


@dataclass(frozen=True)
class Classification(TaskSpec):
    """Diagnosis with :attr:`labels` as its classes (``("0", "1")``: binary)."""

    labels: tuple[str, ...] = BINARY

    # -- configuration --------------------------------------------------------------
    def configure(self, params: Params, classes: Sequence[str] | None = None) -> TaskSpec:
        given = getattr(params.train.classify, "classes", None)  # a TaskTrainParams has none
        names = given or (tuple(classes) if classes else BINARY)
        return replace(self, labels=tuple(names))

    def for_cases(self, cases: pd.DataFrame) -> TaskSpec:
        prefix = probability_column("")
        names = [str(c)[len(prefix) :] for c in cases.columns if str(c).startswith(prefix)]
        return replace(self, labels=tuple(names)) if len(names) > 2 else self

    @property
    def binary(self) -> bool:
        return len(self.labels) == 2

    @property
    def n_outputs(self) -> int:
        return 1 if self.binary else len(self.labels)

    def train_params(self, train: TrainParams) -> TaskTrainParams:
        return train.classify

    def registry_name(self, registry: RegistryParams) -> str:
        return registry.classify_name

    def gate_metric(self, gate: GateParams) -> str:
        return gate.classify_metric

    def training_classes(self) -> tuple[str, ...] | None:
        return self.labels

    # -- training -------------------------------------------------------------------
    def _class_weights(self, y: Sequence[float]) -> torch.Tensor:
        """Inverse class frequencies, scaled to mean 1 (a missing class weighs 0)."""
        counts = Counter(int(v) for v in y)
        n, k = len(y), len(self.labels)
        w = [n / (k * counts[c]) if counts[c] else 0.0 for c in range(k)]
        return torch.tensor(w, dtype=torch.float32)

    def sample_weights(self, cfg: TaskTrainParams, y: Sequence[float]) -> list[float] | None:
        if getattr(cfg, "balance", "none") != "sampler":
            return None
        w = self._class_weights(y)
        return [float(w[int(v)]) for v in y]

    def loss(self, cfg: TaskTrainParams | None = None, y: Sequence[float] = ()) -> nn.Module:
        weighted = cfg is not None and getattr(cfg, "balance", "none") == "weights" and len(y)
        w = self._class_weights(y) if weighted else None
        if self.binary:
            # the positives' weight relative to the negatives'
            return nn.BCEWithLogitsLoss(pos_weight=None if w is None else w[1:] / w[0])
        return nn.CrossEntropyLoss(weight=w)

    def batch_loss(
        self, loss_fn: nn.Module, out: torch.Tensor, batch: Batch, device: torch.device
    ) -> torch.Tensor:
        if self.binary:
            return loss_fn(out.squeeze(1).float(), batch["y"].float().to(device))
        return loss_fn(out.float(), batch["y"].long().to(device))

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
        y = torch.tensor([int(d["y"]) for d in chunk])
        p = prob.clamp(1e-7, 1 - 1e-7)
        if self.binary:
            yf = y.float()
            losses = (-(yf * torch.log(p) + (1 - yf) * torch.log(1 - p))).tolist()
        else:
            losses = (-torch.log(p.gather(1, y[:, None])[:, 0])).tolist()
        return losses, list(zip(prob.tolist(), y.tolist(), strict=True))

    def validation_metric(self, outputs: Sequence[Any]) -> float:
        scores = np.array([s for s, _ in outputs], dtype=float)
        labels = np.array([y for _, y in outputs])
        if self.binary:
            return M.auroc(labels, scores)
        return MC.macro_auroc(labels, scores)

    # -- evaluation -----------------------------------------------------------------
    def probability_columns(self) -> list[str]:
        return [probability_column(c) for c in self.labels]

    def case_values(
        self, prob: torch.Tensor, data: Item, spacing: Sequence[float]
    ) -> dict[str, Any]:
        if self.binary:
            return {"probability": float(prob[0])}
        p = prob[0].numpy().astype(float)
        row = {col: float(v) for col, v in zip(self.probability_columns(), p, strict=True)}
        return row | {"predicted": int(MC.predicted_class(p[None])[0])}

    def _probs(self, f: pd.DataFrame) -> npt.NDArray[np.float64]:
        return f[self.probability_columns()].to_numpy(dtype=float)

    def summarise(
        self, cases: pd.DataFrame, validation: Callable[[], pd.DataFrame], plots_dir: Path
    ) -> dict[str, Any]:
        if self.binary:
            return self._summarise_binary(cases, validation, plots_dir)
        k = len(self.labels)

        def stat(fn: Callable[[Any, Any], float]) -> OnColumns:
            return OnColumns(fn, ("label", tuple(self.probability_columns())))

        def hard(fn: Callable[..., float]) -> OnColumns:
            return OnColumns(lambda y, p: fn(y, p, k), ("label", "predicted"))

        def per_class(i: int) -> dict[str, Any]:
            def sens_spec(j: int) -> Callable[[pd.DataFrame], float]:
                return hard(lambda y, p, n: MC.sensitivity_specificity(y, p, n)[i][j])

            return {
                "auroc": with_ci(cases, stat(lambda y, p: MC.one_vs_rest_auroc(y, p)[i])),
                "sensitivity": with_ci(cases, sens_spec(0)),
                "specificity": with_ci(cases, sens_spec(1)),
                "n_cases": int((cases["label"] == i).sum()),
            }

        y, pred, probs = (
            cases["label"].to_numpy(),
            cases["predicted"].to_numpy(),
            self._probs(cases),
        )
        matrix = MC.confusion_matrix(y, pred, k)
        result: dict[str, Any] = {
            "classes": list(self.labels),
            "decision": "argmax: the class of the highest probability (no threshold)",
            "metrics": {
                "macro_auroc": with_ci(cases, stat(MC.macro_auroc)),
                "balanced_accuracy": with_ci(cases, hard(MC.balanced_accuracy)),
                "mcc": with_ci(cases, hard(MC.matthews_corrcoef)),
                "ece": with_ci(cases, stat(MC.expected_calibration_error)),
            },
            "per_class": {name: per_class(i) for i, name in enumerate(self.labels)},
            "confusion_matrix": {
                "rows": "truth",
                "columns": "predicted",
                "classes": list(self.labels),
                "counts": matrix.tolist(),
            },
            **breakdowns(cases, stat(MC.macro_auroc)),
        }
        plots.plot_confusion_matrix(y, pred, list(self.labels), plots_dir)
        plots.plot_roc_one_vs_rest(y, probs, list(self.labels), plots_dir)
        return result

    def _summarise_binary(
        self, cases: pd.DataFrame, validation: Callable[[], pd.DataFrame], plots_dir: Path
    ) -> dict[str, Any]:
        val = validation()
        threshold = M.youden_threshold(val["label"].to_numpy(), val["probability"].to_numpy())
        y, p = cases["label"].to_numpy(), cases["probability"].to_numpy()

        def stat(fn: Any) -> OnColumns:
            return OnColumns(fn, ("label", "probability"))

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

    def _scores(self, f: pd.DataFrame) -> npt.NDArray[np.float64]:
        """The case scores of a per-case table: (n,) of one probability, or (n, K)."""
        return f["probability"].to_numpy(dtype=float) if self.binary else self._probs(f)

    def calibration_error(self, cases: pd.DataFrame) -> float | None:
        return rounded(self._ece(cases))

    def _ece(self, f: pd.DataFrame) -> float:
        ece = M.expected_calibration_error if self.binary else MC.expected_calibration_error
        return ece(f["label"].to_numpy(), self._scores(f))

    def with_temperature(self, cases: pd.DataFrame, temperature: float) -> pd.DataFrame:
        out = cases.copy()
        out[self.case_score("")] = apply_temperature(self._scores(out), temperature)
        return out  # the order of the cases and classes (argmax) is unchanged

    def calibrate(self, oof: pd.DataFrame) -> tuple[float, pd.DataFrame, dict[str, Any]]:
        y, p = oof["label"].to_numpy(), self._scores(oof)
        try:
            temperature = fit_temperature(y, p)
            fitted = f"{len(oof)} out-of-fold series (negative log-likelihood)"
        except ValueError as err:  # one class out of fold: nothing to fit, T stays 1
            log.warning("temperature scaling skipped: %s (list more folds)", err)
            temperature, fitted = 1.0, f"not fitted: {err}"
        scaled = self.with_temperature(oof, temperature)
        after = self._scores(scaled)
        info = {
            "temperature": temperature,
            "fitted_on": fitted,
            "oof_ece_before": rounded(self._ece(oof)),
            "oof_ece_after": rounded(self._ece(scaled)),
            "oof_nll_before": rounded(nll(y, p)),
            "oof_nll_after": rounded(nll(y, after)),
        }
        return temperature, scaled, info

    def gate_cases(self, cases: pd.DataFrame) -> pd.DataFrame:
        return cases

    def case_score(self, metric: str) -> str | list[str]:
        return "probability" if self.binary else self.probability_columns()

    def score(
        self, metric: str, y: npt.NDArray[Any], values: npt.NDArray[Any], cut: float
    ) -> float:
        if self.binary:
            if metric == "auroc":
                return M.auroc(y, values)
            return M.balanced_accuracy(y, values, cut)
        if metric == "auroc":  # of several classes: the macro mean of one-vs-rest AUROCs
            return MC.macro_auroc(y, values)
        return MC.balanced_accuracy(y, MC.predicted_class(values), len(self.labels))

    # -- prediction -----------------------------------------------------------------
    def output_shape(self, size: Sequence[int]) -> tuple[int, ...]:
        return (-1,) if self.binary else (-1, len(self.labels))

    @property
    def has_threshold(self) -> bool:
        return self.binary
