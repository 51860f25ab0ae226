"""SEG and RTSTRUCT objects that medimg did not write (pydicom's and pydicom-data's test
files), read and rasterised onto a grid built from their own geometry; discovery routes
annotation objects to ingest instead of setting them aside; precedence of overlaps."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import examples
from pydicom.data import get_testdata_file

from medimg.config import LESION, CodeParams, StructureParams
from medimg.dicom.annotations import (
    annotation_kind,
    annotation_of,
    rasterise,
    read_annotation,
    structure_labels,
)
from medimg.dicom.discover import discover
from medimg.dicom.geometry import lps_affine, ras_affine
from medimg.dicom.rtstruct import write_rtstruct
from medimg.dicom.seg import read_sources
from medimg.errors import DicomError
from tests.helpers import make_series

ANATOMY = CodeParams(value="91723000", meaning="Anatomical Structure")
BODY = StructureParams(
    name="body",
    category=ANATOMY,
    type=CodeParams(value="123037004", meaning="Body structure"),
    synonyms=("patient", "external"),
)


def test_pydicom_rtstruct_is_read_and_rasterised_on_its_geometry() -> None:
    ds = pydicom.dcmread(get_testdata_file("rtstruct.dcm"), force=True)  # no file meta
    ann = annotation_of(ds)
    assert ann.kind == "rtstruct"
    assert ann.names == ("patient", "Isocenter 1", "Isocenter 2")
    assert ann.frame_of_reference_uid == "1.2.826.0.1.3680043.8.498.2010020400001.2"
    assert ann.series_uids == ("1.2.826.0.1.3680043.8.498.2010020400001.2.1.1",)
    # its contours lie at z = -200, -190, -180 mm: an axial grid of 10 mm voxels whose
    # edges run along the rectangle's sides x = +-200, y = +-150
    affine = ras_affine(lps_affine([1, 0, 0, 0, 1, 0], [10, 10], [-245, -245, -200], [0, 0, 10]))
    labels, unmatched = rasterise(ds, (50, 50, 3), affine, structure_labels([BODY]))
    expected = np.zeros((50, 50, 3), dtype=np.uint8)
    expected[5:45, 10:40, :] = 1  # voxel centres x -195..195, y -145..145
    assert np.array_equal(labels, expected)
    assert unmatched == ("Isocenter 1", "Isocenter 2")  # POINT ROIs, reported by name


@pytest.mark.parametrize("name", ["liver.dcm", "liver_expb.dcm"])
def test_pydicom_data_seg_is_read_and_placed_by_frame_position(name: str) -> None:
    path = get_testdata_file(name)
    ann = read_annotation(path)
    assert (ann.kind, ann.names) == ("seg", ("Liver",))
    assert len(ann.series_uids) == 1 and len(ann.instance_uids) == 3
    ds = pydicom.dcmread(path)
    groups = ds.PerFrameFunctionalGroupsSequence
    positions = [np.asarray(g.PlanePositionSequence[0].ImagePositionPatient, float) for g in groups]
    order = np.argsort([p[2] for p in positions])
    step = positions[order[1]] - positions[order[0]]
    spacing = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
    affine = ras_affine(lps_affine([1, 0, 0, 0, 1, 0], spacing, positions[order[0]], step))
    liver = StructureParams(
        name="liver", category=ANATOMY, type=CodeParams(value="10200004", meaning="Liver")
    )
    labels, unmatched = rasterise(ann, (512, 512, 3), affine, structure_labels([BODY, liver]))
    assert unmatched == ()
    for k, frame in enumerate(order):
        assert np.array_equal(labels[:, :, k].T, (ds.pixel_array[frame] > 0) * 2)
    assert labels.any()
    with pytest.raises(DicomError, match=f"{name}: frame 1 of segment 1 lies off"):
        finer = lps_affine([1, 0, 0, 0, 1, 0], [0.5, 0.5], positions[order[0]], step)
        rasterise(ann, (512, 512, 3), ras_affine(finer), structure_labels([liver]))


@pytest.fixture
def ct_series(tmp_path: Path) -> tuple[list[pydicom.Dataset], tuple[int, ...], np.ndarray]:
    _, paths = make_series(tmp_path / "ct", examples.get_path("ct"), n=4)
    sources = read_sources(paths)
    first = sources[0]
    iop, spacing = first.ImageOrientationPatient, first.PixelSpacing
    affine = ras_affine(lps_affine(iop, spacing, [0, 0, 0], [0, 0, 5]))
    return sources, (int(first.Columns), int(first.Rows), 4), affine


def test_overlapping_structures_the_higher_label_wins(ct_series, tmp_path: Path) -> None:
    sources, shape, affine = ct_series
    labels = np.zeros(shape, dtype=np.uint8)
    labels[10:50, 10:50, 1:3] = 1
    labels[20:30, 20:30, 1:3] = 2  # the lesion inside the body: the body has a hole there
    path = tmp_path / "rt.dcm"
    write_rtstruct(labels, affine, sources, [BODY, LESION], path)
    ds = pydicom.dcmread(path)
    for roi in ds.ROIContourSequence:  # drop the body's holes: now the two overlap
        if roi.ReferencedROINumber == 1:
            roi.ContourSequence = [c for i, c in enumerate(roi.ContourSequence) if i % 2 == 0]
            assert len(roi.ContourSequence) == 2
    back, _ = rasterise(ds, shape, affine, structure_labels([BODY, LESION]))
    assert np.array_equal(back, labels)  # the lesion (2) over the body (1)
    swapped, _ = rasterise(ds, shape, affine, structure_labels([LESION, BODY]))
    assert np.array_equal(swapped, (labels > 0) * 2)  # the body (now 2) over the lesion


def test_discovery_routes_seg_and_rtstruct_to_the_annotations(ct_series, tmp_path: Path) -> None:
    sources, shape, affine = ct_series
    labels = np.zeros(shape, dtype=np.uint8)
    labels[10:20, 10:20, 2] = 1
    write_rtstruct(labels, affine, sources, [LESION], tmp_path / "ct" / "rt.dcm")
    shutil.copy(get_testdata_file("liver.dcm"), tmp_path / "ct" / "seg.dcm")
    found = discover(tmp_path / "ct")
    assert len(found.instances) == 4
    assert found.rejected == []
    assert sorted((a.path.name, a.kind) for a in found.annotations) == [
        ("rt.dcm", "rtstruct"),
        ("seg.dcm", "seg"),
    ]
    assert annotation_kind("", "SEG") == "seg"
    assert annotation_kind("1.2.840.10008.5.1.4.1.1.2", "CT") is None
    with pytest.raises(DicomError, match=r"IM0: not a DICOM SEG or RTSTRUCT"):
        read_annotation(tmp_path / "ct" / "IM0")
