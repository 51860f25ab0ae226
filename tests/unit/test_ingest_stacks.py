"""Series of several stacks: one volume per echo, time point, b-value or dimension index,
each equal to dcm2niix's where dcm2niix is right, and never a volume of mixed grids.

The series are built from pydicom's real MR and CT test images (tests.helpers
``make_multistack_series``): every image gets its own pixels, so a volume that took a
slice of another stack would differ.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.data import get_testdata_file

from medimg.dicom.deid import Pseudonymizer, load_or_create_salt
from tests.helpers import assert_same_volume, dcm2niix, make_multistack_series, run_ingest

MR = Path(get_testdata_file("MR_small.dcm"))
ENHANCED_CT = Path(get_testdata_file("eCT_Supplemental.dcm"))


def _labels(path: Path) -> Path:
    """labels.csv giving MR_small's patient label 1."""
    patient = str(pydicom.dcmread(MR, stop_before_pixels=True).PatientID)
    path.write_text(f"patient_id,label\n{patient},1\n")
    return path


def _ingest(raw: Path, tmp: Path, name: str = "out", **cfg: object) -> tuple[dict, pd.DataFrame]:
    summary = run_ingest(raw, tmp / name, tmp / "salt", _labels(tmp / "labels.csv"), **cfg)
    return summary, pd.read_parquet(tmp / name / "manifest.parquet")


def _volume(tmp: Path, key: str, name: str = "out") -> np.ndarray:
    return np.asarray(nib.load(tmp / name / "volumes" / f"{key}.nii.gz").dataobj)


def _assert_is(volume: np.ndarray, stored: np.ndarray) -> None:
    """The volume (i, j, k) holds ``stored`` (slices, rows, columns), slice for slice."""
    assert volume.shape == stored.shape[::-1]
    for k in range(stored.shape[0]):
        np.testing.assert_array_equal(volume[:, :, k], stored[k].T)


def _quarantine(out: Path) -> list[dict[str, str]]:
    with (out / "quarantine.csv").open() as f:
        return list(csv.DictReader(f))


def _series_key(tmp: Path, uid: str) -> str:
    return Pseudonymizer(load_or_create_salt(tmp / "salt")).key("series", uid)


@pytest.mark.parametrize("n_echoes", [2, 3])
@pytest.mark.parametrize("interleaved", [False, True], ids=["blocked", "interleaved"])
@pytest.mark.parametrize("file_folders", [False, True], ids=["one_folder", "folder_per_file"])
def test_multi_echo_gives_one_volume_per_echo_equal_to_dcm2niix(
    tmp_path: Path, n_echoes: int, interleaved: bool, file_folders: bool
) -> None:
    echoes = [{"EchoNumbers": e, "EchoTime": 5.0 + 10 * (e - 1)} for e in range(1, n_echoes + 1)]
    raw = tmp_path / "raw"
    uid, stored = make_multistack_series(
        raw, MR, 10, echoes, interleaved=interleaved, file_folders=file_folders
    )
    summary, m = _ingest(raw, tmp_path)
    assert summary["n_stacks"] == n_echoes and summary["n_quarantined_files"] == 0, summary
    dcm2niix(raw, tmp_path / "ref")
    series = _series_key(tmp_path, uid)
    for e in range(1, n_echoes + 1):
        (row,) = m[m["split_value"] == str(e)].to_dict("records")
        assert row["key"].startswith(f"{series}-") and uid not in row["key"]
        assert (row["split_by"], row["series"], row["status"]) == ("EchoNumbers", series, "ok")
        assert list(row["flags"]) == ["split_series"] and row["label"] == 1
        assert row["n_slices"] == 10
        _assert_is(_volume(tmp_path, row["key"]), stored[e - 1])
        assert_same_volume(tmp_path / "out" / row["volume"], tmp_path / "ref" / f"{uid}_e{e}.nii")
    # the keys are stable: a second run elsewhere gives the same ones
    _, again = _ingest(raw, tmp_path, "again")
    assert sorted(again["key"]) == sorted(m["key"])


def test_echoes_told_apart_by_echo_time_alone(tmp_path: Path) -> None:
    """Some vendors number every echo 1: EchoTime still tells them apart."""
    echoes = [{"EchoNumbers": 1, "EchoTime": t} for t in (4.6, 9.2)]
    _, stored = make_multistack_series(tmp_path / "raw", MR, 6, echoes, interleaved=True)
    summary, m = _ingest(tmp_path / "raw", tmp_path)
    assert summary["n_stacks"] == 2
    assert sorted(zip(m["split_by"], m["split_value"], strict=True)) == [
        ("EchoTime", "4.6"),
        ("EchoTime", "9.2"),
    ]
    for n, t in enumerate(("4.6", "9.2")):
        _assert_is(_volume(tmp_path, m[m["split_value"] == t]["key"].item()), stored[n])


# dcm2niix builds 4D volumes in InstanceNumber order: where the numbers run through the
# time points (or b-values) at each position, it puts images of several time points into
# one volume, with a slice step of zero. Those cases are checked against the intended
# volumes only; the blocked ones against dcm2niix as well.
ORDERS = pytest.mark.parametrize(
    "interleaved", [False, True], ids=["blocked", "interleaved_not_dcm2niix"]
)


@ORDERS
def test_dynamic_series_of_three_time_points(tmp_path: Path, interleaved: bool) -> None:
    times = [{"TemporalPositionIdentifier": t, "NumberOfTemporalPositions": 3} for t in (1, 2, 3)]
    raw = tmp_path / "raw"
    uid, stored = make_multistack_series(raw, MR, 8, times, interleaved=interleaved)
    summary, m = _ingest(raw, tmp_path)
    assert summary["n_stacks"] == 3 and summary["n_quarantined_files"] == 0
    if not interleaved:
        dcm2niix(raw, tmp_path / "ref")
    ref = tmp_path / "ref" / f"{uid}.nii"
    for t in (1, 2, 3):
        row = m[m["split_value"] == str(t)].iloc[0]
        assert row["split_by"] == "TemporalPositionIdentifier"
        _assert_is(_volume(tmp_path, row["key"]), stored[t - 1])
        if not interleaved:
            assert nib.load(ref).shape == (64, 64, 8, 3)  # one 4D volume, time last
            assert_same_volume(tmp_path / "out" / row["volume"], ref, frame=t - 1)


@ORDERS
def test_diffusion_series_of_two_b_values(tmp_path: Path, interleaved: bool) -> None:
    b_values = [{"DiffusionBValue": 0.0}, {"DiffusionBValue": 1000.0}]
    raw = tmp_path / "raw"
    uid, stored = make_multistack_series(raw, MR, 8, b_values, interleaved=interleaved)
    summary, m = _ingest(raw, tmp_path)
    assert summary["n_stacks"] == 2 and summary["n_quarantined_files"] == 0
    if not interleaved:
        dcm2niix(raw, tmp_path / "ref", sidecar=True)
        bvals = [float(v) for v in (tmp_path / "ref" / f"{uid}.bval").read_text().split()]
        assert bvals == [0.0, 1000.0]
    for n, b in enumerate(("0", "1000")):
        row = m[m["split_value"] == b].iloc[0]
        assert row["split_by"] == "DiffusionBValue"
        _assert_is(_volume(tmp_path, row["key"]), stored[n])
        if not interleaved:
            ref = tmp_path / "ref" / f"{uid}.nii"
            assert_same_volume(tmp_path / "out" / row["volume"], ref, frame=n)


def test_diffusion_directions_split_within_a_b_value(tmp_path: Path) -> None:
    dirs = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    stacks: list[dict[str, object]] = [{"DiffusionBValue": 0.0}]
    stacks += [{"DiffusionBValue": 800.0, "DiffusionGradientOrientation": d} for d in dirs]
    _, stored = make_multistack_series(tmp_path / "raw", MR, 5, stacks)
    summary, m = _ingest(tmp_path / "raw", tmp_path)
    assert summary["n_stacks"] == 3
    split = {(r["split_by"], r["split_value"]): r["key"] for _, r in m.iterrows()}
    assert set(split) == {
        ("DiffusionBValue", "0"),
        ("DiffusionBValue, DiffusionGradientOrientation", "800, 1\\0\\0"),
        ("DiffusionBValue, DiffusionGradientOrientation", "800, 0\\1\\0"),
    }
    key = split[("DiffusionBValue, DiffusionGradientOrientation", "800, 0\\1\\0")]
    _assert_is(_volume(tmp_path, key), stored[2])


def test_repeated_acquisitions_split_but_per_image_trigger_times_do_not(tmp_path: Path) -> None:
    """AcquisitionNumber splits where it repeats positions; a TriggerTime unique to each
    image marks no stack, and what nothing tells apart stays duplicate_positions."""
    runs = [{"AcquisitionNumber": a} for a in (1, 2)]
    _, stored = make_multistack_series(tmp_path / "acq" / "raw", MR, 6, runs)
    summary, m = _ingest(tmp_path / "acq" / "raw", tmp_path / "acq")
    assert summary["n_stacks"] == 2 and set(m["split_by"]) == {"AcquisitionNumber"}
    _assert_is(_volume(tmp_path / "acq", m[m["split_value"] == "2"]["key"].item()), stored[1])

    same = [{"AcquisitionNumber": 1}, {"AcquisitionNumber": 1}]
    trigger = {(s, k): {"TriggerTime": 10.0 * (6 * s + k)} for s in (0, 1) for k in range(6)}
    make_multistack_series(tmp_path / "cine" / "raw", MR, 6, same, changes=trigger)
    summary, _ = _ingest(tmp_path / "cine" / "raw", tmp_path / "cine")
    assert summary["n_stacks"] == 0
    assert summary["quarantine_reasons"] == {"duplicate_positions": 12}
    rows = _quarantine(tmp_path / "cine" / "out")
    assert all("share a position" in r["detail"] for r in rows)


def test_echoes_and_time_points_together(tmp_path: Path) -> None:
    stacks = [
        {"EchoNumbers": e, "EchoTime": 5.0 * e, "TemporalPositionIdentifier": t}
        for t in (1, 2)
        for e in (1, 2)
    ]
    _, stored = make_multistack_series(tmp_path / "raw", MR, 5, stacks, interleaved=True)
    summary, m = _ingest(tmp_path / "raw", tmp_path)
    assert summary["n_stacks"] == 4
    assert set(m["split_by"]) == {"EchoNumbers, TemporalPositionIdentifier"}
    for n, (t, e) in enumerate((t, e) for t in (1, 2) for e in (1, 2)):
        key = m[m["split_value"] == f"{e}, {t}"]["key"].item()
        _assert_is(_volume(tmp_path, key), stored[n])


def test_stacks_setting_keeps_the_first_echo_or_time_point(tmp_path: Path) -> None:
    stacks = [
        {"EchoNumbers": e, "EchoTime": 5.0 * e, "TemporalPositionIdentifier": t}
        for t in (1, 2)
        for e in (1, 2, 3)
    ]
    raw = tmp_path / "raw"
    _, stored = make_multistack_series(raw, MR, 4, stacks)
    everything, m_all = _ingest(raw, tmp_path, "all")
    assert everything["n_stacks"] == 6 and set(m_all["label"]) == {1}
    first_echo, m = _ingest(raw, tmp_path, "echo", stacks={"echo": "first"})
    assert first_echo["n_stacks"] == 2
    assert sorted(m["split_value"]) == ["1, 1", "1, 2"]
    assert first_echo["quarantine_reasons"] == {"stack_not_kept": 16}
    details = {r["detail"] for r in _quarantine(tmp_path / "echo")}
    assert all("ingest.stacks.echo: first" in d for d in details)
    _assert_is(_volume(tmp_path, m[m["split_value"] == "1, 2"]["key"].item(), "echo"), stored[3])
    both, m = _ingest(raw, tmp_path, "both", stacks={"echo": "first", "temporal": "first"})
    assert both["n_stacks"] == 1 and list(m["split_value"]) == ["1, 1"]
    # a kept stack has the key it has when everything is kept
    assert set(m["key"]) <= set(m_all["key"])


def test_qc_report_says_the_series_was_split_and_why(tmp_path: Path) -> None:
    echoes = [{"EchoNumbers": e, "EchoTime": 5.0 * e} for e in (1, 2)]
    uid, _ = make_multistack_series(tmp_path / "raw", MR, 4, echoes)
    _, m = _ingest(tmp_path / "raw", tmp_path)
    qc = json.loads((tmp_path / "out" / "qc.json").read_text())
    (split,) = qc["split_series"]
    assert split == {
        "series": _series_key(tmp_path, uid),
        "keys": sorted(m["key"]),
        "split_by": "EchoNumbers",
    }
    assert {s["split_value"] for s in qc["series"]} == {"1", "2"}
    page = (tmp_path / "out" / "qc.html").read_text()
    assert "Series split into several volumes" in page and "EchoNumbers" in page


@pytest.mark.parametrize(
    ("changed", "expected_stacks"),
    [
        ([5], 0),  # one slice in the middle: the rest has a gap (missing_slices, rejected)
        ([11], 1),  # one slice at the end: 11 slices of one spacing, the odd one set aside
        (list(range(6, 12)), 2),  # half the slices, one block
        (list(range(1, 12, 2)), 2),  # half the slices, every other one
    ],
    ids=["one_middle", "one_end", "half_blocked", "half_interleaved"],
)
def test_a_slice_of_another_pixel_spacing_never_joins_a_volume(
    tmp_path: Path, changed: list[int], expected_stacks: int
) -> None:
    """dcm2niix stacks such a series into one volume of the first slice's spacing;
    ingest makes a volume of each spacing, or none, and says why."""
    raw = tmp_path / "raw"
    odd = {(0, k): {"PixelSpacing": [0.9, 0.9]} for k in changed}
    _, (stored,) = make_multistack_series(raw, MR, 12, [{"PixelSpacing": [0.8, 0.8]}], changes=odd)
    summary, m = _ingest(raw, tmp_path)
    assert summary["n_stacks"] == expected_stacks, summary
    for _, row in m.iterrows():
        spacing = 0.9 if row["split_value"] == "0.9\\0.9" else 0.8
        assert row["split_by"] == "PixelSpacing" and "split_series" in row["flags"]
        img = nib.load(tmp_path / "out" / row["volume"])
        np.testing.assert_allclose(np.sqrt((img.affine[:3, :3] ** 2).sum(0))[:2], spacing)
        slices = [k for k in range(12) if (k in changed) == (spacing == 0.9)]
        _assert_is(np.asarray(img.dataobj), stored[slices])
    if len(changed) == 1:
        rows = _quarantine(tmp_path / "out")
        odd_file = {r["reason"] for r in rows if r["file"].endswith(f"IM{changed[0]:03d}")}
        assert odd_file == {"no_stack"}
        assert all("PixelSpacing" in r["detail"] or "missing" in r["detail"] for r in rows)
    # with irregular: flag, the gap is kept flagged: still no slice of the other spacing
    flagged, m = _ingest(raw, tmp_path, "flag", irregular="flag")
    assert flagged["n_stacks"] == max(expected_stacks, 1)
    assert all(n < 12 for n in m["n_slices"])


def test_a_slice_of_another_pixel_type_never_joins_a_volume(tmp_path: Path) -> None:
    odd = {(0, k): {"PixelRepresentation": 0} for k in range(3, 6)}
    _, (stored,) = make_multistack_series(tmp_path / "raw", MR, 6, [{}], changes=odd)
    summary, m = _ingest(tmp_path / "raw", tmp_path)
    assert summary["n_stacks"] == 2 and set(m["split_by"]) == {"PixelRepresentation"}
    unsigned = m[m["split_value"] == "0"]["key"].item()
    _assert_is(_volume(tmp_path, unsigned), stored[3:6])


def _enhanced_two_stacks(path: Path, temporal: bool) -> np.ndarray:
    """eCT_Supplemental's two frames twice, at the same positions: as a second time point
    (TemporalPositionIndex) or as a second StackID, both dimension indices. Returns the
    stored frames (4, rows, columns)."""
    import copy

    ds = pydicom.dcmread(ENHANCED_CT)
    frames = ds.pixel_array.astype(np.int32)
    stored = np.concatenate([frames, frames + 100]).astype(ds.pixel_array.dtype)
    items = list(ds.PerFrameFunctionalGroupsSequence)
    extra = [copy.deepcopy(item) for item in items]
    if temporal:
        pointer = pydicom.Dataset()
        pointer.DimensionIndexPointer = 0x00209128  # TemporalPositionIndex
        pointer.FunctionalGroupPointer = 0x00209111  # FrameContentSequence
        pointer.DimensionOrganizationUID = ds.DimensionIndexSequence[0].DimensionOrganizationUID
        ds.DimensionIndexSequence.append(pointer)
    for t, group in ((1, items), (2, extra)):
        for item in group:
            content = item.FrameContentSequence[0]
            if temporal:
                content.TemporalPositionIndex = t
                content.DimensionIndexValues = [*content.DimensionIndexValues, t]
            elif t == 2:
                content.StackID = "2"
                content.DimensionIndexValues = [2, content.DimensionIndexValues[1]]
    ds.PerFrameFunctionalGroupsSequence = items + extra
    ds.NumberOfFrames = 4
    ds.PixelData = stored.tobytes()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.SeriesInstanceUID = pydicom.uid.generate_uid()
    path.parent.mkdir(parents=True)
    ds.save_as(path, enforce_file_format=True)
    return stored


@pytest.mark.parametrize(
    ("temporal", "split_by", "values"),
    [
        (True, "TemporalPositionIndex", ["1", "2"]),
        (False, "DimensionIndexValues", ["StackID=1", "StackID=2"]),
    ],
    ids=["temporal_index", "stack_id"],
)
def test_enhanced_multiframe_split_by_dimension_index_equals_dcm2niix(
    tmp_path: Path, temporal: bool, split_by: str, values: list[str]
) -> None:
    stored = _enhanced_two_stacks(tmp_path / "raw" / "IM0", temporal)
    summary, m = _ingest(tmp_path / "raw", tmp_path)
    assert summary["n_stacks"] == 2 and summary["n_quarantined_files"] == 0, summary
    assert set(m["split_by"]) == {split_by} and sorted(m["split_value"]) == values
    slope = float(pydicom.dcmread(ENHANCED_CT).SharedFunctionalGroupsSequence[0]
                  .PixelValueTransformationSequence[0].RescaleSlope)  # fmt: skip
    intercept = float(pydicom.dcmread(ENHANCED_CT).SharedFunctionalGroupsSequence[0]
                      .PixelValueTransformationSequence[0].RescaleIntercept)  # fmt: skip
    dcm2niix(tmp_path / "raw", tmp_path / "ref", name="ref")
    assert nib.load(tmp_path / "ref" / "ref.nii").shape == (512, 512, 2, 2)
    for n, value in enumerate(values):
        row = m[m["split_value"] == value].iloc[0]
        assert_same_volume(tmp_path / "out" / row["volume"], tmp_path / "ref" / "ref.nii", frame=n)
        vol = _volume(tmp_path, row["key"])
        # frame 1 lies below frame 0 (-159 mm, -149 mm): ascending order is 1, 0
        expected = stored[[2 * n + 1, 2 * n]] * slope + intercept
        _assert_is(vol, expected.astype(vol.dtype))
