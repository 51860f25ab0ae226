"""Optimisation policy of a training run: the optimiser, its schedule, early stopping."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from medimg.config import TaskTrainParams


def build_optimizer(groups: list[dict[str, Any]], cfg: TaskTrainParams) -> torch.optim.AdamW:
    """AdamW with PyTorch's fused kernel, on the CPU as on CUDA: one pass over each
    parameter's memory per step instead of one per arithmetic operation (several times
    faster on CPU: docs/performance.md). Every group carries its own learning rate
    (:func:`~medimg.models.pretrained.param_groups`). Given the same gradients its weights
    differ from the reference loop's by float rounding only (tested); a run still repeats
    and resumes exactly. Through a network such differences grow, as they would on another
    CPU or a GPU: the demo trains until its validation scores level off.
    """
    return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay, fused=True)


def lr_schedule(warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


@dataclass
class EarlyStopping:
    """Keeps the best epoch and says when to stop.

    An epoch is the best so far when its validation metric beats the best (in the
    metric's direction), or ties it with a lower validation loss: a small validation fold
    often reaches AUROC or Dice 1.0 early, and of equally ranking models the better
    calibrated one is kept. Where the metric is undefined (a validation fold with one
    class has no AUROC), the negative loss stands in for it.
    """

    patience: int  # epochs without a new best before stopping
    maximize: bool = True  # the metric's direction
    best_metric: float = -math.inf  # best score so far (sign-adjusted when minimising)
    best_loss: float = math.inf
    best_epoch: int = 0
    bad_epochs: int = 0

    def update(self, epoch: int, metric: float, loss: float) -> bool:
        """Record an epoch's validation result; True when it is the best so far."""
        score = (metric if self.maximize else -metric) if math.isfinite(metric) else -loss
        best = score > self.best_metric or (score == self.best_metric and loss < self.best_loss)
        if best:
            self.best_metric, self.best_loss, self.best_epoch = score, loss, epoch
            self.bad_epochs = 0
        else:  # epochs since the best, whether or not each one was validated
            self.bad_epochs = epoch - self.best_epoch
        return best

    @property
    def stop(self) -> bool:
        return self.bad_epochs >= self.patience

    def share(self) -> None:
        """Under DDP: every rank takes rank 0's state (only rank 0 validates)."""
        import torch.distributed as dist

        shared: list[Any] = [self.bad_epochs, self.best_metric, self.best_epoch]
        dist.broadcast_object_list(shared, src=0)
        self.bad_epochs, self.best_metric, self.best_epoch = shared

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps of it."""
        return {
            "best_metric": self.best_metric,
            "best_loss": self.best_loss,
            "best_epoch": self.best_epoch,
            "bad_epochs": self.bad_epochs,
        }
