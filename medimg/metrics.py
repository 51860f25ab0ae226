"""Evaluation metrics: binary classification, calibration, segmentation overlap and
surface distance, per structure of a label map (N-class diagnosis: medimg.multiclass).

Pure numpy (plus scipy.ndimage for surfaces): no plotting, no I/O. Undefined values
(AUROC with a single class, a surface distance to an empty mask) are NaN rather than an
exception, so a metric table over many cases can be built without special cases and the
gaps stay visible.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
from scipy import ndimage

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]


def _scores(y: npt.ArrayLike, p: npt.ArrayLike) -> tuple[IntArray, FloatArray]:
    """Labels as 0/1 integers and scores as floats, checked to pair up."""
    labels = np.asarray(y).ravel()
    scores = np.asarray(p, dtype=np.float64).ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"{labels.size} labels but {scores.size} scores")
    if not np.all((labels == 0) | (labels == 1)):
        raise ValueError("labels must be 0 or 1")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores must be finite")
    return labels.astype(np.int64), scores


# --- classification --------------------------------------------------------------------


def _roc_counts(labels: IntArray, scores: FloatArray) -> tuple[IntArray, IntArray, FloatArray]:
    """False and true positive counts at each distinct score, highest score first."""
    order = np.argsort(scores, kind="mergesort")[::-1]
    scores, labels = scores[order], labels[order]
    # A threshold sits at the last row of each run of equal scores: tied cases flip
    # together, which draws the diagonal segment that gives ties half credit.
    last = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]
    tps = np.cumsum(labels)[last]
    fps = last + 1 - tps
    return fps, tps, scores[last]


def roc_curve(
    y: npt.ArrayLike, p: npt.ArrayLike, drop_intermediate: bool = True
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Receiver operating characteristic, as ``sklearn.metrics.roc_curve`` computes it.

    Args:
        y: 0/1 labels.
        p: scores or probabilities; a case is called positive when ``p >= threshold``.
        drop_intermediate: leave out thresholds on straight segments of the curve (they
            change nothing in the plot or the area).

    Returns:
        False positive rates, true positive rates and the decreasing thresholds. The first
        threshold is ``inf`` (nothing called positive), so the curve starts at (0, 0). The
        rates of an absent class are NaN.
    """
    labels, scores = _scores(y, p)
    if labels.size == 0:
        return np.zeros(1), np.zeros(1), np.full(1, np.inf)
    fps, tps, thresholds = _roc_counts(labels, scores)
    if drop_intermediate and fps.size > 2:
        # keep corners only: points where the second difference is non-zero
        corner = np.r_[True, (np.diff(fps, 2) != 0) | (np.diff(tps, 2) != 0), True]
        fps, tps, thresholds = fps[corner], tps[corner], thresholds[corner]
    fps, tps = np.r_[0, fps], np.r_[0, tps]
    thresholds = np.r_[np.inf, thresholds]
    n_neg, n_pos = fps[-1], tps[-1]
    fpr = fps / n_neg if n_neg > 0 else np.full(fps.size, np.nan)
    tpr = tps / n_pos if n_pos > 0 else np.full(tps.size, np.nan)
    return fpr.astype(np.float64), tpr.astype(np.float64), thresholds


def auroc(y: npt.ArrayLike, p: npt.ArrayLike) -> float:
    """Area under the ROC curve by the trapezoid rule; tied scores count half.

    Returns:
        The area, or NaN when only one class is present.
    """
    labels, scores = _scores(y, p)
    n_pos = int(labels.sum())
    if n_pos == 0 or n_pos == labels.size:
        return math.nan
    fps, tps, _ = _roc_counts(labels, scores)
    fpr = np.r_[0, fps] / fps[-1]
    tpr = np.r_[0, tps] / tps[-1]
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1])) / 2)


def youden_threshold(y: npt.ArrayLike, p: npt.ArrayLike) -> float:
    """Threshold that maximises Youden's J = sensitivity + specificity - 1.

    Choose it on validation data, then apply it unchanged to the test set. Among equally
    good thresholds the highest is taken. The threshold is placed halfway between the
    lowest score called positive and the next lower score, so it classifies the given
    data exactly as the optimal cut does while leaving a margin on both sides.

    Returns:
        The threshold (use as ``p >= threshold``), or NaN when only one class is present.
    """
    labels, scores = _scores(y, p)
    n_pos = int(labels.sum())
    if n_pos == 0 or n_pos == labels.size:
        return math.nan
    fps, tps, thresholds = _roc_counts(labels, scores)
    j = tps / n_pos - fps / (labels.size - n_pos)
    best = int(np.argmax(j))  # first maximum: the highest threshold
    cut = float(thresholds[best])
    if best + 1 < thresholds.size:
        below = float(thresholds[best + 1])
        middle = (cut + below) / 2
        if below < middle <= cut:  # adjacent floats can round onto ``below``
            return middle
    return cut


def confusion_counts(
    y: npt.ArrayLike, p: npt.ArrayLike, threshold: float
) -> tuple[int, int, int, int]:
    """Confusion matrix counts ``(tn, fp, fn, tp)`` for predictions ``p >= threshold``."""
    labels, scores = _scores(y, p)
    tn, fp, fn, tp = np.bincount(2 * labels + (scores >= threshold), minlength=4).tolist()
    return tn, fp, fn, tp


def sensitivity_specificity(
    y: npt.ArrayLike, p: npt.ArrayLike, threshold: float
) -> tuple[float, float]:
    """Sensitivity (true positive rate) and specificity (true negative rate).

    Args:
        y: 0/1 labels.
        p: scores; a case is called positive when ``p >= threshold``.
        threshold: the decision threshold.

    Returns:
        ``(sensitivity, specificity)``; each is NaN when its class is absent.
    """
    tn, fp, fn, tp = confusion_counts(y, p, threshold)
    sens = tp / (tp + fn) if tp + fn else math.nan
    spec = tn / (tn + fp) if tn + fp else math.nan
    return sens, spec


def balanced_accuracy(y: npt.ArrayLike, p: npt.ArrayLike, threshold: float) -> float:
    """Mean of sensitivity and specificity; NaN when a class is absent."""
    sens, spec = sensitivity_specificity(y, p, threshold)
    return (sens + spec) / 2


# --- calibration -----------------------------------------------------------------------


def _bins(y: npt.ArrayLike, p: npt.ArrayLike, n_bins: int) -> tuple[IntArray, ...]:
    labels, probs = _scores(y, p)
    if n_bins < 1:
        raise ValueError("n_bins must be at least 1")
    if np.any((probs < 0) | (probs > 1)):
        raise ValueError("probabilities must lie in [0, 1]")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # Bins are (lower, upper], the first also holding 0: sklearn's calibration_curve.
    index = np.searchsorted(edges[1:-1], probs, side="left")
    count = np.bincount(index, minlength=n_bins)
    return labels, index, count


def reliability_table(y: npt.ArrayLike, p: npt.ArrayLike, n_bins: int = 10) -> pd.DataFrame:
    """Per-bin mean predicted probability and observed fraction of positives.

    Args:
        y: 0/1 labels.
        p: predicted probabilities of the positive class, in [0, 1].
        n_bins: number of equal-width bins over [0, 1].

    Returns:
        One row per bin (empty bins included, with NaN means): bin_lower, bin_upper,
        count, mean_predicted, fraction_positive.
    """
    labels, index, count = _bins(y, p, n_bins)
    probs = np.asarray(p, dtype=np.float64).ravel()
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_predicted = np.bincount(index, weights=probs, minlength=n_bins) / count
        fraction = np.bincount(index, weights=labels, minlength=n_bins) / count
    return pd.DataFrame(
        {
            "bin_lower": edges[:-1],
            "bin_upper": edges[1:],
            "count": count,
            "mean_predicted": mean_predicted,
            "fraction_positive": fraction,
        }
    )


def expected_calibration_error(y: npt.ArrayLike, p: npt.ArrayLike, n_bins: int = 10) -> float:
    """Expected calibration error over equal-width bins: the mean over bins of ``|mean
    predicted - fraction positive|``, weighted by the share of cases in each bin.

    Returns:
        The error in [0, 1], or NaN for no cases.
    """
    labels, index, count = _bins(y, p, n_bins)  # reliability_table's bins, without a frame
    n, full = int(count.sum()), count > 0
    if n == 0:
        return math.nan
    probs = np.asarray(p, dtype=np.float64).ravel()
    mean_predicted = np.bincount(index, weights=probs, minlength=n_bins)[full] / count[full]
    fraction = np.bincount(index, weights=labels, minlength=n_bins)[full] / count[full]
    return float(np.sum(count[full] * np.abs(mean_predicted - fraction)) / n)


# --- segmentation ----------------------------------------------------------------------


def _masks(pred: npt.ArrayLike, truth: npt.ArrayLike) -> tuple[BoolArray, BoolArray]:
    a = np.asarray(pred).astype(bool)
    b = np.asarray(truth).astype(bool)
    if a.shape != b.shape:
        raise ValueError(f"prediction {a.shape} and truth {b.shape} differ in shape")
    return a, b


def dice(pred: npt.ArrayLike, truth: npt.ArrayLike) -> float:
    """Dice overlap ``2 |A & B| / (|A| + |B|)``.

    Returns:
        1.0 when both masks are empty (nothing to find, nothing found), 0.0 when exactly
        one is empty.
    """
    a, b = _masks(pred, truth)
    total = int(a.sum()) + int(b.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.sum(a & b)) / total


def _surface(mask: BoolArray) -> BoolArray:
    """Voxels of the mask with a face neighbour outside it (or on the array border)."""
    return mask & ~ndimage.binary_erosion(mask)


def _sampling(spacing: Sequence[float], ndim: int) -> list[float]:
    if len(spacing) != ndim:
        raise ValueError(f"{len(spacing)} spacings for a {ndim}-D mask")
    return [float(s) for s in spacing]


def _surface_scores(
    a: BoolArray, b: BoolArray, sampling: list[float], tolerance_mm: float
) -> tuple[float, float, float]:
    """``(hd95, msd, nsd)`` of two masks: (0, 0, 1) if both are empty, (NaN, NaN, 0) if one is."""
    if not (math.isfinite(tolerance_mm) and tolerance_mm >= 0):
        raise ValueError(f"tolerance must be a finite distance >= 0 mm, not {tolerance_mm}")
    empty_a, empty_b = not a.any(), not b.any()
    if empty_a and empty_b:
        return 0.0, 0.0, 1.0
    if empty_a or empty_b:
        return math.nan, math.nan, 0.0
    # the bounding box of both masks holds every nearest surface voxel; erosion is unchanged
    both = np.argwhere(a | b)
    box = tuple(slice(int(s), int(e) + 1) for s, e in zip(both.min(0), both.max(0), strict=True))
    surf_a, surf_b = _surface(a[box]), _surface(b[box])
    to_b = ndimage.distance_transform_edt(~surf_b, sampling=sampling)[surf_a]
    to_a = ndimage.distance_transform_edt(~surf_a, sampling=sampling)[surf_b]
    pooled = np.concatenate([to_b, to_a])
    within = int(np.count_nonzero(pooled <= tolerance_mm))
    return float(np.percentile(pooled, 95)), float(pooled.mean()), within / pooled.size


def surface_distances(
    pred: npt.ArrayLike, truth: npt.ArrayLike, spacing: Sequence[float]
) -> tuple[float, float]:
    """Symmetric 95th-percentile Hausdorff distance and mean surface distance, in mm.

    A surface is the mask minus its erosion. The distances from every surface voxel of
    each mask to the nearest surface voxel of the other are pooled; HD95 is their 95th
    percentile, MSD their mean. (MONAI instead takes the larger of the two directed
    percentiles; the pooled form weights both surfaces by their size.)

    Args:
        pred: predicted mask.
        truth: reference mask of the same shape.
        spacing: voxel size along each axis, in mm.

    Returns:
        ``(hd95, msd)``: both 0.0 when both masks are empty, NaN when exactly one is.
    """
    a, b = _masks(pred, truth)
    hd95, msd, _ = _surface_scores(a, b, _sampling(spacing, a.ndim), 0.0)
    return hd95, msd


def normalised_surface_dice(
    pred: npt.ArrayLike, truth: npt.ArrayLike, spacing: Sequence[float], tolerance_mm: float
) -> float:
    """Normalised surface Dice (Nikolov et al. 2021): the share of both surfaces within
    ``tolerance_mm`` of the other.

    Surfaces and distances are those of :func:`surface_distances`, each surface voxel
    counting once: MONAI's ``compute_surface_dice`` without sub-voxels.

    Args:
        pred: predicted mask.
        truth: reference mask of the same shape.
        spacing: voxel size along each axis, in mm.
        tolerance_mm: largest accepted distance (inclusive), in mm.

    Returns:
        The fraction in [0, 1]; 1.0 when both masks are empty (MONAI: NaN), 0.0 when
        exactly one is.
    """
    a, b = _masks(pred, truth)
    return _surface_scores(a, b, _sampling(spacing, a.ndim), tolerance_mm)[2]


def _label_map(labels: npt.ArrayLike, n_structures: int, what: str) -> IntArray:
    arr = np.asarray(labels)
    ints = arr if np.issubdtype(arr.dtype, np.integer) else arr.astype(np.int64)  # NIfTI floats
    low, high = (int(ints.min()), int(ints.max())) if arr.size else (0, 0)
    if not (np.array_equal(ints, arr) and 0 <= low <= high <= n_structures):
        raise ValueError(f"the {what} label map must hold integers 0..{n_structures} only")
    return ints


def structure_scores(
    pred_labels: npt.ArrayLike,
    truth_labels: npt.ArrayLike,
    n_structures: int,
    spacing: Sequence[float],
    tolerance_mm: float,
) -> list[dict[str, Any]]:
    """Dice, HD95, MSD and NSD of each structure of two label maps.

    Each structure is scored in the bounding box of its voxels in either map, with one
    distance transform per surface: a small structure in a large volume costs little.

    Args:
        pred_labels: predicted label map, integers 0 (background) to ``n_structures``.
        truth_labels: reference label map of the same shape.
        n_structures: number of structures K; a label above it is an error.
        spacing: voxel size along each axis, in mm.
        tolerance_mm: NSD tolerance, in mm.

    Returns:
        One dict per structure 1..K, in order: ``structure`` (its label), ``dice``,
        ``hd95``, ``msd``, ``nsd`` (as :func:`dice`, :func:`surface_distances` and
        :func:`normalised_surface_dice` give them: HD95 and MSD are NaN when exactly one
        mask is empty), ``present`` (the truth has the structure), ``predicted_voxels``.
    """
    pred = _label_map(pred_labels, n_structures, "predicted")
    truth = _label_map(truth_labels, n_structures, "reference")
    if pred.shape != truth.shape:
        raise ValueError(f"prediction {pred.shape} and truth {truth.shape} differ in shape")
    sampling = _sampling(spacing, pred.ndim)
    # one pass over each map finds every structure's bounding box
    objects = [ndimage.find_objects(m, max_label=n_structures) for m in (pred, truth)]
    rows = []
    for k, found in enumerate(zip(*objects, strict=True), start=1):
        boxes = [b for b in found if b is not None] or [(slice(0, 0),) * pred.ndim]
        box = tuple(
            slice(min(s.start for s in d), max(s.stop for s in d)) for d in zip(*boxes, strict=True)
        )
        a, b = pred[box] == k, truth[box] == k
        hd95, msd, nsd = _surface_scores(a, b, sampling, tolerance_mm)
        rows.append(
            {"structure": k, "dice": dice(a, b), "hd95": hd95, "msd": msd, "nsd": nsd}
            | {"present": found[1] is not None, "predicted_voxels": int(a.sum())}
        )
    return rows


def __getattr__(name: str) -> Any:
    """Names that moved to :mod:`medimg.stats` (before medimg 0.2 they lived here)."""
    if name in ("bootstrap_ci", "breakdown"):
        import warnings

        from medimg import stats

        warnings.warn(
            f"medimg.metrics.{name} moved to medimg.stats.{name}", DeprecationWarning, stacklevel=2
        )
        return getattr(stats, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
