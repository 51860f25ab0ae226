"""The classifier's Structured Report: valid for its IOD by three independent checks,
read back by highdicom with the class, the probabilities and the volumes it was given,
and the same object (UIDs) when the same model predicts the same series again."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from medimg.dicom.sr import build_diagnosis_sr, read_diagnosis, write_diagnosis_sr
from tests.helpers import Cohort, dicom_problems


def _series(cohort: Cohort) -> list[pydicom.Dataset]:
    files = sorted(f for f in cohort.raw.rglob("*") if f.is_file())
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    return [
        ds
        for ds in (pydicom.dcmread(f, stop_before_pixels=True) for f in files)
        if ds.SeriesInstanceUID == first.SeriesInstanceUID
    ]


def test_the_sr_is_valid_and_reads_back(tiny_cohort: Cohort, tmp_path: Path) -> None:
    series = _series(tiny_cohort)
    probabilities = {"none": 0.125, "cyst": 0.75, "solid": 0.125}
    sr = build_diagnosis_sr(
        series, probabilities, "cyst", "medimg-classifier", "3", {"lesion": 12.5}
    )
    path = tmp_path / "sr.dcm"
    write_diagnosis_sr(sr, path)
    assert dicom_problems(path) == []
    back = read_diagnosis(path)
    assert back == {
        "predicted": "cyst",
        "probabilities": probabilities,
        "volumes_ml": {"lesion": 12.5},
    }
    ds = pydicom.dcmread(path)
    assert ds.StudyInstanceUID == series[0].StudyInstanceUID  # filed in the source study
    evidence = ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.SeriesInstanceUID == series[0].SeriesInstanceUID
    assert len(evidence.ReferencedSOPSequence) == len(series)
    again = build_diagnosis_sr(series, probabilities, "cyst", "medimg-classifier", "3")
    assert (again.SeriesInstanceUID, again.SOPInstanceUID) == (
        ds.SeriesInstanceUID,
        ds.SOPInstanceUID,
    )
    other = build_diagnosis_sr(series, probabilities, "cyst", "medimg-classifier", "4")
    assert other.SOPInstanceUID != ds.SOPInstanceUID


def test_a_class_the_model_does_not_have_is_refused(tiny_cohort: Cohort) -> None:
    with pytest.raises(ValueError, match="'tumour' is not one of"):
        build_diagnosis_sr(_series(tiny_cohort), {"none": 0.5, "cyst": 0.5}, "tumour", "m", "1")
