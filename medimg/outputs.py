"""The DICOM objects of one predicted series: the segmenter's SEG, the classifier's SR.

A series that one cannot be made for keeps its other outputs, with the reason in the
report. The classifier's SR can carry the volumes a segmenter measured on the same series
(``predict.volumes_from``: that segmenter's prediction folder, whose ``predictions.csv``
rows are keyed by the same pseudonymous series key).
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from medimg.config import PredictParams
from medimg.errors import DicomError
from medimg.inbox import SeriesResult

log = logging.getLogger(__name__)

VOLUME = "volume_ml_"  # predictions.csv: a column per structure


def write_seg(
    mask: npt.NDArray[np.uint8],
    affine: npt.NDArray[np.float64],
    sources: list[Path],
    model: tuple[str, str],
    spec: Any,
    cfg: PredictParams,
    path: Path,
    res: SeriesResult,
) -> None:
    """The DICOM SEG of ``mask`` (one segment per structure of ``spec``), referencing
    ``sources``; ``model``: the name and version it names as the algorithm."""
    from importlib.metadata import version

    from medimg.dicom.seg import SegInfo, read_sources, segments_from
    from medimg.dicom.seg import write_seg as write

    name, model_version = model
    several = len(spec.labels) > 1  # one structure: the binary SEG as before structures
    what = f"{len(spec.labels)} structures" if several else "lesion"
    info = SegInfo(
        segments=segments_from(spec.structures) if several else (),
        series_description=f"medimg {what} ({name} v{model_version})"[:64],
        algorithm_name=name,
        algorithm_version=model_version,
        series_number=cfg.seg_series_number,
        software_version=f"medimg {version('medimg')}",
    )
    try:
        if not sources:
            raise DicomError("no source images to reference")
        write(mask, affine, read_sources(sources), info, path)
        res.outputs["seg"] = f"{res.key}/seg.dcm"
    except DicomError as e:
        res.reason = f"no DICOM SEG: {e}"
        log.warning("series %s: %s", res.key, res.reason)


def write_sr(
    sources: list[Path],
    model: tuple[str, str],
    spec: Any,
    path: Path,
    res: SeriesResult,
    volumes_ml: dict[str, float] | None = None,
) -> None:
    """The diagnosis of ``res`` as a DICOM SR (TID 1500) referencing the series'
    instances, with each structure's volume when a segmenter measured them."""
    from medimg.dicom.seg import read_sources
    from medimg.dicom.sr import build_diagnosis_sr, write_diagnosis_sr

    probs = {n: res.extra[f"probability_{n}"] for n in spec.labels}
    try:
        if not sources:
            raise DicomError("no source images to reference")
        sr = build_diagnosis_sr(
            read_sources(sources), probs, str(res.predicted), *model, volumes_ml=volumes_ml
        )
        write_diagnosis_sr(sr, path)
        res.outputs["sr"] = f"{res.key}/sr.dcm"
    except (DicomError, ValueError) as e:
        res.reason = f"no DICOM SR: {e}"
        log.warning("series %s: %s", res.key, res.reason)


def segmenter_volumes(folder: Path | None) -> dict[str, dict[str, float]]:
    """Each predicted series' volumes per structure (ml) from every ``predictions.csv``
    below ``folder`` (one folder's, or one per study of the ``predict-inbox``
    deployment); no folder, or one without any, gives none."""
    found: dict[str, dict[str, float]] = {}
    for table in sorted(Path(folder).rglob("predictions.csv")) if folder else []:
        with table.open(newline="") as f:
            for row in csv.DictReader(f):
                volumes = {
                    k.removeprefix(VOLUME): float(v)
                    for k, v in row.items()
                    if k and k.startswith(VOLUME) and v not in (None, "")
                }
                if row.get("status") == "predicted" and volumes:
                    found[row["key"]] = volumes
    return found
