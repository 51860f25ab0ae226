"""Conversion of one stack, ingest's middle step: DICOM slices to a NIfTI volume (and its
lesion mask on the same grid), the record that becomes its manifest row and, with
``ingest.export_deid_dicom``, de-identified DICOM copies of its files.

:func:`ingest_stack` writes each file atomically and the record last, so a killed run
leaves nothing half-done. :mod:`medimg.ingest` plans the stacks and joins the records.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import numpy.typing as npt

from medimg.config import IngestParams
from medimg.dicom.deid import Pseudonymizer, load_or_create_salt, write_deidentified
from medimg.dicom.discover import Rejection
from medimg.dicom.pixels import PixelDecodeError, read_stack
from medimg.dicom.series import RESAMPLED, Stack
from medimg.errors import DicomError
from medimg.io import atomic_write_text
from medimg.volume import align_mask, content_hash, save_nifti, stack_volume


@dataclass(frozen=True)
class IngestPaths:
    """Inputs and outputs of one ingest run."""

    input: Path  # the DICOM folder
    out: Path  # data/interim
    labels: Path | None = None  # labels.csv, optional
    classes: tuple[str, ...] | None = None  # its classes in order (train.classify.classes);
    # None: the file's own values, sorted
    masks: Path | None = None  # folder of <SeriesInstanceUID>.nii[.gz], optional

    @property
    def volumes(self) -> Path:
        return self.out / "volumes"

    @property
    def out_masks(self) -> Path:
        return self.out / "masks"

    @property
    def records(self) -> Path:
        return self.out / "records"

    @property
    def deid_dicom(self) -> Path:
        return self.out / "dicom"


@dataclass(frozen=True)
class Job:
    """One stack to turn into a volume (picklable, for process and Dask runners)."""

    key: str
    stack: Stack
    fingerprint: str
    meta: dict[str, Any]  # pseudonymous ids and header facts for the manifest
    mask: Path | None


@dataclass
class StackResult:
    record: dict[str, Any] | None = None
    rejected: list[Rejection] = field(default_factory=list)


def pseudonymizer(cfg: IngestParams) -> Pseudonymizer:
    """The keyed pseudonyms of an ingest run, from its secret salt (``cfg.salt_file``)."""
    return Pseudonymizer(load_or_create_salt(cfg.salt_file))


def _plane(normal: np.ndarray) -> str:
    axis = int(np.argmax(np.abs(normal)))
    if abs(normal[axis]) < np.cos(np.radians(1.0)):
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]


def ingest_stack(job: Job, cfg: IngestParams, paths: IngestPaths, threads: int = 1) -> StackResult:
    """Write one stack's volume (and mask) and its record; or reject it with reasons.

    ``threads`` read and compress the volume side by side (the bytes do not depend on it).
    """
    stack = job.stack
    if stack.irregular and cfg.irregular == "reject":
        reason = stack.irregular[0]
        detail = f"series {job.key}: {', '.join(stack.irregular)}: {stack.detail}"
        return StackResult(
            rejected=[Rejection(s.path, reason, detail, key=job.key) for s in stack.slices]
        )
    try:
        pixels = read_stack(stack, threads)
    except PixelDecodeError as e:
        rejected = _with_others_incomplete(job, Rejection(e.path, e.reason, e.detail))
        if cfg.on_invalid == "raise":
            raise DicomError(f"{e.path.relative_to(paths.input)}: {e.detail}") from e
        return StackResult(rejected=rejected)
    if cfg.export_deid_dicom:  # before any output: a file may fail only this full read
        failed = _export_dicom(job, cfg, paths)
        if failed is not None:
            if cfg.on_invalid == "raise":
                raise DicomError(f"{failed.path.relative_to(paths.input)}: {failed.detail}")
            return StackResult(rejected=_with_others_incomplete(job, failed))
    volume, affine = stack_volume(stack, pixels, resample=cfg.irregular == "resample")
    flags = list(stack.flags)
    if cfg.irregular == "resample" and stack.irregular:
        flags.append(RESAMPLED)
    ext = ".nii.gz" if cfg.compress else ".nii"
    vol_rel = f"volumes/{job.key}{ext}"
    volume_hash, p01, p99 = _write_volume(volume, affine, paths.out / vol_rel, cfg, threads)
    shape, dtype = volume.shape, volume.dtype
    # the mask after the voxels are written and let go: the series and the mask (read, then
    # on the volume grid) are never in memory together, which bounds ingest's peak for a
    # huge series near one series' worth (bench/memory.py)
    del volume, pixels
    mask_rel = None
    lesion_voxels = None
    if job.mask is not None:
        rel = f"masks/{job.key}{ext}"
        lesion_voxels = _write_mask(job.mask, paths.out / rel, shape, affine, cfg)
        if lesion_voxels is None:
            flags.append("mask_mismatch")
        else:
            mask_rel = rel
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    record = {
        "key": job.key,
        **job.meta,
        "plane": _plane(stack.normal),
        "orientation": "".join(nib.aff2axcodes(affine)),
        "shape": [int(v) for v in shape],
        "spacing": [round(float(v), 5) for v in spacing],
        "dtype": str(dtype),
        "n_slices": len(stack.slices),
        "flags": sorted(set(flags)),
        "status": "flagged" if stack.irregular else "ok",
        "volume": vol_rel,
        "mask": mask_rel,
        "lesion_voxels": lesion_voxels,
        "intensity_p01": round(float(p01), 3),
        "intensity_p99": round(float(p99), 3),
        "content_hash": volume_hash,
        "fingerprint": job.fingerprint,
    }
    atomic_write_text(paths.records / f"{job.key}.json", json.dumps(record, sort_keys=True))
    return StackResult(record=record)


def _with_others_incomplete(job: Job, failed: Rejection) -> list[Rejection]:
    """``failed``, then ``series_incomplete`` for each other file of the job's stack."""
    return [failed] + [
        Rejection(
            s.path, "series_incomplete", f"series {job.key}: another file failed", key=job.key
        )
        for s in job.stack.slices
        if s.path != failed.path
    ]


def _write_volume(
    volume: npt.NDArray,
    affine: npt.NDArray[np.float64],
    path: Path,
    cfg: IngestParams,
    threads: int,
) -> tuple[str, float, float]:
    """Write the volume; return its content hash and its 1st and 99th intensity percentiles."""
    with ThreadPoolExecutor(1) as pool:  # hash while writing: both release the GIL
        digest = pool.submit(content_hash, volume, affine)
        save_nifti(volume, affine, path, cfg.compression_level, threads)
        volume_hash = digest.result()
    p01, p99 = np.percentile(volume[::8, ::8, ::2], [1, 99])  # a sample is enough
    return volume_hash, float(p01), float(p99)


def _write_mask(
    src: Path, dst: Path, shape: tuple[int, ...], affine: npt.NDArray[np.float64], cfg: IngestParams
) -> int | None:
    """Write the mask at ``src`` on the volume's grid to ``dst``; return its lesion voxels.

    Returns:
        The count of non-zero voxels, or None (nothing written) when the mask's grid does
        not overlap the volume's.
    """
    mask = align_mask(nib.load(src), shape, affine)  # type: ignore[arg-type]
    if mask is None:
        return None
    lesion_voxels = int(np.count_nonzero(mask))
    save_nifti(mask, affine, dst, level=cfg.compression_level)
    return lesion_voxels


def _export_dicom(job: Job, cfg: IngestParams, paths: IngestPaths) -> Rejection | None:
    """De-identified DICOM copies of the stack's files, with consistently remapped UIDs.

    Returns:
        None, or the rejection of the first file whose header cannot be de-identified (a
        damaged value the header scan never reads, such as a US of odd length).
    """
    pseudo = pseudonymizer(cfg)
    folder = paths.deid_dicom / job.key
    files = list(dict.fromkeys(s.path for s in job.stack.slices))  # stack order, once each
    for n, src in enumerate(files, start=1):
        try:
            write_deidentified(
                src, folder / f"{n:05d}.dcm", pseudo, patient_pseudonym=job.meta["patient"]
            )
        except Exception as e:  # pydicom raises many types on a value it cannot convert
            return Rejection(
                src, "unreadable", f"header cannot be de-identified ({type(e).__name__})"
            )
    for extra in folder.glob("*.dcm"):
        if int(extra.stem) > len(files):
            extra.unlink()
    return None
