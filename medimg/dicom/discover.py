"""Find DICOM image instances in a folder of any layout, reading headers only.

Every file under the root is an image :class:`Instance` (one per frame group; a
multi-frame file carries one :class:`Frame` per frame), an annotation (:class:`
AnnotationFile`: a DICOM SEG or RTSTRUCT, for ingest to match to its series) or a
:class:`Rejection` with a typed reason. Non-DICOM files, DICOMDIRs (never followed as
paths) and other non-image objects (SR, presentation states, ...) are set aside.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from medimg.dicom.annotations import annotation_kind
from medimg.dicom.deid import from_generator
from medimg.dicom.dimensions import Dims, frame_dims, single_frame_dims
from medimg.dicom.read import dcmread

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
# Enhanced and legacy-converted objects: every frame's geometry in functional groups.
MULTIFRAME_SOP_CLASSES = frozenset(k for k, v in IMAGE_SOP_CLASSES.items() if "Enhanced" in v)


@dataclass(frozen=True)
class Rejection:
    """A file set aside. ``path`` is absolute; only quarantine.csv ever shows it."""

    path: Path
    reason: str  # a code: not_dicom, dicomdir, non_image, unreadable, missing_tag, ...
    detail: str = ""  # free text without PHI: the tag, the SOP class, the transfer syntax
    series_uid: str = ""  # when known: the series this damaged file belonged to
    key: str = ""  # when known: that series' pseudonymous key (ingest's stack key)


@dataclass(frozen=True)
class AnnotationFile:
    """A DICOM SEG or RTSTRUCT object found among the files (read in full only later)."""

    path: Path
    kind: str  # "seg" or "rtstruct"


@dataclass(frozen=True)
class Frame:
    """Geometry and scaling of one 2D image (a single-frame file or one frame)."""

    position: tuple[float, float, float] | None  # ImagePositionPatient, mm
    orientation: tuple[float, ...] | None  # ImageOrientationPatient, 6 cosines
    spacing: tuple[float, float] | None  # PixelSpacing [row, column], mm
    slope: float = 1.0  # RescaleSlope
    intercept: float = 0.0  # RescaleIntercept
    index: int = 0  # frame number in the file, 0-based
    dims: Dims = ()  # what sets it apart from images at its position (echo, time, ...)


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
    frame_of_reference: str  # FrameOfReferenceUID: an annotation must share it
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
    synthetic: bool = False  # written by medimg's generator (its private creator)
    header_end: int = -1  # offset where the header scan stopped: Pixel Data, if it met it

    @property
    def multiframe(self) -> bool:
        return self.sop_class in MULTIFRAME_SOP_CLASSES


class _Header:
    """Fast access to a header's plain values.

    pydicom converts a raw element on first access, which dominates a header scan.
    Values of the simple VRs read here (UI, CS, DS, IS, US) are decoded straight from
    their bytes; everything else (text that depends on the character set, sequences)
    goes through pydicom.
    """

    FAST_VRS = frozenset({"UI", "CS", "DS", "IS", "US"})

    def __init__(self, ds: Dataset) -> None:
        self.ds = ds

    def get(self, keyword: str, default: Any = None) -> Any:
        tag = _TAGS.get(keyword)
        if tag is None:
            tag = _TAGS[keyword] = tag_for_keyword(keyword)
        try:
            elem = self.ds.get_item(tag)  # type: ignore[arg-type]
        except KeyError:
            return default
        if elem is None:
            return default
        if not isinstance(elem, RawDataElement):
            return self.ds.get(keyword, default)
        vr = elem.VR or dictionary_VR(tag)
        if vr not in self.FAST_VRS or elem.value is None:
            return self.ds.get(keyword, default)
        raw: bytes = elem.value
        if vr == "US":
            if not raw:
                return default
            if len(raw) != 2:  # every US read here has one value; pydicom refuses it too
                raise ValueError(f"{keyword}: US value of {len(raw)} bytes")
            fmt = "<H" if elem.is_little_endian else ">H"
            return struct.unpack(fmt, raw[:2])[0]
        text = raw.decode("latin-1").strip("\x00 ")
        if not text:
            return default
        parts = [t.strip() for t in text.split("\\")]
        if vr == "IS":
            return int(float(parts[0])) if len(parts) == 1 else [int(float(v)) for v in parts]
        return parts[0] if len(parts) == 1 and keyword not in _MULTI else parts


_TAGS: dict[str, int | None] = {}
_MULTI = {"ImageType", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"}


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
    if not (all(abs(n - 1) <= 1e-2 for n in norms) and abs(dot) <= 1e-2):  # NaN fails too
        return None
    return o


def _valid_spacing(s: tuple[float, ...] | None) -> tuple[float, ...] | None:
    """From a tenth of a micrometre to ten metres (1e-300 would underflow the affine)."""
    return s if s is not None and all(1e-4 <= v < 1e4 for v in s) else None


def _valid_position(p: tuple[float, ...] | None) -> tuple[float, ...] | None:
    """A point within a kilometre of the origin (NaN, infinity and 1e308 are damage)."""
    return p if p is not None and all(abs(v) < 1e6 for v in p) else None


def _frames(ds: Dataset, multiframe: bool) -> tuple[Frame, ...]:
    def scale(value: Any, default: float) -> float:
        try:
            out = float(value) if value not in (None, "") else default
        except (TypeError, ValueError):
            return default
        if not math.isfinite(out):  # would fill the whole volume with NaN or infinity
            raise ValueError("rescale slope or intercept is not a finite number")
        return out

    if not multiframe:
        h = _Header(ds)
        return (
            Frame(
                position=_valid_position(_floats(h.get("ImagePositionPatient"), 3)),  # type: ignore[arg-type]
                orientation=_valid_orientation(_floats(h.get("ImageOrientationPatient"), 6)),
                spacing=_valid_spacing(_floats(h.get("PixelSpacing"), 2)),  # type: ignore[arg-type]
                slope=scale(h.get("RescaleSlope"), 1.0),
                intercept=scale(h.get("RescaleIntercept"), 0.0),
                dims=_dims(lambda: single_frame_dims(h.get)),
            ),
        )
    shared = _item(ds, "SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    n = int(ds.get("NumberOfFrames") or 1)
    frames = []
    for i in range(n):
        groups = [per_frame[i] if i < len(per_frame) else None, shared]
        value = functools.partial(_group_value, groups)
        rescale = "PixelValueTransformationSequence"
        frames.append(
            Frame(
                position=_valid_position(  # type: ignore[arg-type]
                    _floats(value("PlanePositionSequence", "ImagePositionPatient"), 3)
                ),
                orientation=_valid_orientation(
                    _floats(value("PlaneOrientationSequence", "ImageOrientationPatient"), 6)
                ),
                spacing=_valid_spacing(  # type: ignore[arg-type]
                    _floats(value("PixelMeasuresSequence", "PixelSpacing"), 2)
                ),
                slope=scale(value(rescale, "RescaleSlope"), 1.0),
                intercept=scale(value(rescale, "RescaleIntercept"), 0.0),
                index=i,
                dims=_dims(functools.partial(frame_dims, ds, groups)),
            )
        )
    return tuple(frames)


def _dims(read: Callable[[], Dims]) -> Dims:
    """The splitting attributes, or none when one cannot be parsed: a damaged optional
    value must not set aside an image that converts (its stack is then checked as is)."""
    try:
        return tuple(read())
    except Exception:  # pydicom raises many types on a value of the wrong VR or length
        return ()


def _is_dicomdir(ds: Dataset) -> bool:
    meta = getattr(ds, "file_meta", None)
    sop = meta.get("MediaStorageSOPClassUID") if meta is not None else None
    return sop == MEDIA_STORAGE_DIRECTORY or "DirectoryRecordSequence" in ds


def read_header(path: Path) -> Instance | AnnotationFile | Rejection:
    """Read one file's header (no pixels) and classify it."""
    if path.is_symlink():
        return Rejection(path, "symlink", "symbolic link (not followed)")
    try:
        stat = path.stat()
        if stat.st_size == 0:
            return Rejection(path, "not_dicom", "empty file")
        with path.open("rb") as f:
            ds = dcmread(f, stop_before_pixels=True)
            header_end = f.tell()  # pydicom leaves the file at the Pixel Data tag
    except InvalidDicomError:
        return Rejection(path, "not_dicom", "no DICOM preamble and header")
    except Exception as e:  # pydicom raises many types on damaged files
        return Rejection(path, "unreadable", f"header cannot be parsed ({type(e).__name__})")
    try:
        return _classify(path, stat, ds, header_end)
    except Exception as e:  # a value of the wrong VR or length surfaces only when read
        return Rejection(path, "unreadable", f"header value cannot be parsed ({type(e).__name__})")


def _classify(
    path: Path, stat: os.stat_result, ds: Dataset, header_end: int = -1
) -> Instance | AnnotationFile | Rejection:
    h = _Header(ds)
    if _is_dicomdir(ds):
        return Rejection(
            path, "dicomdir", "DICOMDIR index (not followed; files are found by walking)"
        )
    sop_class = str(
        h.get("SOPClassUID", "") or getattr(ds.file_meta, "MediaStorageSOPClassUID", "")
    )
    if kind := annotation_kind(sop_class, str(h.get("Modality", "") or "")):
        return AnnotationFile(path, kind)
    if sop_class not in IMAGE_SOP_CLASSES:
        name = UID(sop_class).name if sop_class else "no SOPClassUID"
        return Rejection(path, "non_image", f"not a CT or MR image: {name}")
    for keyword in ("SOPInstanceUID", "SeriesInstanceUID", "Rows", "Columns", "BitsAllocated"):
        if h.get(keyword) in (None, ""):
            series = str(h.get("SeriesInstanceUID", "") or "")
            return Rejection(path, "missing_tag", f"{keyword} is missing", series)
    if sop_class in MULTIFRAME_SOP_CLASSES:
        # Each frame's geometry is in its own functional group; a damaged count would
        # also drive the loop over frames (NumberOfFrames 2**31 - 1 never ends).
        n_frames = int(h.get("NumberOfFrames") or 1)
        n_groups = len(ds.get("PerFrameFunctionalGroupsSequence") or [])
        if n_frames != n_groups:
            series = str(h.get("SeriesInstanceUID", "") or "")
            detail = f"NumberOfFrames {n_frames} with {n_groups} per-frame functional groups"
            return Rejection(path, "missing_geometry", detail, series)
    frames = _frames(ds, sop_class in MULTIFRAME_SOP_CLASSES)
    meta = getattr(ds, "file_meta", None)
    ts = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    instance_number = h.get("InstanceNumber")
    return Instance(
        path=path,
        size=stat.st_size,
        mtime_ns=stat.st_mtime_ns,
        sop_class=sop_class,
        sop_uid=str(h.get("SOPInstanceUID")),
        series_uid=str(h.get("SeriesInstanceUID")),
        study_uid=str(h.get("StudyInstanceUID", "")),
        frame_of_reference=str(h.get("FrameOfReferenceUID", "") or ""),
        patient_id=str(ds.get("PatientID", "")),
        accession=str(ds.get("AccessionNumber", "")),
        modality=str(h.get("Modality", "")),
        manufacturer=str(ds.get("Manufacturer", "")),
        image_type=tuple(str(v).upper() for v in (h.get("ImageType") or [])),
        rows=int(h.get("Rows")),
        columns=int(h.get("Columns")),
        bits_allocated=int(h.get("BitsAllocated")),
        bits_stored=int(h.get("BitsStored") or h.get("BitsAllocated")),
        pixel_representation=int(h.get("PixelRepresentation") or 0),
        samples=int(samples) if (samples := h.get("SamplesPerPixel")) not in (None, "") else 1,
        photometric=str(h.get("PhotometricInterpretation", "MONOCHROME2")),
        transfer_syntax=ts,
        instance_number=int(instance_number) if instance_number not in (None, "") else None,
        burned_in=str(h.get("BurnedInAnnotation", "")).upper() == "YES",
        frames=frames,
        header_end=header_end,
        synthetic=from_generator(ds),
    )


def walk(root: Path) -> Iterator[Path]:
    """Every file under ``root``, sorted; symbolic links are listed, never followed."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        for name in sorted(filenames):
            if (path := Path(dirpath) / name).is_symlink() or path.is_file():  # never followed
                yield path


@dataclass
class Discovery:
    instances: list[Instance] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    n_files: int = 0
    annotations: list[AnnotationFile] = field(default_factory=list)


def discover(root: Path, workers: int = 1) -> Discovery:
    """Classify every file under ``root`` (header-only reads; ``workers`` processes)."""
    paths = list(walk(Path(root)))
    found = Discovery(n_files=len(paths))
    if workers > 1 and len(paths) >= 64 * workers:  # a pool pays off on larger folders
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers) as pool:
            results = list(pool.map(read_header, paths, chunksize=len(paths) // (workers * 4)))
    else:
        results = [read_header(p) for p in paths]
    for r in results:
        if isinstance(r, Rejection):
            found.rejected.append(r)
        elif isinstance(r, AnnotationFile):
            found.annotations.append(r)
        else:
            found.instances.append(r)
    n = (found.n_files, len(found.instances), len(found.annotations), len(found.rejected))
    log.info("discovered %d files: %d image instances, %d annotations, %d set aside", *n)
    return found
