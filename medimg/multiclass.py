"""Image-level metrics for a diagnosis with K classes, as Metrics Reloaded recommends.

Per-class one-vs-rest AUROC and their macro mean (ranking), balanced accuracy and
Matthews' correlation coefficient (decisions, robust to prevalence), per-class
sensitivity and specificity, the K x K confusion matrix, and the top-label expected
calibration error. Binary diagnosis keeps :mod:`medimg.metrics`, with its threshold;
here a decision is the argmax of the class probabilities.

Inputs are ``y``, integer class indices 0..K-1 of shape (n,), and either ``probs``, class
probabilities of shape (n, K) whose rows sum to 1, or ``pred``, predicted indices (n,).
As in :mod:`medimg.metrics`, an undefined value (a class absent from the truth) is NaN,
not an exception, so bootstrap samples that miss a class drop out instead of failing.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from medimg import metrics
from medimg.metrics import FloatArray, IntArray

SUM_TOLERANCE = 1e-3  # how far a row of probabilities may sum from 1 (float32, rounding)


def _labels(y: npt.ArrayLike, n_classes: int, what: str = "labels") -> IntArray:
    """Class indices as int64, checked to lie in 0..n_classes-1."""
    arr = np.asarray(y).ravel()
    if n_classes < 1:
        raise ValueError(f"n_classes must be at least 1, not {n_classes}")
    ints = arr.astype(np.int64)
    if not np.array_equal(ints, arr) or np.any((ints < 0) | (ints >= n_classes)):
        raise ValueError(f"{what} must be class indices 0..{n_classes - 1}")
    return ints


def _probabilities(y: npt.ArrayLike, probs: npt.ArrayLike) -> tuple[IntArray, FloatArray]:
    """Labels and an (n, K) probability matrix, checked to pair up and to be probabilities."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] < 2:
        raise ValueError(f"probabilities must have shape (n, K) with K >= 2, not {p.shape}")
    labels = _labels(y, p.shape[1])
    if labels.size != p.shape[0]:
        raise ValueError(f"{labels.size} labels but {p.shape[0]} rows of probabilities")
    if not np.all(np.isfinite(p)) or np.any((p < 0) | (p > 1)):
        raise ValueError("probabilities must be finite and lie in [0, 1]")
    if p.size and np.max(np.abs(p.sum(axis=1) - 1)) > SUM_TOLERANCE:
        raise ValueError("each row of probabilities must sum to 1 (apply softmax first)")
    return labels, p


def predicted_class(probs: npt.ArrayLike) -> IntArray:
    """The most probable class of each case; a tie goes to the lowest class index.

    Args:
        probs: class probabilities (n, K).

    Returns:
        Class indices (n,).
    """
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"probabilities must have shape (n, K), not {p.shape}")
    return np.argmax(p, axis=1).astype(np.int64)  # argmax returns the first maximum


def one_vs_rest_auroc(y: npt.ArrayLike, probs: npt.ArrayLike) -> list[float]:
    """AUROC of each class against all others, scored by that class's probability.

    Args:
        y: class indices (n,).
        probs: class probabilities (n, K).

    Returns:
        K areas; NaN for a class absent from ``y`` or present in every case.
    """
    labels, p = _probabilities(y, probs)
    return [metrics.auroc(labels == k, p[:, k]) for k in range(p.shape[1])]


def macro_auroc(y: npt.ArrayLike, probs: npt.ArrayLike) -> float:
    """Unweighted mean of the defined one-vs-rest AUROCs (sklearn's ``ovr`` macro).

    Returns:
        The mean, or NaN when no class has a defined AUROC.
    """
    areas = [a for a in one_vs_rest_auroc(y, probs) if not math.isnan(a)]
    return float(np.mean(areas)) if areas else math.nan


def confusion_matrix(y: npt.ArrayLike, pred: npt.ArrayLike, n_classes: int) -> IntArray:
    """Counts of each (true, predicted) pair of classes.

    Args:
        y: true class indices (n,).
        pred: predicted class indices (n,).
        n_classes: number of classes K.

    Returns:
        A (K, K) integer matrix: rows are the true class, columns the predicted one.
    """
    truth = _labels(y, n_classes)
    called = _labels(pred, n_classes, "predictions")
    if truth.size != called.size:
        raise ValueError(f"{truth.size} labels but {called.size} predictions")
    flat = np.bincount(truth * n_classes + called, minlength=n_classes * n_classes)
    return flat.reshape(n_classes, n_classes).astype(np.int64)


def sensitivity_specificity(
    y: npt.ArrayLike, pred: npt.ArrayLike, n_classes: int
) -> list[tuple[float, float]]:
    """Sensitivity and specificity of each class, one against the rest.

    Returns:
        K pairs ``(sensitivity, specificity)``: the share of the class's cases called it,
        and the share of the other cases not called it. Each is NaN when its denominator
        is empty (no case of the class, or no case of any other).
    """
    counts = confusion_matrix(y, pred, n_classes)
    n = int(counts.sum())
    pairs = []
    for k in range(n_classes):
        tp, actual, called = int(counts[k, k]), int(counts[k].sum()), int(counts[:, k].sum())
        tn = n - actual - called + tp
        sens = tp / actual if actual else math.nan
        spec = tn / (n - actual) if n - actual else math.nan
        pairs.append((sens, spec))
    return pairs


def balanced_accuracy(y: npt.ArrayLike, pred: npt.ArrayLike, n_classes: int) -> float:
    """Mean recall over the classes present in ``y`` (sklearn's ``balanced_accuracy_score``).

    A class that is never the truth has no recall and is left out, so chance level is
    1 / (number of classes present).

    Returns:
        The mean, or NaN for no cases.
    """
    recalls = [s for s, _ in sensitivity_specificity(y, pred, n_classes) if not math.isnan(s)]
    return float(np.mean(recalls)) if recalls else math.nan


def matthews_corrcoef(y: npt.ArrayLike, pred: npt.ArrayLike, n_classes: int) -> float:
    """Matthews' correlation coefficient for K classes (Gorodkin 2004, the R_K statistic).

    With C the confusion matrix, s cases, c = trace(C), t and p the true and predicted
    class totals: ``(c s - t.p) / sqrt((s^2 - p.p)(s^2 - t.t))``. It is 1 for perfect
    decisions, 0 for decisions unrelated to the truth, and for two classes the usual MCC.

    Returns:
        The coefficient in [-1, 1], or NaN when the truth or the predictions hold a single
        class (sklearn returns 0.0 there; NaN keeps an undefined value out of means and
        bootstrap intervals).
    """
    counts = confusion_matrix(y, pred, n_classes).astype(np.float64)
    s = counts.sum()
    t, p = counts.sum(axis=1), counts.sum(axis=0)
    denominator = (s * s - p @ p) * (s * s - t @ t)
    if denominator <= 0:
        return math.nan
    return float((np.trace(counts) * s - t @ p) / math.sqrt(denominator))


def top_label(y: npt.ArrayLike, probs: npt.ArrayLike) -> tuple[FloatArray, IntArray]:
    """Confidence of each decision and whether it was right: the top-label view.

    Returns:
        ``(confidence, correct)``: the largest probability of each case (n,), and 1 where
        its class is the true one, else 0 (n,).
    """
    labels, p = _probabilities(y, probs)
    confidence = p.max(axis=1) if p.size else np.zeros(0)
    return confidence, (predicted_class(p) == labels).astype(np.int64)


def expected_calibration_error(y: npt.ArrayLike, probs: npt.ArrayLike, n_bins: int = 10) -> float:
    """Top-label (confidence) expected calibration error over equal-width bins.

    The binary :func:`medimg.metrics.expected_calibration_error` applied to the
    confidence of each decision against whether it was right: within each bin of
    confidence, |mean confidence - accuracy|, weighted by the share of cases in the bin
    (Guo et al. 2017). For two classes it differs from the binary ECE of the positive
    class's probability: confidences fold onto [0.5, 1], so the bins are not the same
    and errors on either side of 0.5 are pooled.

    Args:
        y: class indices (n,).
        probs: class probabilities (n, K).
        n_bins: number of equal-width bins over [0, 1]; those below 1/K stay empty.

    Returns:
        The error in [0, 1], or NaN for no cases.
    """
    confidence, correct = top_label(y, probs)
    return metrics.expected_calibration_error(correct, confidence, n_bins)
