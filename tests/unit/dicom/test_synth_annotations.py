"""The demo cohort's annotations as DICOM SEG, RTSTRUCT and NIfTI: every path ingests to
the same label maps, and every object is valid for its IOD."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from medimg import stages
from medimg.config import IngestParams, Params, load_params
from medimg.dicom.synth import annotation_formats
from tests.helpers import TEST_SALT, TINY_SYNTH, dciodvfy_errors

REPO = Path(__file__).resolve().parents[3]
DEMO = load_params(REPO / "params.yaml")  # the demo's five structures and three classes


def _params(root: Path, seg: float, rt: float) -> Params:
    synth = TINY_SYNTH.model_copy(
        update={"lesion_kinds": ("cyst", "solid"), "labels": "kind", "positive_fraction": 0.66,
                "seg_fraction": seg, "rtstruct_fraction": rt}
    )  # fmt: skip
    root.mkdir(parents=True, exist_ok=True)
    salt = root / "salt"
    salt.write_text(TEST_SALT)
    salt.chmod(0o600)
    return DEMO.model_copy(
        update={"data": Params().data, "synth": synth, "ingest": IngestParams(salt_file=salt)}
    )


def _ingest(root: Path, seg: float, rt: float) -> Params:
    params = _params(root, seg, rt)
    stages.synth(params, root)
    stages.ingest(params, root)
    return params


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("annotations")
    _ingest(base / "mixed", 0.34, 0.33)
    _ingest(base / "nifti", 0.0, 0.0)
    return base / "mixed", base / "nifti"


def test_formats_split_the_series_in_the_shares_asked() -> None:
    shares = TINY_SYNTH.model_copy(update={"seg_fraction": 0.3, "rtstruct_fraction": 0.3})
    formats = annotation_formats(shares, 20)
    assert (formats.count("seg"), formats.count("rtstruct"), formats.count("nifti")) == (6, 6, 8)
    assert annotation_formats(TINY_SYNTH, 5) == ["nifti"] * 5  # the default: NIfTI only


def test_seg_rtstruct_and_nifti_ingest_to_the_same_label_maps(cohorts: tuple[Path, Path]) -> None:
    mixed, nifti = cohorts
    written = sorted(".".join(p.name.split(".")[-2:]) for p in (mixed / "data" / "masks").iterdir())
    kinds = {k: written.count(k) for k in set(written)}
    assert set(kinds) == {"seg.dcm", "rtstruct.dcm", "nii.gz"} and min(kinds.values()) >= 2
    a, b = mixed / "data" / "interim" / "masks", nifti / "data" / "interim" / "masks"
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir()) and len(names) == len(written)
    values: set[int] = set()
    for name in names:
        x, y = np.asarray(nib.load(a / name).dataobj), np.asarray(nib.load(b / name).dataobj)
        assert np.array_equal(x, y), name
        values |= set(np.unique(x).tolist())
    assert values == {0, 1, 2, 3, 4, 5}  # background and every structure


def test_every_annotation_object_is_valid_for_its_iod(cohorts: tuple[Path, Path]) -> None:
    mixed, _ = cohorts
    for kind, sop_class in (("seg", "1.2.840.10008.5.1.4.1.1.66.4"),
                            ("rtstruct", "1.2.840.10008.5.1.4.1.1.481.3")):  # fmt: skip
        path = sorted((mixed / "data" / "masks").glob(f"*.{kind}.dcm"))[0]
        ds = pydicom.dcmread(path)
        assert ds.SOPClassUID == sop_class
        assert dciodvfy_errors(path) == [], kind


def test_annotation_objects_repeat_byte_for_byte(
    cohorts: tuple[Path, Path], tmp_path: Path
) -> None:
    """DVC tracks the cohort by its hashes: writing it again gives the same SEG and RTSTRUCT
    bytes (no time of writing, no random DimensionOrganizationUID from highdicom)."""
    mixed, _ = cohorts
    params = _params(tmp_path, 0.34, 0.33)
    stages.synth(params, tmp_path)
    first, again = mixed / "data" / "masks", tmp_path / "data" / "masks"
    names = sorted(p.name for p in first.iterdir() if p.name.endswith(".dcm"))
    assert len(names) >= 4 and names == sorted(p.name for p in again.glob("*.dcm"))
    for name in names:
        assert (first / name).read_bytes() == (again / name).read_bytes(), name
