"""Temperature scaling (Guo et al., 2017): one scalar ``T`` that divides a classifier's
logits, fitted by minimising the negative log-likelihood of held-out cases. It changes
the probabilities, never their order, so AUROC and argmax stay what they were.

Fitted on the out-of-fold predictions of a cross-validation (:mod:`medimg.cv`), whose
cases no member trained on. The logits are recovered from the probabilities stored in
the per-case tables: ``logit(p)`` for one output, ``log(p)`` for several (softmax is
invariant to the constant this loses).
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
from scipy.optimize import minimize_scalar

EPS = 1e-7
T_RANGE = (0.05, 20.0)  # the search interval of T


def _logits(probs: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    p = np.clip(np.asarray(probs, dtype=float), EPS, 1 - EPS)
    if p.ndim == 1:
        return np.log(p) - np.log1p(-p)
    return np.log(p)


def apply_temperature(probs: npt.ArrayLike, temperature: float) -> npt.NDArray[np.float64]:
    """``probs`` ((n,) of the positive class, or (n, K)) with their logits divided by T."""
    z = _logits(np.asarray(probs, dtype=float)) / temperature
    if z.ndim == 1:
        return 1.0 / (1.0 + np.exp(-z))
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll(y: npt.ArrayLike, probs: npt.ArrayLike) -> float:
    """Mean negative log-likelihood of integer labels ``y`` under ``probs``."""
    p = np.clip(np.asarray(probs, dtype=float), EPS, 1 - EPS)
    labels = np.asarray(y, dtype=int)
    if p.ndim == 1:
        return float(-np.mean(np.where(labels == 1, np.log(p), np.log1p(-p))))
    return float(-np.mean(np.log(p[np.arange(len(labels)), labels])))


def fit_temperature(y: npt.ArrayLike, probs: npt.ArrayLike) -> float:
    """The temperature that minimises the NLL of ``y`` under ``probs`` scaled by it.

    Raises:
        ValueError: fewer than two cases, or labels of one class only (nothing to fit).
    """
    labels = np.asarray(y, dtype=int)
    if len(labels) < 2 or len(np.unique(labels)) < 2:
        raise ValueError("temperature scaling needs held-out cases of at least two classes")
    p = np.asarray(probs, dtype=float)
    lo, hi = (math.log(t) for t in T_RANGE)
    found = minimize_scalar(
        lambda log_t: nll(labels, apply_temperature(p, math.exp(log_t))),
        bounds=(lo, hi),
        method="bounded",
        options={"xatol": 1e-4},
    )
    return float(round(math.exp(found.x), 4))
