"""DICOM Segmentation objects (highdicom) from a label map on a series' volume grid.

One segment per structure (:class:`Segment`: its label value in the map, its name and its
SNOMED CT codes); a plain binary mask is the one-segment case (the default, a lesion).

The mask comes on the grid of the ingested volume: indexed (i, j, k) = (column, row,
slice) with a RAS affine (see :mod:`medimg.volume`). Each source image is matched to its
slice **by position**: its ImagePositionPatient (per frame, for multi-frame objects) goes
through the inverse of that affine and must land on a whole slice index, with row and
column directions equal to the volume's. So a series whose InstanceNumber ignores
position, or stacked against its normal, still gets every frame on the right instance;
a volume whose slices were resampled (``ingest.irregular: resample``) has no slice for
some source images and is refused, rather than written misaligned.

Which source images a SEG references decides where it may go (see
:mod:`medimg.predict`): de-identified copies (the default) or the original instances (the
hospital's own PACS, where the SEG then carries the patient's identity).
"""

from __future__ import annotations

import datetime
import logging
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset

from medimg.config import LESION, CodeParams, StructureParams
from medimg.dicom.geometry import LPS_TO_RAS, direction_cosines
from medimg.dicom.read import dcmread
from medimg.errors import DicomError
from medimg.io import atomic_path

log = logging.getLogger(__name__)
# highdicom logs every source dataset's UID at INFO as it copies its modules: UIDs of a
# patient's images (PACS mode) do not belong in logs, and a line per copy is noise
logging.getLogger("highdicom").setLevel(logging.WARNING)

POSITION_TOLERANCE = 0.05  # max distance of a source frame from a slice centre, voxels
ORIENTATION_TOLERANCE = 1e-3  # max difference of direction cosines


@dataclass(frozen=True)
class Segment:
    """One structure of a label map, as a SEG segment describes it."""

    label: int  # its value in the label map, 1..K
    name: str  # SegmentLabel
    category: CodeParams  # SegmentedPropertyCategoryCode
    type: CodeParams  # SegmentedPropertyTypeCode


def segments_from(structures: Sequence[StructureParams]) -> tuple[Segment, ...]:
    """The segments of ``Params.structures``: structure i (0-based) has label i + 1."""
    return tuple(Segment(i, s.name, s.category, s.type) for i, s in enumerate(structures, start=1))


@dataclass(frozen=True)
class SegInfo:
    """What the SEG says about where it came from (no patient data), and its segments.

    With no ``segments``, the SEG holds one lesion segment named ``segment_label`` of every
    non-zero voxel (a binary mask, as for a one-structure model).
    """

    series_description: str  # e.g. "medimg lesion (medimg-segmenter v3)"
    algorithm_name: str  # the registered model's name
    algorithm_version: str  # its version (or run id)
    series_number: int = 9901
    segment_label: str = "Lesion"
    manufacturer: str = "medimg"
    software_version: str = "0"
    segments: tuple[Segment, ...] = ()  # one per structure, in label-map order
    created: datetime.datetime | None = None  # content date and time; None: now

    def resolved_segments(self) -> tuple[Segment, ...]:
        """The segments to write: ``segments``, or the one lesion segment."""
        if self.segments:
            return self.segments
        return (Segment(1, self.segment_label, LESION.category, LESION.type),)


def _frame_positions(ds: Dataset) -> list[npt.NDArray[np.float64]]:
    """ImagePositionPatient of every frame of ``ds``, LPS mm, in frame order."""
    if "PerFrameFunctionalGroupsSequence" in ds:
        out = []
        for item in ds.PerFrameFunctionalGroupsSequence:
            out.append(np.asarray(item.PlanePositionSequence[0].ImagePositionPatient, float))
        return out
    return [np.asarray(ds.ImagePositionPatient, dtype=np.float64)]


def _orientation(ds: Dataset) -> npt.NDArray[np.float64]:
    if "ImageOrientationPatient" in ds:
        return np.asarray(ds.ImageOrientationPatient, dtype=np.float64)
    shared = ds.SharedFunctionalGroupsSequence[0]
    if "PlaneOrientationSequence" in shared:
        return np.asarray(shared.PlaneOrientationSequence[0].ImageOrientationPatient, float)
    first = ds.PerFrameFunctionalGroupsSequence[0]
    return np.asarray(first.PlaneOrientationSequence[0].ImageOrientationPatient, float)


def slice_indices(affine: npt.NDArray[np.float64], shape: Sequence[int], ds: Dataset) -> list[int]:
    """The volume slice index k of each frame of ``ds``, found by position.

    Args:
        affine: the volume's RAS affine, voxel (i, j, k) to mm.
        shape: the volume's shape (columns, rows, slices).
        ds: a source image (single- or multi-frame).

    Raises:
        DicomError: a frame lies off the volume's slices, or its rows and columns run
            along other directions than the volume's (the message names the frame).
    """
    row, col, _ = direction_cosines(_orientation(ds))
    lps = LPS_TO_RAS @ affine  # LPS_TO_RAS is its own inverse
    axes = lps[:3, :3] / np.linalg.norm(lps[:3, :3], axis=0)
    if not (
        np.allclose(axes[:, 0], row, atol=ORIENTATION_TOLERANCE)
        and np.allclose(axes[:, 1], col, atol=ORIENTATION_TOLERANCE)
    ):
        raise DicomError("a source image's rows and columns do not run along the volume's axes")
    if int(ds.Rows) != shape[1] or int(ds.Columns) != shape[0]:
        raise DicomError("a source image's matrix differs from the volume's")
    inverse = np.linalg.inv(lps)
    out = []
    for n, position in enumerate(_frame_positions(ds)):
        ijk = (inverse @ np.append(position, 1.0))[:3]
        k = round(float(ijk[2]))
        off = np.abs(ijk - np.array([0.0, 0.0, k]))
        if np.any(off > POSITION_TOLERANCE) or not 0 <= k < shape[2]:
            raise DicomError(
                f"source frame {n + 1} lies {np.round(ijk, 2).tolist()} in volume voxels, "
                "not on a slice (was the volume resampled?)"
            )
        out.append(k)
    return out


def source_frames(
    mask: npt.NDArray[np.integer], affine: npt.NDArray[np.float64], sources: Sequence[Dataset]
) -> npt.NDArray[np.uint8]:
    """The mask cut into the source images' frames: (frames, rows, columns), the frames
    of ``sources`` in order (every frame of a multi-frame source), 1 where non-zero.

    Raises:
        DicomError: see :func:`slice_indices`.
    """
    return (label_frames(mask, affine, sources) > 0).astype(np.uint8)


def label_frames(
    labels: npt.NDArray[np.integer], affine: npt.NDArray[np.float64], sources: Sequence[Dataset]
) -> npt.NDArray[np.integer]:
    """The label map cut into the source images' frames, values kept: (frames, rows,
    columns), as :func:`source_frames`."""
    frames = []
    for ds in sources:
        for k in slice_indices(affine, labels.shape, ds):
            frames.append(np.asarray(labels[:, :, k]).T)  # (columns, rows) -> (rows, columns)
    return np.stack(frames)


def _segment_pixels(
    frames: npt.NDArray[np.integer], segments: Sequence[Segment], binary: bool
) -> npt.NDArray[np.uint8]:
    """(frames, rows, columns, segments): 1 where a frame holds the segment's label (any
    non-zero value for a binary mask)."""
    if binary:
        return (frames > 0).astype(np.uint8)[..., None]
    return np.stack([frames == s.label for s in segments], axis=-1).astype(np.uint8)


def _coded(code: CodeParams) -> Any:  # hd.sr.CodedConcept (highdicom imported lazily)
    import highdicom as hd

    return hd.sr.CodedConcept(code.value, code.scheme, code.meaning)


def read_sources(paths: Sequence[Path]) -> list[Dataset]:
    """The source images, once each, ordered by SOPInstanceUID (any order works: the
    frames are matched by position).

    Raises:
        DicomError: a file cannot be read (the message names it), or the series mixes
            multi-frame objects with others (a SEG references one multi-frame source).
    """
    found: dict[str, Dataset] = {}
    for path in dict.fromkeys(paths):
        try:
            ds = dcmread(path)
        except (pydicom.errors.InvalidDicomError, OSError) as e:
            raise DicomError(f"{path}: cannot read as DICOM ({type(e).__name__})") from e
        found.setdefault(str(ds.SOPInstanceUID), ds)
    sources = [found[uid] for uid in sorted(found)]
    if len(sources) > 1 and any(int(ds.get("NumberOfFrames", 1) or 1) > 1 for ds in sources):
        raise DicomError("series of several multi-frame images: no SEG (one source expected)")
    return sources


def build_seg(
    mask: npt.NDArray[np.integer],
    affine: npt.NDArray[np.float64],
    sources: Sequence[Dataset],
    info: SegInfo,
) -> Dataset:
    """A binary DICOM SEG of ``mask`` over ``sources``, one segment per structure of
    ``info`` (:meth:`SegInfo.resolved_segments`); highdicom validates it as it builds.

    ``mask`` is a label map on the volume grid (values 0..K, each a segment's ``label``),
    or a binary mask when ``info`` names no segments.

    The SEG's own UIDs are derived from the source series, the algorithm and its version,
    so predicting again with the same model gives the same SeriesInstanceUID and
    SOPInstanceUID (a PACS replaces the object instead of piling up copies).

    Raises:
        DicomError: the frames cannot be matched to ``sources``, or highdicom refuses.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    segments = info.resolved_segments()
    pixels = _segment_pixels(label_frames(mask, affine, sources), segments, not info.segments)
    series_uid = str(sources[0].SeriesInstanceUID)
    seed = [series_uid, info.algorithm_name, info.algorithm_version]
    algorithm = hd.AlgorithmIdentificationSequence(
        name=info.algorithm_name[:64],
        version=info.algorithm_version[:64],
        family=codes.cid7162.ArtificialIntelligence,
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=n,
            segment_label=segment.name[:64],
            segmented_property_category=_coded(segment.category),
            segmented_property_type=_coded(segment.type),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )
        for n, segment in enumerate(segments, start=1)
    ]
    with warnings.catch_warnings():
        try:
            # pseudonyms are one-component person names, which highdicom warns about
            warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person")
            seg = hd.seg.Segmentation(
                source_images=list(sources),
                pixel_array=pixels,
                segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
                segment_descriptions=descriptions,
                series_instance_uid=generate_uid(entropy_srcs=[*seed, "series"]),
                series_number=info.series_number,
                sop_instance_uid=generate_uid(entropy_srcs=[*seed, "instance"]),
                instance_number=1,
                manufacturer=info.manufacturer,
                manufacturer_model_name=info.algorithm_name[:64],
                software_versions=info.software_version[:64],
                device_serial_number=info.algorithm_version[:64],
                series_description=info.series_description[:64],
                omit_empty_frames=False,  # every source frame referenced, lesion or not
            )
        except (ValueError, TypeError, AttributeError) as e:
            # highdicom quotes the offending value, which may be the patient's (PACS mode)
            reason = re.sub(r"'[^']*'|\"[^\"]*\"", "<value>", str(e))
            raise DicomError(f"highdicom refused the SEG: {reason}") from e
    return _settled(seg, seed, info.created)


def _settled(seg: Dataset, seed: list[str], created: datetime.datetime | None) -> Dataset:
    """``seg`` as a function of its inputs: highdicom draws a random
    DimensionOrganizationUID, which is derived from ``seed`` instead, and stamps the time it
    ran, which ``created`` (when given) replaces, so that the same annotation writes the
    same bytes (the demo cohort's files, tracked by DVC, then repeat)."""
    from pydicom.uid import generate_uid

    uid = generate_uid(entropy_srcs=[*seed, "dimensions"])
    for item in [*seg.DimensionOrganizationSequence, *seg.DimensionIndexSequence]:
        item.DimensionOrganizationUID = uid
    if created is not None:
        seg.InstanceCreationDate = seg.ContentDate = created.strftime("%Y%m%d")
        seg.InstanceCreationTime = seg.ContentTime = created.strftime("%H%M%S")
        if "ContributingEquipmentSequence" in seg:  # highdicom's own item comes last
            seg.ContributingEquipmentSequence[-1].ContributionDateTime = created.strftime(
                "%Y%m%d%H%M%S"
            )
    return seg


def write_seg(
    mask: npt.NDArray[np.integer],
    affine: npt.NDArray[np.float64],
    sources: Sequence[Dataset],
    info: SegInfo,
    path: Path,
) -> Dataset:
    """Build the SEG (:func:`build_seg`) and write it to ``path`` atomically."""
    seg = build_seg(mask, affine, sources, info)
    with atomic_path(path, suffix=".tmp.dcm") as tmp:
        seg.save_as(tmp, enforce_file_format=True)
    return seg
