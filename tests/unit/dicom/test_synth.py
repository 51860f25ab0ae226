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

from medimg.dicom.geometry import lps_affine, ras_affine
from medimg.errors import ConfigError
from tests.helpers import TINY_SYNTH, Cohort, tool_path, write_cohort


def _truth(cohort: Cohort) -> list[dict[str, str]]:
    with cohort.truth.open() as f:
        return list(csv.DictReader(f))


def _digest_tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


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
