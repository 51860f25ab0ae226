"""Ingest reads annotations as DICOM SEG, RTSTRUCT and NIfTI alike: a generated cohort
whose label maps come part as SEG (in the masks folder), part as RTSTRUCT (among the
images), part as NIfTI label maps and per-structure NIfTI masks gives the same masks as
the NIfTI-only ingest; annotations of no ingested series or of another frame of
reference are quarantined; unmatched structure names are reported in qc.json."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.uid import generate_uid

from medimg import stages
from medimg.config import LESION, CodeParams, DataParams, IngestParams, Params, StructureParams
from medimg.dicom.deid import Pseudonymizer, load_or_create_salt
from medimg.dicom.rtstruct import write_rtstruct
from medimg.dicom.seg import SegInfo, read_sources, segments_from, write_seg
from medimg.ingest import IngestPaths, ingest
from medimg.volume import save_nifti
from tests.helpers import TEST_SALT, run_ingest, write_cohort

ANATOMY = CodeParams(value="91723000", meaning="Anatomical Structure")
BODY = StructureParams(
    name="body", category=ANATOMY, type=CodeParams(value="123037004", meaning="Body structure")
)
STRUCTURES = (BODY, LESION)  # the lesion lies inside the body and wins where they overlap
COUCH = StructureParams(name="couch", category=ANATOMY, type=BODY.type)  # not configured
INFO = SegInfo("medimg test", "medimg-test", "1", segments=segments_from(STRUCTURES))


def _label_map(lesion: np.ndarray) -> np.ndarray:
    """Body 1 (a ring with a hole, on some slices only), the generator's lesion 2 over it."""
    n0, n1, _ = lesion.shape
    out = np.zeros(lesion.shape, dtype=np.uint8)
    out[n0 // 8 : -n0 // 8, n1 // 8 : -n1 // 8, 1:-2] = 1
    out[n0 // 3 : -n0 // 3, n1 // 3 : -n1 // 3, 1:-2] = 0
    out[lesion > 0] = 2
    return out


class Case:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.cohort = write_cohort(root / "cohort")
        self.salt = root / "salt"
        self.salt.write_text(TEST_SALT)
        self.salt.chmod(0o600)
        base = root / "base"  # the generator's lesion masks on each ingested grid
        run_ingest(self.cohort.raw, base, self.salt, masks=self.cohort.masks)
        pseudo = Pseudonymizer(load_or_create_salt(self.salt))
        with self.cohort.truth.open() as f:
            rows = list(csv.DictReader(f))
        self.series = []  # (uid, key, source files, affine, label map), by plane in turn
        for row in rows:
            uid, key = row["series_uid"], pseudo.key("series", row["series_uid"])
            files = [
                p
                for p in sorted((self.cohort.raw / row["folder"]).rglob("*"))
                if p.is_file()
                and pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID == uid
            ]
            lesion = nib.load(base / "masks" / f"{key}.nii.gz")
            labels = _label_map(np.asarray(lesion.dataobj))
            self.series.append((uid, key, files, lesion.affine, labels))

    def run(self, name: str, raw: Path, masks: Path) -> Path:
        """Ingest ``raw`` and ``masks`` through the ingest stage; returns its output."""
        data = DataParams(raw=raw, masks=masks, interim=self.root / name, labels=self.cohort.labels)
        params = Params(data=data, ingest=IngestParams(salt_file=self.salt), structures=STRUCTURES)
        stages.ingest(params)
        return self.root / name


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> Case:
    return Case(tmp_path_factory.mktemp("ingest_annotations"))


def _masks(out: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(nib.load(p).dataobj) for p in sorted((out / "masks").iterdir())}


def _nifti_only(case: Case) -> Path:
    folder = case.root / "nifti"
    folder.mkdir(exist_ok=True)
    for uid, _, _, affine, labels in case.series:
        save_nifti(labels, affine, folder / f"{uid}.nii.gz")
    return case.run("nifti_only", case.cohort.raw, folder)


def _mixed(case: Case) -> tuple[Path, Path]:
    """The cohort's images with RTSTRUCTs among them, and a masks folder of SEGs and
    NIfTI files; plus an annotation of no series and one of another frame of reference."""
    raw, masks = case.root / "mixed_raw", case.root / "mixed_masks"
    shutil.copytree(case.cohort.raw, raw)
    masks.mkdir()
    for n, (uid, _, files, affine, labels) in enumerate(case.series):
        sources = read_sources(files)
        if n % 4 == 0:
            write_seg(labels, affine, sources, INFO, masks / f"seg{n}.dcm")
        elif n % 4 == 1:
            extra, names = labels.copy(), STRUCTURES
            if n == 1:  # a structure no configured name matches, where the others are not
                extra[:2, :2, :3] = 3
                names = (*STRUCTURES, COUCH)
            write_rtstruct(extra, affine, sources, names, raw / f"rt{n}.dcm")
        elif n % 4 == 2:
            save_nifti(labels, affine, masks / f"{uid}.nii.gz")
        else:  # one binary mask per structure, combined by precedence
            save_nifti((labels > 0).astype(np.uint8), affine, masks / f"{uid}_body.nii.gz")
            save_nifti((labels == 2).astype(np.uint8), affine, masks / f"{uid}_lesion.nii.gz")
    uid, _, files, affine, labels = case.series[0]
    ds = write_rtstruct(labels, affine, read_sources(files), STRUCTURES, raw / "unknown.dcm")
    for item in ds.iterall():  # references to a series and images that are not there
        image = item.keyword == "ReferencedSOPInstanceUID" and item.value != ds.StudyInstanceUID
        if image or item.keyword == "SeriesInstanceUID":
            item.value = generate_uid()
    ds.save_as(raw / "unknown.dcm", enforce_file_format=True)
    other = write_seg(labels, affine, read_sources(files), INFO, masks / "other_frame.dcm")
    other.FrameOfReferenceUID = generate_uid()
    other.save_as(masks / "other_frame.dcm", enforce_file_format=True)
    return raw, masks


@pytest.fixture(scope="module")
def runs(case: Case) -> tuple[Path, Path]:
    """The outputs of the NIfTI-only ingest and of the mixed one."""
    reference = _nifti_only(case)
    raw, masks = _mixed(case)
    return reference, case.run("mixed", raw, masks)


def test_seg_rtstruct_and_nifti_give_the_nifti_only_masks(case: Case, runs) -> None:
    reference, out = runs
    ref_masks = _masks(reference)
    for _, key, _, _, labels in case.series:  # the label maps themselves, on every plane
        assert np.array_equal(ref_masks[f"{key}.nii.gz"], labels)
    got = _masks(out)
    assert sorted(got) == sorted(ref_masks)
    for name, mask in ref_masks.items():
        assert np.array_equal(got[name], mask), name
    a = pd.read_parquet(reference / "manifest.parquet").set_index("key")
    b = pd.read_parquet(out / "manifest.parquet").set_index("key")
    assert (b["lesion_voxels"] == a["lesion_voxels"]).all()
    assert b["mask"].notna().all()
    assert (b["lesion_voxels"] > 0).all()

    with (out / "quarantine.csv").open() as f:
        reasons = {Path(r["file"]).name: r["reason"] for r in csv.DictReader(f)}
    assert reasons == {
        "unknown.dcm": "annotation_unmatched",
        "other_frame.dcm": "annotation_frame_of_reference",
    }
    qc = json.loads((out / "qc.json").read_text())
    assert qc["unmatched_structures"] == {"couch": 1}


def test_a_changed_annotation_reingests_its_series_only(case: Case, runs) -> None:
    _, out = runs
    _, key, files, affine, labels = case.series[0]
    changed = np.where(labels == 2, 0, labels).astype(np.uint8)  # the lesion removed
    write_seg(changed, affine, read_sources(files), INFO, case.root / "mixed_masks" / "seg0.dcm")
    paths = IngestPaths(input=case.root / "mixed_raw", out=out, masks=case.root / "mixed_masks")
    summary = ingest(IngestParams(salt_file=case.salt), paths, structures=STRUCTURES)
    assert summary["n_processed"] == 1
    assert np.array_equal(np.asarray(nib.load(out / "masks" / f"{key}.nii.gz").dataobj), changed)
    assert summary["unmatched_structures"] == {"couch": 1}  # from the unchanged series' record
