"""Prediction in the original geometry, with models whose output is known in advance.

The cohort is CT on 6 mm isotropic grids without noise, in every orientation the
generator writes (axial, coronal, sagittal, oblique; ascending and descending; shuffled
InstanceNumber). Its lesions are the only tissue between 80 and 250 HU, so a "model" that
thresholds that band returns exactly the lesion: the predicted mask must then equal the
generator's ground truth voxel for voxel, on the series' own grid and in the DICOM SEG.
Both models go through the real path: ``tracking.log_model`` (safetensors + config),
registration with the champion alias in a SQLite store, loading by ``models:/`` URI.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from torch import nn

from medimg import stages, tracking
from medimg.config import (
    AugmentParams,
    DataParams,
    IngestParams,
    Params,
    PredictParams,
    SynthParams,
    TrackingParams,
)
from medimg.dicom.deid import Pseudonymizer
from medimg.dicom.synth import _uid
from tests.conftest import CANARY, Cohort, plant_canaries, write_cohort

# Known-output cohort: 40 x 40 pixels of 6.0 mm (240 / 40), 6 mm slices, no noise.
EXACT_SYNTH = SynthParams(
    seed=3,
    n_patients=4,
    positive_fraction=1.0,
    mr_fraction=0.0,
    matrix=40,
    n_slices=14,
    fov_mm=(240.0, 240.0),
    slice_spacing_mm=(6.0, 6.0),
    lesion_radius_mm=(14.0, 20.0),
    noise_hu=0.0,
    centre_jitter_mm=3.0,
    shuffle_instance_fraction=0.5,
    descending_fraction=0.5,
)
# The lesion band in the model's scaled units: CT window [-200, 300] HU -> [0, 1].
BAND = ((80.0 + 200.0) / 500.0, (250.0 + 200.0) / 500.0)
SALT = "medimg-predict-test-salt"


class Identity3d(nn.Module):
    """A 1x1x1 convolution that passes its input through (a 3D model, to the loader)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 1, kernel_size=1)
        with torch.no_grad():
            self.conv.weight.fill_(1.0)
            self.conv.bias.fill_(0.0)


class BandSegmenter(Identity3d):
    """Lesion logits +20 inside the intensity band, -20 outside (2 channels)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("band", torch.tensor(BAND))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, R, A, S)
        x = self.conv(x)
        inside = ((x > self.band[0]) & (x < self.band[1])).float()
        return torch.cat([torch.zeros_like(x), 40.0 * inside - 20.0], dim=1)


class BandClassifier(Identity3d):
    """Positive (logit +20) when any voxel lies in the band."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("band", torch.tensor(BAND))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, R, A, S) -> (B, 1)
        x = self.conv(x)
        inside = ((x > self.band[0]) & (x < self.band[1])).flatten(1).any(dim=1)
        return (40.0 * inside.float() - 20.0)[:, None]


def known_model(task: str, cfg: Any) -> nn.Module:
    """Stands in for ``medimg.train.build_model`` when MLflow loads the model."""
    return BandClassifier() if task == "classify" else BandSegmenter()


@pytest.fixture(scope="module")
def known_models() -> Iterator[None]:
    """The registry builds the band models (their weights are the band)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("medimg.train.build_model", known_model)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        yield


def register_known(params: Params, task: str, root: Path, threshold: float = 0.5) -> str:
    """Log the band model of ``task`` as a run's model, mark it evaluated and register it
    (first version: champion). Returns ``models:/<name>@champion``."""
    client = tracking.configure(params, root)
    exp = tracking.experiment_id(client, params, task, root)
    run_id = client.create_run(exp, run_name=f"known-{task}").info.run_id
    model_dir = root / "models" / task
    model_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"model": known_model(task, None).state_dict()}, model_dir / "model.pt")
    uri = tracking.log_model(params, task, model_dir, run_id)
    (model_dir / tracking.RUN_FILE).write_text(json.dumps({"run_id": run_id, "model_uri": uri}))
    client.set_tag(run_id, "medimg.evaluated", "true")
    client.log_dict(run_id, {"threshold": threshold}, f"{task}.json")
    decision = tracking.register(params, task, root, model_dir)
    assert decision.promoted
    return f"models:/{tracking.registered_name(params, task)}@champion"


def project_params(root: Path, cohort: Cohort, **predict: Any) -> Params:
    salt = root / "salt"
    if not salt.exists():
        salt.write_text(SALT)
        salt.chmod(0o600)
    return Params(
        data=DataParams(raw=cohort.raw),
        ingest=IngestParams(salt_file=salt, workers=1),
        augment=AugmentParams(patch_size=(32, 32, 32)),
        tracking=TrackingParams(uri=f"sqlite:///{root / 'mlflow.db'}", retry_wait_s=0.1),
        predict=PredictParams(**predict),
    )


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
