"""Prediction with several classes and several structures: a multi-segment DICOM SEG
that highdicom reads back with each structure's name and codes, a label-map NIfTI, and
predictions.csv with a probability per class. The models are the known band models
(tests/known_models.py) through the real MLflow path."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medimg import stages
from medimg.config import LESION, ClassifyParams, CodeParams, StructureParams, TrainParams
from medimg.dicom.deid import Pseudonymizer
from tests.helpers import write_cohort
from tests.known_models import EXACT_SYNTH, SALT, known_model, project_params, register_known

BODY = StructureParams(
    name="body",
    category=CodeParams(value="91723000", meaning="Anatomical Structure"),
    type=CodeParams(value="38266002", meaning="Entire body"),
)
CLASSES = ("none", "small", "large")


@pytest.fixture(scope="module")
def predicted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("medimg.models.build.build_model", known_model)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        root = tmp_path_factory.mktemp("several")
        cohort = write_cohort(root / "cohort", EXACT_SYNTH)
        params = project_params(root, cohort).model_copy(
            update={
                "structures": (BODY, LESION),
                "train": TrainParams(classify=ClassifyParams(classes=CLASSES)),
            }
        )
        seg_uri = register_known(params, "segment", root)
        cls_uri = register_known(params, "classify", root)
        seg = stages.predict(params, root, cohort.raw, root / "seg", seg_uri)
        cls = stages.predict(params, root, cohort.raw, root / "cls", cls_uri)
        with cohort.truth.open() as f:
            truth = list(csv.DictReader(f))
        yield {"root": root, "cohort": cohort, "seg": seg, "cls": cls, "truth": truth}


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_multi_segment_seg_names_codes_and_pixels(predicted: dict) -> None:
    import highdicom as hd

    root, truth = predicted["root"], predicted["truth"]
    assert predicted["seg"]["n_predicted"] == len(truth) > 0
    pseudo = Pseudonymizer(SALT.encode())
    for row in truth:
        key = pseudo.key("series", row["series_uid"])
        seg = hd.seg.segread(root / "seg" / key / "seg.dcm")
        descriptions = [seg.get_segment_description(n) for n in (1, 2)]
        assert [d.segment_label for d in descriptions] == ["body", "lesion"]
        assert [d.segmented_property_type.value for d in descriptions] == ["38266002", "52988006"]
        assert descriptions[1].segmented_property_category.value == "49755003"
        label_map = np.asarray(nib.load(root / "seg" / key / "mask.nii.gz").dataobj)
        assert set(np.unique(label_map)) == {0, 1, 2}
        # the lesion label is exactly the generator's lesion (the band model finds it)
        from nibabel.processing import resample_from_to

        pred = nib.load(root / "seg" / key / "mask.nii.gz")
        truth_img = nib.load(predicted["cohort"].masks / f"{row['series_uid']}.nii.gz")
        lesion = np.asarray(resample_from_to(truth_img, pred, order=0).dataobj) > 0
        assert np.array_equal(label_map == 2, lesion), row["orientation"]


def test_predictions_csv_has_a_volume_per_structure(predicted: dict) -> None:
    rows = _rows(predicted["root"] / "seg" / "predictions.csv")
    assert rows and all(r["status"] == "predicted" for r in rows)
    for r in rows:
        assert float(r["volume_ml_body"]) > float(r["volume_ml_lesion"]) > 0
        assert r["threshold"] == ""


def test_predictions_csv_has_a_probability_per_class_and_the_class(predicted: dict) -> None:
    rows = _rows(predicted["root"] / "cls" / "predictions.csv")
    assert rows and predicted["cls"]["task"] == "classify"
    for r in rows:
        probs = [float(r[f"probability_{c}"]) for c in CLASSES]
        assert sum(probs) == pytest.approx(1.0, abs=1e-5)
        assert r["predicted"] == CLASSES[int(np.argmax(probs))] == CLASSES[int(r["label"])]
        assert r["predicted"] != "none"  # every patient of the cohort has a lesion
        assert r["threshold"] == ""  # argmax: no threshold to report
    assert {r["predicted"] for r in rows} <= {"small", "large"}


def test_the_classifier_writes_a_valid_sr_per_series(predicted: dict) -> None:
    """Each series' diagnosis as a DICOM SR (TID 1500): valid for its IOD by three checks,
    read back by highdicom with the class and probabilities of predictions.csv, and
    referencing the de-identified copies it was predicted from (no patient in it)."""
    import pydicom

    from medimg.dicom.sr import read_diagnosis
    from tests.helpers import dicom_problems

    out = predicted["root"] / "cls"
    rows = {r["key"]: r for r in _rows(out / "predictions.csv") if r["status"] == "predicted"}
    assert rows
    for key, row in rows.items():
        sr = out / key / "sr.dcm"
        assert dicom_problems(sr) == [], key
        back = read_diagnosis(sr)
        assert back["predicted"] == row["predicted"]
        for c in CLASSES:
            assert back["probabilities"][c] == pytest.approx(float(row[f"probability_{c}"]))
        ds = pydicom.dcmread(sr)
        source = pydicom.dcmread(next((out / "ingest" / "dicom" / key).glob("*.dcm")))
        assert ds.StudyInstanceUID == source.StudyInstanceUID
        assert ds.PatientID == source.PatientID  # the pseudonym of the copies
