"""The fold models of a cross-validation as one network (nnU-Net and Auto3DSeg's default).

:class:`Ensemble` averages its members' probabilities, not their logits: the sigmoid of
one logit, or the softmax over classes or label-map channels. Its ``forward`` returns the
log of that mean (the logit of it, for one output), so that the sigmoid or softmax every
caller already applies gives the mean back, and an ensemble goes wherever one model goes:
evaluation, sliding windows, the MLflow model, ``medimg predict``, the promotion gate.
Sliding-window inference blends the windows of this output, as it blends a single model's
logits.

A temperature ``T`` (fitted on out-of-fold predictions, :mod:`medimg.calibration`)
divides each member's logits before they are averaged (calibrate, then pool): out of
fold every case was scored by one member, so ``T`` is a member's temperature, and each
member's probabilities are scaled exactly as :func:`medimg.calibration.apply_temperature`
scales the out-of-fold table. Scaling the mean instead (pool, then calibrate) applied a
single model's temperature to an average that is already less confident than any
member (on one demo split it took the ensemble's test ECE from 0.142 to 0.267). Scaling
each member still worsened it on the reference run (0.113 to 0.162, docs/performance.md):
the fit is consistent now, not yet a cure. Segmenters keep T = 1.

Weights are an ordinary state dict (``members.<i>.<name>`` and ``temperature``), so they
go through safetensors as they are; :func:`first_member` takes a pretrained encoder from
an ensemble (its first fold).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

PREFIX = "members."
EPS = 1e-7  # probabilities are kept in [EPS, 1 - EPS] before the log


class Ensemble(nn.Module):
    """The mean probability of ``members``, as logits (see the module docstring)."""

    def __init__(self, members: Sequence[nn.Module], temperature: float = 1.0):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)
        self.register_buffer("temperature", torch.tensor(float(temperature)))

    temperature: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(self.temperature, dtype=torch.float32)
        outs = [m(x).float() / t for m in self.members]
        if outs[0].shape[1] == 1:  # one logit: the mean of sigmoids, as a logit
            p = torch.stack([torch.sigmoid(o) for o in outs]).mean(0).clamp(EPS, 1 - EPS)
            return torch.log(p) - torch.log1p(-p)
        p = torch.stack([torch.softmax(o, dim=1) for o in outs]).mean(0)
        return torch.log(p.clamp(EPS, 1 - EPS))


def build_ensemble(
    build: Callable[[], nn.Module], n_members: int, temperature: float = 1.0
) -> Ensemble:
    """An ensemble of ``n_members`` networks from ``build`` (weights loaded after)."""
    return Ensemble([build() for _ in range(n_members)], temperature)


def ensemble_state(
    states: Sequence[Mapping[str, torch.Tensor]], temperature: float = 1.0
) -> dict[str, torch.Tensor]:
    """The state dict of an :class:`Ensemble` of members with weights ``states``."""
    out = {f"{PREFIX}{i}.{k}": v for i, state in enumerate(states) for k, v in state.items()}
    out["temperature"] = torch.tensor(float(temperature))
    return out


def is_ensemble_state(state: Mapping[str, Any]) -> bool:
    return "temperature" in state and any(str(k).startswith(f"{PREFIX}0.") for k in state)


def n_members(state: Mapping[str, Any]) -> int:
    """How many members an ensemble's state dict holds (0: not an ensemble's)."""
    if not is_ensemble_state(state):
        return 0
    return len({str(k).split(".")[1] for k in state if str(k).startswith(PREFIX)})


def first_member(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` itself, or its first member's weights when it is an ensemble's."""
    if not is_ensemble_state(state):
        return dict(state)
    head = f"{PREFIX}0."
    return {k[len(head) :]: v for k, v in state.items() if k.startswith(head)}
