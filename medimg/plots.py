"""Evaluation figures, each written as a PNG with a CSV of the plotted numbers beside it.

The CSV makes a figure checkable and re-plottable without re-running the evaluation.
Both files are written atomically. Figures have a fixed size and resolution and no
version string in the PNG metadata, so equal input gives equal bytes on one machine
(fonts and the matplotlib release can still change pixels across machines).

Figures are drawn on matplotlib's Agg canvas without pyplot: nothing needs a display,
no global backend is switched under a notebook or another caller, and no figure stays
registered after the call. matplotlib is imported inside the functions, so importing this
module stays cheap for code that never draws.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from medimg import multiclass
from medimg.io import atomic_path
from medimg.metrics import auroc, confusion_counts, reliability_table, roc_curve

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

FIGSIZE = (5.0, 4.0)  # inches
WIDE_FIGSIZE = (9.0, 4.0)
DPI = 100
MAX_TICK_LABELS = 40  # beyond this many cases the names overlap: leave them out


def _figure(figsize: tuple[float, float] = FIGSIZE, ncols: int = 1) -> tuple[Figure, Any]:
    """A new figure on an Agg canvas, and its axes (a 1 x ncols array)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=DPI)
    FigureCanvasAgg(fig)  # attaches itself: savefig renders with Agg, no display needed
    return fig, fig.subplots(1, ncols, squeeze=False)


def _write(fig: Figure, table: pd.DataFrame, out_dir: Path, name: str) -> list[Path]:
    """Save the figure and its table atomically, then free the figure."""
    png, csv = Path(out_dir) / f"{name}.png", Path(out_dir) / f"{name}.csv"
    try:
        fig.tight_layout()
        with atomic_path(png, suffix=".tmp.png") as tmp:
            fig.savefig(tmp, format="png", dpi=DPI, metadata={"Software": None})
    finally:
        fig.clear()  # not known to pyplot, so nothing to close: just drop the artists
    with atomic_path(csv, suffix=".tmp.csv") as tmp:
        table.to_csv(tmp, index=False)
    log.info("wrote %s and %s", png, csv)
    return [png, csv]


def plot_roc(y: npt.ArrayLike, p: npt.ArrayLike, out_dir: Path, name: str = "roc") -> list[Path]:
    """ROC curve with the AUROC in the legend.

    Args:
        y: 0/1 labels.
        p: scores.
        out_dir: folder for ``{name}.png`` and ``{name}.csv`` (fpr, tpr, threshold).
        name: file stem.

    Returns:
        The paths written.
    """
    fpr, tpr, thresholds = roc_curve(y, p)
    fig, axes = _figure()
    ax = axes[0, 0]
    ax.plot(fpr, tpr, label=f"AUROC = {auroc(y, p):.3f}")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8, label="chance")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", xlim=(0, 1), ylim=(0, 1.02))
    ax.set_aspect("equal")
    ax.legend(loc="lower right")
    table = pd.DataFrame({"fpr": fpr, "tpr": tpr, "threshold": thresholds})
    return _write(fig, table, out_dir, name)


def plot_calibration(
    y: npt.ArrayLike,
    p: npt.ArrayLike,
    out_dir: Path,
    name: str = "calibration",
    n_bins: int = 10,
) -> list[Path]:
    """Reliability diagram: fraction of positives against mean predicted probability.

    Args:
        y: 0/1 labels.
        p: predicted probabilities in [0, 1].
        out_dir: folder for ``{name}.png`` and ``{name}.csv`` (the reliability table).
        name: file stem.
        n_bins: number of equal-width bins.

    Returns:
        The paths written.
    """
    table = reliability_table(y, p, n_bins)
    full = table[table["count"] > 0]
    fig, axes = _figure()
    ax = axes[0, 0]
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8, label="perfect")
    ax.plot(full["mean_predicted"], full["fraction_positive"], marker="o", label="model")
    ax.set(xlabel="mean predicted probability", ylabel="fraction positive")
    ax.set(xlim=(-0.02, 1.02), ylim=(-0.02, 1.02))  # points on 0 and 1 stay visible
    ax.set_aspect("equal")
    ax.legend(loc="upper left")
    return _write(fig, table, out_dir, name)


def plot_confusion(
    y: npt.ArrayLike, p: npt.ArrayLike, threshold: float, out_dir: Path, name: str = "confusion"
) -> list[Path]:
    """2x2 confusion matrix of counts for predictions ``p >= threshold``.

    Args:
        y: 0/1 labels.
        p: scores.
        threshold: decision threshold (chosen on validation data).
        out_dir: folder for ``{name}.png`` and ``{name}.csv`` (actual, predicted, count).
        name: file stem.

    Returns:
        The paths written.
    """
    tn, fp, fn, tp = confusion_counts(y, p, threshold)
    counts = np.array([[tn, fp], [fn, tp]])
    fig, axes = _figure((4.0, 4.0))
    ax = axes[0, 0]
    _draw_counts(ax, counts, ["negative", "positive"])
    ax.set(xlabel="predicted", ylabel="actual", title=f"threshold {threshold:.3g}")
    table = pd.DataFrame(
        {"actual": [0, 0, 1, 1], "predicted": [0, 1, 0, 1], "count": counts.ravel()}
    )
    return _write(fig, table, out_dir, name)


def _draw_counts(ax: Any, counts: npt.NDArray[np.int64], names: list[str]) -> None:
    """A matrix of counts as shaded cells with the numbers written in, names on both axes."""
    ax.imshow(counts, cmap="Blues", vmin=0, vmax=max(int(counts.max()), 1))
    for (i, j), count in np.ndenumerate(counts):
        dark = count > counts.max() / 2
        ax.text(j, i, str(count), ha="center", va="center", color="white" if dark else "black")
    slanted = len(names) > 3  # long rows of names overlap unless slanted
    ax.set_xticks(range(len(names)), labels=names, rotation=45 if slanted else 0)
    ax.set_yticks(range(len(names)), labels=names)


def _names(class_names: Sequence[str], n_classes: int) -> list[str]:
    names = [str(c) for c in class_names]
    if len(names) != n_classes or len(set(names)) != n_classes:
        raise ValueError(f"need {n_classes} distinct class names, got {names}")
    return names


def plot_confusion_matrix(
    y: npt.ArrayLike,
    pred: npt.ArrayLike,
    class_names: Sequence[str],
    out_dir: Path,
    name: str = "confusion_matrix",
) -> list[Path]:
    """K x K confusion matrix of counts, for decisions already made (argmax for K classes).

    The binary :func:`plot_confusion` (``confusion.*``, a threshold on one score) stays
    as it is; this one takes class indices, so the two never share files.

    Args:
        y: true class indices (n,).
        pred: predicted class indices (n,).
        class_names: the K class names, in index order.
        out_dir: folder for ``{name}.png`` and ``{name}.csv`` (truth, predicted, count: one
            row per cell, zeros included, by class name).
        name: file stem.

    Returns:
        The paths written.
    """
    counts = multiclass.confusion_matrix(y, pred, len(class_names))
    names = _names(class_names, counts.shape[0])
    side = min(3.0 + 0.6 * len(names), 10.0)  # inches: room for the counts as classes grow
    fig, axes = _figure((side, side))
    _draw_counts(axes[0, 0], counts, names)
    axes[0, 0].set(xlabel="predicted", ylabel="truth", title=f"{int(counts.sum())} cases")
    k = len(names)
    cells = {"truth": np.repeat(names, k), "predicted": np.tile(names, k), "count": counts.ravel()}
    return _write(fig, pd.DataFrame(cells), out_dir, name)


def plot_roc_one_vs_rest(
    y: npt.ArrayLike,
    probs: npt.ArrayLike,
    class_names: Sequence[str],
    out_dir: Path,
    name: str = "roc_one_vs_rest",
) -> list[Path]:
    """One ROC curve per class, that class against the rest, with each AUROC.

    Args:
        y: true class indices (n,).
        probs: class probabilities (n, K).
        class_names: the K class names, in index order.
        out_dir: folder for ``{name}.png`` and ``{name}.csv`` (class, fpr, tpr; the rates
            of a class absent from ``y``, or in every case, are NaN and not drawn).
        name: file stem.

    Returns:
        The paths written.
    """
    areas = multiclass.one_vs_rest_auroc(y, probs)  # checks y and probs
    labels, p = np.asarray(y).ravel(), np.asarray(probs, dtype=np.float64)
    names = _names(class_names, len(areas))
    fig, axes = _figure()
    ax = axes[0, 0]
    parts = []
    for k, (label, area) in enumerate(zip(names, areas, strict=True)):
        fpr, tpr, _ = roc_curve(labels == k, p[:, k])
        ax.plot(fpr, tpr, label=f"{label}: AUROC = {area:.3f}")  # NaN: not drawn
        parts.append(pd.DataFrame({"class": label, "fpr": fpr, "tpr": tpr}))
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8, label="chance")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", xlim=(0, 1), ylim=(0, 1.02))
    ax.set(title=f"macro AUROC {multiclass.macro_auroc(labels, p):.3f}")
    ax.set_aspect("equal")
    ax.legend(loc="lower right", fontsize="small")
    return _write(fig, pd.concat(parts, ignore_index=True), out_dir, name)


def plot_calibration_multiclass(
    y: npt.ArrayLike,
    probs: npt.ArrayLike,
    out_dir: Path,
    name: str = "calibration_top_label",
    n_bins: int = 10,
) -> list[Path]:
    """Top-label reliability diagram: accuracy against confidence of the argmax class.

    The bins behind :func:`medimg.multiclass.expected_calibration_error`, whose value is
    in the title.

    Args:
        y: true class indices (n,).
        probs: class probabilities (n, K).
        out_dir: folder for ``{name}.png`` and ``{name}.csv`` (bin_lower, bin_upper,
            count, mean_confidence, accuracy; empty bins with NaN means).
        name: file stem.
        n_bins: number of equal-width bins over [0, 1].

    Returns:
        The paths written.
    """
    confidence, correct = multiclass.top_label(y, probs)
    table = reliability_table(correct, confidence, n_bins).rename(
        columns={"mean_predicted": "mean_confidence", "fraction_positive": "accuracy"}
    )
    ece = multiclass.expected_calibration_error(y, probs, n_bins)
    full = table[table["count"] > 0]
    fig, axes = _figure()
    ax = axes[0, 0]
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8, label="perfect")
    ax.plot(full["mean_confidence"], full["accuracy"], marker="o", label="model")
    ax.set(xlabel="confidence (top class)", ylabel="accuracy", title=f"ECE {ece:.3f}")
    ax.set(xlim=(-0.02, 1.02), ylim=(-0.02, 1.02))
    ax.set_aspect("equal")
    ax.legend(loc="upper left")
    return _write(fig, table, out_dir, name)


def plot_per_structure(
    cases: pd.DataFrame, out_dir: Path, name: str = "dice_per_structure", value: str = "dice"
) -> list[Path]:
    """Per-case Dice of each structure: a box and the cases' points, one column each.

    Args:
        cases: tidy frame, one row per case and structure, with columns ``key``,
            ``structure`` and ``value``; structures are drawn in order of first appearance
            (give them in the configured order).
        out_dir: folder for ``{name}.png`` and ``{name}.csv`` (key, structure, value; by
            structure, then worst first, NaN last).
        name: file stem.
        value: the metric column.

    Returns:
        The paths written.
    """
    missing = {"key", "structure", value} - set(cases.columns)
    if missing:
        raise ValueError(f"per-structure table lacks columns {sorted(missing)}")
    order = list(dict.fromkeys(cases["structure"]))
    rank = cases["structure"].map({s: i for i, s in enumerate(order)}).rename("_rank")
    table = pd.concat([cases[["key", "structure", value]], rank], axis=1)
    table = table.sort_values(["_rank", value, "key"], na_position="last", kind="mergesort")
    table = table.drop(columns="_rank").reset_index(drop=True)
    fig, axes = _figure(WIDE_FIGSIZE if len(order) > 4 else FIGSIZE)
    ax = axes[0, 0]
    for i, structure in enumerate(order):
        values = table.loc[table["structure"] == structure, value].to_numpy(dtype=np.float64)
        values = values[np.isfinite(values)]
        if values.size:
            ax.boxplot(values, positions=[i], widths=0.5, showfliers=False)
            offsets = np.linspace(-0.15, 0.15, values.size) if values.size > 1 else np.zeros(1)
            ax.plot(i + offsets, values, linestyle="none", marker=".", color="C0", alpha=0.6)
    ax.set_xticks(
        range(len(order)), labels=[str(s) for s in order], rotation=45 if len(order) > 4 else 0
    )
    n_cases = table["key"].nunique()
    ax.set(xlabel=f"structure ({n_cases} cases)", ylabel=value, xlim=(-0.6, len(order) - 0.4))
    return _write(fig, table, out_dir, name)


def plot_per_case(
    frame: pd.DataFrame, value: str, out_dir: Path, name: str, key: str = "series"
) -> list[Path]:
    """One bar per case, sorted by a per-case metric (e.g. Dice), worst first.

    Args:
        frame: one row per case.
        value: column to plot; NaN cases are kept and listed last.
        out_dir: folder for ``{name}.png`` and ``{name}.csv`` (key and value, as sorted).
        name: file stem.
        key: column naming the case.

    Returns:
        The paths written.
    """
    table = (
        frame[[key, value]]
        .sort_values([value, key], na_position="last", kind="mergesort")
        .reset_index(drop=True)
    )
    values = table[value].to_numpy(dtype=np.float64)
    fig, axes = _figure(WIDE_FIGSIZE)
    ax = axes[0, 0]
    positions = np.arange(len(table))
    ax.bar(positions, np.nan_to_num(values, nan=0.0), width=0.8)
    if np.any(np.isfinite(values)):
        ax.axhline(float(np.nanmedian(values)), color="grey", linestyle="--", linewidth=0.8)
    if len(table) <= MAX_TICK_LABELS:
        ax.set_xticks(positions, labels=[str(k) for k in table[key]], rotation=90, fontsize=6)
    else:
        ax.set_xticks([])
    ax.set(xlabel=f"{key} (sorted, {len(table)} cases)", ylabel=value)
    return _write(fig, table, out_dir, name)


def plot_training_curves(
    history: Sequence[dict[str, Any]], out_dir: Path, name: str = "training"
) -> list[Path]:
    """Every numeric column of the training history against the epoch.

    Losses (columns named ``*loss*``) go on the left panel, other metrics on the right,
    since their scales differ.

    Args:
        history: one dict per epoch, e.g. ``{"epoch": 1, "train_loss": 0.7, ...}``; rows
            without ``epoch`` are numbered from 1.
        out_dir: folder for ``{name}.png`` and ``{name}.csv`` (the history).
        name: file stem.

    Returns:
        The paths written.
    """
    table = pd.DataFrame(list(history))
    if table.empty:
        raise ValueError("empty training history")
    epoch = table["epoch"] if "epoch" in table else pd.Series(np.arange(1, len(table) + 1))
    numeric = [
        c
        for c in table.columns
        if c != "epoch"
        and pd.api.types.is_numeric_dtype(table[c])
        and not pd.api.types.is_bool_dtype(table[c])
    ]
    losses = [c for c in numeric if "loss" in c.lower()]
    others = [c for c in numeric if c not in losses]
    panels = [cols for cols in (losses, others) if cols]
    fig, axes = _figure(WIDE_FIGSIZE if len(panels) == 2 else FIGSIZE, max(len(panels), 1))
    for ax, cols in zip(axes[0], panels, strict=False):
        for c in cols:  # epochs without validation (val_every) are left out, not gaps
            kept = table[c].notna()
            ax.plot(epoch[kept], table[c][kept], marker=".", label=c)
        ax.set(xlabel="epoch", ylabel="loss" if cols is losses else "metric")
        ax.legend()
    return _write(fig, table, out_dir, name)
