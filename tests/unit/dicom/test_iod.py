"""Every DICOM object medimg writes is valid for its IOD, by three independent checks.

pydicom reads every value strictly and validates it as a writer would; highdicom checks
the Type 1 and Type 2 attributes of every mandatory module of the object's IOD (MR Image
and CT Image modules included); dciodvfy, David Clunie's IOD validator from dicom3tools
(``make system-packages`` installs it; the test fails, never skips, without it), reports
no error. Checked: the generator's files for every modality, vendor and plane it writes,
their de-identified copies (``ingest.export_deid_dicom``) and DICOM SEG objects built
over those copies as ``medimg predict`` builds them.
"""

from __future__ import annotations

import csv
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medimg.config import load_params
from medimg.dicom.seg import SegInfo, read_sources, write_seg
from tests.helpers import (
    TINY_SYNTH,
    Cohort,
    dciodvfy_errors,
    dicom_problems,
    run_ingest,
    write_cohort,
)

REPO = Path(__file__).resolve().parents[3]
# Small, yet every vendor writes both modalities and both modalities every plane.
COVERAGE = TINY_SYNTH.model_copy(
    update={"seed": 1, "n_patients": 12, "matrix": 16, "mr_fraction": 0.5}
)
INFO = SegInfo("medimg lesion (test v1)", "medimg-test", "1")


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def _invalid(files: list[Path]) -> dict[str, list[str]]:
    found = {str(p): dicom_problems(p) for p in files}
    return {k: v for k, v in found.items() if v}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Cohort:
    return write_cohort(tmp_path_factory.mktemp("iod"), COVERAGE)


@pytest.fixture(scope="module")
def exported(cohort: Cohort, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The cohort ingested with de-identified DICOM copies; returns ingest's output."""
    tmp = tmp_path_factory.mktemp("iod_ingest")
    out = tmp / "interim"
    run_ingest(cohort.raw, out, tmp / "salt", masks=cohort.masks, export_deid_dicom=True)
    return out


def test_generator_writes_valid_ct_and_mr_images(cohort: Cohort) -> None:
    with cohort.truth.open() as f:
        rows = list(csv.DictReader(f))
    vendors = {r["vendor"] for r in rows}
    assert {(r["modality"], r["vendor"]) for r in rows} == {
        (m, v) for m in ("CT", "MR") for v in vendors
    }
    assert len(vendors) == 4
    assert {(r["modality"], r["orientation"]) for r in rows} == {
        (m, o) for m in ("CT", "MR") for o in COVERAGE.orientations
    }
    files = _files(cohort.raw)
    assert len(files) == cohort.counts["files"]
    assert _invalid(files) == {}


def test_deidentified_copies_stay_valid(cohort: Cohort, exported: Path) -> None:
    files = _files(exported / "dicom")
    assert len(files) == cohort.counts["files"]
    assert _invalid(files) == {}


def test_seg_objects_over_the_copies_are_valid(
    cohort: Cohort, exported: Path, tmp_path: Path
) -> None:
    written = []
    for folder in sorted((exported / "dicom").iterdir()):
        volume = nib.load(exported / "volumes" / f"{folder.name}.nii.gz")
        mask_path = exported / "masks" / f"{folder.name}.nii.gz"
        mask = np.asarray(nib.load(mask_path).dataobj)
        if not mask.any():  # a negative patient: a SEG of a few voxels all the same
            mask = np.zeros(volume.shape, dtype=np.uint8)
            mask[2:5, 2:5, 1:3] = 1
        path = tmp_path / f"{folder.name}.dcm"
        write_seg(mask, volume.affine, read_sources(_files(folder)), INFO, path)
        written.append(path)
    assert len(written) == cohort.counts["series"]
    assert _invalid(written) == {}


@pytest.mark.slow
def test_every_file_of_the_demo_cohort_passes_dciodvfy(tmp_path: Path) -> None:
    """What `make demo` writes under data/raw: the synth section of params.yaml, on its
    first 40 patients (every modality, orientation, stacking and annotation format the
    demo's fractions give; all 120 would add 8 minutes to the suite and no kind of file)."""
    params = load_params(REPO / "params.yaml")
    cohort = write_cohort(tmp_path, params.synth.model_copy(update={"n_patients": 40}))
    with (cohort.root / "data" / "synth_truth.csv").open() as f:
        truth = list(csv.DictReader(f))
    assert {r["modality"] for r in truth} == {"CT", "MR"}
    assert {r["orientation"] for r in truth} == set(params.synth.orientations)
    assert {r["lesion_kind"] for r in truth} >= set(params.synth.lesion_kinds)
    files = _files(cohort.raw)
    assert len(files) == cohort.counts["files"]
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:  # one validator process per core
        errors = Counter(e for found in pool.map(dciodvfy_errors, files) for e in found)
    assert errors == Counter()
    assert _invalid(files[::25]) == {}  # and the three checks on a sample
