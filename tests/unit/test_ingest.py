"""Ingest against an independent oracle (dcm2niix) and the generator's ground truth."""

from __future__ import annotations

import csv
import gzip
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.data import get_testdata_file

from medimg.dicom.deid import Pseudonymizer, load_or_create_salt
from tests.helpers import Cohort, assert_same_volume, canonical, dcm2niix, run_ingest

DICOMDIR_TESTS = Path(pydicom.__file__).parent / "data" / "test_files" / "dicomdirtests"
NIBABEL_DATA = Path(nib.__file__).parent / "nicom" / "tests" / "data"


@pytest.fixture(scope="module")
def tiny_ingest(tiny_cohort: Cohort, tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("ingest")
    salt = tmp / "salt"
    out = tmp / "interim"
    summary = run_ingest(tiny_cohort.raw, out, salt, tiny_cohort.labels, tiny_cohort.masks)
    pseudo = Pseudonymizer(load_or_create_salt(salt))
    return {"out": out, "salt": salt, "summary": summary, "pseudo": pseudo}


def _truth(cohort: Cohort) -> list[dict[str, str]]:
    with cohort.truth.open() as f:
        return list(csv.DictReader(f))


def test_every_synthetic_series_equals_dcm2niix(
    tiny_cohort: Cohort, tiny_ingest: dict, tmp_path: Path
) -> None:
    dcm2niix(tiny_cohort.raw, tmp_path)
    rows = _truth(tiny_cohort)
    assert {r["orientation"] for r in rows} == {"axial", "coronal", "sagittal", "oblique"}
    assert any(r["shuffled"] == "1" for r in rows) and any(r["descending"] == "1" for r in rows)
    for row in rows:
        key = tiny_ingest["pseudo"].key("series", row["series_uid"])
        assert_same_volume(
            tiny_ingest["out"] / "volumes" / f"{key}.nii.gz", tmp_path / f"{row['series_uid']}.nii"
        )


def test_masks_land_on_the_volume_grid(tiny_cohort: Cohort, tiny_ingest: dict) -> None:
    for row in _truth(tiny_cohort):
        key = tiny_ingest["pseudo"].key("series", row["series_uid"])
        ours = canonical(tiny_ingest["out"] / "masks" / f"{key}.nii.gz")
        truth = canonical(tiny_cohort.masks / f"{row['series_uid']}.nii.gz")
        vol = canonical(tiny_ingest["out"] / "volumes" / f"{key}.nii.gz")
        np.testing.assert_allclose(ours.affine, vol.affine, atol=1e-6)
        np.testing.assert_array_equal(np.asarray(ours.dataobj), np.asarray(truth.dataobj))


def test_manifest_rows_labels_and_pseudonyms(tiny_cohort: Cohort, tiny_ingest: dict) -> None:
    m = pd.read_parquet(tiny_ingest["out"] / "manifest.parquet")
    truth = {tiny_ingest["pseudo"].key("series", r["series_uid"]): r for r in _truth(tiny_cohort)}
    assert sorted(m["key"]) == sorted(truth)
    assert m["key"].is_unique
    for _, row in m.iterrows():
        t = truth[row["key"]]
        assert row["label"] == int(t["label"])
        assert row["modality"] == t["modality"] and row["vendor"] == t["vendor"]
        assert row["lesion_voxels"] == int(t["lesion_voxels"])
        assert row["status"] == "ok" and list(row["flags"]) == []
        assert row["plane"] == t["orientation"]
        assert len(row["content_hash"]) == 64
    # one pseudonymous patient per real patient, studies grouped under their patient
    assert m["patient"].nunique() == len({r["patient_id"] for r in truth.values()})
    assert all(c in "0123456789abcdef" for k in m["patient"] for c in k)
    qc = json.loads((tiny_ingest["out"] / "qc.json").read_text())
    assert qc["n_stacks"] == len(truth) and qc["n_labelled"] == len(truth)
    assert "<table>" in (tiny_ingest["out"] / "qc.html").read_text()


def test_real_series_match_dcm2niix(tmp_path: Path) -> None:
    """pydicom's CT5N, the enhanced multi-frame eCT_Supplemental, and (geometry only)
    nibabel's enhanced Philips MPRAGE."""
    cases = {
        "ct5n": [DICOMDIR_TESTS / "98892001" / "CT5N"],
        "ect": [Path(get_testdata_file("eCT_Supplemental.dcm"))],
    }
    for name, sources in cases.items():
        raw = tmp_path / name / "raw"
        raw.mkdir(parents=True)
        for src in sources:
            if src.is_dir():
                shutil.copytree(src, raw / src.name)
            else:
                shutil.copy(src, raw)
    mprage = tmp_path / "mprage" / "raw"
    mprage.mkdir(parents=True)
    (mprage / "IM1").write_bytes(
        gzip.decompress((NIBABEL_DATA / "philips_mprage.dcm.gz").read_bytes())
    )
    for name, pixels in (("ct5n", True), ("ect", True), ("mprage", False)):
        raw = tmp_path / name / "raw"
        summary = run_ingest(raw, tmp_path / name / "out", tmp_path / "salt")
        assert summary["n_stacks"] == 1 and summary["n_quarantined_files"] == 0, name
        ref = tmp_path / name / "ref"
        dcm2niix(raw, ref, name="ref")
        (ours,) = (tmp_path / name / "out" / "volumes").iterdir()
        assert_same_volume(ours, ref / "ref.nii", pixels=pixels)


@pytest.mark.parametrize(
    ("sources", "reasons"),
    [
        (["77654033/CT2"], {"missing_slices"}),
        (["98892001/CT2N"], {"localizer"}),
        (["98892003/MR700", "98892003/MR2", "98892003/MR1"], {"no_stack"}),
        (["emri_small.dcm"], {"missing_geometry"}),
    ],
)
def test_real_series_that_must_not_become_volumes(
    tmp_path: Path, sources: list[str], reasons: set[str]
) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    n_files = 0
    for s in sources:
        if s.endswith(".dcm"):
            shutil.copy(get_testdata_file(s), raw)
            n_files += 1
        else:
            shutil.copytree(DICOMDIR_TESTS / s, raw / s.replace("/", "_"))
            n_files += len(list((DICOMDIR_TESTS / s).iterdir()))
    summary = run_ingest(raw, tmp_path / "out", tmp_path / "salt")
    assert summary["n_stacks"] == 0
    assert not list((tmp_path / "out").glob("volumes/*"))
    with (tmp_path / "out" / "quarantine.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len({r["file"] for r in rows}) == n_files
    assert {r["reason"] for r in rows} == reasons


def test_irregular_policy_flag_and_resample(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    shutil.copytree(DICOMDIR_TESTS / "77654033" / "CT2", raw / "CT2")
    flagged = run_ingest(raw, tmp_path / "flag", tmp_path / "salt", irregular="flag")
    assert flagged["n_flagged"] == 1 and flagged["flags"] == {"missing_slices": 1}
    resampled = run_ingest(raw, tmp_path / "resample", tmp_path / "salt", irregular="resample")
    (vol,) = (tmp_path / "resample" / "volumes").iterdir()
    img = nib.load(vol)
    # slices from -99.48 to 105.52 mm: 205 mm at the 1.25 mm of the regular part, 165 slices
    assert img.shape[2] == 165
    np.testing.assert_allclose(np.sqrt((img.affine[:3, :3] ** 2).sum(0))[2], 1.25, atol=1e-3)
    assert resampled["flags"] == {"missing_slices": 1, "resampled": 1}


def test_gantry_tilt_is_resampled_onto_an_orthogonal_grid(tmp_path: Path) -> None:
    """Slices sheared 2 mm per slice along y are shifted back under the first one."""
    from scipy import ndimage

    src = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    raw = tmp_path / "raw"
    raw.mkdir()
    series = pydicom.uid.generate_uid()
    for k in range(4):
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0.0, 2.0 * k, 5.0 * k]
        ds.save_as(raw / f"s{k}", enforce_file_format=True)
    rejected = run_ingest(raw, tmp_path / "reject", tmp_path / "salt")
    assert rejected["quarantine_reasons"] == {"gantry_tilt": 4}
    summary = run_ingest(raw, tmp_path / "out", tmp_path / "salt", irregular="resample")
    assert summary["flags"] == {"gantry_tilt": 1, "resampled": 1}
    (vol,) = (tmp_path / "out" / "volumes").iterdir()
    img = nib.load(vol)
    np.testing.assert_allclose(img.affine[:3, 2], [0, 0, 5.0], atol=1e-6)  # step along normal
    data = img.get_fdata()
    pixels = src.pixel_array * float(src.RescaleSlope) + float(src.RescaleIntercept)
    dr = float(src.PixelSpacing[0])
    for k in range(4):
        expected = ndimage.shift(pixels, (-2.0 * k / dr, 0), order=1, mode="nearest")
        np.testing.assert_allclose(data[:, :, k].T, expected, rtol=1e-5, atol=1e-2)
