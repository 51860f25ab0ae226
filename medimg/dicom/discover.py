"""Find DICOM image instances in a folder of any layout, reading headers only.

Every file under the root is either an image :class:`Instance` (one per frame group; a
multi-frame file carries one :class:`Frame` per frame) or a :class:`Rejection` with a
typed reason. Non-DICOM files, DICOMDIRs (never followed as paths) and non-image objects
(SR, RTSTRUCT, presentation states, ...) are set aside, not errors.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

log = logging.getLogger(__name__)

MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
IMAGE_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2": "CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.2": "Legacy Converted Enhanced CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.4": "MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.4.1": "Enhanced MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.4.4": "Legacy Converted Enhanced MR Image Storage",
}


@dataclass(frozen=True)
class Rejection:
    """A file set aside. ``path`` is absolute; only quarantine.csv ever shows it."""

    path: Path
    reason: str  # a code: not_dicom, dicomdir, non_image, unreadable, missing_tag, ...
    detail: str = ""  # free text without PHI: the tag, the SOP class, the transfer syntax
    series_uid: str = ""  # when known: the series this damaged file belonged to


@dataclass(frozen=True)
class Frame:
    """Geometry and scaling of one 2D image (a single-frame file or one frame)."""

    position: tuple[float, float, float] | None  # ImagePositionPatient, mm
    orientation: tuple[float, ...] | None  # ImageOrientationPatient, 6 cosines
    spacing: tuple[float, float] | None  # PixelSpacing [row, column], mm
    slope: float = 1.0  # RescaleSlope
    intercept: float = 0.0  # RescaleIntercept
    index: int = 0  # frame number in the file, 0-based


@dataclass(frozen=True)
class Instance:
    """Header summary of one image file. Identifiers stay in memory, never in outputs."""

    path: Path
    size: int  # bytes
    mtime_ns: int
    sop_class: str
    sop_uid: str
    series_uid: str
    study_uid: str
    patient_id: str
    accession: str
    modality: str
    manufacturer: str
    image_type: tuple[str, ...]
    rows: int
    columns: int
    bits_allocated: int
    bits_stored: int
    pixel_representation: int
    samples: int
    photometric: str
    transfer_syntax: str
    instance_number: int | None
    burned_in: bool
    frames: tuple[Frame, ...] = field(default_factory=tuple)

    @property
    def multiframe(self) -> bool:
        return self.sop_class in {
            "1.2.840.10008.5.1.4.1.1.2.1",
            "1.2.840.10008.5.1.4.1.1.2.2",
            "1.2.840.10008.5.1.4.1.1.4.1",
            "1.2.840.10008.5.1.4.1.1.4.4",
        }


def _floats(value: Any, n: int) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        out = tuple(float(v) for v in (value if isinstance(value, Sequence | list) else [value]))
    except (TypeError, ValueError):
        return None
    return out if len(out) == n else None


def _item(ds: Dataset, keyword: str) -> Dataset | None:
    seq = ds.get(keyword)
    return seq[0] if seq else None


def _group_value(groups: Sequence[Dataset | None], seq: str, attr: str) -> Any:
    """First value of ``seq[0].attr`` found in per-frame, then shared functional groups."""
    for g in groups:
        if g is None:
            continue
        item = _item(g, seq)
        if item is not None and attr in item:
            return item.get(attr)
    return None


def _valid_orientation(o: tuple[float, ...] | None) -> tuple[float, ...] | None:
    """Six direction cosines of two orthogonal unit vectors, else None."""
    if o is None:
        return None
    row, col = o[:3], o[3:]
    norms = (sum(v * v for v in row) ** 0.5, sum(v * v for v in col) ** 0.5)
    dot = sum(a * b for a, b in zip(row, col, strict=True))
    if any(abs(n - 1) > 1e-2 for n in norms) or abs(dot) > 1e-2:
        return None
    return o


def _valid_spacing(s: tuple[float, ...] | None) -> tuple[float, ...] | None:
    return s if s is not None and all(0 < v < 1e4 for v in s) else None


def _frames(ds: Dataset, multiframe: bool) -> tuple[Frame, ...]:
    def scale(value: Any, default: float) -> float:
        try:
            return float(value) if value not in (None, "") else default
        except (TypeError, ValueError):
            return default

    if not multiframe:
        return (
            Frame(
                position=_floats(ds.get("ImagePositionPatient"), 3),  # type: ignore[arg-type]
                orientation=_valid_orientation(_floats(ds.get("ImageOrientationPatient"), 6)),
                spacing=_valid_spacing(_floats(ds.get("PixelSpacing"), 2)),  # type: ignore[arg-type]
                slope=scale(ds.get("RescaleSlope"), 1.0),
                intercept=scale(ds.get("RescaleIntercept"), 0.0),
            ),
        )
    shared = _item(ds, "SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    n = int(ds.get("NumberOfFrames") or 1)
    frames = []
    for i in range(n):
        groups = [per_frame[i] if i < len(per_frame) else None, shared]
        frames.append(
            Frame(
                position=_floats(  # type: ignore[arg-type]
                    _group_value(groups, "PlanePositionSequence", "ImagePositionPatient"), 3
                ),
                orientation=_valid_orientation(
                    _floats(
                        _group_value(groups, "PlaneOrientationSequence", "ImageOrientationPatient"),
                        6,
                    )
                ),
                spacing=_valid_spacing(  # type: ignore[arg-type]
                    _floats(_group_value(groups, "PixelMeasuresSequence", "PixelSpacing"), 2)
                ),
                slope=scale(
                    _group_value(groups, "PixelValueTransformationSequence", "RescaleSlope"), 1.0
                ),
                intercept=scale(
                    _group_value(groups, "PixelValueTransformationSequence", "RescaleIntercept"),
                    0.0,
                ),
                index=i,
            )
        )
    return tuple(frames)


def _is_dicomdir(ds: Dataset) -> bool:
    meta = getattr(ds, "file_meta", None)
    sop = meta.get("MediaStorageSOPClassUID") if meta is not None else None
    return sop == MEDIA_STORAGE_DIRECTORY or "DirectoryRecordSequence" in ds


def read_header(path: Path) -> Instance | Rejection:
    """Read one file's header (no pixels) and classify it."""
    if path.is_symlink():
        return Rejection(path, "symlink", "symbolic link (not followed)")
    try:
        stat = path.stat()
        if stat.st_size == 0:
            return Rejection(path, "not_dicom", "empty file")
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError:
        return Rejection(path, "not_dicom", "no DICOM preamble and header")
    except Exception as e:  # pydicom raises many types on damaged files
        return Rejection(path, "unreadable", f"header cannot be parsed ({type(e).__name__})")
    try:
        return _classify(path, stat, ds)
    except Exception as e:  # a value of the wrong VR or length surfaces only when read
        return Rejection(path, "unreadable", f"header value cannot be parsed ({type(e).__name__})")


def _classify(path: Path, stat: os.stat_result, ds: Dataset) -> Instance | Rejection:
    if _is_dicomdir(ds):
        return Rejection(
            path, "dicomdir", "DICOMDIR index (not followed; files are found by walking)"
        )
    sop_class = str(
        ds.get("SOPClassUID", "") or getattr(ds.file_meta, "MediaStorageSOPClassUID", "")
    )
    if sop_class not in IMAGE_SOP_CLASSES:
        name = UID(sop_class).name if sop_class else "no SOPClassUID"
        return Rejection(path, "non_image", f"not a CT or MR image: {name}")
    for keyword in ("SOPInstanceUID", "SeriesInstanceUID", "Rows", "Columns", "BitsAllocated"):
        if ds.get(keyword) in (None, ""):
            series = str(ds.get("SeriesInstanceUID", "") or "")
            return Rejection(path, "missing_tag", f"{keyword} is missing", series)
    multiframe = sop_class in {k for k, v in IMAGE_SOP_CLASSES.items() if "Enhanced" in v}
    frames = _frames(ds, multiframe)
    meta = getattr(ds, "file_meta", None)
    ts = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    instance_number = ds.get("InstanceNumber")
    return Instance(
        path=path,
        size=stat.st_size,
        mtime_ns=stat.st_mtime_ns,
        sop_class=sop_class,
        sop_uid=str(ds.SOPInstanceUID),
        series_uid=str(ds.SeriesInstanceUID),
        study_uid=str(ds.get("StudyInstanceUID", "")),
        patient_id=str(ds.get("PatientID", "")),
        accession=str(ds.get("AccessionNumber", "")),
        modality=str(ds.get("Modality", "")),
        manufacturer=str(ds.get("Manufacturer", "")),
        image_type=tuple(str(v).upper() for v in (ds.get("ImageType") or [])),
        rows=int(ds.Rows),
        columns=int(ds.Columns),
        bits_allocated=int(ds.BitsAllocated),
        bits_stored=int(ds.get("BitsStored") or ds.BitsAllocated),
        pixel_representation=int(ds.get("PixelRepresentation") or 0),
        samples=int(ds.get("SamplesPerPixel") or 1),
        photometric=str(ds.get("PhotometricInterpretation", "MONOCHROME2")),
        transfer_syntax=ts,
        instance_number=int(instance_number) if instance_number not in (None, "") else None,
        burned_in=str(ds.get("BurnedInAnnotation", "")).upper() == "YES",
        frames=frames,
    )


def walk(root: Path) -> Iterator[Path]:
    """Every file under ``root``, sorted; symbolic links are listed, never followed."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if path.is_symlink() or path.is_file():  # links are reported, never followed
                yield path


@dataclass
class Discovery:
    instances: list[Instance] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    n_files: int = 0


def discover(root: Path, workers: int = 1) -> Discovery:
    """Classify every file under ``root`` (header-only reads, optionally in threads)."""
    paths = list(walk(Path(root)))
    found = Discovery(n_files=len(paths))
    if workers > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(read_header, paths, chunksize=64))
    else:
        results = [read_header(p) for p in paths]
    for r in results:
        (found.rejected if isinstance(r, Rejection) else found.instances).append(r)  # type: ignore[arg-type]
    log.info(
        "discovered %d files: %d image instances, %d set aside",
        found.n_files,
        len(found.instances),
        len(found.rejected),
    )
    return found
