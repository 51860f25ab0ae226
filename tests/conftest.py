"""Shared fixtures: a tiny synthetic cohort written once per test session."""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from medimg.config import DataParams, Params, SynthParams

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


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory: pytest.TempPathFactory) -> Cohort:
    """The tiny cohort; tests must not modify it."""
    return write_cohort(tmp_path_factory.mktemp("cohort"))


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
        salt.write_text(
            "medimg-test-salt-24"
        )  # chosen so both folds and the test set hold both labels
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


@pytest.fixture(scope="session")
def tiny_processed(tiny_cohort: Cohort, tmp_path_factory: pytest.TempPathFactory) -> Processed:
    """The tiny cohort, ingested and preprocessed with default params; do not modify."""
    return process_cohort(tiny_cohort, tmp_path_factory.mktemp("processed"))


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
