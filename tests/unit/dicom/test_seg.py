"""DICOM SEG from a mask on a volume grid: frames matched to source images by position."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import examples

from medimg.dicom.geometry import lps_affine, ras_affine
from medimg.dicom.seg import SegInfo, read_sources, slice_indices, source_frames, write_seg
from medimg.errors import DicomError
from tests.helpers import make_series

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
