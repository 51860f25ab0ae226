"""A synthetic cohort that looks like a PACS export: real DICOM files written with pydicom.

Each patient is a continuous phantom in LPS patient coordinates (air, fat, soft tissue,
liver, lungs, spine); about half carry ellipsoidal lesions of one kind (textured,
enhancing solid masses or homogeneous fluid cysts). Every series samples the phantom on
its own grid (axial, coronal, sagittal or oblique, ascending or descending, with
InstanceNumber sometimes unrelated to position), so pixels, headers and masks (a label
map of the chosen structures: body, lung, liver, spine, lesion) agree by construction.
Headers carry fake but realistic PHI so that de-identification can be tested.

Everything is a pure function of :class:`~medimg.config.SynthParams`: the same seed gives
byte-identical files.

The parts: :mod:`medimg.dicom.phantom` (anatomy and lesions), :mod:`medimg.dicom.acquisition`
(studies, series and what each series sees) and :mod:`medimg.dicom.scanner` (one series as
DICOM files). This module writes the cohort: files, masks, labels and ground truth.
"""

from __future__ import annotations

import csv
import datetime
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import numpy.typing as npt

from medimg.config import StructureParams, SynthParams

# The parts' names stay importable from here, where they were defined before.
from medimg.dicom.acquisition import MR_GAIN as MR_GAIN
from medimg.dicom.acquisition import PLANES as PLANES
from medimg.dicom.acquisition import VENDORS as VENDORS
from medimg.dicom.acquisition import SeriesPlan as SeriesPlan
from medimg.dicom.acquisition import Vendor as Vendor
from medimg.dicom.acquisition import plan_cohort as plan_cohort
from medimg.dicom.acquisition import render_series as render_series
from medimg.dicom.acquisition import series_grid as series_grid
from medimg.dicom.geometry import ras_affine
from medimg.dicom.phantom import AIR as AIR
from medimg.dicom.phantom import BONE as BONE
from medimg.dicom.phantom import CT_HU as CT_HU
from medimg.dicom.phantom import FAT as FAT
from medimg.dicom.phantom import LESION as LESION
from medimg.dicom.phantom import LIVER as LIVER
from medimg.dicom.phantom import LUNG as LUNG
from medimg.dicom.phantom import MR_SIGNAL as MR_SIGNAL
from medimg.dicom.phantom import SOFT as SOFT
from medimg.dicom.phantom import STRUCTURES as STRUCTURES
from medimg.dicom.phantom import Lesion as Lesion
from medimg.dicom.phantom import Phantom as Phantom
from medimg.dicom.phantom import check_structures
from medimg.dicom.phantom import lesion_core_mm as lesion_core_mm
from medimg.dicom.phantom import make_phantom as make_phantom
from medimg.dicom.scanner import FIRST_NAMES as FIRST_NAMES
from medimg.dicom.scanner import INSTITUTIONS as INSTITUTIONS
from medimg.dicom.scanner import LAST_NAMES as LAST_NAMES
from medimg.dicom.scanner import make_identity, make_uid, write_series
from medimg.errors import ConfigError
from medimg.io import atomic_dir, atomic_path, atomic_write_text
from medimg.typing import Progress

log = logging.getLogger(__name__)

_uid = make_uid  # its name here before the split; tests import it


ANNOTATION_SERIES_NUMBER = 9801  # SeriesNumber of the cohort's SEG and RTSTRUCT objects


def annotation_formats(cfg: SynthParams, n_series: int) -> list[str]:
    """Per series, how its annotation is written: ``seg``, ``rtstruct`` or ``nifti``, in
    the shares ``cfg.seg_fraction`` and ``cfg.rtstruct_fraction`` (exactly, rounded), on a
    seeded permutation of the series."""
    n_seg = round(cfg.seg_fraction * n_series)
    n_rt = min(n_series - n_seg, round(cfg.rtstruct_fraction * n_series))
    formats = ["nifti"] * n_series
    for rank, i in enumerate(np.random.default_rng([cfg.seed, 11]).permutation(n_series)):
        if rank < n_seg + n_rt:
            formats[int(i)] = "seg" if rank < n_seg else "rtstruct"
    return formats


def _save_mask(
    mask: npt.NDArray[np.uint8],
    lps: npt.NDArray[np.float64],
    path: Path,
    fmt: str = "nifti",
    structures: Sequence[StructureParams] = (),
    series: Path | None = None,
) -> None:
    """Write one series' label map (slices, rows, cols) on its grid (LPS affine ``lps``):
    the one place the cohort's annotations are written. ``fmt`` ``nifti`` writes ``path``
    (``<SeriesInstanceUID>.nii.gz``); ``seg`` and ``rtstruct`` write a DICOM SEG or
    RTSTRUCT of the ``structures`` over the series' files in folder ``series`` beside it,
    as a PACS or planning system exports them."""
    # (slices, rows, cols) -> (i, j, k) = (cols, rows, slices)
    data, affine = np.ascontiguousarray(mask.transpose(2, 1, 0)), ras_affine(lps)
    if fmt == "nifti":
        img = nib.Nifti1Image(data, affine)
        img.set_qform(img.affine, code=1)
        img.set_sform(img.affine, code=1)
        nib.save(img, path)
        return
    from medimg.dicom.rtstruct import write_rtstruct
    from medimg.dicom.seg import SegInfo, read_sources, segments_from, write_seg

    if series is None:
        raise ValueError(f"{path.name}: a {fmt} annotation needs its series' folder")
    uid = path.name.removesuffix(".nii.gz")
    files = sorted(f for f in series.iterdir() if f.is_file())  # a study folder may hold two
    sources = [ds for ds in read_sources(files) if ds.SeriesInstanceUID == uid]
    target = path.with_name(path.name.replace(".nii.gz", f".{fmt}.dcm"))
    # annotated at the study's time: the same cohort writes the same bytes (DVC's hashes repeat)
    created = datetime.datetime.strptime(
        f"{sources[0].StudyDate}{sources[0].StudyTime}", "%Y%m%d%H%M%S"
    )
    if fmt == "seg":
        info = SegInfo(
            series_description="medimg synthetic annotation",
            algorithm_name="medimg-synth",
            algorithm_version="1",
            series_number=ANNOTATION_SERIES_NUMBER,
            segments=segments_from(structures),
            created=created,
        )
        write_seg(data, affine, sources, info, target)
    else:
        write_rtstruct(
            data,
            affine,
            sources,
            structures,
            target,
            series_number=ANNOTATION_SERIES_NUMBER,
            created=created,
        )


TRUTH_COLUMNS = [
    "series_uid",
    "study_uid",
    "patient_id",
    "modality",
    "vendor",
    "orientation",
    "descending",
    "shuffled",
    "n_slices",
    "label",
    "lesion_kind",
    "lesion_voxels",
    "folder",
]


def truth_columns(structures: Sequence[str]) -> list[str]:
    """The columns of ``truth_csv``: :data:`TRUTH_COLUMNS`, then ``<name>_voxels`` for each
    structure other than the lesion (whose count is ``lesion_voxels``)."""
    return TRUTH_COLUMNS + [f"{name}_voxels" for name in structures if name != "lesion"]


def synth_cohort(
    cfg: SynthParams,
    raw_dir: Path,
    masks_dir: Path,
    labels_csv: Path,
    truth_csv: Path,
    progress: Progress | None = None,
    force: bool = False,
    structures: Sequence[str | StructureParams] = ("lesion",),
) -> dict[str, int]:
    """Write the cohort: DICOM under ``raw_dir``, one NIfTI mask per series (named by its
    SeriesInstanceUID) under ``masks_dir``, ``labels_csv`` (patient_id,label) and
    ``truth_csv`` (per-series ground truth for tests, :func:`truth_columns`).

    Each mask is a label map of ``structures`` (names among :data:`STRUCTURES`, in the
    order of ``Params.structures``): value i + 1 where structure i is, later ones winning
    where they overlap. The default gives binary lesion masks. ``labels_csv`` holds 0/1
    or the patient's lesion kind (none, cyst, solid), as ``cfg.labels`` says.

    Each output is staged and swapped in atomically, so an interrupted run leaves the
    previous cohort intact. A cohort already written with the same settings is left as it
    is (its files keep their timestamps, so ingest sees nothing new) unless ``force``.

    Returns:
        Counts: patients, positives, series and files.

    Raises:
        ConfigError: an unknown or repeated structure name, or lesions that cannot fit.
    """
    coded = tuple(s for s in structures if isinstance(s, StructureParams))
    names = tuple(s if isinstance(s, str) else s.name for s in structures)
    check_structures(names)
    if (cfg.seg_fraction or cfg.rtstruct_fraction) and len(coded) != len(names):
        raise ConfigError("synth: SEG and RTSTRUCT annotations need the structures' codes")
    stamp = truth_csv.with_name(truth_csv.stem + ".params.json")
    stamped: dict[str, object] = {"synth": cfg.model_dump(mode="json"), "structures": names}
    if cfg.seg_fraction or cfg.rtstruct_fraction:  # the codes the DICOM objects carry
        stamped["codes"] = [s.model_dump(mode="json") for s in coded]
    settings = json.dumps(stamped)
    outputs = (raw_dir, masks_dir, labels_csv, truth_csv, stamp)
    if not force and all(p.exists() for p in outputs) and stamp.read_text() == settings:
        with truth_csv.open() as f:
            n_series = sum(1 for _ in csv.DictReader(f))
        log.info("synthetic cohort in %s is up to date", raw_dir)
        n_pos = round(cfg.n_patients * cfg.positive_fraction)
        return {"patients": cfg.n_patients, "positives": n_pos, "series": n_series,
                "files": n_series * cfg.n_slices}  # fmt: skip
    stamp.unlink(missing_ok=True)
    phantoms, positive, plans = plan_cohort(cfg)
    formats = annotation_formats(cfg, len(plans))
    idents = [make_identity(cfg.seed, p) for p in range(cfg.n_patients)]
    truth: list[dict[str, object]] = []
    with atomic_dir(raw_dir) as raw, atomic_dir(masks_dir) as masks:
        for done, plan in enumerate(plans):
            ident, phantom = idents[plan.patient_index], phantoms[plan.patient_index]
            mask, affine, folder = write_series(plan, phantom, cfg, ident, raw, names)
            series_uid = make_uid(cfg.seed, "series", plan.series_index)
            _save_mask(
                mask, affine, masks / f"{series_uid}.nii.gz",
                formats[done], coded, raw / folder,
            )  # fmt: skip
            pos = positive[plan.patient_index]
            truth.append(_truth_row(plan, cfg, ident, phantom, pos, mask, names, folder))
            if progress is not None:
                progress(done + 1, len(plans))
    labels = [
        p.lesion_kind if cfg.labels == "kind" else int(pos)
        for p, pos in zip(phantoms, positive, strict=True)
    ]
    _write_labels(labels_csv, idents, labels)
    _write_truth(truth_csv, truth, truth_columns(names))
    counts = {
        "patients": cfg.n_patients,
        "positives": int(sum(positive)),
        "series": len(plans),
        "files": len(plans) * cfg.n_slices,
    }
    atomic_write_text(stamp, settings)  # last: marks the cohort complete
    log.info("synthetic cohort written to %s: %s", raw_dir, counts)
    return counts


def _truth_row(
    plan: SeriesPlan,
    cfg: SynthParams,
    ident: dict[str, str],
    phantom: Phantom,
    positive: bool,
    mask: npt.NDArray[np.uint8],
    structures: tuple[str, ...],
    folder: str,
) -> dict[str, object]:
    """One series' ground truth, a row of ``truth_csv``: voxel counts are of the mask as
    written (after overlaps are resolved); ``lesion_voxels`` is empty when the lesion is
    not among the structures."""
    counts = np.bincount(mask.ravel(), minlength=len(structures) + 1)
    voxels = {f"{name}_voxels": int(counts[i]) for i, name in enumerate(structures, start=1)}
    return {
        "series_uid": make_uid(cfg.seed, "series", plan.series_index),
        "study_uid": make_uid(cfg.seed, "study", plan.patient_index, plan.study_index),
        "patient_id": ident["PatientID"],
        "modality": plan.modality,
        "vendor": plan.vendor.name,
        "orientation": plan.orientation,
        "descending": int(plan.descending),
        "shuffled": int(plan.shuffled),
        "n_slices": cfg.n_slices,
        "label": int(positive),
        "lesion_kind": phantom.lesion_kind,
        "lesion_voxels": "",
        **voxels,
        "folder": folder,
    }


def _write_labels(path: Path, idents: list[dict[str, str]], labels: Sequence[int | str]) -> None:
    """``labels.csv``: patient_id,label, sorted by patient ID."""
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["patient_id", "label"])
        for ident, label in sorted(
            zip(idents, labels, strict=True), key=lambda t: t[0]["PatientID"]
        ):
            writer.writerow([ident["PatientID"], label])


def _write_truth(path: Path, truth: list[dict[str, object]], columns: list[str]) -> None:
    """``truth_csv``: one row per series, ``columns`` (:func:`truth_columns`)."""
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        dict_writer = csv.DictWriter(f, fieldnames=columns)
        dict_writer.writeheader()
        dict_writer.writerows(truth)
