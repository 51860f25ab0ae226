"""De-identification on real DICOM: the synthetic cohort and pydicom's own test files.

The canary tests plant a unique value in every attribute of Table E.1-1 and check that
none of them, nor any original UID, survives in the bytes of the written file.
"""

from __future__ import annotations

import copy
import io
import re
import stat
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import config as dcm_config
from pydicom.data import get_testdata_file
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import UID, CTImageStorage

from medimg.dicom.deid import (
    ANNEX_E,
    METHOD,
    Pseudonymizer,
    deidentify,
    load_or_create_salt,
    phi_values,
    write_deidentified,
)
from medimg.errors import ConfigError
from tests.helpers import Cohort

PSEUDONYM = "a1b2c3d4e5f60718"
SALT = b"test-salt-not-secret"


@pytest.fixture
def pseudo() -> Pseudonymizer:
    return Pseudonymizer(SALT)


def _read(name: str) -> Dataset:
    path = get_testdata_file(name)
    assert path is not None, f"pydicom test file {name} is missing (install pydicom-data)"
    return pydicom.dcmread(path)


def _synth_files(cohort: Cohort) -> list[Path]:
    return sorted(p for p in cohort.raw.rglob("*") if p.is_file())


def _to_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def _uids(ds: Dataset) -> Iterator[str]:
    """Every UI value in ``ds`` and its file meta, through sequences."""
    datasets = [ds, *([ds.file_meta] if hasattr(ds, "file_meta") else [])]
    for d in datasets:
        for elem in d.iterall():
            if elem.VR == "UI" and elem.value:
                yield from (
                    map(str, elem.value) if isinstance(elem.value, MultiValue) else [elem.value]
                )


def _plant(ds: Dataset) -> list[str]:
    """Put a unique value in every Table E.1-1 attribute of ``ds``; return the values."""
    planted: list[str] = []

    def canary() -> str:
        planted.append(f"CANARY{len(planted):04d}")  # one length: no value holds another
        return planted[-1]

    def uid() -> str:
        planted.append(f"1.2.826.0.1.3680043.10.999.{1000 + len(planted)}")
        return planted[-1]

    dates = {"DA": "20991231", "TM": "235959.987654", "DT": "20991231235958", "AS": "097W"}
    for tag, action in ANNEX_E.items():
        vr = dictionary_VR(tag)
        target = ds.file_meta if tag.group == 0x0002 else ds
        item = Dataset()
        if vr == "SQ" and action == "U":  # references: kept, their instance UIDs remapped
            item.ReferencedSOPClassUID = CTImageStorage
            item.ReferencedSOPInstanceUID = uid()
            target.add_new(tag, vr, [item])
        elif vr == "SQ":
            item.CodeMeaning = canary()
            inner = Dataset()
            inner.LongCodeValue = canary()
            item.ConceptNameCodeSequence = [inner]
            target.add_new(tag, vr, [item])
        elif vr == "UI":
            target.add_new(tag, vr, uid())
        elif vr in dates:
            target.add_new(tag, vr, dates[vr])
            planted.append(dates[vr])
        elif vr in {"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"}:
            target.add_new(tag, vr, canary())
        elif vr in {"OB", "UN"}:
            target.add_new(tag, vr, canary().encode())
    # Outside the table: a private block, overlay and curve data, an unlisted person
    # name and identifiers nested two sequences deep in an unlisted sequence.
    block = ds.private_block(0x0019, "CANARYCORP", create=True)
    block.add_new(0x10, "LO", canary())
    block.add_new(0x11, "UN", canary().encode())
    ds.add_new(0x60003000, "OW", canary().encode())
    ds.add_new(0x60004000, "LT", canary())
    ds.add_new(0x50003000, "OW", canary().encode())
    ds.EvaluatorName = canary()
    request, code, study = Dataset(), Dataset(), Dataset()
    request.AccessionNumber = canary()
    request.StudyInstanceUID = uid()
    request.RequestedProcedureDescription = canary()
    study.ReferencedSOPClassUID = CTImageStorage
    study.ReferencedSOPInstanceUID = uid()
    code.CodeValue, code.CodingSchemeDesignator = "P1", "99LOCAL"
    code.DocumentAuthorTrial = canary()
    code.ReferencedStudySequence = [study]
    request.RequestedProcedureCodeSequence = [code]
    ds.ReferencedRequestSequence = [request]
    return planted


def test_table_covers_annex_e_with_reduced_codes() -> None:
    assert len(ANNEX_E) > 550
    assert set(ANNEX_E.values()) == {"D", "Z", "X", "U"}
    expected = {
        "PatientName": "Z",
        "PatientID": "Z",  # Z/D
        "PatientBirthDate": "Z",
        "PatientAge": "X",
        "OtherPatientIDsSequence": "X",
        "InstitutionName": "X",  # X/Z/D
        "AcquisitionDate": "X",  # X/Z
        "SeriesDate": "X",  # X/D
        "ContentDate": "Z",  # Z/D
        "AccessionNumber": "Z",
        "StudyInstanceUID": "U",
        "MediaStorageSOPInstanceUID": "U",
        "ReferencedImageSequence": "U",  # X/Z/U*
        "VerifyingObserverName": "D",
    }
    actual = {keyword_for_tag(tag): code for tag, code in ANNEX_E.items()}
    assert {k: actual[k] for k in expected} == expected
    for kept in ("Modality", "SOPClassUID", "PixelData", "ImagePositionPatient", "Manufacturer"):
        assert kept not in actual


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "eCT_Supplemental.dcm"])
def test_canaries_never_reach_the_written_file(name: str, pseudo: Pseudonymizer) -> None:
    ds = _read(name)
    software = ds.file_meta.ImplementationClassUID  # names the writer, not the patient
    originals = [u for u in _uids(ds) if not u.startswith("1.2.840.10008.") and u != software]
    planted = _plant(ds)
    assert set(planted) <= phi_values(ds)
    data = _to_bytes(deidentify(ds, pseudo, patient_pseudonym=PSEUDONYM))
    assert b"CANARY" not in data
    leaked = [v for v in [*planted, *originals] if v.encode() in data]
    assert leaked == []
    assert len(originals) >= 3  # the file's own instance UIDs were checked too


def test_no_phi_of_the_synthetic_cohort_survives(
    tiny_cohort: Cohort, pseudo: Pseudonymizer
) -> None:
    for path in _synth_files(tiny_cohort)[::7]:
        ds = pydicom.dcmread(path)
        phi = phi_values(ds)
        for value in (ds.PatientName, ds.PatientID, ds.InstitutionName, ds.SOPInstanceUID):
            assert str(value) in phi
        data = _to_bytes(deidentify(ds, pseudo, patient_pseudonym=PSEUDONYM))
        # Values of a few characters (sex, age) can occur by chance in pixel bytes.
        assert [v for v in phi if len(v) >= 6 and v.encode() in data] == []


def test_marks_the_dataset_as_deidentified(tiny_cohort: Cohort, pseudo: Pseudonymizer) -> None:
    ds = pydicom.dcmread(_synth_files(tiny_cohort)[0])
    out = pydicom.dcmread(io.BytesIO(_to_bytes(deidentify(ds, pseudo, patient_pseudonym="p1"))))
    assert out.PatientIdentityRemoved == "YES"
    assert out.DeidentificationMethod == METHOD
    (code,) = out.DeidentificationMethodCodeSequence
    assert (code.CodeValue, code.CodingSchemeDesignator) == ("113100", "DCM")
    assert out.PatientName == out.PatientID == "p1"
    for gone in ("InstitutionName", "PatientAddress", "OtherPatientIDs", "PatientAge"):
        assert gone not in out
    assert out.PatientBirthDate == "" and out.ReferringPhysicianName == ""
    assert not any(elem.tag.is_private for elem in out.iterall())
    for kept in (
        "Modality",
        "SOPClassUID",
        "Manufacturer",
        "ManufacturerModelName",
        "ImageType",
        "InstanceNumber",
        "RescaleIntercept",
        "SliceThickness",
        "BitsStored",
    ):
        assert out[kept].value == ds[kept].value


def test_keep_private_keeps_private_tags(tiny_cohort: Cohort, pseudo: Pseudonymizer) -> None:
    ds = pydicom.dcmread(_synth_files(tiny_cohort)[0])
    out = deidentify(ds, pseudo, patient_pseudonym=PSEUDONYM, keep_private=True)
    assert out.private_block(0x0019, "MEDIMG SYNTH")[0x10].value == ds[0x00191010].value


def test_uids_are_remapped_consistently(tiny_cohort: Cohort, pseudo: Pseudonymizer) -> None:
    by_series: dict[str, list[Dataset]] = {}
    for path in _synth_files(tiny_cohort):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        by_series.setdefault(ds.SeriesInstanceUID, []).append(ds)
    first, second = next(iter(by_series.values()))[:2]
    a, b = (deidentify(d, pseudo, patient_pseudonym=PSEUDONYM) for d in (first, second))
    for key in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        assert a[key].value == b[key].value != first[key].value
    assert a.SOPInstanceUID != b.SOPInstanceUID
    for out in (a, b):
        assert out.SOPInstanceUID == out.file_meta.MediaStorageSOPInstanceUID
        assert out.SOPClassUID == first.SOPClassUID
        assert all(UID(u).is_valid for u in _uids(out))
    other = deidentify(first, Pseudonymizer(b"another salt"), patient_pseudonym=PSEUDONYM)
    assert other.StudyInstanceUID != a.StudyInstanceUID
    assert pseudo.uid(first.StudyInstanceUID) == a.StudyInstanceUID


def test_new_uids_are_valid(pseudo: Pseudonymizer) -> None:
    for original in ("1.2.3", "", "2.25.0", "x" * 200):
        new = pseudo.uid(original)
        assert UID(new).is_valid and len(new) <= 64
        assert re.fullmatch(r"2\.25\.(0|[1-9][0-9]*)", new)
    out = deidentify(_read("eCT_Supplemental.dcm"), pseudo, patient_pseudonym=PSEUDONYM)
    assert all(UID(u).is_valid for u in _uids(out))


def _geometry(ds: Dataset) -> list[object]:
    return [
        list(ds[k].value)
        for k in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")
    ] + [ds.SliceThickness]


def test_synthetic_pixels_and_geometry_survive(tiny_cohort: Cohort, pseudo: Pseudonymizer) -> None:
    ds = pydicom.dcmread(_synth_files(tiny_cohort)[3])
    out = pydicom.dcmread(io.BytesIO(_to_bytes(deidentify(ds, pseudo, patient_pseudonym="p"))))
    np.testing.assert_array_equal(out.pixel_array, ds.pixel_array)
    assert out.pixel_array.dtype == ds.pixel_array.dtype
    assert _geometry(out) == _geometry(ds)
    for key in ("RescaleIntercept", "RescaleSlope", "PhotometricInterpretation", "Rows"):
        assert out.get(key) == ds.get(key)


def test_enhanced_multiframe_keeps_per_frame_geometry(pseudo: Pseudonymizer) -> None:
    ds = _read("eCT_Supplemental.dcm")
    out = pydicom.dcmread(io.BytesIO(_to_bytes(deidentify(ds, pseudo, patient_pseudonym="p"))))
    np.testing.assert_array_equal(out.pixel_array, ds.pixel_array)
    frames, new_frames = ds.PerFrameFunctionalGroupsSequence, out.PerFrameFunctionalGroupsSequence
    assert len(new_frames) == len(frames) == ds.NumberOfFrames
    for old, new in zip(frames, new_frames, strict=True):
        old_pos = old.PlanePositionSequence[0].ImagePositionPatient
        assert new.PlanePositionSequence[0].ImagePositionPatient == old_pos
    shared, new_shared = ds.SharedFunctionalGroupsSequence[0], out.SharedFunctionalGroupsSequence[0]
    for seq, key in (
        ("PlaneOrientationSequence", "ImageOrientationPatient"),
        ("PixelMeasuresSequence", "PixelSpacing"),
        ("PixelMeasuresSequence", "SliceThickness"),
    ):
        assert new_shared[seq][0][key].value == shared[seq][0][key].value
    old_dim = ds.DimensionOrganizationSequence[0].DimensionOrganizationUID
    assert out.DimensionOrganizationSequence[0].DimensionOrganizationUID == pseudo.uid(old_dim)


def test_input_dataset_is_not_modified(tiny_cohort: Cohort, pseudo: Pseudonymizer) -> None:
    for ds in (pydicom.dcmread(_synth_files(tiny_cohort)[0]), _read("eCT_Supplemental.dcm")):
        before, meta = copy.deepcopy(ds), copy.deepcopy(ds.file_meta)
        deidentify(ds, pseudo, patient_pseudonym=PSEUDONYM)
        assert ds == before
        assert ds.file_meta == meta


def test_rejects_a_pseudonym_that_looks_like_phi(pseudo: Pseudonymizer) -> None:
    with pytest.raises(ValueError) as err:
        deidentify(_read("CT_small.dcm"), pseudo, patient_pseudonym="Doe^John")
    assert "Doe" not in str(err.value)


@pytest.mark.parametrize("which", ["synthetic", "eCT_Supplemental.dcm"])
def test_written_file_reads_back_strictly(
    which: str, tiny_cohort: Cohort, pseudo: Pseudonymizer, tmp_path: Path
) -> None:
    if which == "synthetic":
        src = _synth_files(tiny_cohort)[0]
    else:
        found = get_testdata_file(which)
        assert found is not None
        src = Path(found)
    dst = tmp_path / "out" / "deid.dcm"
    write_deidentified(src, dst, pseudo, patient_pseudonym=PSEUDONYM)
    assert [p.name for p in dst.parent.iterdir()] == ["deid.dcm"]  # no temporary left
    old = dcm_config.settings.reading_validation_mode
    dcm_config.settings.reading_validation_mode = dcm_config.RAISE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = pydicom.dcmread(dst)
            for elem in out.iterall():
                _ = elem.value  # every value is parsed, and validated
            assert out.pixel_array.size > 0
    finally:
        dcm_config.settings.reading_validation_mode = old
    assert out.PatientID == PSEUDONYM
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID


def test_salt_file_is_created_private_and_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MEDIMG_SALT", raising=False)
    path = tmp_path / "secrets" / "salt"
    salt = load_or_create_salt(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert re.fullmatch(rb"[0-9a-f]{64}", salt)
    assert load_or_create_salt(path) == salt
    assert load_or_create_salt(tmp_path / "other") != salt


def test_salt_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDIMG_SALT", "correct horse battery staple")
    assert load_or_create_salt(tmp_path / "salt") == b"correct horse battery staple"
    assert not (tmp_path / "salt").exists()
    monkeypatch.setenv("MEDIMG_SALT", " ")
    with pytest.raises(ConfigError, match="MEDIMG_SALT"):
        load_or_create_salt(tmp_path / "salt")


def test_pseudonym_keys(pseudo: Pseudonymizer) -> None:
    key = pseudo.key("patient", "MRN1234567")
    assert key == Pseudonymizer(SALT).key("patient", "MRN1234567")
    assert re.fullmatch(r"[0-9a-f]{16}", key)
    assert pseudo.key("patient", "MRN1234567", n=40).startswith(key)
    assert pseudo.key("study", "MRN1234567") != key
    assert pseudo.key("patient", "MRN1234568") != key
    assert Pseudonymizer(b"other").key("patient", "MRN1234567") != key
    assert "test-salt" not in repr(pseudo)
    with pytest.raises(ValueError):
        pseudo.key("patient", "x", n=0)
    with pytest.raises(ValueError):
        Pseudonymizer(b"")
