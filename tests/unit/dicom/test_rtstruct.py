"""RTSTRUCT from a label map: valid for its IOD (pydicom, highdicom, dciodvfy), and read
back into exactly the same label map on every plane the generator writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from medimg.config import LESION, CodeParams, StructureParams
from medimg.dicom.annotations import contour_points, rasterise, read_annotation, structure_labels
from medimg.dicom.rtstruct import plane_outlines, write_rtstruct
from medimg.errors import DicomError
from tests.helpers import dicom_problems, generated_series

ANATOMY = CodeParams(value="91723000", meaning="Anatomical Structure")
BODY = CodeParams(value="123037004", meaning="Body structure")
LIVER = CodeParams(value="10200004", meaning="Liver")
STRUCTURES = (
    StructureParams(name="body", category=ANATOMY, type=BODY),
    StructureParams(name="liver", category=ANATOMY, type=LIVER),
    LESION,
)


def three_structures(shape: tuple[int, ...]) -> np.ndarray:
    """Labels 1..3: a ring with a hole and an island in it, two disjoint blobs on two
    slices only, and a lesion laid over both; slices 0, 1 and the last three are empty."""
    n0, n1, n2 = shape
    lm = np.zeros(shape, dtype=np.uint8)
    lm[n0 // 12 : -n0 // 12, n1 // 12 : -n1 // 12, 2:-3] = 1
    lm[n0 // 4 : -n0 // 4, n1 // 4 : -n1 // 4, 2:-3] = 0
    lm[3 * n0 // 8 : -3 * n0 // 8, 3 * n1 // 8 : -3 * n1 // 8, n2 // 4] = 1
    lm[n0 // 8 : n0 // 4, n1 // 8 : n1 // 2, n2 // 2 : n2 // 2 + 2] = 2
    lm[5 * n0 // 8 : 7 * n0 // 8, n1 // 2 : 3 * n1 // 4, n2 // 2] = 2
    lm[n0 // 2 - 3 : n0 // 2 + 3, n1 // 5 : n1 // 5 + 5, n2 // 2 - 1 : n2 // 2 + 2] = 3
    lm[0, 0, n2 // 2] = 3  # a single voxel at the edge of the image
    return lm


@pytest.fixture(scope="module")
def generated(
    tmp_path_factory: pytest.TempPathFactory,
) -> list[tuple[str, list, tuple, np.ndarray]]:
    """Every series of the tiny cohort: (plane-direction, sources, shape, RAS affine)."""
    return generated_series(tmp_path_factory.mktemp("rt_cohort"))


def test_outlines_fill_back_exactly_holes_and_blobs() -> None:
    from skimage.draw import polygon2mask

    rng = np.random.default_rng(3)
    for _ in range(200):  # saddles, diagonal neighbours, pixels on the border
        plane = rng.random((11, 9)) > rng.uniform(0.2, 0.8)
        filled = np.zeros_like(plane)
        for outline in plane_outlines(plane):
            filled ^= polygon2mask(plane.shape, outline)
        assert np.array_equal(filled, plane)
    ring = np.zeros((9, 9), dtype=bool)
    ring[1:8, 1:8] = True
    ring[3:6, 3:6] = False
    assert len(plane_outlines(ring)) == 2  # the outer outline and the hole's
    blobs = np.zeros((9, 9), dtype=bool)
    blobs[1:3, 1:3] = blobs[5:8, 5:8] = True
    assert len(plane_outlines(blobs)) == 2


def test_rtstruct_is_valid_and_round_trips_on_every_plane(generated, tmp_path: Path) -> None:
    labels_of = structure_labels(STRUCTURES)
    for plane, sources, shape, affine in generated:
        labels = three_structures(shape)
        path = tmp_path / f"{plane}.dcm"
        write_rtstruct(labels, affine, sources, STRUCTURES, path, series_number=9902)
        assert dicom_problems(path) == [], plane
        ann = read_annotation(path)
        assert ann.kind == "rtstruct"
        assert ann.names == ("body", "liver", "lesion")
        assert ann.frame_of_reference_uid == sources[0].FrameOfReferenceUID
        assert ann.series_uids == (sources[0].SeriesInstanceUID,)
        assert set(ann.instance_uids) == {str(ds.SOPInstanceUID) for ds in sources}
        back, unmatched = rasterise(ann, shape, affine, labels_of)
        assert unmatched == ()
        assert np.array_equal(back, labels), plane
        ds = pydicom.dcmread(path)
        for roi in ds.ROIContourSequence:  # each contour on its own source image's plane
            for contour in roi.ContourSequence:
                assert contour.ContourGeometricType == "CLOSED_PLANAR"
                (image,) = contour.ContourImageSequence
                src = next(s for s in sources if s.SOPInstanceUID == image.ReferencedSOPInstanceUID)
                normal = np.cross(
                    *np.reshape(np.asarray(src.ImageOrientationPatient, float), (2, 3))
                )
                points = np.reshape(np.asarray(contour.ContourData, float), (-1, 3))
                offsets = (points - np.asarray(src.ImagePositionPatient, float)) @ normal
                np.testing.assert_allclose(offsets, 0.0, atol=1e-4)


def test_contours_on_no_slice_of_the_grid_are_refused(generated, tmp_path: Path) -> None:
    _, sources, shape, affine = generated[0]
    path = tmp_path / "rt.dcm"
    write_rtstruct(three_structures(shape), affine, sources, STRUCTURES, path)
    shifted = affine.copy()
    shifted[:3, 3] += 0.5 * affine[:3, 2]  # half a slice along the normal
    with pytest.raises(DicomError, match=r"rt\.dcm: ROI 1 contour 1 does not lie on a slice"):
        rasterise(read_annotation(path), shape, shifted, structure_labels(STRUCTURES))


def test_unmatched_roi_names_are_returned_not_dropped(generated, tmp_path: Path) -> None:
    _, sources, shape, affine = generated[0]
    path = tmp_path / "rt.dcm"
    write_rtstruct(three_structures(shape), affine, sources, STRUCTURES, path)
    back, unmatched = rasterise(read_annotation(path), shape, affine, structure_labels([LESION]))
    assert unmatched == ("body", "liver")
    assert np.array_equal(back, (three_structures(shape) == 3).astype(np.uint8))


def test_contour_points_from_the_file_bytes_equal_pydicoms_values() -> None:
    """pydicom's own RTSTRUCT (implicit VR): the bytes parsed at once give every value that
    pydicom's DS conversion gives, for every contour."""
    path = pydicom.data.get_testdata_file("rtstruct.dcm")
    raw, converted = pydicom.dcmread(path, force=True), pydicom.dcmread(path, force=True)
    count = 0
    for roi_raw, roi in zip(raw.ROIContourSequence, converted.ROIContourSequence, strict=True):
        for c_raw, c in zip(roi_raw.ContourSequence, roi.ContourSequence, strict=True):
            assert isinstance(c_raw.get_item(0x30060050).value, bytes)  # not yet converted
            expected = np.reshape(np.asarray(c.ContourData, dtype=np.float64), (-1, 3))
            assert np.array_equal(contour_points(c_raw), expected)
            count += 1
    assert count >= 3


@pytest.mark.parametrize(
    "damage",
    [
        lambda v: v[:-1],  # two coordinates of a point left
        lambda v: [],  # no point at all
        lambda v: [*v[:-1], "inf"],  # a coordinate beyond every slice
        lambda v: ["nan", *v[1:]],  # a coordinate that is not a number
    ],
    ids=["short", "empty", "infinite", "nan"],
)
def test_damaged_contour_data_names_the_file(generated, tmp_path: Path, damage) -> None:
    _, sources, shape, affine = generated[0]
    path = tmp_path / "rt.dcm"
    ds = write_rtstruct(three_structures(shape), affine, sources, STRUCTURES, path)
    contour = ds.ROIContourSequence[0].ContourSequence[0]
    contour.ContourData = damage(list(contour.ContourData))
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(DicomError, match=r"rt\.dcm: damaged RTSTRUCT \(ValueError\)"):
        rasterise(read_annotation(path), shape, affine, structure_labels(STRUCTURES))
