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
    ax.imshow(counts, cmap="Blues", vmin=0, vmax=max(int(counts.max()), 1))
    for (i, j), count in np.ndenumerate(counts):
        dark = count > counts.max() / 2
        ax.text(j, i, str(count), ha="center", va="center", color="white" if dark else "black")
    ax.set_xticks([0, 1], labels=["negative", "positive"])
    ax.set_yticks([0, 1], labels=["negative", "positive"])
    ax.set(xlabel="predicted", ylabel="actual", title=f"threshold {threshold:.3g}")
    table = pd.DataFrame(
        {"actual": [0, 0, 1, 1], "predicted": [0, 1, 0, 1], "count": counts.ravel()}
    )
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
        for c in cols:
            ax.plot(epoch, table[c], marker=".", label=c)
        ax.set(xlabel="epoch", ylabel="loss" if cols is losses else "metric")
        ax.legend()
    return _write(fig, table, out_dir, name)
