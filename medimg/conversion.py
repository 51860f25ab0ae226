"""Conversion of one stack, ingest's middle step: DICOM slices to a NIfTI volume (and its
lesion mask on the same grid), the record that becomes its manifest row and, with
``ingest.export_deid_dicom``, de-identified DICOM copies of its files.

:func:`ingest_stack` writes each file atomically and the record last, so a killed run
leaves nothing half-done. :mod:`medimg.ingest` plans the stacks and joins the records.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import numpy.typing as npt

from medimg.config import LESION, IngestParams, StructureParams
from medimg.dicom.annotations import Annotation, rasterise, read_annotation, structure_labels
from medimg.dicom.deid import Pseudonymizer, load_or_create_salt, write_deidentified
from medimg.dicom.discover import AnnotationFile, Discovery, Rejection, read_header, walk
from medimg.dicom.pixels import PixelDecodeError, read_stack
from medimg.dicom.series import RESAMPLED, Stack
from medimg.errors import DicomError
from medimg.io import atomic_write_text
from medimg.volume import align_mask, content_hash, save_nifti, stack_volume

FINGERPRINT = ".fingerprint"  # records/<key>.fingerprint (IngestPaths.records)


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
    def records(self) -> Path:  # per series: <key>.json, its row; <key>.fingerprint
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
    mask: Path | None  # NIfTI label map <SeriesInstanceUID>.nii[.gz]
    structure_masks: tuple[tuple[Path, int], ...] = ()  # binary NIfTI masks and their label
    annotations: tuple[Path, ...] = ()  # DICOM SEG and RTSTRUCT objects matched to the stack
    structures: tuple[StructureParams, ...] = (LESION,)  # label-map order, Params.structures

    @property
    def annotated(self) -> bool:
        return self.mask is not None or bool(self.structure_masks or self.annotations)


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
    unmatched: dict[str, int] = {}
    set_aside: list[Rejection] = []  # annotations that do not fit the grid
    if job.annotated:
        rel = f"masks/{job.key}{ext}"
        lesion_voxels = write_label_map(
            job, paths.out / rel, shape, affine, cfg, unmatched, set_aside
        )
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
        "unmatched_structures": dict(sorted(unmatched.items())),
        "annotation_rejections": [[str(r.path), r.reason, r.detail] for r in set_aside],
    }
    atomic_write_text(paths.records / f"{job.key}.json", json.dumps(record, sort_keys=True))
    # last (a record without it is redone); .dvcignore'd: sizes and mtimes vary by machine
    atomic_write_text(paths.records / f"{job.key}{FINGERPRINT}", job.fingerprint)
    return StackResult(record=record, rejected=set_aside)


def read_fingerprint(paths: IngestPaths, key: str) -> str | None:
    """The fingerprint series ``key`` was ingested with (None: never, or not to the end)."""
    try:
        return (paths.records / f"{key}{FINGERPRINT}").read_text()
    except OSError:
        return None


def annotated_job(
    key: str,
    stack: Stack,
    masks: Path | None,
    annotations: list[Path],
    structures: tuple[StructureParams, ...],
) -> Job:
    """A stack's job with its annotations: the NIfTI masks named by its series in
    ``masks``, and the SEG and RTSTRUCT files matched to it (fingerprint and manifest
    facts still empty)."""
    return Job(
        key,
        stack,
        "",
        {},
        find_mask(masks, stack.series_uid),
        structure_masks(masks, stack.series_uid, structures),
        tuple(sorted(annotations)),
        structures,
    )


def find_mask(masks: Path | None, series_uid: str) -> Path | None:
    """The NIfTI label map ``<SeriesInstanceUID>.nii[.gz]`` of a series, if any."""
    if masks is None:
        return None
    for suffix in (".nii.gz", ".nii"):
        candidate = masks / f"{series_uid}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def structure_masks(
    masks: Path | None, series_uid: str, structures: tuple[StructureParams, ...]
) -> tuple[tuple[Path, int], ...]:
    """The binary masks ``<SeriesInstanceUID>_<structure>.nii[.gz]`` of a series, with the
    label of the structure each names (names that match none: label 0, reported)."""
    if masks is None or not masks.is_dir():
        return ()
    labels = structure_labels(structures)
    found = []
    for path in sorted(masks.glob(f"{series_uid}_*.nii*")):
        name = path.name.removeprefix(f"{series_uid}_").removesuffix(".gz").removesuffix(".nii")
        found.append((path, labels(name) or 0))
    return tuple(found)


def annotation_files(found: Discovery, masks: Path | None) -> list[AnnotationFile]:
    """The SEG and RTSTRUCT objects of the input folder and of the masks folder."""
    files = list(found.annotations)
    if masks is not None and masks.is_dir():
        others = [p for p in walk(masks) if not p.name.endswith((".nii", ".nii.gz"))]
        files += [r for r in map(read_header, others) if isinstance(r, AnnotationFile)]
    return files


def match_annotations(
    files: Iterable[AnnotationFile], stacks: list[Stack]
) -> tuple[dict[int, list[Path]], list[Rejection]]:
    """Each SEG or RTSTRUCT matched to the stacks it annotates (keyed by their index in
    ``stacks``): those holding an image it references, else those of a series it
    references, with its frame of reference; the others are rejected with the reason
    ``annotation_unmatched`` or ``annotation_frame_of_reference``."""
    matched: dict[int, list[Path]] = {}
    rejected: list[Rejection] = []
    for file in files:
        try:
            ann: Annotation = read_annotation(file.path)
        except DicomError as e:
            rejected.append(Rejection(file.path, "unreadable", str(e).split(": ", 1)[-1]))
            continue
        refs = set(ann.instance_uids)
        hits = [
            i for i, s in enumerate(stacks) if any(x.instance.sop_uid in refs for x in s.slices)
        ]
        hits = hits or [i for i, s in enumerate(stacks) if s.series_uid in ann.series_uids]
        same = [i for i in hits if stacks[i].first.frame_of_reference == ann.frame_of_reference_uid]
        kind = ann.kind.upper()
        if not hits:
            detail = f"{kind} references no ingested series (is its series in the input?)"
            rejected.append(Rejection(file.path, "annotation_unmatched", detail))
        elif not same:
            detail = f"{kind}'s FrameOfReferenceUID differs from its series' (drawn elsewhere?)"
            rejected.append(Rejection(file.path, "annotation_frame_of_reference", detail))
        for i in same:
            matched.setdefault(i, []).append(file.path)
    return matched, rejected


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


def write_label_map(
    job: Job,
    dst: Path,
    shape: tuple[int, ...],
    affine: npt.NDArray[np.float64],
    cfg: IngestParams,
    unmatched: dict[str, int],
    rejected: list[Rejection],
) -> int | None:
    """Write the stack's annotations, combined into one label map on the volume's grid,
    to ``dst``; return its non-zero voxels.

    Names (or NIfTI label values above the structure count) that no structure matches
    are counted into ``unmatched``; a SEG or RTSTRUCT that does not fit the grid goes to
    ``rejected`` (``annotation_geometry``) and the rest still combine.

    Returns:
        The count of non-zero voxels, or None (nothing written) when a NIfTI mask's grid
        does not overlap the volume's, or no annotation could be placed.
    """
    out = np.zeros(shape, dtype=np.uint8)
    placed = False
    k = len(job.structures)
    sources = ([(job.mask, None)] if job.mask else []) + list(job.structure_masks)
    for path, label in sources:
        if label == 0:  # <SeriesInstanceUID>_<name>.nii.gz of no configured structure
            name = path.name.split("_", 1)[-1].removesuffix(".gz").removesuffix(".nii")
            unmatched[name] = unmatched.get(name, 0) + 1
            continue
        part = _nifti_labels(path, shape, affine, k if label is None else 1)
        if part is None:
            return None
        if label is not None:
            part = part * np.uint8(label)
        for v in np.unique(part[part > k]):
            unmatched[f"label {int(v)}"] = unmatched.get(f"label {int(v)}", 0) + 1
        part[part > k] = 0
        np.maximum(out, part, out=out)
        placed = True
    labels = structure_labels(job.structures)
    for path in job.annotations:
        try:
            part, names = rasterise(path, shape, affine, labels)
        except DicomError as e:
            detail = f"series {job.key}: {str(e).removeprefix(f'{path}: ')}"
            rejected.append(Rejection(path, "annotation_geometry", detail, key=job.key))
            continue
        for name in names:
            unmatched[name] = unmatched.get(name, 0) + 1
        np.maximum(out, part, out=out)
        placed = True
    if not placed:
        return None
    save_nifti(out, affine, dst, level=cfg.compression_level)
    return int(np.count_nonzero(out))


def _nifti_labels(
    src: Path, shape: tuple[int, ...], affine: npt.NDArray[np.float64], n_labels: int
) -> npt.NDArray[np.uint8] | None:
    """The NIfTI mask at ``src`` on the volume's grid: its values kept (a label map) when
    ``n_labels`` > 1, else 1 wherever non-zero; None when the grids do not overlap."""
    img = nib.load(src)
    if n_labels <= 1:
        return align_mask(img, shape, affine)  # type: ignore[arg-type]
    data = np.asarray(img.dataobj)  # type: ignore[attr-defined]
    out = np.zeros(shape, dtype=np.uint8)
    for value in np.unique(data[data > 0]):
        one = nib.Nifti1Image((data == value).astype(np.uint8), img.affine)  # type: ignore[attr-defined]
        part = align_mask(one, shape, affine)
        if part is None:
            return None
        out[part > 0] = min(int(value), 255)
    return out


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
