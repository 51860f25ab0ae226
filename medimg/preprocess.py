"""The preprocess stage: ingested volumes to training-ready, cached data and splits.

Reads ``data/interim/manifest.parquet`` and its volumes, runs the deterministic MONAI chain
of :mod:`medimg.transforms` once per volume and writes, under ``data/processed``:

- ``images/<key>.nii.gz`` (float32, scaled) and ``masks/<key>.nii.gz`` (uint8) on one RAS grid;
- ``manifest.parquet``: one row per volume with its split;
- ``splits.json``: patient-level folds and test set;
- ``qc.json``: data checks (no leakage, labels, balance per split, spacing, intensity
  ranges, image-mask alignment). A failed hard check stops the stage. Also the runtime
  the stage computed with (reproducible mode, the kernels' instruction set, threads).

Outputs are pure functions of inputs and params: running twice gives identical bytes; in
reproducible mode (``train.reproducible``, pinned by :func:`medimg.stages.pin_runtime`) on
any x86-64 CPU with AVX2.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd

from medimg.config import PreprocessParams, SplitParams
from medimg.data.manifest import read_classes, write_classes
from medimg.data.split import TEST, assign_all, split_summary
from medimg.errors import DataError
from medimg.io import atomic_dir, atomic_path, atomic_write_text
from medimg.transforms import IMAGE, LABEL, preprocessing_transforms
from medimg.typing import Progress
from medimg.volume import save_nifti

log = logging.getLogger(__name__)


def _process_one(
    row: dict[str, Any], interim: Path, out: Path, cfg: PreprocessParams
) -> dict[str, Any]:
    with_label = row["mask"] is not None
    item = {IMAGE: str(interim / row["volume"])}
    if with_label:
        item[LABEL] = str(interim / row["mask"])
    data = preprocessing_transforms(row["modality"], cfg, with_label)(item)
    image = data[IMAGE]
    affine = np.asarray(image.affine, dtype=np.float64)
    img = image[0].numpy().astype(np.float32)
    key = row["key"]
    save_nifti(img, affine, out / "images" / f"{key}.nii.gz")
    result = {
        "image": f"images/{key}.nii.gz",
        "mask": None,
        "lesion_voxels": None,
        "max_label": None,
        "label_voxels": None,
        "image_min": round(float(img.min()), 5),
        "image_max": round(float(img.max()), 5),
        "spacing": [round(float(v), 5) for v in np.sqrt((affine[:3, :3] ** 2).sum(axis=0))],
        "shape": list(img.shape),
    }
    if with_label:
        label = data[LABEL]
        if not np.allclose(np.asarray(label.affine), affine, atol=1e-4):
            raise DataError(f"volume {key}: mask and image left the preprocessing on two grids")
        # a label map (0 background, i for structure i): nearest neighbour kept it integer
        mask = np.rint(label[0].numpy()).clip(0, 255).astype(np.uint8)
        save_nifti(mask, affine, out / "masks" / f"{key}.nii.gz")
        result["mask"] = f"masks/{key}.nii.gz"
        result["lesion_voxels"] = int(np.count_nonzero(mask))
        result["max_label"] = int(mask.max())
        result["label_voxels"] = np.bincount(mask.ravel())[1:].tolist()  # per structure
    return result


def _select(manifest: pd.DataFrame, cfg: PreprocessParams) -> tuple[pd.DataFrame, dict[str, int]]:
    allowed = {"ok", "flagged"} if cfg.include_flagged else {"ok"}
    keep = manifest["status"].isin(allowed) & manifest["label"].notna()
    dropped = {
        "flagged": int((~manifest["status"].isin(allowed)).sum()),
        "unlabelled": int((manifest["status"].isin(allowed) & manifest["label"].isna()).sum()),
    }
    return manifest[keep].sort_values("key").reset_index(drop=True), dropped


def preprocess(
    cfg: PreprocessParams,
    split_cfg: SplitParams,
    interim: Path,
    out: Path,
    progress: Progress | None = None,
    runtime: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run the stage; see the module docstring. Returns the QC summary (``runtime``: what
    the process computes with, recorded in it: the pinning, kernels and threads).

    Raises:
        DataError: no usable volume, or a failed data check.
    """
    manifest_path = interim / "manifest.parquet"
    if not manifest_path.is_file():
        raise DataError(f"{manifest_path}: not found; run `medimg ingest` first")
    manifest, dropped = _select(pd.read_parquet(manifest_path), cfg)
    if manifest.empty:
        raise DataError(f"{manifest_path}: no labelled volume passed QC; see qc.html there")
    rows = cast("list[dict[str, Any]]", manifest.to_dict("records"))  # columns are str
    # a patient is positive when any of its series is
    patient_labels = {str(k): int(v) for k, v in manifest.groupby("patient")["label"].max().items()}
    splits = assign_all(patient_labels, split_cfg)
    classes = read_classes(interim)
    with atomic_dir(out) as stage:
        write_classes(classes, stage)
        (stage / "images").mkdir()
        (stage / "masks").mkdir()
        results = _process_all(rows, interim, stage, cfg, progress)
        table = _table(rows, results, splits)
        with atomic_path(stage / "manifest.parquet", suffix=".tmp.parquet") as tmp:
            table.to_parquet(tmp, index=False)
        series_per_patient = Counter(table["patient"])
        summary = split_summary(splits, patient_labels, series_per_patient)
        _write_splits(stage / "splits.json", split_cfg, splits, summary)
        qc = data_checks(table, splits, cfg, classes)
        qc["dropped"] = dropped
        qc["splits"] = summary
        if runtime is not None:
            qc["runtime"] = runtime
        atomic_write_text(stage / "qc.json", json.dumps(qc, indent=1, sort_keys=True))
        failed = [n for n, c in qc["checks"].items() if not c["passed"] and c.get("hard", True)]
        for name, check in qc["checks"].items():
            if not check["passed"] and not check.get("hard", True):
                log.warning("preprocess: soft data check %s failed: %s", name, check)
        if failed:
            raise DataError(f"preprocess: data checks failed: {', '.join(failed)}; see qc.json")
    log.info(
        "preprocess: %d volumes of %d patients; test %s",
        len(table),
        len(splits),
        summary.get(TEST, {}),
    )
    return qc


def _process_all(
    rows: list[dict[str, Any]],
    interim: Path,
    stage: Path,
    cfg: PreprocessParams,
    progress: Progress | None,
) -> list[dict[str, Any]]:
    """:func:`_process_one` over ``rows`` in threads; results in the order of ``rows``."""
    workers = cfg.workers or 2

    def one(row: dict[str, Any]) -> dict[str, Any]:
        return _process_one(row, interim, stage, cfg)

    results: list[dict[str, Any]] = []
    with ThreadPoolExecutor(workers) as pool:
        for res in pool.map(one, rows):
            results.append(res)
            if progress:
                progress(len(results), len(rows))
    return results


def _table(
    rows: list[dict[str, Any]], results: list[dict[str, Any]], splits: dict[str, str]
) -> pd.DataFrame:
    """The processed manifest: one row per volume, with its split and processing results."""
    return pd.DataFrame(
        [
            {
                "key": row["key"],
                "patient": row["patient"],
                "study": row["study"],
                "modality": row["modality"],
                "vendor": row["vendor"],
                "plane": row["plane"],
                "label": int(row["label"]),
                "split": splits[row["patient"]],
                **res,
            }
            for row, res in zip(rows, results, strict=True)
        ]
    )


def _write_splits(
    path: Path, split_cfg: SplitParams, splits: dict[str, str], summary: dict[str, Any]
) -> None:
    """``splits.json``: the split settings, every patient's split and the split summary."""
    atomic_write_text(
        path,
        json.dumps(
            {
                "salt": split_cfg.salt,
                "test_fraction": split_cfg.test_fraction,
                "n_folds": split_cfg.n_folds,
                "patients": splits,
                "summary": summary,
            },
            indent=1,
            sort_keys=True,
        ),
    )


def data_checks(
    table: pd.DataFrame,
    splits: dict[str, str],
    cfg: PreprocessParams,
    classes: tuple[str, ...] = ("0", "1"),
) -> dict[str, Any]:
    """Checks on the processed data; each says whether it passed and what it measured."""
    checks: dict[str, dict[str, Any]] = {}
    per_patient = table.groupby("patient")["split"].nunique()
    checks["no_patient_in_two_splits"] = {
        "passed": bool((per_patient == 1).all())
        and all(table["split"] == table["patient"].map(splits)),
        "patients_in_several": int((per_patient > 1).sum()),
    }
    labels = sorted(int(v) for v in table["label"].unique())
    checks["label_set"] = {
        "passed": set(labels) <= set(range(len(classes))),
        "labels": labels,
        "classes": list(classes),
    }
    spacing = np.array(table["spacing"].tolist(), dtype=float)
    checks["spacing"] = {
        "passed": bool(np.allclose(spacing, cfg.spacing_mm, atol=1e-3)),
        "min": spacing.min(axis=0).round(4).tolist(),
        "max": spacing.max(axis=0).round(4).tolist(),
    }
    shapes = {tuple(s) for s in table["shape"]}
    checks["shape"] = {"passed": shapes == {tuple(cfg.spatial_size)}, "shapes": sorted(shapes)}
    lo, hi = float(table["image_min"].min()), float(table["image_max"].max())
    bounded = cfg.mr_normalization == "percentile" or set(table["modality"]) == {"CT"}
    checks["intensity_range"] = {
        "passed": (lo >= 0.0 and hi <= 1.0) if bounded else bool(np.isfinite([lo, hi]).all()),
        "min": lo,
        "max": hi,
    }
    # binary masks of a binary diagnosis: a positive's series should show its lesion (of
    # several classes or structures, which class shows which structure is the user's to say)
    has_mask = table["mask"].notna() & (table["max_label"].fillna(0) <= 1) & (len(classes) == 2)
    positives_without_lesion = int(
        ((table["label"] == 1) & has_mask & (table["lesion_voxels"] == 0)).sum()
    )
    negatives_with_lesion = int(
        ((table["label"] == 0) & has_mask & (table["lesion_voxels"] > 0)).sum()
    )
    checks["masks_agree_with_labels"] = {  # soft: a lesion may lie outside a series' view
        "hard": False,
        "passed": positives_without_lesion == 0 and negatives_with_lesion == 0,
        "volumes_with_mask": int(has_mask.sum()),
        "positives_without_lesion": positives_without_lesion,
        "negatives_with_lesion": negatives_with_lesion,
    }
    return {"checks": checks, "n_volumes": len(table), "n_patients": len(splits)}
