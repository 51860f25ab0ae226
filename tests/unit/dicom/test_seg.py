"""DICOM SEG from a label map on a volume grid: frames matched to source images by
position, one segment per structure; read back with highdicom and rasterised."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import examples

from medimg.config import LESION, CodeParams, StructureParams
from medimg.dicom.annotations import rasterise, read_annotation, structure_labels
from medimg.dicom.geometry import lps_affine, ras_affine
from medimg.dicom.seg import (
    SegInfo,
    Segment,
    label_frames,
    read_sources,
    segments_from,
    slice_indices,
    source_frames,
    write_seg,
)
from medimg.errors import DicomError
from tests.helpers import generated_series, make_series

INFO = SegInfo("medimg lesion (test v1)", "medimg-test", "1")


@pytest.fixture
def series(tmp_path: Path) -> tuple[list[pydicom.Dataset], np.ndarray, np.ndarray]:
    """Four real CT slices 5 mm apart, InstanceNumber against position, their volume
    grid (RAS, slices ascending) and a mask with a different pattern on every slice."""
    _, paths = make_series(tmp_path / "ct", examples.get_path("ct"), n=4)
    for n, path in enumerate(paths):  # InstanceNumber descending with position
        ds = pydicom.dcmread(path)
        ds.InstanceNumber = 4 - n
        ds.save_as(path)
    sources = read_sources(paths)
    first = sources[0]
    positions = sorted(float(ds.ImagePositionPatient[2]) for ds in sources)
    affine = ras_affine(
        lps_affine(
            first.ImageOrientationPatient, first.PixelSpacing, [0, 0, positions[0]], [0, 0, 5]
        )
    )
    rng = np.random.default_rng(0)
    mask = (rng.random((int(first.Columns), int(first.Rows), 4)) > 0.7).astype(np.uint8)
    return sources, affine, mask


def test_frames_follow_position_not_file_or_instance_order(series) -> None:
    sources, affine, mask = series
    shuffled = random.Random(1).sample(sources, len(sources))
    for ds in shuffled:
        (k,) = slice_indices(affine, mask.shape, ds)
        assert k == round(float(ds.ImagePositionPatient[2]) / 5.0)
    frames = source_frames(mask, affine, shuffled)
    for ds, frame in zip(shuffled, frames, strict=True):
        k = round(float(ds.ImagePositionPatient[2]) / 5.0)
        assert np.array_equal(frame, mask[:, :, k].T)


def test_seg_round_trip_through_highdicom_and_strict_pydicom(series, tmp_path: Path) -> None:
    import highdicom as hd
    from pydicom import config

    sources, affine, mask = series
    path = tmp_path / "seg.dcm"
    write_seg(mask, affine, sources, INFO, path)
    old = config.settings.reading_validation_mode
    config.settings.reading_validation_mode = config.RAISE
    try:
        raw = pydicom.dcmread(path)
        for elem in raw.iterall():
            _ = elem.value
    finally:
        config.settings.reading_validation_mode = old
    seg = hd.seg.segread(path)
    uids = [str(ds.SOPInstanceUID) for ds in reversed(sources)]
    got = seg.get_pixels_by_source_instance(uids, segment_numbers=[1])[..., 0]
    for uid, frame in zip(uids, got, strict=True):
        ds = next(d for d in sources if str(d.SOPInstanceUID) == uid)
        k = round(float(ds.ImagePositionPatient[2]) / 5.0)
        assert np.array_equal(frame, mask[:, :, k].T)
    assert raw.PatientID == sources[0].PatientID
    # the same series and model give the same SEG UIDs (a PACS replaces, not piles up)
    again = write_seg(mask, affine, sources, INFO, tmp_path / "again.dcm")
    assert again.SOPInstanceUID == raw.SOPInstanceUID
    assert again.SeriesInstanceUID == raw.SeriesInstanceUID


def test_a_resampled_volume_is_refused_not_misaligned(series) -> None:
    sources, affine, mask = series
    shifted = affine.copy()
    shifted[2, 3] += 2.5  # half a slice: no source image lies on a slice of this grid
    with pytest.raises(DicomError, match=r"source frame 1 lies .* not on a slice"):
        source_frames(mask, shifted, sources)
    swapped = affine[:, [1, 0, 2, 3]]
    with pytest.raises(DicomError, match="rows and columns"):
        source_frames(mask, swapped, sources)


def test_highdicom_refusal_names_the_attribute_not_the_value(series, tmp_path: Path) -> None:
    sources, affine, mask = series
    for ds in sources:
        ds.PatientSex = "SECRETVALUE"
    with pytest.raises(DicomError, match="PatientSex") as err:
        write_seg(mask, affine, sources, INFO, tmp_path / "seg.dcm")
    assert "SECRETVALUE" not in str(err.value)
    assert not (tmp_path / "seg.dcm").exists()


def test_unreadable_source_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "IM1"
    bad.write_bytes(b"not dicom")
    with pytest.raises(DicomError, match="IM1: cannot read as DICOM"):
        read_sources([bad])


# --- several segments, over the generator's series ----------------------------------------

ANATOMY = CodeParams(value="91723000", meaning="Anatomical Structure")
BODY = CodeParams(value="123037004", meaning="Body structure")
LIVER = CodeParams(value="10200004", meaning="Liver")
STRUCTURES = (
    StructureParams(name="body", category=ANATOMY, type=BODY),
    StructureParams(name="liver", category=ANATOMY, type=LIVER),
    LESION,
)


def three_structures(shape: tuple[int, ...]) -> np.ndarray:
    """Labels 1..3 on a grid: a ring with a hole and an island, two blobs on two slices
    only, and a lesion laid over both (a label map: the later structure wins)."""
    n0, n1, n2 = shape
    lm = np.zeros(shape, dtype=np.uint8)
    lm[n0 // 12 : -n0 // 12, n1 // 12 : -n1 // 12, 2:-3] = 1
    lm[n0 // 4 : -n0 // 4, n1 // 4 : -n1 // 4, 2:-3] = 0  # a hole
    lm[3 * n0 // 8 : -3 * n0 // 8, 3 * n1 // 8 : -3 * n1 // 8, n2 // 4] = 1  # an island in it
    lm[n0 // 8 : n0 // 4, n1 // 8 : n1 // 2, n2 // 2 : n2 // 2 + 2] = 2  # on two slices
    lm[5 * n0 // 8 : 7 * n0 // 8, n1 // 2 : 3 * n1 // 4, n2 // 2] = 2  # a second blob
    lm[n0 // 2 - 3 : n0 // 2 + 3, n1 // 5 : n1 // 5 + 5, n2 // 2 - 1 : n2 // 2 + 2] = 3
    return lm


@pytest.fixture(scope="module")
def generated(
    tmp_path_factory: pytest.TempPathFactory,
) -> list[tuple[str, list, tuple, np.ndarray]]:
    """Every series of the tiny cohort: (plane-direction, sources, shape, RAS affine)."""
    return generated_series(tmp_path_factory.mktemp("seg_cohort"))


def test_generated_series_cover_every_plane_both_ways(generated) -> None:
    assert {p for p, *_ in generated} == {
        f"{o}-{d}" for o in ("axial", "coronal", "sagittal", "oblique") for d in "01"
    }


def test_three_segments_round_trip_on_every_plane(generated, tmp_path: Path) -> None:
    import highdicom as hd

    info = dataclasses.replace(INFO, segments=segments_from(STRUCTURES))
    for plane, sources, shape, affine in generated:
        labels = three_structures(shape)
        path = tmp_path / f"{plane}.dcm"
        write_seg(labels, affine, sources, info, path)
        seg = hd.seg.segread(path)
        got = [
            (int(s.SegmentNumber), s.SegmentLabel, s.SegmentedPropertyTypeCodeSequence[0].CodeValue)
            for s in seg.SegmentSequence
        ]
        assert got == [
            (1, "body", "123037004"),
            (2, "liver", "10200004"),
            (3, "lesion", "52988006"),
        ]
        category = {
            s.SegmentedPropertyCategoryCodeSequence[0].CodeValue for s in seg.SegmentSequence
        }
        assert category == {"91723000", "49755003"}
        uids = [str(ds.SOPInstanceUID) for ds in sources]
        pixels = seg.get_pixels_by_source_instance(uids, segment_numbers=[1, 2, 3])
        frames = label_frames(labels, affine, sources)
        for n in (1, 2, 3):
            assert np.array_equal(pixels[..., n - 1], frames == n), (plane, n)
        # and back onto the volume grid, placed by the frames' positions
        back, unmatched = rasterise(
            read_annotation(path), shape, affine, structure_labels(STRUCTURES)
        )
        assert unmatched == ()
        assert np.array_equal(back, labels), plane


def test_default_seg_is_one_lesion_segment_of_every_non_zero_voxel(series, tmp_path) -> None:
    import highdicom as hd

    sources, affine, mask = series
    write_seg(mask * 7, affine, sources, INFO, tmp_path / "seg.dcm")
    seg = hd.seg.segread(tmp_path / "seg.dcm")
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Lesion"]
    assert segments_from((LESION,)) == (Segment(1, "lesion", LESION.category, LESION.type),)
    back, _ = rasterise(
        read_annotation(tmp_path / "seg.dcm"), mask.shape, affine, {"Lesion": 1}.get
    )
    assert np.array_equal(back, mask)
