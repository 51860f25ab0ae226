"""Helpers shared by the test modules: constants, classes and plain functions.

Fixtures live in the ``conftest.py`` files, which build them from these; test modules
import from here, never from a conftest or from one another. Heavy libraries are imported
inside the functions that need them, so that importing this module stays cheap.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

from medimg.config import DataParams, Params, SynthParams, TaskTrainParams, TrainParams

# --- tools -----------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the servers tests start)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:``port`` now."""
    import socket

    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def tool_path(name: str) -> str:
    """A command-line tool from this environment's bin folder, else from PATH.

    Fails (never skips) when the tool is missing: it is a declared dev dependency.
    """
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found: install the dev extras (pip install -e '.[dev]')")
    return found


def system_tool(name: str, package: str) -> str:
    """A command from a Debian package that ``make system-packages`` installs.

    Fails (never skips) when it is missing, naming the package to install.
    """
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found: run `make system-packages` (apt-get install {package})")
    return found


def dcm2niix(src: Path, out: Path, name: str = "%j", sidecar: bool = False) -> None:
    """dcm2niix on ``src`` into ``out`` (uncompressed NIfTI; with ``sidecar``, the JSON
    and diffusion files too); fails with its output when it fails."""
    import subprocess

    out.mkdir(parents=True, exist_ok=True)
    options = ["-b", "y" if sidecar else "n", "-z", "n", "-f", name, "-o", str(out)]
    proc = subprocess.run(
        [tool_path("dcm2niix"), *options, str(src)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def canonical(path: Path):  # -> nib.Nifti1Image (nibabel imported lazily)
    import nibabel as nib

    return nib.as_closest_canonical(nib.load(path))


def assert_same_volume(
    ours: Path, ref: Path, pixels: bool = True, frame: int | None = None
) -> None:
    """Same grid (affine to 1e-3 mm) and, with ``pixels``, the same values; ``frame``
    picks one volume of a 4D reference."""
    import numpy as np

    a, b = canonical(ours), canonical(ref)
    assert a.shape[:3] == b.shape[:3]
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-3)
    if pixels:
        data = b.get_fdata() if frame is None else b.dataobj[..., frame]
        np.testing.assert_allclose(a.get_fdata(), np.asarray(data).reshape(a.shape), rtol=1e-6)


def dciodvfy_errors(path: Path) -> list[str]:
    """The "Error" lines David Clunie's IOD validator (dicom3tools) prints for a file."""
    import subprocess

    proc = subprocess.run(
        [system_tool("dciodvfy", "dicom3tools"), str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    lines = (proc.stdout + proc.stderr).splitlines()
    errors = [line for line in lines if line.startswith("Error")]
    assert errors or proc.returncode == 0, f"{path}: dciodvfy exited {proc.returncode}"
    return errors


# --- the tiny synthetic cohort ---------------------------------------------------------

# Small enough to write in about a second, large enough to hold every orientation,
# both modalities, shuffled and descending stacks, and lesions of a few voxels.
TINY_SYNTH = SynthParams(
    seed=7,
    n_patients=8,
    matrix=48,
    n_slices=16,
    lesion_radius_mm=(8.0, 12.0),
    centre_jitter_mm=3.0,
    shuffle_instance_fraction=0.5,
    descending_fraction=0.5,
    mr_fraction=0.35,
)
# The pseudonym key of the tests: fixed, so the same pseudonyms, hence splits, in every
# session. With the split salt below it gives the tiny cohort's test set and both folds
# patients of both labels (test_evaluate asserts it of the test set).
TEST_SALT = "medimg-test-salt-24"


@dataclass(frozen=True)
class Cohort:
    root: Path
    params: Params
    counts: dict[str, int]

    @property
    def raw(self) -> Path:
        return self.root / "data" / "raw"

    @property
    def masks(self) -> Path:
        return self.root / "data" / "masks"

    @property
    def labels(self) -> Path:
        return self.root / "data" / "labels.csv"

    @property
    def truth(self) -> Path:
        return self.root / "data" / "synth_truth.csv"


def write_cohort(root: Path, synth: SynthParams = TINY_SYNTH) -> Cohort:
    from medimg import stages

    params = Params(data=DataParams(), synth=synth)
    counts = stages.synth(params, root=root)
    return Cohort(root=root, params=params, counts=counts)


@dataclass(frozen=True)
class Processed:
    cohort: Cohort
    root: Path
    params: Params
    qc: dict

    @property
    def interim(self) -> Path:
        return self.root / "interim"

    @property
    def processed(self) -> Path:
        return self.root / "processed"


def process_cohort(
    cohort: Cohort, root: Path, salt: Path | None = None, **preprocess: object
) -> Processed:
    """Ingest and preprocess ``cohort`` under ``root`` (salt file default: in root)."""
    from medimg import stages
    from medimg.config import IngestParams, PreprocessParams, SplitParams, TrackingParams

    if salt is None:  # a fixed key: the same pseudonyms, hence splits, in every session
        salt = root / "salt"
        root.mkdir(parents=True, exist_ok=True)
        salt.write_text(TEST_SALT)  # chosen so both folds and the test set hold both labels
        salt.chmod(0o600)
    data = DataParams(
        raw=cohort.raw,
        labels=cohort.labels,
        masks=cohort.masks,
        interim=root / "interim",
        processed=root / "processed",
    )
    params = Params(
        data=data,
        synth=cohort.params.synth,
        ingest=IngestParams(salt_file=salt),
        preprocess=PreprocessParams(**preprocess),  # type: ignore[arg-type]
        split=SplitParams(salt="medimg-split-v1", n_folds=2, test_fraction=0.25),
        tracking=TrackingParams(enabled=False),  # tests that track pass their own store
    )
    stages.ingest(params)
    qc = stages.preprocess(params)
    return Processed(cohort=cohort, root=root, params=params, qc=qc)


# --- DICOM series and planted identifiers ----------------------------------------------


def make_series(folder: Path, src: Path, n: int = 3, **changes: object) -> tuple[str, list[Path]]:
    """Copy one real image into an n-slice series: fresh UIDs, axial, 5 mm apart, and
    ``changes`` set on every slice. Returns the SeriesInstanceUID and the files."""
    import pydicom
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    uid = generate_uid()
    paths = []
    for k in range(n):
        ds = pydicom.dcmread(src)
        ds.SeriesInstanceUID = uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.ImagePositionPatient = [0.0, 0.0, 5.0 * k]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.InstanceNumber = k + 1
        for key, value in changes.items():
            setattr(ds, key, value)
        path = folder / f"IM{k}"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return uid, paths


CANARY = "CNRY"  # every planted identifier contains it


def plant_canaries(cohort: Cohort, dest: Path) -> tuple[Path, Path]:
    """Copy the cohort to ``dest/raw``, writing a unique ``CNRY...`` string into every
    Annex E attribute that holds text, a private tag, the patient's name and ID, and the
    folder names; ``dest/labels.csv`` gets the matching patient IDs. Returns both paths."""
    import pydicom

    from medimg.dicom.deid import ANNEX_E

    raw = dest / "raw"
    for i, src in enumerate(sorted(p for p in cohort.raw.rglob("*") if p.is_file())):
        ds = pydicom.dcmread(src)
        patient_id = ds.PatientID
        for tag, action in ANNEX_E.items():
            if tag.group in (0x0002,) or action == "U":
                continue
            try:
                keyword = pydicom.datadict.keyword_for_tag(tag)
                vr = pydicom.datadict.dictionary_VR(tag)
            except KeyError:
                continue
            if vr in ("LO", "SH", "PN", "LT", "ST", "UT", "CS") and keyword not in ("PatientName",):
                value = f"{CANARY}{i:03d}{keyword[:6]}".upper()[:16]
                setattr(ds, keyword, value)
        block = ds.private_block(0x0011, "CANARY CREATOR", create=True)
        block.add_new(0x01, "LO", f"{CANARY}PRIVATE")
        ds.PatientName = f"{CANARY}NAME^SECRET"
        ds.PatientID = f"{CANARY}ID" + patient_id
        dst = raw / f"{CANARY}FOLDER_{src.parent.name}" / src.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(dst, enforce_file_format=True)
    labels = dest / "labels.csv"
    with cohort.labels.open() as f, labels.open("w") as g:
        for line in f:
            g.write(line if line.startswith("patient_id") else f"{CANARY}ID" + line)
    return raw, labels


# --- stage runs ------------------------------------------------------------------------


def run_ingest(
    raw: Path,
    out: Path,
    salt: Path,
    labels: Path | None = None,
    masks: Path | None = None,
    **cfg: object,
) -> dict:
    from medimg.config import IngestParams
    from medimg.ingest import IngestPaths, ingest

    params = IngestParams(salt_file=salt, **cfg)  # type: ignore[arg-type]
    return ingest(params, IngestPaths(input=raw, out=out, labels=labels, masks=masks))


def fold_or_none(p: Processed) -> int | None:
    """A validation fold holding both labels, whose training folds hold both too."""
    import pandas as pd

    table = pd.read_parquet(p.processed / "manifest.parquet")
    for split, group in table[table["split"] != "test"].groupby("split"):
        rest = table[(table["split"] != "test") & (table["split"] != split)]
        if group["label"].nunique() == 2 and rest["label"].nunique() == 2:
            return int(split)
    return None


def validation_fold(p: Processed) -> int:
    """A validation fold holding both labels (fails the test if there is none)."""
    found = fold_or_none(p)
    if found is None:
        pytest.fail("no fold of the tiny cohort holds both labels")
    return found


def train_params(p: Processed, out: Path, epochs: int = 3, **task: object) -> Params:
    """Small 3D training params for ``p``, with models, metrics and plots under ``out``."""
    data = p.params.data.model_copy(
        update={"models": out / "models", "metrics": out / "metrics", "plots": out / "plots"}
    )
    train = TrainParams(
        fold=validation_fold(p),
        classify=TaskTrainParams(arch="resnet10", epochs=epochs, batch_size=4, patience=50, **task),  # type: ignore[arg-type]
        segment=TaskTrainParams(arch="resnet18", epochs=epochs, batch_size=2, patience=50, **task),  # type: ignore[arg-type]
    )
    return p.params.model_copy(update={"data": data, "train": train})


def make_multistack_series(
    folder: Path,
    src: Path,
    n_positions: int,
    stacks: list[dict[str, object]],
    *,
    interleaved: bool = False,
    file_folders: bool = False,
    step_mm: float = 4.0,
    changes: dict[tuple[int, int], dict[str, object]] | None = None,
) -> tuple[str, list[object]]:
    """One series of several stacks at the same ``n_positions`` positions, made from one
    real image: stack ``s`` gets the attributes ``stacks[s]``, and every image distinct
    pixels (the source's halved, plus 50 per position and 700 per stack).

    Args:
        interleaved: InstanceNumber runs through the stacks at each position (1: stack 0
            at position 0, 2: stack 1 at position 0, ...); else stack by stack.
        file_folders: each file in a folder of its own; else all in ``folder``.
        changes: attributes set on the image of (stack, position) only.

    Returns:
        The SeriesInstanceUID and, per stack, its stored pixels (positions, rows, columns),
        positions ascending along the slice normal.
    """
    import numpy as np
    import pydicom
    from pydicom.uid import generate_uid

    uid = generate_uid()
    base = pydicom.dcmread(src).pixel_array.astype(np.int32) // 2
    expected = []
    for s, attrs in enumerate(stacks):
        pixels = np.stack([base + 50 * k + 700 * s for k in range(n_positions)])
        expected.append(pixels)
        for k in range(n_positions):
            ds = pydicom.dcmread(src)
            ds.SeriesInstanceUID = uid
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.ImagePositionPatient = [0.0, 0.0, step_mm * k]
            ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
            ds.SliceLocation = step_mm * k
            ds.SliceThickness = step_mm
            number = k * len(stacks) + s if interleaved else s * n_positions + k
            ds.InstanceNumber = number + 1
            for key, value in {**attrs, **(changes or {}).get((s, k), {})}.items():
                setattr(ds, key, value)
            ds.PixelData = pixels[k].astype(ds.pixel_array.dtype).tobytes()
            where = folder / f"F{number:03d}" if file_folders else folder
            where.mkdir(parents=True, exist_ok=True)
            ds.save_as(where / f"IM{number:03d}", enforce_file_format=True)
    return uid, expected


_TEXT_VRS = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UI"}
_TEXT_VRS |= {"UC", "UR", "UT"}
_ONE_VALUE_VRS = {"LT", "ST", "UR", "UT"}  # a backslash is text in these


def _texts(ds: Dataset) -> Iterator[tuple[str, str]]:
    """(VR, value) of every text value of ``ds`` and its sequences, as the file holds it."""
    from pydicom.dataelem import RawDataElement

    for tag in sorted(ds.keys()):
        raw, elem = ds.get_item(tag), ds[tag]
        if elem.VR == "SQ":
            for item in elem.value:
                yield from _texts(item)
        elif isinstance(raw, RawDataElement) and elem.VR in _TEXT_VRS and raw.value:
            text = raw.value.decode("latin-1").rstrip("\x00 ")
            for part in [text] if elem.VR in _ONE_VALUE_VRS else text.split("\\"):
                yield elem.VR, part


def dicom_problems(path: Path) -> list[str]:
    """What three independent checks find wrong with a DICOM file: pydicom (a strict read
    of every value, and each value validated as it would be when written), highdicom (the
    Type 1 and 2 attributes of every mandatory module of the file's IOD) and dciodvfy
    (its Error lines). Empty when the file is valid by all three."""
    import warnings

    import pydicom
    from highdicom._standard_utils import (
        check_required_attributes,
        get_iod_module_map,
        get_sop_class_iod_map,
    )
    from pydicom import config
    from pydicom.valuerep import validate_value

    problems: list[str] = []
    old = config.settings.reading_validation_mode
    config.settings.reading_validation_mode = config.RAISE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ds = pydicom.dcmread(path)
            for vr, text in _texts(ds):  # as written, before pydicom converts them
                validate_value(vr, text, config.RAISE)
            for elem in ds.iterall():  # and converted, under the strict reading mode
                _ = elem.value
    except Exception as e:
        problems.append(f"pydicom: {type(e).__name__}: {e}")
        return problems
    finally:
        config.settings.reading_validation_mode = old
    iod = get_sop_class_iod_map()[str(ds.SOPClassUID)]
    for module in get_iod_module_map()[iod]:
        # highdicom's check takes each functional group macro as required in the shared
        # item, where the standard allows it per frame instead; and the SR content tree's
        # conditional (1C) references as required of every item (ReferencedSOPSequence
        # only belongs to IMAGE and COMPOSITE items): dciodvfy checks both
        skip = module["key"].endswith("functional-groups") or module["key"] == "sr-document-content"
        if module["usage"] == "M" and not skip:
            try:
                check_required_attributes(ds, module["key"])
            except AttributeError as e:
                problems.append(f"highdicom: {module['key']}: {e}")
    problems += [f"dciodvfy: {line}" for line in dciodvfy_errors(path)]
    return problems


def generated_series(root: Path) -> list[tuple[str, list, tuple, object]]:
    """Every series of the tiny cohort written under ``root`` (every plane, ascending and
    descending): (its plane and direction, its source images, its volume shape and RAS
    affine), for round trips through SEG and RTSTRUCT."""
    import csv

    from medimg.dicom.discover import discover
    from medimg.dicom.geometry import ras_affine
    from medimg.dicom.seg import read_sources
    from medimg.dicom.series import GeometryTolerance, assemble

    cohort = write_cohort(root)
    with cohort.truth.open() as f:
        planes = {
            r["series_uid"]: f"{r['orientation']}-{r['descending']}" for r in csv.DictReader(f)
        }
    stacks, _ = assemble(discover(cohort.raw).instances, GeometryTolerance())
    out = []
    for stack in stacks:
        sources = read_sources([s.path for s in stack.slices])
        shape = (int(sources[0].Columns), int(sources[0].Rows), len(stack.slices))
        out.append((planes[stack.series_uid], sources, shape, ras_affine(stack.lps_affine())))
    return out


def write_lock(path: Path, pins: dict[str, str]) -> Path:
    """A lock file in uv's format (requirements/cpu.lock's): each ``name==version`` pin
    with a hash line and a comment, under uv's header."""
    body = "".join(
        f"{name}=={v} \\\n    --hash=sha256:{'0' * 64}\n    # via medimg\n"
        for name, v in pins.items()
    )
    path.write_text("# This file was autogenerated by uv via the following command:\n" + body)
    return path
