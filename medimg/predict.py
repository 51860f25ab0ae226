"""The predict stage: a folder of new DICOM studies to results a PACS viewer can show.

For every series in the folder:

1. **ingest** with the training rules (:mod:`medimg.ingest`: the same grouping, geometry
   checks, QC gate and de-identified volumes); series that fail the gate are reported
   with their reason, never predicted;
2. **preprocess** with the transforms stored with the model: the ``preprocess`` section
   of the model's logged ``model_config.json``, not today's ``params.yaml``;
3. **infer**: sliding windows of the model's patch size (segmentation), or the whole
   volume (classification);
4. **invert**: the probability map goes back from the model's grid to the series' own
   grid (the ingested volume: RAS NIfTI with the series' affine) by world coordinates,
   with nibabel's resampling (linear on probabilities, then 0.5). Every spatial step of
   preprocessing (orientation, spacing, crop, pad) is recorded in the MetaTensor's
   affine, so this one resampling undoes all of them, whatever the orientation;
5. **write** under ``output/<key>/``: ``mask.nii.gz`` (the label map on the series' grid:
   each channel's probability resampled, then the most probable label), ``seg.dcm``
   (DICOM SEG, one segment per structure with its name and codes, frames matched to
   source instances by position), for a classifier ``sr.dcm`` (DICOM SR, TID 1500: the
   predicted class and each class's probability, :mod:`medimg.dicom.sr`), and
   ``montage.png``; then ``predictions.csv`` (a probability per class and the predicted
   class, or a volume per structure) and ``report.html`` for the folder.

De-identification (``predict.deid``):

- ``deidentified`` (default): ingest also exports de-identified copies of the source
  images (``output/ingest/dicom/<key>/``, pseudonymous patient, remapped UIDs), and the
  SEG references those copies. Nothing in ``output`` then names the patient; the SEG and
  its copies open together in any viewer.
- ``pacs``: the SEG references the original instances and so carries the patient's
  name, ID and study (highdicom copies them from the sources), which a hospital PACS
  needs to file it next to the images. **These SEG files are PHI**; file names, CSV,
  report and logs still use only pseudonymous keys.

Output file names are the pseudonymous series key of ingest. Every file is written
atomically; a series that fails is reported with its reason and the others go on.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import numpy.typing as npt

from medimg.config import IngestParams, PredictParams, PreprocessParams
from medimg.decode import diagnosis, label_map
from medimg.decode import to_original_grid as to_original_grid
from medimg.errors import MedImgError
from medimg.inbox import (  # noqa: F401  (PredictPaths, Inbox, qc_gate, ...: their old home)
    Inbox,
    PredictPaths,
    SeriesResult,
    ingest_inbox,
    ingest_rules,
    qc_gate,
    rejected_series,
    source_files,
)
from medimg.io import atomic_write_text
from medimg.outputs import segmenter_volumes, write_seg, write_sr
from medimg.tasks import get_task
from medimg.typing import Progress
from medimg.volume import save_nifti

log = logging.getLogger(__name__)

PREDICTIONS_COLUMNS = [
    "key",
    "study",
    "modality",
    "plane",
    "status",
    "reason",
    "probability",
    "label",
    "predicted",
    "threshold",
    "lesion_voxels",
    "lesion_ml",
    "model",
    "model_version",
]


# ----------------------------------------------------------------------------- the model


@dataclass
class Predictor:
    """A registered model ready to predict, with what was stored beside it."""

    uri: str
    task: str  # classify | segment
    module: Any  # torch.nn.Module, eval mode, on ``device``
    preprocess: PreprocessParams  # the transforms the model was trained with
    patch_size: tuple[int, ...]  # sliding-window size, voxels
    name: str  # registered name (or the URI for runs:/ models)
    version: str  # registered version (or the run id)
    run_id: str
    threshold: float | None = None  # binary classification cut, from the model's
    # evaluation; None for a task that has none (N classes: argmax; segmentation)
    device: Any = None  # torch.device
    spec: Any = None  # the TaskSpec with the model's outputs (classes or structures)


def load_predictor(uri: str, client: Any, device: str = "auto") -> Predictor:
    """Load a model logged by :func:`medimg.tracking.log_model`, by URI, through MLflow's
    pyfunc path, with its stored config (task, patch size, preprocessing) and, for a
    classifier, the decision threshold chosen at evaluation.

    Args:
        uri: ``models:/name@alias``, ``models:/name/3`` or ``runs:/<id>/model``.
        client: the ``MlflowClient`` of :func:`medimg.tracking.configure`.
        device: auto | cpu | cuda.

    Raises:
        ConfigError: no such model, or it is not a medimg model.
    """
    from medimg import tracking
    from medimg.runtime import resolve_device

    bundle = tracking.load_bundle(uri)
    found = tracking.registered_version(client, uri)
    meta, run_id = bundle.meta, bundle.run_id
    name, version = found if found else (uri, run_id)
    spec = get_task(str(meta["task"])).from_description(meta.get("outputs", {}))
    task = spec.name
    threshold = None
    if spec.has_threshold:
        threshold = tracking.decision_threshold(client, run_id) if run_id else 0.5
    dev = resolve_device(device)
    module = bundle.module.to(dev).eval()
    return Predictor(
        uri=uri,
        task=task,
        module=module,
        preprocess=PreprocessParams(**meta["preprocess"]),
        patch_size=tuple(int(v) for v in meta["patch_size"]),
        name=name,
        version=version,
        run_id=run_id,
        threshold=threshold,
        device=dev,
        spec=spec,
    )


# ----------------------------------------------------------------------------- one series


def preprocess_volume(path: Path, modality: str, cfg: PreprocessParams) -> Any:
    """The ingested volume through the model's deterministic chain: a MetaTensor
    (1, R, A, S) whose ``affine`` maps the model's grid to RAS mm."""
    from medimg.transforms import IMAGE, preprocessing_transforms

    return preprocessing_transforms(modality, cfg, with_label=False)({IMAGE: str(path)})[IMAGE]


def _model(predictor: Predictor) -> tuple[str, str]:
    """The model's name and version as DICOM results name them."""
    name = predictor.name if predictor.name != predictor.uri else "medimg-model"
    return name, str(predictor.version)


def _spec(predictor: Predictor) -> Any:
    return predictor.spec if predictor.spec is not None else get_task(predictor.task)


def infer(predictor: Predictor, image: Any) -> npt.NDArray[np.float32] | float:
    """Probabilities on the model's grid: per voxel (segment: (R, A, S) of one structure,
    (K + 1, R, A, S) of several), or of the volume (classify: a float for two classes,
    (K,) for more)."""
    import torch

    x = torch.as_tensor(np.asarray(image, dtype=np.float32))[None]  # (1, 1, R, A, S)
    with torch.no_grad():
        out = _spec(predictor).predict(predictor.module, x, predictor.patch_size, predictor.device)
    if out[0].dim() == 0:
        return float(out[0])
    return np.asarray(out[0].numpy(), dtype=np.float32)


def predict_series(
    record: dict[str, Any],
    sources: list[Path],
    predictor: Predictor,
    cfg: PredictParams,
    work: Path,
    out: Path,
    volumes: dict[str, dict[str, float]] | None = None,
) -> SeriesResult:
    """Predict one ingested series and write its outputs under ``out/<key>/``.

    Args:
        record: its ingest record (key, modality, volume path...).
        sources: the DICOM files the SEG references (de-identified copies or originals).
        work: the ingest output folder (``record["volume"]`` is relative to it).
        volumes: a segmenter's volumes per series key (:func:`segmenter_volumes` of
            ``predict.volumes_from``, read once per run), for a classifier's SR.

    Never raises for a bad series: the result says ``failed`` and why.
    """
    key = record["key"]
    res = SeriesResult(
        key=key,
        study=str(record.get("study", "")),
        modality=str(record.get("modality", "")),
        plane=str(record.get("plane", "")),
        n_files=len(sources),
    )
    folder = out / key
    try:
        t0 = time.perf_counter()
        original: Any = nib.load(work / record["volume"])
        affine = np.asarray(original.affine, dtype=np.float64)
        image = preprocess_volume(work / record["volume"], res.modality, predictor.preprocess)
        t1 = time.perf_counter()
        result = infer(predictor, image)
        t2 = time.perf_counter()
        res.seconds = {"preprocess": t1 - t0, "inference": t2 - t1}
        volume = np.asarray(original.dataobj)
        mask = None
        spec = _spec(predictor)
        if not spec.with_masks:
            diagnosis(res, result, spec.labels, predictor.threshold)
            measured = (volumes or {}).get(key)
            write_sr(sources, _model(predictor), spec, folder / "sr.dcm", res, measured)
        else:
            model_affine = np.asarray(image.affine, dtype=np.float64)
            mask = label_map(spec, result, model_affine, volume.shape, affine, res)
            save_nifti(mask, affine, folder / "mask.nii.gz")
            res.outputs["mask"] = f"{key}/mask.nii.gz"
            seg = folder / "seg.dcm"
            write_seg(mask, affine, sources, _model(predictor), spec, cfg, seg, res)
        from medimg.report import write_montage

        write_montage(volume, mask, res.modality, cfg, folder / "montage.png")
        res.outputs["montage"] = f"{key}/montage.png"
        res.seconds["writing"] = time.perf_counter() - t2
    except (MedImgError, ValueError, RuntimeError, OSError) as e:
        res.status, res.reason = "failed", f"{type(e).__name__}: {e}"
        log.error("series %s: prediction failed: %s", key, res.reason)
    return res


def predict(
    cfg: PredictParams,
    ingest_cfg: IngestParams,
    predictor: Predictor,
    input_dir: Path,
    out: Path,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Run the stage (see the module docstring) in this process. Returns the summary
    that ``summary.json`` and ``report.html`` show.

    Raises:
        DicomError: the input folder does not exist.
    """
    t0 = time.perf_counter()
    inbox = ingest_inbox(cfg, ingest_cfg, predictor.preprocess, PredictPaths(input_dir, out))
    results = list(inbox.rejected)
    volumes = segmenter_volumes(cfg.volumes_from)
    for n, (record, sources) in enumerate(inbox.items, start=1):
        results.append(
            predict_series(record, sources, predictor, cfg, inbox.paths.ingest.out, out, volumes)
        )
        if progress:
            progress(n, len(inbox.items))
    total = time.perf_counter() - t0
    return finalize_predict(cfg, predictor, inbox.paths, results, inbox.seconds, total)


def finalize_predict(
    cfg: PredictParams,
    predictor: Predictor,
    paths: PredictPaths,
    results: list[SeriesResult],
    ingest_s: float,
    total_s: float,
) -> dict[str, Any]:
    """Write ``predictions.csv``, ``summary.json`` and ``report.html``; return the summary."""
    from medimg.report import write_report

    results = sorted(results, key=lambda r: (r.status != "predicted", r.key))
    predicted = [r for r in results if r.status == "predicted"]
    summary = {
        "model": predictor.name,
        "model_uri": predictor.uri,
        "model_version": predictor.version,
        "task": predictor.task,
        "threshold": predictor.threshold,
        "deid": cfg.deid,
        "n_series": len([r for r in results if r.key != "(files)"]),
        "n_predicted": len(predicted),
        "n_rejected": sum(r.status == "rejected" for r in results),
        "n_failed": sum(r.status == "failed" for r in results),
        "n_positive": sum(r.label == 1 for r in predicted),
        "seconds": {
            "ingest": round(ingest_s, 3),
            "total": round(total_s, 3),
            **{
                step: round(sum(r.seconds.get(step, 0.0) for r in predicted), 3)
                for step in ("preprocess", "inference", "writing")
            },
        },
        "series": [_row(r, predictor) | {"outputs": r.outputs} for r in results],
    }
    extra = list(dict.fromkeys(k for r in results for k in r.extra))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=[*PREDICTIONS_COLUMNS, *extra], lineterminator="\n")
    writer.writeheader()
    writer.writerows(_row(r, predictor) for r in results)
    atomic_write_text(paths.out / "predictions.csv", buf.getvalue())
    atomic_write_text(paths.out / "summary.json", json.dumps(summary, indent=1))
    write_report(summary, paths.out / "report.html")
    log.info(
        "predict: %d series predicted (%d positive), %d rejected, %d failed; see %s",
        summary["n_predicted"],
        summary["n_positive"],
        summary["n_rejected"],
        summary["n_failed"],
        paths.out / "report.html",
    )
    return summary


def _row(r: SeriesResult, predictor: Predictor) -> dict[str, Any]:
    return {
        "key": r.key,
        "study": r.study,
        "modality": r.modality,
        "plane": r.plane,
        "status": r.status,
        "reason": r.reason,
        "probability": r.probability,
        "label": r.label,
        "predicted": r.predicted,
        "threshold": predictor.threshold,  # empty for a task without one
        "lesion_voxels": r.lesion_voxels,
        "lesion_ml": r.lesion_ml,
        "model": predictor.name,
        "model_version": predictor.version,
        **r.extra,
    }
