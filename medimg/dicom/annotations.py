"""Annotations in: DICOM SEG and RTSTRUCT objects, read and rasterised onto a volume grid.

:func:`read_annotation` reads what matching needs from the header only (the kind, the
frame of reference, the referenced series and instances, the structure names), so that
ingest can pair each object with its source stack before it reads any pixels.
:func:`rasterise` puts the object on the grid of the ingested volume (the NIfTI shape and
RAS affine of :mod:`medimg.volume`, indexed (column, row, slice)) as a label map:

- SEG (read with highdicom): every frame is placed by its ImagePositionPatient, its
  orientation and pixel spacing, pixel by pixel through the inverse of the grid's affine;
  a pixel that lands off the grid's voxel centres, or outside it, is an error rather
  than a misplaced voxel.
- RTSTRUCT: each CLOSED_PLANAR contour goes into voxel coordinates, must lie on one slice
  plane (within :data:`PLANE_TOLERANCE` of the slice gap) and is filled on that plane with
  :func:`skimage.draw.polygon2mask` (a voxel is inside when its centre is); the contours
  of one ROI on one plane combine by the even-odd rule, so a contour inside another is a
  hole (and one inside the hole an island), as the standard and RT systems read them.

Names map to label values through the caller's ``structure_label`` (``Params``'s synonym
table); where two structures overlap, the higher label wins. Names that match nothing are
returned to be reported, never dropped silently. Nothing here logs: SEG and RTSTRUCT
objects carry patient names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset

from medimg.config import StructureParams, structure_key
from medimg.dicom.geometry import LPS_TO_RAS, direction_cosines
from medimg.dicom.read import dcmread
from medimg.errors import DicomError

SEG_SOP_CLASSES = frozenset({"1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.7"})
RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"
PLANE_TOLERANCE = 0.25  # max distance of a contour or SEG frame from a slice plane, slice gaps
PIXEL_TOLERANCE = 0.1  # max in-plane distance of a SEG pixel from a voxel centre, voxels
CONTOUR_DATA = 0x30060050  # (3006,0050) Contour Data, DS: x, y, z of every point, LPS mm

StructureLabel = Callable[[str], "int | None"]


def structure_labels(structures: Sequence[StructureParams]) -> StructureLabel:
    """``Params.structure_label`` for ``structures``: a name (or synonym, compared as
    :func:`~medimg.config.structure_key` does) to its label value, None for no match."""
    keys = {structure_key(a): i for i, s in enumerate(structures, 1) for a in (s.name, *s.synonyms)}
    return lambda name: keys.get(structure_key(name))


def annotation_kind(sop_class: str, modality: str = "") -> str | None:
    """``"seg"`` or ``"rtstruct"`` for an annotation object (by SOP class, else by
    Modality), None for anything else."""
    if sop_class in SEG_SOP_CLASSES:
        return "seg"
    if sop_class == RTSTRUCT_SOP_CLASS:
        return "rtstruct"
    return {"SEG": "seg", "RTSTRUCT": "rtstruct"}.get(modality.upper()) if not sop_class else None


@dataclass(frozen=True)
class Annotation:
    """What an annotation object refers to (UIDs stay in memory, never in outputs)."""

    path: Path
    kind: str  # "seg" or "rtstruct"
    sop_uid: str
    frame_of_reference_uid: str
    series_uids: tuple[str, ...]  # the referenced source series
    instance_uids: tuple[str, ...]  # the referenced source images (SOPInstanceUID)
    names: tuple[str, ...]  # segment labels or ROI names, in object order


def _instances(items: object, *keys: str) -> Iterator[str]:
    """ReferencedSOPInstanceUID of every item of the sequences ``keys`` nested in
    ``items`` (the last key holds the references)."""
    for item in items or []:  # type: ignore[attr-defined]
        if not keys:
            if "ReferencedSOPInstanceUID" in item:
                yield str(item.ReferencedSOPInstanceUID)
            continue
        yield from _instances(item.get(keys[0]), *keys[1:])


def _seg_refs(ds: Dataset) -> tuple[list[str], list[str], list[str]]:
    series = [str(s.SeriesInstanceUID) for s in ds.get("ReferencedSeriesSequence") or []]
    uids = list(_instances(ds.get("ReferencedSeriesSequence"), "ReferencedInstanceSequence"))
    groups = [*(ds.get("SharedFunctionalGroupsSequence") or [])]
    groups += ds.get("PerFrameFunctionalGroupsSequence") or []
    uids += _instances(groups, "DerivationImageSequence", "SourceImageSequence")
    names = [str(s.get("SegmentLabel", "")) for s in ds.get("SegmentSequence") or []]
    return series, uids, names


def _rtstruct_refs(ds: Dataset) -> tuple[list[str], list[str], list[str]]:
    frames = ds.get("ReferencedFrameOfReferenceSequence") or []
    studies = [st for f in frames for st in f.get("RTReferencedStudySequence") or []]
    refs = [se for st in studies for se in st.get("RTReferencedSeriesSequence") or []]
    series = [str(se.SeriesInstanceUID) for se in refs]
    uids = list(_instances(refs, "ContourImageSequence"))
    uids += _instances(ds.get("ROIContourSequence"), "ContourSequence", "ContourImageSequence")
    names = [str(r.get("ROIName", "")) for r in ds.get("StructureSetROISequence") or []]
    return series, uids, names


def _frame_of_reference(ds: Dataset, kind: str) -> str:
    if kind == "seg" or "FrameOfReferenceUID" in ds:
        return str(ds.get("FrameOfReferenceUID", ""))
    rois = ds.get("StructureSetROISequence") or []
    key = "ReferencedFrameOfReferenceUID"
    found = {str(r.get(key)) for r in rois if key in r}
    frames = ds.get("ReferencedFrameOfReferenceSequence") or []
    found |= {str(f.FrameOfReferenceUID) for f in frames if "FrameOfReferenceUID" in f}
    return found.pop() if len(found) == 1 else ""  # none, or several: matches no series


def read_annotation(path: Path | str) -> Annotation:
    """The references and names of the SEG or RTSTRUCT at ``path`` (header only).

    Raises:
        DicomError: the file cannot be read, or is neither a SEG nor an RTSTRUCT (the
            message names the file).
    """
    path = Path(path)
    try:
        ds = dcmread(path, stop_before_pixels=True)
    except Exception as e:  # pydicom raises many types on damaged files
        raise DicomError(f"{path}: cannot read as DICOM ({type(e).__name__})") from e
    return annotation_of(ds, path)


def annotation_of(ds: Dataset, path: Path = Path("-")) -> Annotation:
    """The :class:`Annotation` of a dataset already read (see :func:`read_annotation`)."""
    kind = _kind(ds, path)
    try:
        series, uids, names = _seg_refs(ds) if kind == "seg" else _rtstruct_refs(ds)
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise DicomError(f"{path}: damaged references ({type(e).__name__})") from e
    return Annotation(
        path=path,
        kind=kind,
        sop_uid=str(ds.get("SOPInstanceUID", "")),
        frame_of_reference_uid=_frame_of_reference(ds, kind),
        series_uids=tuple(dict.fromkeys(series)),
        instance_uids=tuple(dict.fromkeys(uids)),
        names=tuple(names),
    )


def rasterise(
    source: Annotation | Dataset | Path,
    shape: tuple[int, ...],
    affine: npt.NDArray[np.float64],
    structure_label: StructureLabel,
) -> tuple[npt.NDArray[np.uint8], tuple[str, ...]]:
    """The annotation as a label map on the grid (``shape``, RAS ``affine``).

    Args:
        source: an :class:`Annotation` or the path of a SEG or RTSTRUCT (the file is read
            in full, once), or a SEG or RTSTRUCT dataset with its pixels.
        shape: the volume's shape (columns, rows, slices).
        affine: the volume's RAS affine, voxel (i, j, k) to mm.
        structure_label: the label value (1..254) a name means, None if it means none.

    Returns:
        The label map (uint8, 0 background; the higher label where structures overlap)
        and the names that ``structure_label`` matches to nothing, in object order.

    Raises:
        DicomError: the object does not fit the grid (a frame or contour off its slice
            planes or outside it), or is damaged; the message names the file.
    """
    if isinstance(source, Dataset):
        path, ds, kind = Path("-"), source, _kind(source, Path("-"))
    else:
        path = source.path if isinstance(source, Annotation) else Path(source)
        ds, kind = _read_full(path, source.kind if isinstance(source, Annotation) else None)
    grid = np.asarray(np.linalg.inv(LPS_TO_RAS @ affine), dtype=np.float64)  # LPS -> (i, j, k)
    out = np.zeros(shape, dtype=np.uint8)
    unmatched: list[str] = []
    try:
        parts = seg_masks(ds, grid, shape) if kind == "seg" else rtstruct_masks(ds, grid, shape)
        for name, mask in parts:
            label = structure_label(name)
            if label is None:
                unmatched.append(name)
            elif mask is not None:
                np.maximum(out, mask.astype(np.uint8) * np.uint8(label), out=out)
    except DicomError as e:
        raise DicomError(f"{path}: {e}") from e
    except (AttributeError, KeyError, IndexError, TypeError, ValueError) as e:
        raise DicomError(f"{path}: damaged {kind.upper()} ({type(e).__name__})") from e
    return out, tuple(dict.fromkeys(unmatched))


def _kind(ds: Dataset, path: Path) -> str:
    kind = annotation_kind(str(ds.get("SOPClassUID", "")), str(ds.get("Modality", "")))
    if kind is None:
        raise DicomError(f"{path}: not a DICOM SEG or RTSTRUCT object")
    return kind


def _read_full(path: Path, kind: str | None) -> tuple[Dataset, str]:
    """The whole object and its kind (None: found from the file): a SEG through highdicom
    (which checks it as a Segmentation), unless highdicom refuses its transfer syntax (big
    endian), then through pydicom."""
    try:
        ds = dcmread(path)
    except Exception as e:  # pydicom raises many types on damaged files
        what = kind.upper() if kind else "annotation"
        raise DicomError(f"{path}: cannot read the {what} ({type(e).__name__})") from e
    kind = kind or _kind(ds, path)
    if kind == "seg" and ds.file_meta.get("TransferSyntaxUID") != "1.2.840.10008.1.2.2":
        import highdicom as hd

        try:
            return hd.seg.Segmentation.from_dataset(ds, copy=False), kind
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise DicomError(f"{path}: not a valid SEG ({type(e).__name__})") from e
    return ds, kind


def _group(ds: Dataset, frame: Dataset, keyword: str) -> Dataset:
    """Item 0 of the functional group ``keyword`` of a frame: its own, else the shared."""
    for group in (frame, *(ds.get("SharedFunctionalGroupsSequence") or [])):
        if keyword in group:
            return group[keyword].value[0]
    raise DicomError(f"a frame has no {keyword}")


def _on_grid(points: npt.NDArray[np.float64], shape: tuple[int, ...], what: str) -> tuple:
    """Voxel indices of ``points`` (N, 3) in voxel coordinates, which must lie on voxel
    centres (in plane) and slice planes, inside the grid."""
    idx = np.round(points).astype(np.int64)
    off = np.abs(points - idx)
    if np.any(off[:, :2] > PIXEL_TOLERANCE) or np.any(off[:, 2] > PLANE_TOLERANCE):
        worst = np.round(off.max(axis=0), 2).tolist()
        raise DicomError(
            f"{what} lies off the series' voxel grid (by {worst} voxels, column/row/slice); "
            "is it drawn on another series or resampled?"
        )
    if np.any(idx < 0) or np.any(idx >= np.asarray(shape)):
        raise DicomError(f"{what} lies outside the series' volume")
    return tuple(idx.T)


def seg_masks(
    ds: Dataset, grid: npt.NDArray[np.float64], shape: tuple[int, ...]
) -> Iterator[tuple[str, npt.NDArray[np.bool_]]]:
    """(segment label, mask on the grid) of every segment of a SEG; ``grid`` maps LPS mm
    to voxel coordinates."""
    pixels = np.asarray(ds.pixel_array)
    frames = pixels.reshape(-1, *pixels.shape[-2:])  # (frames, rows, columns)
    kind = str(ds.get("SegmentationType", "BINARY")).upper()
    cut = 0.5 * float(ds.get("MaximumFractionalValue", 1) or 1) if kind == "FRACTIONAL" else 0
    segments = {int(s.SegmentNumber): str(s.get("SegmentLabel", "")) for s in ds.SegmentSequence}
    masks = {n: np.zeros(shape, dtype=bool) for n in segments}
    for f, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        row, col, _ = direction_cosines(
            _group(ds, item, "PlaneOrientationSequence").ImageOrientationPatient
        )
        dr, dc = (float(v) for v in _group(ds, item, "PixelMeasuresSequence").PixelSpacing)
        origin = np.asarray(_group(ds, item, "PlanePositionSequence").ImagePositionPatient, float)
        if kind == "LABELMAP":
            values = {n: frames[f] == n for n in segments}
        else:
            number = int(_group(ds, item, "SegmentIdentificationSequence").ReferencedSegmentNumber)
            values = {number: frames[f] > cut}
        for n, hit in values.items():
            r, c = np.nonzero(hit)
            lps = origin + np.outer(c * dc, row) + np.outer(r * dr, col)
            voxels = lps @ grid[:3, :3].T + grid[:3, 3]
            masks[n][_on_grid(voxels, shape, f"frame {f + 1} of segment {n}")] = True
    for n, name in segments.items():
        yield name, masks[n]


def contour_points(contour: Dataset) -> npt.NDArray[np.float64]:
    """The (N, 3) points of a contour item, LPS mm.

    Contour Data is a DS list of thousands of values per structure and slice; pydicom makes
    each one a validated ``DSfloat``, which made reading RTSTRUCTs most of ingest. Read as
    it came from the file, the element's bytes are split and parsed by NumPy at once (about
    8x faster); an element already converted (a dataset built in memory) is taken as it is.

    Raises:
        ValueError: a value is not a finite number, there is none, or their count is not
            a multiple of 3.
    """
    element = contour.get_item(CONTOUR_DATA)
    if element is None:
        raise ValueError("a contour has no Contour Data")
    value = element.value
    if isinstance(value, bytes):
        text = value.strip(b" \x00")
        values = np.array(text.split(b"\\") if text else [], dtype=np.float64)
    else:
        values = np.asarray(value if value is not None else [], dtype=np.float64)
    if values.size == 0 or not np.isfinite(values).all():
        raise ValueError("a contour's Contour Data is empty or holds a non-finite value")
    return values.reshape(-1, 3)


def rtstruct_masks(
    ds: Dataset, grid: npt.NDArray[np.float64], shape: tuple[int, ...]
) -> Iterator[tuple[str, npt.NDArray[np.bool_] | None]]:
    """(ROI name, mask on the grid, None for an ROI without closed contours) of every ROI
    of an RTSTRUCT; ``grid`` maps LPS mm to voxel coordinates."""
    from skimage.draw import polygon2mask

    names = {int(r.ROINumber): str(r.get("ROIName", "")) for r in ds.StructureSetROISequence}
    masks: dict[int, npt.NDArray[np.bool_] | None] = dict.fromkeys(names)
    for roi in ds.get("ROIContourSequence") or []:
        number = int(roi.ReferencedROINumber)
        for n, contour in enumerate(roi.get("ContourSequence") or [], start=1):
            if str(contour.get("ContourGeometricType", "")).upper() != "CLOSED_PLANAR":
                continue  # points and open lines enclose no voxel
            points = contour_points(contour)
            voxels = points @ grid[:3, :3].T + grid[:3, 3]
            k = round(float(np.median(voxels[:, 2])))
            what = f"ROI {number} contour {n}"
            if np.max(np.abs(voxels[:, 2] - k)) > PLANE_TOLERANCE:
                raise DicomError(f"{what} does not lie on a slice plane of the series")
            if not 0 <= k < shape[2]:
                raise DicomError(f"{what} lies outside the series' volume")
            mask = masks.get(number)
            if mask is None:
                mask = masks[number] = np.zeros(shape, dtype=bool)
            mask[:, :, k] ^= polygon2mask(shape[:2], voxels[:, :2])  # even-odd: holes
    for number, name in names.items():
        yield name, masks[number]
