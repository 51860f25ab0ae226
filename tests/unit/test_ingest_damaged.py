"""A corpus of damaged input: every variant ends in quarantine or a named QC flag, and
the good series beside them are ingested exactly as without them."""

from __future__ import annotations

import csv
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from medimg.dicom.deid import Pseudonymizer, load_or_create_salt
from tests.fuzz_mutators import elements
from tests.helpers import Cohort, make_series, run_ingest

CT = Path(get_testdata_file("CT_small.dcm"))


def series(folder: Path, n: int = 3, src: Path = CT, **changes: object) -> list[Path]:
    """A clean n-slice series made from one real CT image."""
    return make_series(folder, src, n, **changes)[1]


def edit(path: Path, fn: Callable[[Dataset], None]) -> None:
    ds = pydicom.dcmread(path)
    fn(ds)
    ds.save_as(path, enforce_file_format=True)


def delete(keyword: str) -> Callable[[Dataset], None]:
    return lambda ds: delattr(ds, keyword)


def setval(keyword: str, value: object) -> Callable[[Dataset], None]:
    return lambda ds: setattr(ds, keyword, value)


def non_image(folder: Path, sop_class: str, modality: str) -> None:
    folder.mkdir(parents=True)
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, generate_uid()
    ds.SeriesInstanceUID, ds.StudyInstanceUID = generate_uid(), generate_uid()
    ds.Modality = modality
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = (
        sop_class,
        ds.SOPInstanceUID,
    )
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(folder / "obj", enforce_file_format=True)


def dicomdir_with_traversal(folder: Path) -> None:
    folder.mkdir(parents=True)
    ds = Dataset()
    ds.FileSetID = "EXPORT"
    record = Dataset()
    record.DirectoryRecordType = "IMAGE"
    record.ReferencedFileID = ["..", "..", "..", "etc", "passwd"]
    ds.DirectoryRecordSequence = Sequence([record])
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(folder / "DICOMDIR", enforce_file_format=True)


def encapsulated(ds: Dataset, transfer_syntax: str) -> None:
    ds.PixelData = encapsulate([ds.PixelData])
    ds.file_meta.TransferSyntaxUID = transfer_syntax


def truncate(path: Path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def overwrite(path: Path, offset: int, data: bytes) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset : offset + len(data)] = data
    path.write_bytes(bytes(raw))


def new_series(ds: Dataset) -> None:
    ds.SeriesInstanceUID = generate_uid()


def rle_panic(ds: Dataset) -> None:
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([frame[:64] + b"\x81" + frame[65:]])  # first segment byte


def swallow_pixel_data(path: Path) -> None:
    """The element before Pixel Data declares a length that runs to the end of the file."""
    data = path.read_bytes()
    *_, last, pixel = elements(data)
    assert pixel.tag == 0x7FE00010 and last.length_size == 4
    new = (len(data) - last.value_at).to_bytes(4, "little")
    overwrite(path, last.length_at, new)


def odd_length_us(path: Path, tag: int) -> None:
    """A US value of three bytes, the file otherwise well-formed (explicit VR LE)."""
    data = path.read_bytes()
    (e,) = [e for e in elements(data) if e.tag == tag]
    raw = data[: e.length_at] + b"\x03\x00" + data[e.value_at : e.value_at + 2] + b"\x00"
    path.write_bytes(raw + data[e.value_at + e.length :])


def build_corpus(root: Path) -> dict[str, set[str]]:
    """Write every variant under root/<name>/; return name -> acceptable outcomes
    (quarantine reasons or manifest QC flags)."""
    v: dict[str, set[str]] = {}

    def add(name: str, outcomes: set[str]) -> Path:
        v[name] = outcomes
        return root / name

    (add("zero_byte", {"not_dicom"}) / "f").parent.mkdir(parents=True)
    (root / "zero_byte" / "f").write_bytes(b"")
    add("text_file", {"not_dicom"}).mkdir(parents=True)
    (root / "text_file" / "README.txt").write_text("exported by PACS\n")
    add("random_bytes", {"not_dicom"}).mkdir(parents=True)
    (root / "random_bytes" / "blob").write_bytes(os.urandom(4096))
    add("png", {"not_dicom"}).mkdir(parents=True)
    (root / "png" / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    # cut inside the header: pydicom reads what is there, so required tags are missing
    p = series(add("truncated_header", {"not_dicom", "unreadable", "missing_tag"}))  # fmt: skip
    truncate(p[1], 0.05)
    p = series(add("truncated_pixels", {"unreadable", "pixel_decode", "series_incomplete"}))
    truncate(p[1], 0.8)
    p = series(add("no_preamble", {"not_dicom"}), n=1)
    p[0].write_bytes(p[0].read_bytes()[132:])  # strip preamble and 'DICM'
    p = series(add("no_file_meta", {"not_dicom", "unreadable", "no_stack"}), n=1)
    ds = pydicom.dcmread(p[0])
    del ds.file_meta
    pydicom.dcmwrite(p[0], ds, implicit_vr=True, little_endian=True)
    for kw, reason in (("ImagePositionPatient", "missing_geometry"),
                       ("ImageOrientationPatient", "missing_geometry"),
                       ("PixelSpacing", "missing_geometry"),
                       ("Rows", "missing_tag"), ("SOPInstanceUID", "missing_tag")):  # fmt: skip
        p = series(add(f"missing_{kw}", {reason, "incomplete_series"}))
        edit(p[1], delete(kw))
    p = series(add("missing_series_uid", {"missing_tag", "missing_slices"}))
    edit(p[1], delete("SeriesInstanceUID"))
    p = series(add("position_not_numbers", {"missing_geometry", "incomplete_series"}))
    raw = p[0].read_bytes()
    at = raw.index(b"\x20\x00\x32\x00DS")  # (0020,0032) ImagePositionPatient
    length = int.from_bytes(raw[at + 6 : at + 8], "little")
    overwrite(p[0], at + 8, b"a\\b\\c".ljust(length, b" "))
    p = series(add("orientation_5_values", {"missing_geometry", "incomplete_series"}))
    edit(p[0], setval("ImageOrientationPatient", [1, 0, 0, 0, 1]))
    p = series(add("orientation_not_orthogonal", {"missing_geometry", "incomplete_series"}))
    edit(p[2], setval("ImageOrientationPatient", [1, 0, 0, 1, 0, 0]))
    p = series(add("zero_pixel_spacing", {"missing_geometry", "incomplete_series"}))
    edit(p[0], setval("PixelSpacing", [0, 0]))
    p = series(add("mixed_matrix", {"no_stack", "split_series"}), n=4)
    edit(p[3], lambda ds: (setattr(ds, "Rows", 64), setattr(ds, "Columns", 32)))
    p = series(add("duplicate_instance", {"duplicate_instances"}))
    shutil.copy(p[1], p[1].with_name("IM1_copy"))
    p = series(add("duplicate_position", {"duplicate_positions"}))
    edit(p[2], setval("ImagePositionPatient", [0.0, 0.0, 5.0]))
    p = series(add("missing_middle_slice", {"missing_slices"}), n=4)
    p[2].unlink()
    p = series(add("uneven_spacing", {"nonuniform_spacing"}), n=4)
    edit(p[3], setval("ImagePositionPatient", [0.0, 0.0, 17.0]))
    p = series(add("gantry_tilt", {"gantry_tilt"}), n=4)
    for k, path in enumerate(p):
        edit(path, setval("ImagePositionPatient", [0.0, 2.0 * k, 5.0 * k]))
    for name, ts in (("unsupported_transfer_syntax", "1.2.840.10008.1.2.4.100"),  # MPEG2
                     ("unknown_transfer_syntax", "1.2.999.1")):  # fmt: skip
        p = series(add(name, {"pixel_decode", "unreadable", "series_incomplete"}))
        for path in p:
            edit(path, lambda ds, ts=ts: encapsulated(ds, ts))
    p = series(add("pixel_length_mismatch", {"pixel_decode", "series_incomplete"}))
    for path in p:
        edit(path, setval("Rows", 256))
    p = series(add("rgb_image", {"unsupported_pixels"}))
    for path in p:
        edit(path, setval("PhotometricInterpretation", "RGB"))
    series(add("burned_in", {"burned_in_annotation"}), BurnedInAnnotation="YES")
    series(add("localizer", {"localizer"}), ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    series(add("single_slice", {"no_stack"}), n=1)
    dicomdir_with_traversal(add("dicomdir_traversal", {"dicomdir"}))
    non_image(add("structured_report", {"non_image"}), "1.2.840.10008.5.1.4.1.1.88.11", "SR")
    rt = "1.2.840.10008.5.1.4.1.1.481.3"
    non_image(add("rtstruct", {"annotation_unmatched"}), rt, "RTSTRUCT")  # no reference
    non_image(add("presentation_state", {"non_image"}), "1.2.840.10008.5.1.4.1.1.11.1", "PR")
    series(add("secondary_capture", {"non_image"}), SOPClassUID="1.2.840.10008.5.1.4.1.1.7")
    p = series(add("huge_declared_length", {"unreadable", "not_dicom", "missing_tag",
                                             "series_incomplete", "pixel_decode"}))  # fmt: skip
    raw = p[0].read_bytes()
    at = raw.index(b"\x08\x00\x60\x00")  # (0008,0060) Modality: CS, 2-byte length
    overwrite(p[0], at + 6, b"\xff\xff")
    p = series(add("bit_flips", {"unreadable", "not_dicom", "missing_tag", "missing_geometry",
                                  "incomplete_series", "series_incomplete", "pixel_decode",
                                  "non_image", "no_stack", "missing_slices"}))  # fmt: skip
    overwrite(p[1], 140, bytes(b ^ 0xFF for b in p[1].read_bytes()[140:400]))
    # found by the fuzz harness (test_ingest_fuzz.py): each once crashed or hung ingest, or
    # let a damaged file into a volume
    p = series(add("rle_decoder_panic", {"pixel_decode", "series_incomplete"}),
               src=Path(get_testdata_file("MR_small_RLE.dcm")))  # fmt: skip
    edit(p[1], rle_panic)  # pylibjpeg-rle panics: a BaseException, not an Exception
    for name, kw, value in (("bits_stored_huge", "BitsStored", 4000),  # 1 << 4000 overflowed
                            ("samples_zero", "SamplesPerPixel", 0)):  # fmt: skip
        for path in series(add(name, {"unsupported_pixels"})):
            edit(path, setval(kw, value))
    nan_iop = [1, 0, 0, 0, 1, "nan"]  # passed the unit-vector check: NaN compares False
    for name, kw, value in (("position_nan", "ImagePositionPatient", ["nan", "0", "5"]),
                            ("orientation_nan", "ImageOrientationPatient", nan_iop)):  # fmt: skip
        p = series(add(name, {"missing_geometry", "incomplete_series"}))
        edit(p[1], setval(kw, value))
    for path in series(add("spacing_underflow", {"missing_geometry"})):  # nibabel raised
        edit(path, setval("PixelSpacing", ["1e-300", "1e-300"]))
    p = series(add("rescale_infinite", {"unreadable", "incomplete_series"}))
    edit(p[1], setval("RescaleSlope", "inf"))
    enhanced = Path(get_testdata_file("eCT_Supplemental.dcm"))
    for name, kw, value, reason in (
        ("enhanced_frame_count_huge", "NumberOfFrames", 2**31 - 1, "missing_geometry"),  # hung
        ("enhanced_rows_halved", "Rows", 256, "pixel_decode"),  # pydicom made 4 frames of 2
    ):
        add(name, {reason}).mkdir(parents=True)
        copy = Path(shutil.copy(enhanced, root / name / "IM0"))
        edit(copy, lambda ds, kw=kw, value=value: (setval(kw, value)(ds), new_series(ds)))
    p = series(add("header_length_astray", {"pixel_decode", "series_incomplete"}),
               src=Path(get_testdata_file("MR_small_implicit.dcm")))  # fmt: skip
    swallow_pixel_data(p[1])  # the tail still looks like Pixel Data; the header says not
    p = series(add("us_odd_length", {"unreadable", "incomplete_series"}))
    odd_length_us(p[1], 0x00280100)  # BitsAllocated: the scan took its first two bytes
    add("symlink_outside", {"symlink"}).mkdir(parents=True)
    (root / "symlink_outside" / "link").symlink_to("/etc/hostname")
    return v


@pytest.mark.slow
def test_damaged_corpus(tiny_cohort: Cohort, tmp_path: Path) -> None:
    clean_out, salt = tmp_path / "clean", tmp_path / "salt"
    run_ingest(tiny_cohort.raw, clean_out, salt)
    clean = pd.read_parquet(clean_out / "manifest.parquet")

    raw = tmp_path / "raw"
    shutil.copytree(tiny_cohort.raw, raw / "good")
    expected = build_corpus(raw / "bad")
    assert len(expected) >= 30
    summary = run_ingest(raw, tmp_path / "out", salt)

    # the good series are untouched by their neighbours
    m = pd.read_parquet(tmp_path / "out" / "manifest.parquet")
    good = m[m["key"].isin(clean["key"])]
    assert sorted(good["content_hash"]) == sorted(clean["content_hash"])

    with (tmp_path / "out" / "quarantine.csv").open() as f:
        quarantine = list(csv.DictReader(f))
    assert not [q for q in quarantine if q["file"].startswith("good/")]
    pseudo = Pseudonymizer(load_or_create_salt(salt))
    flags_by_key = {r["key"].split("-")[0]: set(r["flags"]) for _, r in m.iterrows()}
    for name, outcomes in expected.items():
        reasons = {q["reason"] for q in quarantine if q["file"].split("/")[1] == name}
        flags: set[str] = set()
        for f in (raw / "bad" / name).iterdir():
            try:
                uid = pydicom.dcmread(f, stop_before_pixels=True).SeriesInstanceUID
            except Exception:
                continue
            flags |= flags_by_key.get(pseudo.key("series", str(uid)), set())
        seen = reasons | flags
        assert seen, f"{name}: neither quarantined nor flagged"
        assert seen <= outcomes, f"{name}: got {seen}, expected some of {outcomes}"
    assert summary["n_stacks"] == len(m)


def test_export_sets_aside_a_file_only_deidentification_cannot_read(tmp_path: Path) -> None:
    """Found by fuzzing: a damaged value the header scan never reads (a US of three bytes)
    made the de-identified DICOM export raise, and the whole ingest with it."""
    raw = tmp_path / "raw"
    p = series(raw / "bad")
    edit(p[1], setval("AcquisitionMatrix", [0, 128, 128, 0]))
    odd_length_us(p[1], 0x00181310)
    series(raw / "good")
    out = tmp_path / "out"
    summary = run_ingest(raw, out, tmp_path / "salt", export_deid_dicom=True)
    assert summary["n_stacks"] == 1
    with (out / "quarantine.csv").open() as f:
        rows = {(r["file"], r["reason"]) for r in csv.DictReader(f)}
    assert rows == {
        ("bad/IM1", "unreadable"),
        ("bad/IM0", "series_incomplete"),
        ("bad/IM2", "series_incomplete"),
    }
    assert len(list((out / "dicom").iterdir())) == len(list((out / "volumes").iterdir())) == 1


def test_pydicom_log_records_never_carry_element_values(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """pydicom logs the raw value of an element it cannot convert; medimg hides it."""
    import logging

    import medimg.dicom  # noqa: F401  (installs the filter)

    with caplog.at_level(logging.DEBUG, logger="pydicom"):
        logging.getLogger("pydicom").warning("Invalid value for VR PN: %r", "CNRYSECRET^NAME")
    assert caplog.records, "the record itself is kept"
    assert all("CNRYSECRET" not in r.getMessage() for r in caplog.records)
