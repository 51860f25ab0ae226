"""What a human reads: a PNG montage per predicted series, one HTML page per prediction
folder, and the model card beside each trained model.

Montages show slices of the series as acquired (rows down, columns across, as a DICOM
viewer shows them) with the predicted mask in red. The page lists every series with its
result, links to its files, and every series that was not predicted with the reason.
Both carry pseudonymous keys only. matplotlib is drawn on an Agg canvas, without pyplot.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from medimg.config import PredictParams, TaskTrainParams
from medimg.io import atomic_path, atomic_write_text
from medimg.versions import NO_LOCK

DPI = 100
TILE_INCHES = 2.0


def montage_slices(mask: npt.NDArray | None, n_slices: int, n: int) -> list[int]:
    """Slice indices to show: spread over the lesion's slices when there is a lesion,
    else over the whole stack."""
    if mask is not None and mask.any():
        hit = np.flatnonzero(mask.reshape(-1, mask.shape[2]).any(axis=0))
        lo, hi = int(hit.min()), int(hit.max())
    else:
        lo, hi = 0, n_slices - 1
    return sorted({round(float(v)) for v in np.linspace(lo, hi, min(n, hi - lo + 1))})


def _display(volume: npt.NDArray, modality: str, cfg: PredictParams) -> npt.NDArray:
    v = np.asarray(volume, dtype=np.float32)
    if modality == "CT":
        lo, hi = cfg.montage_window_hu
    else:
        lo, hi = (float(x) for x in np.percentile(v[::2, ::2, :], [1, 99]))
    return np.clip((v - lo) / max(hi - lo, 1e-6), 0.0, 1.0)


def _colour(label: int) -> tuple[float, float, float]:
    """Red for label 1 (a lesion alone), then matplotlib's tab10 colours."""
    if label == 1:
        return (1.0, 0.1, 0.1)
    from matplotlib import colormaps

    r, g, b, _ = colormaps["tab10"]((label - 2) % 10)
    return (r, g, b)


def write_montage(
    volume: npt.NDArray,
    mask: npt.NDArray | None,
    modality: str,
    cfg: PredictParams,
    path: Path,
) -> None:
    """PNG of ``cfg.montage_slices`` slices of ``volume`` (i, j, k), the label map's
    structures in colour (one structure: red)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    image = _display(volume, modality, cfg)
    ks = montage_slices(mask, volume.shape[2], cfg.montage_slices)
    cols = min(cfg.montage_columns, len(ks))
    rows = -(-len(ks) // cols)
    fig = Figure(figsize=(cols * TILE_INCHES, rows * TILE_INCHES), dpi=DPI)
    FigureCanvasAgg(fig)
    for n, k in enumerate(ks):
        ax = fig.add_subplot(rows, cols, n + 1)
        ax.imshow(image[:, :, k].T, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        if mask is not None and mask[:, :, k].any():
            overlay = np.zeros((*mask.shape[1::-1], 4), dtype=np.float32)
            plane = mask[:, :, k].T
            for value in np.unique(plane[plane > 0]):
                overlay[plane == value] = (*_colour(int(value)), 0.45)
            ax.imshow(overlay, interpolation="nearest")
        ax.set_title(f"slice {k + 1}/{volume.shape[2]}", fontsize=8)
        ax.axis("off")
    fig.tight_layout(pad=0.3)
    with atomic_path(path, suffix=".tmp.png") as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})


def _cell(value: Any) -> str:
    if value is None or value == "":
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def write_report(summary: dict[str, Any], path: Path) -> None:
    """``report.html``: the model, the counts, one row per series, the montages."""
    e = html.escape
    seconds = summary["seconds"]
    head = (
        f"<h1>medimg predictions</h1><p>Model <b>{e(summary['model'])}</b> version "
        f"<b>{e(str(summary['model_version']))}</b> ({e(summary['model_uri'])}), task "
        f"{e(summary['task'])}; de-identification: <b>{e(summary['deid'])}</b>.</p>"
        f"<p>{summary['n_predicted']} series predicted ({summary['n_positive']} positive), "
        f"{summary['n_rejected']} rejected, {summary['n_failed']} failed. Time: ingest "
        f"{seconds['ingest']:.1f} s, preprocessing {seconds['preprocess']:.1f} s, inference "
        f"{seconds['inference']:.1f} s, writing {seconds['writing']:.1f} s.</p>"
    )
    if summary["deid"] == "pacs":
        head += "<p><b>PACS mode: the DICOM SEG files carry the patient's identity.</b></p>"
    cols = ["key", "study", "modality", "plane", "status", "probability", "label"]
    cols += ["lesion_ml", "reason"]
    rows = []
    for s in summary["series"]:
        links = " ".join(
            f'<a href="{e(p)}">{e(kind)}</a>' for kind, p in sorted(s["outputs"].items())
        )
        cells = "".join(f"<td>{_cell(s.get(c))}</td>" for c in cols)
        rows.append(f'<tr class="{e(s["status"])}">{cells}<td>{links}</td></tr>')
    table = (
        "<table><tr>"
        + "".join(f"<th>{c}</th>" for c in [*cols, "files"])
        + "</tr>"
        + "".join(rows)
        + "</table>"
    )
    note = (
        "<p>Rejected series did not pass ingest's QC gate and were not predicted; the "
        "files set aside are listed in <code>ingest/quarantine.csv</code>, the checks in "
        "<code>ingest/qc.html</code>.</p>"
    )
    montages = "".join(
        f'<figure><img src="{e(s["outputs"]["montage"])}" alt="montage {e(s["key"])}">'
        f"<figcaption>{e(s['key'])}</figcaption></figure>"
        for s in summary["series"]
        if "montage" in s["outputs"]
    )
    style = (
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 6px;font-size:13px}"
        "tr.rejected,tr.failed{background:#fee}img{max-width:800px}"
    )
    page = (
        f'<!doctype html><html><head><meta charset="utf-8"><title>medimg predictions</title>'
        f"<style>{style}</style></head><body>{head}{table}{note}{montages}</body></html>\n"
    )
    atomic_write_text(path, page)


class _Task(Protocol):  # what the card says of a task (a medimg.tasks.TaskSpec)
    @property
    def name(self) -> str: ...
    @property
    def output(self) -> str: ...
    @property
    def architecture(self) -> str: ...
    @property
    def slices(self) -> str: ...
    @property
    def val_metric_card(self) -> str: ...
    @property
    def labels(self) -> tuple[str, ...]: ...
    @property
    def with_masks(self) -> bool: ...


class _Result(Protocol):  # what the card says of a run (a medimg.train.TrainResult)
    epochs_run: int
    best_epoch: int
    best_metric: float
    initialisation: str
    environment: dict[str, str]


def write_model_card(
    path: Path,
    task: _Task,
    cfg: TaskTrainParams,
    result: _Result,
    *,
    manifest: Path,
    fold: int,
    seed: int,
) -> None:
    """A short human-readable card: what the model is, what it saw, how to use it.

    Args:
        manifest: the processed manifest (splits, modalities, vendors).
        fold: the validation fold; seed: the training seed.
    """
    import pandas as pd

    table = pd.read_parquet(manifest)
    train = table[(table["split"] != "test") & (table["split"] != str(fold))]
    val = table[table["split"] == str(fold)]
    lines = [
        f"# medimg {task.name} model",
        "",
        f"**What it does.** {task.output}",
        "",
        f"**Outputs,** in order: {', '.join(f'`{n}`' for n in task.labels)}.",
        "",
        f"**Architecture.** {cfg.arch} ({cfg.spatial_dims}D, {task.architecture}"
        + (f", {task.slices}" if cfg.spatial_dims == 2 else "")
        + f"), width {cfg.width} (first-stage channels; 64 is the standard ResNet)"
        + (f", decoder {list(cfg.decoder_channels)}" if task.with_masks else "")
        + f", first-conv stride {cfg.conv1_stride}; initialised from `{cfg.pretrained}`"
        + f" ({result.initialisation}).",
        "",
        "**Data.** Preprocessed volumes (see the `preprocess` section of the resolved config):"
        f" {len(train)} training volumes of {train['patient'].nunique()} patients,"
        f" {len(val)} validation volumes of {val['patient'].nunique()} patients (fold {fold});"
        f" modalities {sorted(set(train['modality']))}, vendors {sorted(set(train['vendor']))}."
        " Test patients were never seen in training or model selection.",
        "",
        f"**Training.** {result.epochs_run} epochs (best {result.best_epoch}, validation"
        f" {task.val_metric_card} {result.best_metric:.3f}"
        + (f", validated every {cfg.val_every} epochs" if cfg.val_every > 1 else "")
        + f"), AdamW lr {cfg.lr},"
        f" batch {cfg.batch_size}, seed {seed}.",
        "",
        "**Environment.** " + _environment(result.environment),
        "",
        "**Evaluation.** Test-set metrics with 95 % patient-level bootstrap intervals are in"
        f" `metrics/{task.name}.json` and in the MLflow run.",
        "",
        "**Intended use.** Research and pipeline validation. Not a medical device; not for"
        " clinical decisions.",
        "",
        "**Limitations.** Trained on the data above only: other scanners, protocols, body"
        " regions or lesion types are out of distribution. Inputs must go through the same"
        " ingest and preprocessing (the config stored with the model).",
        "",
    ]
    atomic_write_text(path, "\n".join(lines))


def metric_rows(result: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """``metrics/<task>.json``'s metrics with intervals, flat: ``("", "auroc", m)`` for the
    headline ones, then ``("liver", "dice", m)`` per structure or class."""
    rows = [("", name, m) for name, m in (result.get("metrics") or {}).items() if m]
    for section in ("per_class", "per_structure"):
        for owner, block in (result.get(section) or {}).items():
            rows += [(owner, k, m) for k, m in block.items() if isinstance(m, dict) and m]
    return rows


class _History(_Result, Protocol):
    history: list[dict[str, Any]]
    stopped_early: bool


def _finite_or_none(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def write_training_summary(path: Path, val_metric: str, result: _History) -> None:
    """``metrics/<task>_train.json``: the best epoch, its validation metric, the history."""
    summary = {
        "best_epoch": result.best_epoch,
        "best_val_metric": round(result.best_metric, 6),
        "val_metric": val_metric,
        "epochs_run": result.epochs_run,
        "stopped_early": result.stopped_early,
        # wall-clock seconds vary run to run: kept out of the tracked metrics file
        # and an epoch that was not validated (val_every) has null, not NaN, val_* values
        "history": [
            {k: _finite_or_none(v) for k, v in h.items() if k != "seconds"} for h in result.history
        ],
    }
    atomic_write_text(path, json.dumps(summary, indent=1, sort_keys=True))


def _environment(env: dict[str, str]) -> str:
    """One sentence of what decided the run's numbers besides its inputs."""
    if not env:
        return "not recorded."
    mode = (
        "reproducible mode (instruction sets, threads and algorithms pinned: the same"
        " numbers on any x86-64 CPU with AVX2)"
        if env.get("reproducible") == "true"
        else "not pinned (numbers may differ on another CPU)"
    )
    versions = ", ".join(
        f"{k.split('.', 1)[1]} {v}" for k, v in env.items() if k.startswith("version.")
    )
    # pinned, the machine decides nothing: left out, so that the card (a DVC output) is
    # the same file on every machine, as the weights are
    machine = "" if env.get("reproducible") == "true" else f", {env.get('machine', '?')}"
    return (
        f"{mode}; ran {env.get('cpu_capability', '?')} kernels on {env.get('threads', '?')}"
        f" threads{machine}; {versions}. {_lock(env)}"
    )


def _lock(env: dict[str, str]) -> str:
    """What the card says of the lock the environment was installed from."""
    digest, drift = env.get("lock.sha256", NO_LOCK), env.get("lock.drift", "")
    if digest == NO_LOCK:
        return "Not installed from a lock (docs/installation.md)."
    same = "every locked package at its locked version" if drift == "none" else f"except {drift}"
    return f"Installed from the lock with sha256 `{digest}`, {same}."
