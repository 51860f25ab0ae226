"""Mutators for fuzzing the ingest boundary: real DICOM files, damaged on purpose.

Every mutator is a pure function of the input bytes and a seeded ``random.Random``, so a
failure reproduces from (seed file, mutator, seed) alone. Byte-level mutators work on the
encoded file; the element table (:func:`elements`) lets them aim at a tag, its VR or its
length field rather than at random bytes only. Value mutators change one header value to
an extreme (65535 rows, two billion frames, NaN positions) through pydicom, which catches
what only surfaces once a value is used (allocation sizes, loops, arithmetic).
"""

from __future__ import annotations

import copy
import io
import random
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import data_element_generator
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage as CT_IMAGE
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pydicom.uid import MRImageStorage as MR_IMAGE

IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
LONG_VRS = {
    b"OB",
    b"OD",
    b"OF",
    b"OL",
    b"OV",
    b"OW",
    b"SQ",
    b"SV",
    b"UC",
    b"UN",
    b"UR",
    b"UT",
    b"UV",
}
ALL_VRS = [
    b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO", b"LT",
    b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"PN", b"SH", b"SL", b"SQ", b"SS", b"ST",
    b"SV", b"TM", b"UC", b"UI", b"UL", b"UN", b"UR", b"US", b"UT", b"UV",
    b"ZZ", b"\x00\x00", b"\xff\xff", b"ob",  # not VRs at all
]  # fmt: skip
TRANSFER_SYNTAXES = [
    IMPLICIT_LE,
    "1.2.840.10008.1.2.1",  # explicit LE
    EXPLICIT_BE,
    "1.2.840.10008.1.2.1.99",  # deflated explicit LE
    "1.2.840.10008.1.2.4.50",  # JPEG baseline
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.5",  # RLE
    "1.2.999.1",  # unknown
]


@dataclass(frozen=True)
class Element:
    """Where one top-level data element sits in the encoded file."""

    tag: int  # (group << 16) | element
    start: int  # offset of the tag
    vr_at: int | None  # offset of the 2 VR bytes; None in implicit VR
    length_at: int  # offset of the length field
    length_size: int  # 2 or 4 bytes
    value_at: int  # offset of the value
    length: int  # declared length (0xFFFFFFFF: undefined)
    little: bool  # byte order of the length field


def elements(data: bytes) -> list[Element]:
    """Top-level elements of a well-formed Part 10 file (file meta group included)."""
    out: list[Element] = []
    fp = io.BytesIO(data)
    has_preamble = data[128:132] == b"DICM"
    fp.seek(132 if has_preamble else 0)
    ts = IMPLICIT_LE
    groups: list[tuple[bool, bool, Callable[[int, str | None, int], bool] | None]] = []
    if has_preamble:
        groups.append((False, True, lambda tag, vr, length: tag >> 16 != 2))
    for implicit, little, stop in [*groups, (None, None, None)]:
        if implicit is None:
            implicit, little = ts == IMPLICIT_LE, ts != EXPLICIT_BE
        assert little is not None
        for e in data_element_generator(fp, implicit, little, stop_when=stop):  # type: ignore[arg-type]
            if e.tag == 0x00020010 and e.value:
                ts = bytes(e.value).decode("ascii", "replace").strip("\0 ")
            long = implicit or (e.VR or "").encode() in LONG_VRS
            header = 8 if implicit or not long else 12
            # a sequence of undefined length comes back parsed, its value offset as file_tell
            value_at = e.value_tell if hasattr(e, "value_tell") else e.file_tell
            start = value_at - header
            out.append(
                Element(
                    tag=int(e.tag),
                    start=start,
                    vr_at=None if implicit else start + 4,
                    length_at=start + (4 if implicit else (8 if long else 6)),
                    length_size=4 if long else 2,
                    value_at=value_at,
                    length=0xFFFFFFFF if getattr(e, "is_undefined_length", False) else e.length,
                    little=little,
                )
            )
    return out


# --- byte mutators: (data, elements, rng) -> data -----------------------------------------

Mutator = Callable[[bytes, list[Element], random.Random], bytes]


def truncate(data: bytes, elems: list[Element], rng: random.Random) -> bytes:
    return data[: rng.randrange(1, len(data))]


def truncate_in_element(data: bytes, elems: list[Element], rng: random.Random) -> bytes:
    """Cut inside a chosen element's header or value: the common damage of a broken copy."""
    e = rng.choice(elems)
    end = e.value_at + max(0, min(e.length, len(data) - e.value_at))
    return data[: rng.randrange(e.start + 1, max(e.start + 2, end))]


def bit_flips(data: bytes, elems: list[Element], rng: random.Random) -> bytes:
    raw = bytearray(data)
    for _ in range(rng.randint(1, 16)):
        raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
    return bytes(raw)


def header_bit_flips(data: bytes, elems: list[Element], rng: random.Random) -> bytes:
    """Flips in the header (before Pixel Data), where a flip changes meaning."""
    pixel = next((e.start for e in elems if e.tag == 0x7FE00010), len(data))
    raw = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        raw[rng.randrange(128, max(129, pixel))] ^= 1 << rng.randrange(8)
    return bytes(raw)


def byte_overwrite(data: bytes, elems: list[Element], rng: random.Random) -> bytes:
    """A run of random bytes over a chosen element (tag, header or value)."""
    e = rng.choice(elems)
    at = rng.randrange(e.start, min(len(data), e.value_at + max(1, min(e.length, 64))))
    junk = rng.randbytes(rng.randint(1, 16))
    return data[:at] + junk + data[at + len(junk) :]


def wrong_vr(data: bytes, elems: list[Element], rng: random.Random) -> bytes:
    explicit = [e for e in elems if e.vr_at is not None]
    if not explicit:
        return bit_flips(data, elems, rng)
    e = rng.choice(explicit)
    assert e.vr_at is not None
    return data[: e.vr_at] + rng.choice(ALL_VRS) + data[e.vr_at + 2 :]


def _set_length(data: bytes, e: Element, value: int) -> bytes:
    fmt = ("<" if e.little else ">") + ("I" if e.length_size == 4 else "H")
    value &= 0xFFFFFFFF if e.length_size == 4 else 0xFFFF
    return data[: e.length_at] + struct.pack(fmt, value) + data[e.length_at + e.length_size :]


def huge_length(data: bytes, elems: list[Element], rng: random.Random) -> bytes:
    e = rng.choice(elems)
    return _set_length(data, e, rng.choice([0xFFFFFFF0, 0xFFFFFFFE, 0xFFFFFFFF, 0x7FFFFFFF]))


def wrong_length(data: bytes, elems: list[Element], rng: random.Random) -> bytes:
    e = rng.choice(elems)
    deltas = [1, -1, 2, -2, 3, 7, -7, 255, len(data)]
    return _set_length(data, e, max(0, e.length + rng.choice(deltas)))


def pixel_length(data: bytes, elems: list[Element], rng: random.Random) -> bytes:
    """Pixel Data (or the last element) declares a length it does not have."""
    e = next((e for e in elems if e.tag == 0x7FE00010), elems[-1])
    return _set_length(data, e, rng.choice([0, 1, e.length // 2, e.length * 4, 0xFFFFFFF0]))


def transfer_syntax_lie(data: bytes, elems: list[Element], rng: random.Random) -> bytes:
    """The file meta claims another transfer syntax than the dataset is encoded in."""
    e = next((e for e in elems if e.tag == 0x00020010), None)
    if e is None:
        return bit_flips(data, elems, rng)
    uid = rng.choice(TRANSFER_SYNTAXES).encode()
    uid += b"\0" * (len(uid) % 2)
    data = _set_length(data, e, len(uid))
    data = data[: e.value_at] + uid + data[e.value_at + e.length :]
    # keep the meta group length honest, so only the transfer syntax lies
    group = next((g for g in elems if g.tag == 0x00020000), None)
    if group is not None:
        old = struct.unpack("<I", data[group.value_at : group.value_at + 4])[0]
        new = old + len(uid) - e.length
        data = data[: group.value_at] + struct.pack("<I", new) + data[group.value_at + 4 :]
    return data


def drop_element(data: bytes, elems: list[Element], rng: random.Random) -> bytes:
    e = rng.choice([e for e in elems if e.length != 0xFFFFFFFF] or elems)
    end = e.value_at + (e.length if e.length != 0xFFFFFFFF else 0)
    return data[: e.start] + data[end:]


def strip_meta(data: bytes, elems: list[Element], rng: random.Random) -> bytes:
    """No preamble, no 'DICM', no file meta group: a bare dataset."""
    first = next((e.start for e in elems if e.tag >> 16 != 2), 132)
    return data[first:]


def strip_preamble(data: bytes, elems: list[Element], rng: random.Random) -> bytes:
    return data[rng.choice([128, 132]) :]


def garbage_after_magic(data: bytes, elems: list[Element], rng: random.Random) -> bytes:
    return data[:132] + rng.randbytes(rng.randint(0, 2048))


def splice(data: bytes, elems: list[Element], rng: random.Random) -> bytes:
    """A block of the file copied over another place of it (a broken transfer)."""
    n = rng.randint(4, 256)
    src, dst = rng.randrange(len(data) - n), rng.randrange(132, len(data) - n)
    return data[:dst] + data[src : src + n] + data[dst + n :]


BYTE_MUTATORS: dict[str, Mutator] = {
    "truncate": truncate,
    "truncate_in_element": truncate_in_element,
    "bit_flips": bit_flips,
    "header_bit_flips": header_bit_flips,
    "byte_overwrite": byte_overwrite,
    "wrong_vr": wrong_vr,
    "huge_length": huge_length,
    "wrong_length": wrong_length,
    "pixel_length": pixel_length,
    "transfer_syntax_lie": transfer_syntax_lie,
    "drop_element": drop_element,
    "strip_meta": strip_meta,
    "strip_preamble": strip_preamble,
    "garbage_after_magic": garbage_after_magic,
    "splice": splice,
}

# --- value mutators: (dataset, rng) -> None, then re-encoded by pydicom --------------------

EXTREME_VALUES: list[tuple[str, list[object]]] = [
    ("Rows", [0, 1, 65535]),
    ("Columns", [0, 65535]),
    ("BitsAllocated", [0, 1, 7, 12, 64]),
    ("BitsStored", [0, 17, 33, 64]),
    ("HighBit", [0, 63]),
    ("PixelRepresentation", [2, 65535]),
    ("SamplesPerPixel", [0, 3, 65535]),
    ("NumberOfFrames", [0, -1, 2**31 - 1, 99999999]),
    ("InstanceNumber", [-(2**31), 2**31 - 1]),
    ("RescaleSlope", ["0", "-0", "nan", "inf", "1e308", "-1e-308"]),
    ("RescaleIntercept", ["nan", "-inf", "1e308"]),
    ("ImagePositionPatient", [["nan", "0", "0"], ["inf", "0", "1"], ["1e308", "-1e308", "1e308"]]),
    ("ImageOrientationPatient", [["nan"] * 6, [1, 0, 0, 0, 1, "inf"], [0] * 6]),
    ("PixelSpacing", [["nan", "nan"], ["inf", "1"], ["1e-300", "1e-300"], ["-1", "1"]]),
    ("PhotometricInterpretation", ["", "MONOCHROME3", "PALETTE COLOR", "YBR_FULL"]),
    ("SOPClassUID", ["", "1.2.840.10008.1.3.10", "1.2.840.10008.5.1.4.1.1.4.1"]),
]


def extreme_value(ds: Dataset, rng: random.Random) -> str:
    keyword, values = rng.choice(EXTREME_VALUES)
    value = rng.choice(values)
    setattr(ds, keyword, value)
    return f"{keyword}={value!r}"


# --- whole files: not DICOM at all, and DICOMDIRs that point outside --------------------

PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x10\x00\x00\x00\x10\x08\x02\x00\x00\x00"


def non_dicom(rng: random.Random) -> bytes:
    kind = rng.randrange(6)
    if kind == 0:
        return b""
    if kind == 1:
        return rng.randbytes(rng.choice([1, 3, 127, 128, 131, 132, 4096]))
    if kind == 2:
        return b"exported by PACS\nPatientName: nobody\n" * rng.randint(1, 50)
    if kind == 3:
        return PNG + rng.randbytes(rng.randint(0, 512))
    if kind == 4:
        return bytes(128) + b"DICM"  # the magic, then nothing
    return bytes(128) + b"DICM" + b"\x02\x00\x00\x00UL\x04\x00" + b"\xff\xff\xff\xff"


TRAVERSALS = [
    ["..", "..", "..", "etc", "passwd"],
    ["..", "..", "..", "..", "..", "..", "etc", "shadow"],
    ["/etc", "passwd"],
    ["..\\..\\WINDOWS", "SYSTEM32"],
    ["SUB", "..", "..", "..", "ROOT"],
]


def dicomdir(rng: random.Random) -> bytes:
    """A DICOMDIR whose records point outside the export (``..``, absolute paths)."""
    ds = Dataset()
    ds.FileSetID = "EXPORT"
    records = []
    for _ in range(rng.randint(1, 4)):
        record = Dataset()
        record.DirectoryRecordType = rng.choice(["IMAGE", "SERIES", "PATIENT"])
        record.ReferencedFileID = rng.choice(TRAVERSALS)
        record.OffsetOfTheNextDirectoryRecord = rng.choice([0, 0xFFFFFFFF])
        records.append(record)
    ds.DirectoryRecordSequence = Sequence(records)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    data = buf.getvalue()
    if rng.random() < 0.3:  # and sometimes damaged as well
        data = bit_flips(data, [], rng)
    return data


def encode(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@dataclass
class Seed:
    """A real image file, made into a CT or MR image with axial geometry if it lacks one."""

    name: str
    ds: Dataset
    multiframe: bool  # one file is a whole volume; otherwise a mutant gets a clean partner

    @classmethod
    def load(cls, path: Path) -> Seed:
        ds = pydicom.dcmread(path)
        n_frames = int(ds.get("NumberOfFrames") or 1)
        multiframe = n_frames > 1
        if multiframe and "PerFrameFunctionalGroupsSequence" not in ds:
            _add_functional_groups(ds, n_frames)  # emri_small carries no geometry
        if not multiframe:
            if ds.SOPClassUID not in (CT_IMAGE, MR_IMAGE):  # e.g. a JPEG secondary capture
                ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = CT_IMAGE
                ds.Modality = "CT"
            ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
            ds.PixelSpacing = ds.get("PixelSpacing") or [0.5, 0.5]
        return cls(path.name, ds, multiframe)

    def render(
        self,
        series_uid: str,
        sop_uid: str,
        z: float,
        change: Callable[[Dataset], object] | None = None,
    ) -> bytes:
        """The seed as instance ``sop_uid`` of ``series_uid`` at height ``z`` (single-frame)."""
        ds = copy.deepcopy(self.ds) if change is not None else self.ds
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        if not self.multiframe:
            ds.ImagePositionPatient = [0.0, 0.0, z]
            ds.InstanceNumber = int(z) + 1
        if change is not None:
            change(ds)
        return encode(ds)


def _add_functional_groups(ds: Dataset, n_frames: int) -> None:
    """Axial geometry in enhanced functional groups: frames 5 mm apart."""
    orientation, measures = Dataset(), Dataset()
    orientation.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    measures.PixelSpacing, measures.SliceThickness = [1.0, 1.0], 5.0
    shared = Dataset()
    shared.PlaneOrientationSequence = Sequence([orientation])
    shared.PixelMeasuresSequence = Sequence([measures])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per_frame = []
    for k in range(n_frames):
        position, item = Dataset(), Dataset()
        position.ImagePositionPatient = [0.0, 0.0, 5.0 * k]
        item.PlanePositionSequence = Sequence([position])
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)


# --- a batch: many mutants, each reproducible from (batch seed, index) --------------------

KINDS = [*BYTE_MUTATORS, "extreme_value", "non_dicom", "dicomdir"]


@dataclass(frozen=True)
class Mutant:
    """One mutated input and how it was made."""

    path: Path  # the mutated file
    kind: str  # the mutator
    seed: str  # the seed file, or "" for whole-file kinds
    batch_seed: int
    index: int
    detail: str = ""  # what an extreme_value mutator changed
    partner: Path | None = None  # the clean second slice of its series, if any

    def __str__(self) -> str:
        what = f"{self.kind}({self.detail})" if self.detail else self.kind
        return f"mutant {self.index} of batch seed {self.batch_seed}: {what} of {self.seed or '-'}"


def write_mutant(folder: Path, seeds: list[Seed], batch_seed: int, index: int) -> Mutant:
    """Write mutant ``index`` of a batch (and its clean partner slice) under ``folder``.

    The mutator cycles through :data:`KINDS`; everything else comes from a generator
    seeded by (batch_seed, index), so one mutant can be rebuilt alone.
    """
    rng = random.Random(f"{batch_seed}-{index}")
    kind = KINDS[index % len(KINDS)]
    stem = f"{index:04d}_{kind}"
    if kind == "non_dicom":
        path = folder / f"{stem}.bin"
        path.write_bytes(non_dicom(rng))
        return Mutant(path, kind, "", batch_seed, index)
    if kind == "dicomdir":
        path = folder / stem / "DICOMDIR"
        path.parent.mkdir()
        path.write_bytes(dicomdir(rng))
        return Mutant(path, kind, "", batch_seed, index)
    seed = rng.choice(seeds)

    def uid(*parts: object) -> str:
        return generate_uid(entropy_srcs=[str(batch_seed), str(index), *map(str, parts)])

    series = uid("series")
    detail: list[str] = []
    if kind == "extreme_value":
        data = seed.render(
            series, uid("sop"), 0.0, lambda ds: detail.append(extreme_value(ds, rng))
        )
    else:
        base = seed.render(series, uid("sop"), 0.0)
        data = BYTE_MUTATORS[kind](base, elements(base), rng)
    path = folder / f"{stem}_{Path(seed.name).stem}.dcm"
    path.write_bytes(data)
    partner = None
    if not seed.multiframe:  # a clean second slice: an intact mutant makes a volume with it
        partner = folder / f"{stem}_partner.dcm"
        partner.write_bytes(seed.render(series, uid("partner"), 5.0))
    return Mutant(path, kind, seed.name, batch_seed, index, "".join(detail), partner)
