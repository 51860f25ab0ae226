"""The synthetic cohort is real, varied, deterministic DICOM whose masks match its pixels.

dcm2niix serves as an independent oracle for the geometry.
"""

from __future__ import annotations

import csv
import hashlib
import subprocess
import warnings
from collections import defaultdict
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom import config as dcm_config

from medimg.config import DataParams, Params, SynthParams
from medimg.dicom import phantom
from medimg.dicom.geometry import lps_affine, ras_affine
from medimg.dicom.synth import STRUCTURES, synth_cohort
from medimg.errors import ConfigError
from tests.helpers import TINY_SYNTH, Cohort, dicom_problems, tool_path, write_cohort

# Positive patients with cysts and solid lesions, in CT and MR, labelled by kind, masks
# of every structure; lesions a little larger than the tiny cohort's, for their statistics.
KIND_SYNTH = TINY_SYNTH.model_copy(
    update={
        "n_patients": 6,
        "positive_fraction": 0.66,
        "mr_fraction": 0.5,
        "lesion_radius_mm": (10.0, 14.0),
        "lesion_contrast_hu": 60.0,  # solid lesions at 115 HU
        "lesion_kinds": ("cyst", "solid"),
        "labels": "kind",
    }
)
BODY, LUNG, LIVER, SPINE, LESION = range(1, 6)  # label-map values of STRUCTURES


def _truth(cohort: Cohort) -> list[dict[str, str]]:
    with cohort.truth.open() as f:
        return list(csv.DictReader(f))


def _digest_tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _write(root: Path, cfg: SynthParams, structures: tuple[str, ...]) -> Cohort:
    """A cohort written with ``structures`` (stages.synth writes the default only)."""
    params = Params(data=DataParams(), synth=cfg)
    data = root / "data"
    counts = synth_cohort(
        cfg,
        data / "raw",
        data / "masks",
        data / "labels.csv",
        data / "synth_truth.csv",
        structures=structures,
    )
    return Cohort(root=root, params=params, counts=counts)


def _pixels_on_mask_grid(cohort: Cohort, row: dict[str, str]) -> tuple[np.ndarray, np.ndarray]:
    """A series' real values (HU, or MR a.u. after any rescale) from its DICOM files, on
    its mask's voxel grid, and the mask: each file placed by its ImagePositionPatient."""
    from pydicom.pixels import apply_rescale

    img = nib.load(cohort.masks / f"{row['series_uid']}.nii.gz")
    mask = np.asarray(img.dataobj)
    values = np.full(mask.shape, np.nan)
    to_voxel = np.linalg.inv(img.affine)
    for path in (cohort.raw / row["folder"]).iterdir():
        ds = pydicom.dcmread(path)
        if ds.SeriesInstanceUID == row["series_uid"]:
            x, y, z = (float(v) for v in ds.ImagePositionPatient)
            k = round(float((to_voxel @ [-x, -y, z, 1.0])[2]))  # LPS -> RAS -> voxel
            values[:, :, k] = apply_rescale(ds.pixel_array, ds).T  # (rows, cols) -> (i, j)
    assert not np.isnan(values).any()  # every slice found its place
    return values, mask


@pytest.fixture(scope="module")
def kind_cohort(tmp_path_factory: pytest.TempPathFactory) -> Cohort:
    return _write(tmp_path_factory.mktemp("kinds"), KIND_SYNTH, STRUCTURES)


@pytest.fixture(scope="module")
def strict_headers(tiny_cohort: Cohort) -> dict[str, list[pydicom.Dataset]]:
    """Every file read with validation errors and warnings raised, grouped by series."""
    old = dcm_config.settings.reading_validation_mode
    dcm_config.settings.reading_validation_mode = dcm_config.RAISE
    series: dict[str, list[pydicom.Dataset]] = defaultdict(list)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for path in sorted(p for p in tiny_cohort.raw.rglob("*") if p.is_file()):
                ds = pydicom.dcmread(path)
                assert ds.pixel_array.size > 0  # decodes without a warning too
                series[ds.SeriesInstanceUID].append(ds)
    finally:
        dcm_config.settings.reading_validation_mode = old
    return series


def test_same_seed_gives_identical_bytes(tiny_cohort: Cohort, tmp_path: Path) -> None:
    again = write_cohort(tmp_path / "again")
    for sub in ("raw", "masks"):
        assert _digest_tree(tiny_cohort.root / "data" / sub) == _digest_tree(
            again.root / "data" / sub
        )
    assert tiny_cohort.labels.read_bytes() == again.labels.read_bytes()
    other = write_cohort(tmp_path / "other", TINY_SYNTH.model_copy(update={"seed": 8}))
    assert _digest_tree(other.raw) != _digest_tree(tiny_cohort.raw)


def test_files_read_strictly_and_look_like_a_pacs_export(
    tiny_cohort: Cohort, strict_headers: dict[str, list[pydicom.Dataset]]
) -> None:
    truth = {r["series_uid"]: r for r in _truth(tiny_cohort)}
    assert set(strict_headers) == set(truth)
    files = [p for p in tiny_cohort.raw.rglob("*") if p.is_file()]
    assert len(files) == tiny_cohort.counts["files"]
    assert all(p.suffix == "" for p in files)  # names without extensions
    assert min(len(p.relative_to(tiny_cohort.raw).parts) for p in files) >= 3  # nested
    for uid, slices in strict_headers.items():
        assert len(slices) == TINY_SYNTH.n_slices
        ds = slices[0]
        assert ds.Modality == truth[uid]["modality"]
        assert ds.SOPClassUID == (
            pydicom.uid.CTImageStorage if ds.Modality == "CT" else pydicom.uid.MRImageStorage
        )
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert len({s.SOPInstanceUID for s in slices}) == len(slices)
        for key in (
            "PatientName",
            "PatientID",
            "PatientBirthDate",
            "InstitutionName",
            "ReferringPhysicianName",
            "AccessionNumber",
            "OperatorsName",
        ):
            assert str(ds.get(key, "")).strip(), f"fake PHI {key} missing"
    vendors = {s[0].Manufacturer for s in strict_headers.values()}
    assert len(vendors) >= 3


def test_variety_of_orientations_and_orderings(
    tiny_cohort: Cohort, strict_headers: dict[str, list[pydicom.Dataset]]
) -> None:
    rows = _truth(tiny_cohort)
    assert {r["orientation"] for r in rows} == {"axial", "coronal", "sagittal", "oblique"}
    assert {r["modality"] for r in rows} == {"CT", "MR"}
    assert any(r["descending"] == "1" for r in rows)
    shuffled = [r["series_uid"] for r in rows if r["shuffled"] == "1"]
    assert shuffled
    for uid in shuffled:
        slices = strict_headers[uid]
        normal = np.cross(*np.reshape(slices[0].ImageOrientationPatient, (2, 3)))
        by_position = sorted(slices, key=lambda s: float(np.dot(s.ImagePositionPatient, normal)))
        numbers = [int(s.InstanceNumber) for s in by_position]
        assert numbers != sorted(numbers) and numbers != sorted(numbers, reverse=True)


def test_ct_is_in_hounsfield_units_and_mr_is_not(
    strict_headers: dict[str, list[pydicom.Dataset]],
) -> None:
    from pydicom.pixels import apply_rescale

    modalities = {slices[0].Modality for slices in strict_headers.values()}
    assert modalities == {"CT", "MR"}  # the cohort holds both: each branch below checks some
    for slices in strict_headers.values():
        ds = slices[len(slices) // 2]
        values = apply_rescale(ds.pixel_array, ds)
        if ds.Modality == "CT":
            assert ds.RescaleType == "HU"
            assert values.min() < -900  # air
            assert 0 < np.median(values[values > -500]) < 120  # soft tissue dominates the body
        else:
            assert "RescaleType" not in ds
            assert values.min() >= 0


def test_labels_balance_and_masks(tiny_cohort: Cohort) -> None:
    with tiny_cohort.labels.open() as f:
        labels = {r["patient_id"]: int(r["label"]) for r in csv.DictReader(f)}
    assert len(labels) == TINY_SYNTH.n_patients
    assert sum(labels.values()) == round(TINY_SYNTH.n_patients * TINY_SYNTH.positive_fraction)
    for row in _truth(tiny_cohort):
        assert int(row["label"]) == labels[row["patient_id"]]
        mask = np.asarray(nib.load(tiny_cohort.masks / f"{row['series_uid']}.nii.gz").dataobj)
        assert int(mask.sum()) == int(row["lesion_voxels"])
        # every positive series shows its lesions, no negative one has any
        assert (mask.sum() > 0) == (row["label"] == "1")


def test_mask_geometry_matches_headers(
    tiny_cohort: Cohort, strict_headers: dict[str, list[pydicom.Dataset]]
) -> None:
    """The mask affine equals the one built from sorted slice headers."""
    for uid, slices in strict_headers.items():
        iop = [float(v) for v in slices[0].ImageOrientationPatient]
        normal = np.cross(iop[:3], iop[3:])
        ordered = sorted(slices, key=lambda s: float(np.dot(s.ImagePositionPatient, normal)))
        p0 = np.asarray(ordered[0].ImagePositionPatient, dtype=float)
        step = (np.asarray(ordered[-1].ImagePositionPatient, dtype=float) - p0) / (len(ordered) - 1)
        ours = nib.as_closest_canonical(
            nib.Nifti1Image(
                np.zeros((slices[0].Columns, slices[0].Rows, len(slices))),
                ras_affine(lps_affine(iop, ordered[0].PixelSpacing, p0, step)),
            )
        )
        mask = nib.as_closest_canonical(nib.load(tiny_cohort.masks / f"{uid}.nii.gz"))
        assert ours.shape == mask.shape
        np.testing.assert_allclose(ours.affine, mask.affine, atol=1e-3)


def test_dcm2niix_converts_every_series_onto_the_mask_grid(
    tiny_cohort: Cohort, tmp_path: Path
) -> None:
    """dcm2niix, an independent converter, agrees on geometry, and the lesion it shows
    lies under our mask."""
    out = tmp_path / "nii"
    out.mkdir()
    proc = subprocess.run(
        [
            tool_path("dcm2niix"),
            "-b",
            "n",
            "-z",
            "n",
            "-f",
            "%j",
            "-o",
            str(out),
            str(tiny_cohort.raw),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = _truth(tiny_cohort)
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{r['series_uid']}.nii" for r in rows)
    contrast = []
    for row in rows:
        img = nib.as_closest_canonical(nib.load(out / f"{row['series_uid']}.nii"))
        mask = nib.as_closest_canonical(nib.load(tiny_cohort.masks / f"{row['series_uid']}.nii.gz"))
        assert img.shape == mask.shape, row
        np.testing.assert_allclose(img.affine, mask.affine, atol=1e-3)
        m = np.asarray(mask.dataobj) > 0
        if m.any():
            data = img.get_fdata()
            body = data > np.percentile(data, 60)
            contrast.append(data[m].mean() - data[body & ~m].mean())
    assert contrast and min(contrast) > 0  # lesions are brighter than the rest of the body


def test_lesions_that_cannot_fit_are_a_config_error(tmp_path: Path) -> None:
    cfg = TINY_SYNTH.model_copy(update={"n_slices": 4, "lesion_radius_mm": (20.0, 30.0)})
    with pytest.raises(ConfigError, match="n_slices"):
        write_cohort(tmp_path, cfg)
    assert not (tmp_path / "data" / "raw").exists()  # nothing half-written


def test_up_to_date_cohort_is_left_alone(tmp_path: Path) -> None:
    first = write_cohort(tmp_path)
    stamp = {p: p.stat().st_mtime_ns for p in first.raw.rglob("*")}
    again = write_cohort(tmp_path)
    assert again.counts == first.counts
    assert {p: p.stat().st_mtime_ns for p in first.raw.rglob("*")} == stamp
    changed = write_cohort(tmp_path, TINY_SYNTH.model_copy(update={"noise_hu": 5.0}))
    assert changed.counts["series"] == first.counts["series"]
    assert {p: p.stat().st_mtime_ns for p in first.raw.rglob("*")} != stamp


def test_lesion_kinds_look_as_a_radiologist_would_tell_them_apart(kind_cohort: Cohort) -> None:
    """Measured in the written pixels under the lesion label: CT cysts are water (0-20 HU)
    and as smooth as the noise, solid lesions enhance (soft tissue plus the configured
    contrast, 115 HU here) and are textured; on MR
    (T1-like) cysts are darker than the liver of the same series and solid lesions
    brighter, with the same contrast in texture against the liver's noise."""
    noise = KIND_SYNTH.noise_hu
    solid = phantom.CT_HU[phantom.SOFT] + KIND_SYNTH.lesion_contrast_hu  # mean HU
    residuals: dict[str, list[np.ndarray]] = defaultdict(list)
    seen = set()
    for row in _truth(kind_cohort):
        if row["lesion_kind"] == "none":
            continue
        values, mask = _pixels_on_mask_grid(kind_cohort, row)
        lesion, liver = values[mask == LESION], values[mask == LIVER]
        kind = row["lesion_kind"]
        assert lesion.size >= 15 and liver.size >= 100, row["series_uid"]
        seen.add((row["modality"], kind))
        if row["modality"] == "CT":
            low, high = (0.0, 20.0) if kind == "cyst" else (solid - 15.0, solid + 15.0)
            assert low <= lesion.mean() <= high, (kind, lesion.mean())
            residuals[kind].append(lesion - lesion.mean())
            continue
        contrast = lesion.mean() / liver.mean()
        texture = lesion.std() / liver.std()  # the liver: one tissue, noise only
        if kind == "cyst":
            assert contrast < 0.6 and texture < 1.5, (contrast, texture)
        else:
            assert contrast > 1.5 and texture > 2.5, (contrast, texture)
    assert seen == {(m, k) for m in ("CT", "MR") for k in ("cyst", "solid")}
    assert np.concatenate(residuals["cyst"]).std() < 1.2 * noise
    assert np.concatenate(residuals["solid"]).std() > 1.6 * noise


def test_label_maps_hold_every_structure_where_its_tissue_is(kind_cohort: Cohort) -> None:
    """Every structure's value appears; under each, CT pixels have that tissue's HU (lung
    -820, liver 100; the spine's vertebral bone 650 and discs 80), so masks and pixels
    agree; body is in every series and the truth's voxel counts are the masks'."""
    expected_hu = {LUNG: -820.0, LIVER: 100.0}
    present: set[int] = set()
    spine: list[np.ndarray] = []
    for row in _truth(kind_cohort):
        values, mask = _pixels_on_mask_grid(kind_cohort, row)
        counts = np.bincount(mask.ravel(), minlength=len(STRUCTURES) + 1)
        assert len(counts) == len(STRUCTURES) + 1  # no value beyond the structures
        assert counts[BODY] > 0
        present |= set(np.flatnonzero(counts))
        assert [int(row[f"{n}_voxels"]) for n in STRUCTURES] == counts[1:].tolist()
        if row["modality"] == "CT":
            for value, hu in expected_hu.items():
                under = values[mask == value]
                assert under.size == 0 or abs(under.mean() - hu) < 6.0, (value, under.mean())
            spine.append(values[mask == SPINE])
    assert present == {0, BODY, LUNG, LIVER, SPINE, LESION}
    column = np.concatenate(spine)
    bone = column > (650.0 + 80.0) / 2  # the column: vertebrae and the discs between them
    assert 0.6 < bone.mean() < 0.95, bone.mean()  # discs: 6 mm of every 32
    assert abs(column[bone].mean() - 650.0) < 6.0 and abs(column[~bone].mean() - 80.0) < 6.0


def test_kind_labels_name_each_patients_lesions(kind_cohort: Cohort) -> None:
    """labels.csv holds none / cyst / solid, split evenly; the truth agrees per series."""
    with kind_cohort.labels.open() as f:
        labels = {r["patient_id"]: r["label"] for r in csv.DictReader(f)}
    assert sorted(labels.values()) == ["cyst", "cyst", "none", "none", "solid", "solid"]
    for row in _truth(kind_cohort):
        assert row["lesion_kind"] == labels[row["patient_id"]]
        assert row["label"] == str(int(row["lesion_kind"] != "none"))
        assert (int(row["lesion_voxels"]) > 0) == (row["label"] == "1")


def test_structures_change_only_the_masks(tiny_cohort: Cohort, tmp_path: Path) -> None:
    """The default cohort's masks are binary and are exactly the lesion label of the same
    cohort written with every structure; files and labels do not change. A cohort written
    with other structures is rewritten, not taken as up to date."""
    rows = _truth(tiny_cohort)
    every = _write(tmp_path, TINY_SYNTH, STRUCTURES)
    assert _digest_tree(every.raw) == _digest_tree(tiny_cohort.raw)
    assert every.labels.read_bytes() == tiny_cohort.labels.read_bytes()
    multi = {
        r["series_uid"]: np.asarray(nib.load(every.masks / f"{r['series_uid']}.nii.gz").dataobj)
        for r in rows
    }
    for row in rows:
        binary = np.asarray(nib.load(tiny_cohort.masks / f"{row['series_uid']}.nii.gz").dataobj)
        assert set(np.unique(binary)) <= {0, 1}
        assert np.array_equal(binary, (multi[row["series_uid"]] == LESION).astype(np.uint8))
        assert (multi[row["series_uid"]] == BODY).sum() > binary.sum()  # more than lesions
    again = _write(tmp_path, TINY_SYNTH, ("lesion",))
    assert _digest_tree(again.masks) == _digest_tree(tiny_cohort.masks)


def test_unknown_structure_is_a_config_error_before_any_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="kidney") as e:
        _write(tmp_path, TINY_SYNTH, ("body", "kidney"))
    assert "liver" in str(e.value)  # it lists the known names
    assert not (tmp_path / "data").exists()


def test_files_of_both_lesion_kinds_are_valid_for_their_iod(kind_cohort: Cohort) -> None:
    """pydicom, highdicom and dciodvfy find nothing wrong with CT and MR images that hold
    cysts or solid lesions (two slices of one series of each)."""
    picked: dict[tuple[str, str], dict[str, str]] = {}
    for row in _truth(kind_cohort):
        picked.setdefault((row["modality"], row["lesion_kind"]), row)
    assert set(picked) == {(m, k) for m in ("CT", "MR") for k in ("none", "cyst", "solid")}
    files = []
    for row in picked.values():
        mine = [
            p
            for p in sorted((kind_cohort.raw / row["folder"]).iterdir())
            if pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID == row["series_uid"]
        ]
        files += mine[:2]
    assert len(files) == 12
    assert {str(p): dicom_problems(p) for p in files} == {str(p): [] for p in files}
