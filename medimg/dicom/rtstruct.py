"""RT Structure Sets (RTSTRUCT) from a label map on a series' volume grid, with pydicom.

One ROI per configured structure (structure i has label i + 1, as in every medimg label
map), one CLOSED_PLANAR contour per connected outline on each source image plane, in
patient coordinates (LPS mm), each referencing its source image.

The outlines come from :func:`skimage.measure.find_contours` at level 0.5 on the plane's
binary mask, padded with a ring of background so that every outline closes. At that
level an outline runs half-way between a voxel inside and its neighbour outside and
never through a voxel centre, so filling it back by voxel centres (the even-odd rule of
:func:`medimg.dicom.annotations.rasterise`) gives exactly the mask again: holes come out
as outlines inside outlines, two blobs as two outlines. Collinear vertices are dropped
(:func:`skimage.measure.approximate_polygon` at tolerance 0), which changes no outline.

Frames are matched to source images by position, as for SEG (:func:`medimg.dicom.seg.
slice_indices`). The object's UIDs are derived from the source series and the label, so
the same input writes the same object again.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import BaseTag
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from medimg.config import StructureParams
from medimg.dicom.annotations import RTSTRUCT_SOP_CLASS
from medimg.dicom.geometry import LPS_TO_RAS
from medimg.dicom.seg import slice_indices
from medimg.errors import DicomError
from medimg.io import atomic_path

ANATOMY = "91723000"  # SNOMED CT Anatomical Structure: an ORGAN to RT systems
DETACHED_STUDY = "1.2.840.10008.3.1.2.3.1"  # Detached Study Management, as RT references it
CONTOUR_DATA = BaseTag(0x30060050)


def _decimal_strings(values: npt.NDArray[np.float64]) -> RawDataElement:
    """Contour Data as the bytes pydicom would write for these floats (each value's
    shortest repr, backslash-separated, padded to even length), without making a
    validated ``DSfloat`` of each: 5 million of them were two thirds of writing the demo's
    RTSTRUCTs."""
    text = "\\".join(map(repr, values.tolist())).encode("ascii")
    if len(text) % 2:
        text += b" "
    return RawDataElement(CONTOUR_DATA, "DS", len(text), text, 0, False, True, True, False)


PATIENT_STUDY = (  # copied from the source images (Patient and General Study modules)
    "SpecificCharacterSet",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)
TYPE_2 = {"PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate"}
TYPE_2 |= {"StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber"}


def plane_outlines(plane: npt.NDArray[np.bool_]) -> list[npt.NDArray[np.float64]]:
    """The closed outlines of a 2D mask, each (N, 2) in its index coordinates, without
    the repeated closing vertex; filled by the even-odd rule they give ``plane`` again."""
    from skimage.measure import approximate_polygon, find_contours

    padded = np.pad(plane.astype(np.float32), 1)
    out = []
    for contour in find_contours(padded, 0.5):
        outline = approximate_polygon(contour, tolerance=0) - 1.0
        if len(outline) > 1 and np.allclose(outline[0], outline[-1]):
            outline = outline[:-1]
        out.append(outline)
    return out


def _header(
    sources: Sequence[Dataset],
    seed: list[str],
    series_number: int,
    label: str,
    created: datetime.datetime | None,
) -> Dataset:
    first = sources[0]
    now = created or datetime.datetime.now()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(RTSTRUCT_SOP_CLASS)
    ds.SOPInstanceUID = generate_uid(entropy_srcs=[*seed, "instance"])
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    for keyword in PATIENT_STUDY:
        if keyword in first:
            setattr(ds, keyword, first.data_element(keyword).value)  # type: ignore[union-attr]
        elif keyword in TYPE_2:
            setattr(ds, keyword, "")
    ds.SOPClassUID = RTSTRUCT_SOP_CLASS
    ds.FrameOfReferenceUID = first.FrameOfReferenceUID  # the Frame of Reference module
    ds.PositionReferenceIndicator = first.get("PositionReferenceIndicator", "")
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[*seed, "series"])
    ds.SeriesNumber = series_number
    ds.OperatorsName = ""
    ds.InstanceNumber = 1
    ds.StructureSetLabel = label[:16]
    ds.StructureSetDate = now.strftime("%Y%m%d")
    ds.StructureSetTime = now.strftime("%H%M%S")
    return ds


def _references(sources: Sequence[Dataset]) -> Dataset:
    """The Referenced Frame of Reference item: frame of reference, study, series and
    every source image."""
    first = sources[0]
    images = []
    for src in sources:
        item = Dataset()
        item.ReferencedSOPClassUID = src.SOPClassUID
        item.ReferencedSOPInstanceUID = src.SOPInstanceUID
        images.append(item)
    series = Dataset()
    series.SeriesInstanceUID = first.SeriesInstanceUID
    series.ContourImageSequence = DicomSequence(images)
    study = Dataset()
    study.ReferencedSOPClassUID = DETACHED_STUDY
    study.ReferencedSOPInstanceUID = first.StudyInstanceUID
    study.RTReferencedSeriesSequence = DicomSequence([series])
    frame = Dataset()
    frame.FrameOfReferenceUID = first.FrameOfReferenceUID
    frame.RTReferencedStudySequence = DicomSequence([study])
    return frame


def _contours(
    mask: npt.NDArray[np.bool_], lps: npt.NDArray[np.float64], planes: list[tuple[Dataset, int]]
) -> list[Dataset]:
    """CLOSED_PLANAR contours of ``mask`` on each (source image, slice index) plane."""
    out: list[Dataset] = []
    for src, k in planes:
        for outline in plane_outlines(mask[:, :, k]):
            ijk = np.column_stack([outline, np.full(len(outline), float(k)), np.ones(len(outline))])
            points = np.round((ijk @ lps.T)[:, :3], 6)  # LPS mm, well within DS's 16 chars
            image = Dataset()
            image.ReferencedSOPClassUID = src.SOPClassUID
            image.ReferencedSOPInstanceUID = src.SOPInstanceUID
            contour = Dataset()
            contour.ContourImageSequence = DicomSequence([image])
            contour.ContourGeometricType = "CLOSED_PLANAR"
            contour.NumberOfContourPoints = len(points)
            contour.ContourNumber = len(out) + 1
            contour[CONTOUR_DATA] = _decimal_strings(points.ravel())
            out.append(contour)
    return out


def build_rtstruct(
    label_map: npt.NDArray[np.integer],
    affine: npt.NDArray[np.float64],
    sources: Sequence[Dataset],
    structures: Sequence[StructureParams],
    *,
    series_number: int = 9902,
    label: str = "medimg",
    manufacturer: str = "medimg",
    created: datetime.datetime | None = None,
) -> Dataset:
    """An RT Structure Set of ``label_map`` over the single-frame ``sources``.

    Args:
        label_map: values 0..K on the volume grid (i, j, k) = (column, row, slice).
        affine: the volume's RAS affine.
        sources: the series' images (any order: matched to slices by position).
        structures: the structures, in label-map order (``Params.structures``).
        series_number: SeriesNumber of the RTSTRUCT.
        label: StructureSetLabel (and the seed of its UIDs beside the source series).
        manufacturer: Manufacturer of the General Equipment module.
        created: StructureSetDate and StructureSetTime (None: now); given, the same input
            writes the same bytes.

    Raises:
        DicomError: a source image lies off the volume's slices, or is multi-frame.
    """
    if not sources or any(int(s.get("NumberOfFrames", 1) or 1) > 1 for s in sources):
        raise DicomError("RTSTRUCT needs the series' single-frame source images")
    planes = [(src, k) for src in sources for k in slice_indices(affine, label_map.shape, src)]
    lps = LPS_TO_RAS @ affine
    seed = [str(sources[0].SeriesInstanceUID), label]
    ds = _header(sources, seed, series_number, label, created)
    ds.Manufacturer = manufacturer
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([_references(sources)])
    rois, contours, observations = [], [], []
    for number, structure in enumerate(structures, start=1):
        roi = Dataset()
        roi.ROINumber = number
        roi.ReferencedFrameOfReferenceUID = sources[0].FrameOfReferenceUID
        roi.ROIName = structure.name
        roi.ROIGenerationAlgorithm = "AUTOMATIC"
        rois.append(roi)
        item = Dataset()
        item.ROIDisplayColor = [(97 * number) % 256, (151 * number) % 256, (211 * number) % 256]
        item.ReferencedROINumber = number
        found = _contours(np.asarray(label_map) == number, lps, planes)
        if found:  # an empty Contour Sequence is not allowed: an ROI without contours
            item.ContourSequence = DicomSequence(found)
        contours.append(item)
        observation = Dataset()
        observation.ObservationNumber = number
        observation.ReferencedROINumber = number
        observation.RTROIInterpretedType = "ORGAN" if structure.category.value == ANATOMY else ""
        observation.ROIInterpreter = ""
        observations.append(observation)
    ds.StructureSetROISequence = DicomSequence(rois)
    ds.ROIContourSequence = DicomSequence(contours)
    ds.RTROIObservationsSequence = DicomSequence(observations)
    return ds


def write_rtstruct(
    label_map: npt.NDArray[np.integer],
    affine: npt.NDArray[np.float64],
    sources: Sequence[Dataset],
    structures: Sequence[StructureParams],
    path: Path,
    *,
    series_number: int = 9902,
    label: str = "medimg",
    manufacturer: str = "medimg",
    created: datetime.datetime | None = None,
) -> Dataset:
    """Build the RTSTRUCT (:func:`build_rtstruct`) and write it to ``path`` atomically."""
    ds = build_rtstruct(
        label_map,
        affine,
        sources,
        structures,
        series_number=series_number,
        label=label,
        manufacturer=manufacturer,
        created=created,
    )
    with atomic_path(path, suffix=".tmp.dcm") as tmp:
        ds.save_as(tmp, enforce_file_format=True)
    return ds
