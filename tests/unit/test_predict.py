"""Prediction in the original geometry, with models whose output is known in advance.

The cohort is CT on 6 mm isotropic grids without noise, in every orientation the
generator writes (axial, coronal, sagittal, oblique; ascending and descending; shuffled
InstanceNumber). Its lesions are the only tissue between 110 and 200 HU, so a "model" that
thresholds that band returns exactly the lesion: the predicted mask must then equal the
generator's ground truth voxel for voxel, on the series' own grid and in the DICOM SEG.
Both models go through the real path: ``tracking.log_model`` (safetensors + config),
registration with the champion alias in a SQLite store, loading by ``models:/`` URI.
The band models and the cohort are in tests/known_models.py.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
import pytest

from medimg import stages
from medimg.config import (
    Params,
    PredictParams,
)
from medimg.dicom.deid import Pseudonymizer
from medimg.dicom.synth import _uid
from tests.helpers import CANARY, Cohort, plant_canaries, write_cohort
from tests.known_models import EXACT_SYNTH, SALT, known_model, project_params, register_known


@pytest.fixture(scope="module")
def known_models() -> Iterator[None]:
    """The registry builds the band models (their weights are the band)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("medimg.models.build.build_model", known_model)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        yield


@dataclass(frozen=True)
class Known:
    cohort: Cohort
    root: Path
    params: Params
    seg_uri: str
    cls_uri: str
    out: Path
    summary: dict[str, Any]
    truth: list[dict[str, str]]

    @property
    def pseudo(self) -> Pseudonymizer:
        return Pseudonymizer(SALT.encode())

    def key(self, series_uid: str) -> str:
        return self.pseudo.key("series", series_uid)


@pytest.fixture(scope="module")
def known(known_models: None, tmp_path_factory: pytest.TempPathFactory) -> Known:
    """The segmenter's predictions on the known-output cohort (de-identified mode)."""
    root = tmp_path_factory.mktemp("known")
    cohort = write_cohort(root / "cohort", EXACT_SYNTH)
    params = project_params(root, cohort)
    seg_uri = register_known(params, "segment", root)
    cls_uri = register_known(params, "classify", root, threshold=0.3)
    out = root / "out"
    summary = stages.predict(params, root, cohort.raw, out, seg_uri)
    with cohort.truth.open() as f:
        truth = list(csv.DictReader(f))
    return Known(cohort, root, params, seg_uri, cls_uri, out, summary, truth)


def _series_index(seed: int, series_uid: str) -> int:
    return next(g for g in range(1000) if _uid(seed, "series", g) == series_uid)


def test_cohort_covers_every_orientation(known: Known) -> None:
    kinds = {(r["orientation"], r["descending"]) for r in known.truth}
    assert {o for o, _ in kinds} == {"axial", "coronal", "sagittal", "oblique"}
    assert {d for _, d in kinds} == {"0", "1"}
    assert any(r["shuffled"] == "1" for r in known.truth)


@pytest.mark.slow
def test_mask_matches_truth_voxel_for_voxel_in_original_grid(known: Known) -> None:
    from nibabel.processing import resample_from_to

    assert known.summary["n_predicted"] == len(known.truth)
    for row in known.truth:
        key = known.key(row["series_uid"])
        pred = nib.load(known.out / key / "mask.nii.gz")
        volume = nib.load(known.out / "ingest" / "volumes" / f"{key}.nii.gz")
        # on the series' own grid: the ingested volume's shape and affine
        assert pred.shape == volume.shape
        np.testing.assert_allclose(pred.affine, volume.affine, atol=1e-5)
        # the generator's mask is in file order; nearest neighbour only permutes/flips it
        truth_img = nib.load(known.cohort.masks / f"{row['series_uid']}.nii.gz")
        truth = np.asarray(resample_from_to(truth_img, pred, order=0).dataobj)
        got = np.asarray(pred.dataobj)
        assert truth.sum() == int(row["lesion_voxels"]) > 0, row["orientation"]
        assert np.array_equal(got, truth), (row["orientation"], row["descending"], row["shuffled"])


@pytest.mark.slow
def test_seg_frames_match_truth_on_the_same_source_instances(known: Known) -> None:
    import highdicom as hd

    seed = EXACT_SYNTH.seed
    for row in known.truth:
        key = known.key(row["series_uid"])
        g = _series_index(seed, row["series_uid"])
        truth = np.asarray(nib.load(known.cohort.masks / f"{row['series_uid']}.nii.gz").dataobj)
        seg = hd.seg.segread(known.out / key / "seg.dcm")
        # de-identified mode: the SEG references the copies, whose UIDs ingest remapped
        sops = [known.pseudo.uid(_uid(seed, "sop", g, k)) for k in range(truth.shape[2])]
        frames = seg.get_pixels_by_source_instance(sops, segment_numbers=[1])[..., 0]
        expected = truth.transpose(2, 1, 0)  # file order (slices, rows, columns)
        assert np.array_equal(frames, expected), (row["orientation"], row["shuffled"])
        copies = sorted((known.out / "ingest" / "dicom" / key).glob("*.dcm"))
        assert {str(pydicom.dcmread(p).SOPInstanceUID) for p in copies} == set(sops)
        assert str(seg.PatientID) == str(pydicom.dcmread(copies[0]).PatientID)


def test_seg_reads_strictly_with_pydicom(known: Known) -> None:
    from pydicom import config

    key = known.key(known.truth[0]["series_uid"])
    old = config.settings.reading_validation_mode
    config.settings.reading_validation_mode = config.RAISE
    try:
        ds = pydicom.dcmread(known.out / key / "seg.dcm")
        for elem in ds.iterall():  # convert every value under strict validation
            _ = elem.value
    finally:
        config.settings.reading_validation_mode = old
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation Storage
    assert ds.SegmentSequence[0].SegmentAlgorithmName == "medimg-segmenter"


def test_outputs_report_and_csv(known: Known) -> None:
    out = known.out
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert len(rows) == len(known.truth)
    for row in rows:
        assert row["status"] == "predicted" and row["label"] == "1"
        assert row["model"] == "medimg-segmenter" and row["model_version"] == "1"
        for name in ("mask.nii.gz", "seg.dcm", "montage.png"):
            assert (out / row["key"] / name).is_file()
        assert float(row["lesion_ml"]) > 0
    page = (out / "report.html").read_text()
    assert all(r["key"] in page for r in rows) and "medimg-segmenter" in page
    assert (out / rows[0]["key"] / "montage.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_classifier_probability_label_at_stored_threshold(known: Known, tmp_path: Path) -> None:
    one = known.truth[0]
    inbox = tmp_path / "inbox"
    _copy(known.cohort.raw / one["folder"], inbox / "s1")
    summary = stages.predict(known.params, known.root, inbox, tmp_path / "out", known.cls_uri)
    rows = list(csv.DictReader((tmp_path / "out" / "predictions.csv").open()))
    assert summary["task"] == "classify" and rows
    assert known.key(one["series_uid"]) in {r["key"] for r in rows}
    for row in rows:  # every patient of the cohort has a lesion
        assert float(row["probability"]) > 0.99 and row["label"] == "1"
        assert float(row["threshold"]) == 0.3  # from the model's evaluation, not 0.5
        assert row["model"] == "medimg-classifier" and row["model_version"] == "1"
        assert row["lesion_voxels"] == ""
        assert (tmp_path / "out" / row["key"] / "montage.png").is_file()
        assert not (tmp_path / "out" / row["key"] / "seg.dcm").exists()


@pytest.mark.slow
def test_pacs_mode_references_originals_and_deid_mode_leaks_no_phi(
    known: Known, tmp_path: Path
) -> None:
    one = known.truth[3]
    src = tmp_path / "cohort"
    _copy(known.cohort.raw / one["folder"], src / "data" / "raw" / one["folder"])
    _copy(known.cohort.labels, src / "data" / "labels.csv")
    canary_cohort = Cohort(src, known.cohort.params, {})
    raw, _ = plant_canaries(canary_cohort, tmp_path / "planted")
    # de-identified: no canary anywhere in the outputs but the quarantine list
    deid = stages.predict(known.params, known.root, raw, tmp_path / "deid", known.seg_uri)
    assert deid["n_predicted"] >= 1 and deid["n_failed"] == 0
    for path in (tmp_path / "deid").rglob("*"):
        if path.is_file() and path.name != "quarantine.csv":
            assert CANARY.encode() not in path.read_bytes(), path
        assert CANARY not in path.name
    # PACS: the SEG carries the source patient and study, references the originals.
    # A PatientSex that is not M, F or O makes highdicom refuse: reported, value withheld
    bad = stages.predict(
        known.params.model_copy(update={"predict": PredictParams(deid="pacs")}),
        known.root,
        raw,
        tmp_path / "bad",
        known.seg_uri,
    )
    assert all("PatientSex" in s["reason"] and "seg" not in s["outputs"] for s in bad["series"])
    assert CANARY not in (tmp_path / "bad" / "report.html").read_text()
    for path in (p for p in raw.rglob("*") if p.is_file()):
        ds = pydicom.dcmread(path)
        ds.PatientSex = "O"
        ds.save_as(path)
    pacs_params = known.params.model_copy(update={"predict": PredictParams(deid="pacs")})
    pacs = stages.predict(pacs_params, known.root, raw, tmp_path / "pacs", known.seg_uri)
    originals = {
        str(ds.SOPInstanceUID): ds
        for ds in (pydicom.dcmread(p) for p in raw.rglob("*") if p.is_file())
    }
    for series in pacs["series"]:
        seg = pydicom.dcmread(tmp_path / "pacs" / series["outputs"]["seg"])
        refs = {
            item.ReferencedSOPInstanceUID
            for ref in seg.ReferencedSeriesSequence
            for item in ref.ReferencedInstanceSequence
        }
        assert len(refs) == EXACT_SYNTH.n_slices and refs <= set(originals)
        source = originals[next(iter(refs))]
        assert seg.PatientID == source.PatientID and CANARY in str(seg.PatientID)
        assert seg.StudyInstanceUID == source.StudyInstanceUID
    assert not (tmp_path / "pacs" / "ingest" / "dicom").exists()
    assert CANARY not in (tmp_path / "pacs" / "report.html").read_text()


def test_unknown_model_is_a_clear_error(known: Known, tmp_path: Path) -> None:
    from medimg.errors import ConfigError

    with pytest.raises(ConfigError, match="models:/no-such-model@champion"):
        stages.predict(
            known.params, known.root, tmp_path, tmp_path / "o", "models:/no-such-model@champion"
        )


def _copy(src: Path, dst: Path) -> None:
    import shutil

    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dst)
