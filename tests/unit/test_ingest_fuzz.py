"""Fuzzing the ingest boundary: over a thousand mutated real DICOM files per run.

Seeds are real files (pydicom's CT and MR test images in native, big-endian, implicit,
RLE, JPEG, JPEG-LS and JPEG 2000 encodings, an enhanced multi-frame MR, and one slice our
generator writes). :mod:`tests.fuzz_mutators` damages them (truncation, bit flips, wrong
VRs and lengths, huge declared lengths, a lying transfer syntax, no file meta, extreme
values), adds zero-byte, random, text and PNG files, and DICOMDIRs that point at
``../../etc/passwd``. Everything is seeded: a failure names the batch seed and the mutant
index, and :func:`tests.fuzz_mutators.write_mutant` rebuilds that one input.

What "bad" means here: a file is *intact* when pydicom reads it completely (``dcmread``
without ``force``) and decodes its pixel data to the declared rows, columns and frames,
once the defaults the header scan documents for absent attributes are filled in
(PhotometricInterpretation MONOCHROME2, one sample, unsigned, BitsStored = BitsAllocated;
a CT or MR Image Storage object is one frame, whatever NumberOfFrames says).
A mutation can leave a file intact (a flip in pixel values, in a date); such a file may
become part of a volume, or be set aside for what its values now say (another SOP class,
geometry that no longer forms a stack). A file that is not intact is *bad*, and must
never reach a volume. The properties, for every input:

- no exception escapes the header scan, the pixel reader or the ingest stage, and no
  file takes more than :data:`FILE_LIMIT_S` in the header scan and pixel read;
- every file of the folder is either in ``quarantine.csv`` with a reason from the typed
  set, or one of the slices of a volume in the manifest (a second copy of an instance
  is counted through its original, as ingest reports it with ``duplicate_instances``);
- every file that is not in quarantine is intact;
- the good series in the same folder come out with the content hashes of a clean run.
"""

from __future__ import annotations

import csv
import logging
import signal
import time
import warnings
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file

from medimg.dicom.deid import Pseudonymizer, load_or_create_salt
from medimg.dicom.discover import MULTIFRAME_SOP_CLASSES, Instance, Rejection, read_header
from medimg.dicom.pixels import PixelDecodeError, read_stack
from medimg.dicom.series import IRREGULAR_FLAGS, GeometryTolerance, assemble
from medimg.ingest import DAMAGE
from tests.fuzz_mutators import Mutant, Seed, write_mutant
from tests.helpers import Cohort, run_ingest

SEED_FILES = [
    "CT_small.dcm",  # native explicit LE: the fast pixel path
    "MR_small.dcm",
    "MR_small_implicit.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_RLE.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "MR_small_jp2klossless.dcm",
    "JPGExtended.dcm",  # JPEG process 2/4 (a secondary capture, made a CT image)
    "emri_small.dcm",  # enhanced MR, 10 frames (functional groups added)
    "emri_small_jpeg_2k_lossless.dcm",  # the same, JPEG 2000
]
BATCH_SEEDS = (101, 202, 303, 404, 505)  # one ingest run per batch
PER_BATCH = 220  # mutants per batch: 1,100 per run, plus the hypothesis examples
FILE_LIMIT_S = 2.0  # header scan plus pixel read of one file; more is a hang
TYPED_REASONS = (
    DAMAGE
    | set(IRREGULAR_FLAGS)
    | {
        "not_dicom",
        "dicomdir",
        "non_image",
        "symlink",
        "burned_in_annotation",
        "localizer",
        "no_stack",
        "series_incomplete",
    }
)


class Hang(BaseException):  # not an Exception: the code under test must not swallow it
    pass


@contextmanager
def time_limit(seconds: float, what: object) -> Iterator[None]:
    """Interrupt the block (SIGALRM) and fail naming ``what`` if it runs too long."""

    def on_alarm(signum: int, frame: object) -> None:
        raise Hang(f"{what}: still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    start = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    elapsed = time.monotonic() - start  # a C decoder can hold off the signal
    assert elapsed < seconds, f"{what}: took {elapsed:.1f} s (limit {seconds} s)"


@contextmanager
def quiet() -> Iterator[None]:
    """pydicom warns about every damaged value (quoting it); the harness wants none."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        previous = logging.root.manager.disable
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(previous)


# Defaults the header scan applies to attributes a file leaves out (see discover._classify).
INGEST_DEFAULTS = {"PhotometricInterpretation": "MONOCHROME2", "SamplesPerPixel": 1}


def intact(path: Path) -> bool:
    """pydicom reads the whole file and decodes pixels of the declared shape (after the
    defaults ingest applies to absent attributes)."""
    try:
        ds = pydicom.dcmread(path)
        for keyword, default in INGEST_DEFAULTS.items():
            if ds.get(keyword) in (None, ""):
                setattr(ds, keyword, default)
        for keyword, default in (("PixelRepresentation", 0), ("BitsStored", ds.BitsAllocated)):
            if not ds.get(keyword):
                setattr(ds, keyword, default)
        if ds.SOPClassUID not in MULTIFRAME_SOP_CLASSES and "NumberOfFrames" in ds:
            del ds.NumberOfFrames  # a CT or MR Image is one frame, whatever it declares
        arr = ds.pixel_array
        frames = int(ds.get("NumberOfFrames") or 1)
        return arr.shape[-2:] == (ds.Rows, ds.Columns) and arr.size == frames * ds.Rows * ds.Columns
    except Exception:
        return False
    except BaseException as e:  # pyo3's PanicException: a Rust decoder gave up
        if type(e).__name__ != "PanicException":
            raise
        return False


def check_file(path: Path, what: object) -> str:
    """Header scan and pixel read of one file, as ingest does them; returns the outcome."""
    with time_limit(FILE_LIMIT_S, what):
        found = read_header(path)
        if isinstance(found, Rejection):
            assert found.reason in TYPED_REASONS, f"{what}: untyped reason {found.reason!r}"
            return found.reason
        assert isinstance(found, Instance), f"{what}: read_header returned {found!r}"
        stacks, rejected = assemble([found], GeometryTolerance(min_slices=1))
        for r in rejected:
            assert r.reason in TYPED_REASONS, f"{what}: untyped reason {r.reason!r}"
        for stack in stacks:
            try:
                pixels = read_stack(stack)
            except PixelDecodeError as e:
                assert e.reason in TYPED_REASONS, f"{what}: untyped reason {e.reason!r}"
                return e.reason
            assert pixels.shape == (len(stack.slices), found.rows, found.columns), what
        return rejected[0].reason if rejected else "ok"


@dataclass(frozen=True)
class Batch:
    seed: int
    raw: Path  # good/ (clean series) and fuzz/ (the mutants)
    mutants: list[Mutant]


@pytest.fixture(scope="module")
def seeds(tiny_cohort: Cohort) -> list[Seed]:
    synthetic = sorted(p for p in tiny_cohort.raw.rglob("*") if p.is_file())[0]
    return [Seed.load(Path(get_testdata_file(n))) for n in SEED_FILES] + [Seed.load(synthetic)]


@pytest.fixture(scope="module")
def good_series(tiny_cohort: Cohort) -> list[Path]:
    """Two series of the tiny cohort (a CT and an MR) that sit beside every batch."""
    folders = sorted({p.parent for p in tiny_cohort.raw.rglob("*") if p.is_file()})
    by_modality: dict[str, Path] = {}
    for folder in folders:
        ds = pydicom.dcmread(next(folder.iterdir()), stop_before_pixels=True)
        by_modality.setdefault(str(ds.Modality), folder)
    return [by_modality["CT"], by_modality["MR"]]


@pytest.fixture(scope="module")
def batches(
    seeds: list[Seed], good_series: list[Path], tmp_path_factory: pytest.TempPathFactory
) -> list[Batch]:
    out = []
    with quiet():
        for batch_seed in BATCH_SEEDS:
            raw = tmp_path_factory.mktemp(f"batch{batch_seed}") / "raw"
            for k, folder in enumerate(good_series):
                dest = raw / "good" / f"s{k}"
                dest.mkdir(parents=True)
                for f in folder.iterdir():
                    dest.joinpath(f.name).write_bytes(f.read_bytes())
            fuzz = raw / "fuzz"
            fuzz.mkdir()
            mutants = [write_mutant(fuzz, seeds, batch_seed, i) for i in range(PER_BATCH)]
            out.append(Batch(batch_seed, raw, mutants))
    return out


@pytest.mark.slow
def test_every_mutant_is_read_or_rejected_in_time(batches: list[Batch]) -> None:
    """The header scan and pixel read of each input, in this process, under a time limit."""
    outcomes: dict[str, set[str]] = defaultdict(set)
    with quiet():
        for batch in batches:
            for m in batch.mutants:
                outcomes[m.kind].add(check_file(m.path, m))
    assert sum(len(b.mutants) for b in batches) >= 1000
    # every mutator produced inputs the scan told apart from intact ones
    assert all(o - {"ok"} for o in outcomes.values()), dict(outcomes)


def _quarantine(out: Path) -> dict[str, set[str]]:
    with (out / "quarantine.csv").open() as f:
        rows = list(csv.DictReader(f))
    reasons: dict[str, set[str]] = defaultdict(set)
    for r in rows:
        reasons[r["file"]].add(r["reason"])
    return reasons


@pytest.fixture(scope="module")
def clean_hashes(good_series: list[Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("clean")
    for k, folder in enumerate(good_series):
        dest = root / "raw" / "good" / f"s{k}"
        dest.mkdir(parents=True)
        for f in folder.iterdir():
            dest.joinpath(f.name).write_bytes(f.read_bytes())
    salt = root / "salt"
    salt.write_text("medimg-fuzz-salt")
    salt.chmod(0o600)
    run_ingest(root / "raw", root / "out", salt, workers=1)
    m = pd.read_parquet(root / "out" / "manifest.parquet")
    assert len(m) == len(good_series)
    return {"salt": salt, "hashes": dict(zip(m["key"], m["content_hash"], strict=True))}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ingest_quarantines_every_bad_mutant_and_keeps_the_good_series(
    batches: list[Batch], clean_hashes: dict, tmp_path: Path
) -> None:
    salt = clean_hashes["salt"]
    pseudo = Pseudonymizer(load_or_create_salt(salt))
    n_mutants_in_volumes = 0
    for n, batch in enumerate(batches):
        out = tmp_path / f"out{batch.seed}"
        # the first batch also writes de-identified DICOM copies (another reader of them)
        with quiet():
            summary = run_ingest(batch.raw, out, salt, workers=2, export_deid_dicom=n == 0)
        files = sorted(p for p in batch.raw.rglob("*") if p.is_file())
        assert summary["n_files"] == len(files)
        quarantine = _quarantine(out)
        untyped = {f: r for f, r in quarantine.items() if not r <= TYPED_REASONS}
        assert not untyped, f"batch seed {batch.seed}: untyped reasons {untyped}"
        assert all((batch.raw / f).is_file() for f in quarantine), "quarantine names a path outside"

        m = pd.read_parquet(out / "manifest.parquet")
        got = dict(zip(m["key"], m["content_hash"], strict=True))
        assert {k: got.get(k) for k in clean_hashes["hashes"]} == clean_hashes["hashes"]
        assert not [f for f in quarantine if f.startswith("good/")]

        # every file not in quarantine is intact, and is a slice of a volume
        by_file = {m.path: m for m in batch.mutants} | {
            m.partner: m for m in batch.mutants if m.partner
        }
        slices: dict[str, set[tuple[str, int]]] = defaultdict(set)
        with quiet():
            for f in files:
                rel = str(f.relative_to(batch.raw))
                if rel in quarantine or rel.startswith("good/"):
                    continue
                what = by_file.get(f, rel)
                assert intact(f), f"{what}: not intact, yet neither quarantined nor rejected"
                n_mutants_in_volumes += f in by_file and by_file[f].path == f
                ds = pydicom.dcmread(f, stop_before_pixels=True)
                frames = (
                    int(ds.get("NumberOfFrames") or 1)
                    if "PerFrameFunctionalGroupsSequence" in ds
                    else 1
                )
                slices[str(ds.SeriesInstanceUID)] |= {
                    (str(ds.SOPInstanceUID), k) for k in range(frames)
                }
        n_slices = dict(zip(m["key"], m["n_slices"], strict=True))
        for series_uid, frames in slices.items():
            key = pseudo.key("series", series_uid)
            in_volumes = sum(v for k, v in n_slices.items() if k.split("-")[0] == key)
            assert in_volumes == len(frames), (
                f"batch seed {batch.seed}: series {key}: {len(frames)} accepted slices, "
                f"{in_volumes} in volumes"
            )
    # both outcomes happen: intact mutants (flips in pixel values, dates, ...) make volumes
    assert n_mutants_in_volumes >= 50, n_mutants_in_volumes


CT = Path(get_testdata_file("CT_small.dcm"))


@pytest.mark.slow
@settings(
    max_examples=300,
    derandomize=True,  # the same examples in every CI run
    deadline=None,  # time_limit is the hang detector
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    cut=st.integers(0, CT.stat().st_size),
    edits=st.lists(st.tuples(st.integers(128, 1400), st.integers(0, 255)), max_size=6),
)
def test_header_scan_of_edited_ct_slice(tmp_path: Path, cut: int, edits: list) -> None:
    """Byte edits in the header of a real CT slice, then truncation (hypothesis shrinks
    a failure to the fewest edits)."""
    raw = bytearray(CT.read_bytes())
    for at, value in edits:
        raw[at] = value
    path = tmp_path / "edited.dcm"
    path.write_bytes(bytes(raw[: cut or len(raw)]))
    what = f"CT_small.dcm cut at {cut}, edits {edits}"
    with quiet():
        if check_file(path, what) == "ok":  # read as an image: then pydicom agrees
            assert intact(path), f"{what}: pixels read, yet pydicom cannot decode the file"
