"""Ingest on harder input: compressed and unusual pixel encodings, re-runs, kills, PHI."""

from __future__ import annotations

import csv
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from medimg.dicom.deid import Pseudonymizer, load_or_create_salt
from tests.helpers import (
    TINY_SYNTH,
    Cohort,
    make_series,
    plant_canaries,
    run_ingest,
    write_cohort,
)

PIXEL_VARIANTS = [
    "MR_small.dcm",
    "MR_small_RLE.dcm",
    "MR_small_jp2klossless.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "MR_small_implicit.dcm",
    "MR_small_padded.dcm",
]


def _stack_of(src: Path, folder: Path, n: int = 3, **changes: object) -> str:
    """Copy one image into an n-slice series; returns its SeriesInstanceUID."""
    folder.mkdir(parents=True)
    return make_series(folder, src, n, **changes)[0]


def test_compressed_and_unusual_encodings_give_identical_volumes(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    for name in PIXEL_VARIANTS:
        _stack_of(Path(get_testdata_file(name)), raw / name)
    summary = run_ingest(raw, tmp_path / "out", tmp_path / "salt")
    assert summary["n_stacks"] == len(PIXEL_VARIANTS), summary
    volumes = [np.asarray(nib.load(p).dataobj) for p in (tmp_path / "out" / "volumes").iterdir()]
    reference = pydicom.dcmread(get_testdata_file("MR_small.dcm")).pixel_array
    for vol in volumes:
        for k in range(3):
            np.testing.assert_array_equal(vol[:, :, k], reference.T)


def test_undecodable_transfer_syntax_is_quarantined_by_name(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    _stack_of(Path(get_testdata_file("MR_small_RLE.dcm")), raw / "bad")
    for f in (raw / "bad").iterdir():
        ds = pydicom.dcmread(f)
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2 Main Profile
        ds.save_as(f, enforce_file_format=True)
    _stack_of(Path(get_testdata_file("MR_small.dcm")), raw / "good")
    summary = run_ingest(raw, tmp_path / "out", tmp_path / "salt")
    assert summary["n_stacks"] == 1
    rows = list(csv.DictReader((tmp_path / "out" / "quarantine.csv").open()))
    assert {r["file"].split("/")[0] for r in rows} == {"bad"}
    assert any(r["reason"] == "pixel_decode" and "MPEG2" in r["detail"] for r in rows)


def test_monochrome1_and_per_slice_rescale(tmp_path: Path) -> None:
    """MONOCHROME1 is inverted back, and a rescale that varies slice by slice is applied
    slice by slice: both give the same real values as the plain stack."""
    src = Path(get_testdata_file("CT_small.dcm"))
    plain = _stack_of(src, tmp_path / "raw" / "plain")
    ds = pydicom.dcmread(src)
    stored = ds.pixel_array.astype(np.int32)
    folder = tmp_path / "raw" / "variants"
    _stack_of(src, folder)
    series = generate_uid()
    for k, f in enumerate(sorted(folder.iterdir())):
        v = pydicom.dcmread(f)
        v.SeriesInstanceUID = series
        if k == 1:  # MONOCHROME1: stored values inverted within BitsStored
            v.PhotometricInterpretation = "MONOCHROME1"
            top = (1 << v.BitsStored) - 1
            inv = (top - stored) - ((1 << v.BitsStored) if v.PixelRepresentation else 0)
            v.PixelData = inv.astype(ds.pixel_array.dtype).tobytes()
        if k == 2:  # stored doubled, slope halved, intercept moved by 3: real values + 3
            v.RescaleSlope, v.RescaleIntercept = 0.5, float(ds.RescaleIntercept) + 3
            v.PixelData = (2 * stored).astype(ds.pixel_array.dtype).tobytes()
        v.save_as(f, enforce_file_format=True)
    run_ingest(tmp_path / "raw", tmp_path / "out", tmp_path / "salt")
    pseudo = Pseudonymizer(load_or_create_salt(tmp_path / "salt"))
    ref = np.asarray(
        nib.load(tmp_path / "out" / "volumes" / f"{pseudo.key('series', plain)}.nii.gz").dataobj
    )
    (other,) = [
        p
        for p in (tmp_path / "out" / "volumes").iterdir()
        if pseudo.key("series", plain) not in p.name
    ]
    vol = nib.load(other).get_fdata()
    np.testing.assert_array_equal(vol[:, :, 0], ref[:, :, 0])
    np.testing.assert_array_equal(vol[:, :, 1], ref[:, :, 1])
    np.testing.assert_array_equal(vol[:, :, 2], ref[:, :, 2] + 3)


def test_burned_in_annotation_is_quarantined_unless_allowed(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    _stack_of(Path(get_testdata_file("CT_small.dcm")), raw / "s", BurnedInAnnotation="YES")
    out = run_ingest(raw, tmp_path / "a", tmp_path / "salt")
    assert out["n_stacks"] == 0 and out["quarantine_reasons"] == {"burned_in_annotation": 3}
    allowed = run_ingest(raw, tmp_path / "b", tmp_path / "salt", allow_burned_in=True)
    assert allowed["n_stacks"] == 1


def test_rerun_processes_only_new_or_changed_series(tmp_path: Path) -> None:
    cohort = write_cohort(tmp_path / "c", TINY_SYNTH.model_copy(update={"n_patients": 3}))
    out, salt = tmp_path / "out", tmp_path / "salt"
    first = run_ingest(cohort.raw, out, salt, cohort.labels, cohort.masks)
    n = first["n_stacks"]
    before = {p.name: p.stat().st_mtime_ns for p in (out / "volumes").iterdir()}
    again = run_ingest(cohort.raw, out, salt, cohort.labels, cohort.masks)
    assert (again["n_processed"], again["n_reused"]) == (0, n)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "volumes").iterdir()} == before
    # change one file of one series, remove another series, add a new one
    series_dirs = sorted({p.parent for p in cohort.raw.rglob("IM*")})
    changed = next(series_dirs[0].glob("IM*"))
    ds = pydicom.dcmread(changed)
    ds.PixelData = (ds.pixel_array + 1).astype(ds.pixel_array.dtype).tobytes()
    ds.save_as(changed, enforce_file_format=True)
    extra = tmp_path / "extra"
    _stack_of(Path(get_testdata_file("CT_small.dcm")), extra)
    shutil.move(str(extra), cohort.raw / "new_series")
    gone = {
        pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID
        for p in series_dirs[-1].glob("IM*")
    }
    shutil.rmtree(series_dirs[-1])
    third = run_ingest(cohort.raw, out, salt, cohort.labels, cohort.masks)
    n_changed = len({pydicom.dcmread(changed, stop_before_pixels=True).SeriesInstanceUID} - gone)
    assert third["n_processed"] == n_changed + 1
    assert third["n_stacks"] == n - len(gone) + 1
    m = pd.read_parquet(out / "manifest.parquet")
    assert sorted(f"{k}.nii.gz" for k in m["key"]) == sorted(
        p.name for p in (out / "volumes").iterdir()
    )
    records = out / "records"  # per series its row and its source files' fingerprint
    assert sorted(p.stem for p in records.glob("*.json")) == sorted(m["key"])
    assert sorted(p.stem for p in records.glob("*.fingerprint")) == sorted(m["key"])


KILL_SCRIPT = """
import sys
from pathlib import Path
from medimg.config import IngestParams
from medimg.ingest import IngestPaths, ingest
raw, out, salt = map(Path, sys.argv[1:4])
ingest(IngestParams(salt_file=salt), IngestPaths(input=raw, out=out))
"""


def _outputs(out: Path) -> dict[str, str]:
    m = pd.read_parquet(out / "manifest.parquet")
    return dict(zip(m["key"], m["content_hash"], strict=True))


def test_killed_runs_leave_no_partial_output_and_resume(tmp_path: Path) -> None:
    cohort = write_cohort(
        tmp_path / "c", TINY_SYNTH.model_copy(update={"n_patients": 4, "matrix": 96})
    )
    salt = tmp_path / "salt"
    clean = tmp_path / "clean"
    run_ingest(cohort.raw, clean, salt)
    out = tmp_path / "out"
    rng = np.random.default_rng(0)
    for delay in sorted(rng.uniform(0.5, 3.0, size=4)):
        proc = subprocess.Popen(
            [sys.executable, "-c", KILL_SCRIPT, str(cohort.raw), str(out), str(salt)]
        )
        time.sleep(delay)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        # whatever exists under its final name is complete and readable
        for f in out.rglob("*.nii.gz"):
            if not f.name.startswith("."):
                assert np.asarray(nib.load(f).dataobj).size > 0
    final = run_ingest(cohort.raw, out, salt)
    assert _outputs(out) == _outputs(clean)
    assert not [p for p in out.rglob(".*")]  # temporaries of killed runs are gone
    assert final["n_stacks"] == len(_outputs(clean))


def test_phi_canaries_reach_no_output_and_no_log(
    tiny_cohort: Cohort, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    raw, labels = plant_canaries(tiny_cohort, tmp_path)
    uids = {
        str(pydicom.dcmread(p, stop_before_pixels=True).get(k))
        for p in list(raw.rglob("*"))[:50]
        if p.is_file()
        for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
    }
    out = tmp_path / "out"
    with caplog.at_level(logging.DEBUG):
        summary = run_ingest(
            raw, out, tmp_path / "salt", labels, tiny_cohort.masks, export_deid_dicom=True
        )
    assert summary["n_stacks"] == tiny_cohort.counts["series"]
    assert summary["n_labelled"] == summary["n_stacks"]  # labels joined through the hashes
    logs = caplog.text
    for f in out.rglob("*"):
        if not f.is_file() or f.name == "quarantine.csv":
            continue
        data = f.read_bytes()
        if f.suffix == ".gz":
            import gzip

            data = gzip.decompress(data)
        assert b"CNRY" not in data.upper(), f
        for uid in uids:
            assert uid.encode() not in data, f
    assert "CNRY" not in logs.upper()
    for uid in uids:
        assert uid not in logs
    # the de-identified DICOM copies read back and say so
    exported = next((out / "dicom").rglob("*.dcm"))
    ds = pydicom.dcmread(exported)
    assert ds.PatientIdentityRemoved == "YES"
    assert ds.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
