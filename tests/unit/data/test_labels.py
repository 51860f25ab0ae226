"""Labels files: class names or integers, keyed by patient, study or series."""

from __future__ import annotations

from pathlib import Path

import pytest

from medimg.data.labels import read_labels
from medimg.errors import DataError


def _csv(path: Path, header: str, rows: list[str]) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def _hash(v: str) -> str:
    return f"h({v})"


def test_class_names_in_params_order(tmp_path: Path) -> None:
    f = _csv(tmp_path / "l.csv", "patient_id,label", ["P1,solid", "P2,none", "P3,cyst"])
    read = read_labels(f, "PatientID", _hash, ("none", "cyst", "solid"))
    assert read.classes == ("none", "cyst", "solid")
    assert read.values == {"h(P1)": 2, "h(P2)": 0, "h(P3)": 1}


def test_classes_from_the_file_sorted_and_integers_as_indices(tmp_path: Path) -> None:
    names = _csv(tmp_path / "n.csv", "study_uid,label", ["1.2.3,benign", "1.2.4,malignant"])
    assert read_labels(names, "StudyInstanceUID", _hash).classes == ("benign", "malignant")
    ints = _csv(tmp_path / "i.csv", "series_uid,label", ["1.2.5,2", "1.2.6,0"])
    read = read_labels(ints, "SeriesInstanceUID", _hash)
    assert read.classes == ("0", "1", "2") and read.values == {"h(1.2.5)": 2, "h(1.2.6)": 0}
    # a file of positives only is still a binary diagnosis
    assert read_labels(
        _csv(tmp_path / "p.csv", "patient_id,label", ["A,1"]), "PatientID", _hash
    ).classes == ("0", "1")
    # integers index the configured class names
    named = read_labels(ints, "SeriesInstanceUID", _hash, ("none", "cyst", "solid"))
    assert named.values == {"h(1.2.5)": 2, "h(1.2.6)": 0}


def test_unknown_class_names_the_class_and_the_file_not_the_patient(tmp_path: Path) -> None:
    f = _csv(tmp_path / "l.csv", "patient_id,label", ["SECRET-ID-1,none", "SECRET-ID-2,tumour"])
    with pytest.raises(DataError, match=r"l\.csv: row 3: label 'tumour' is not one of") as err:
        read_labels(f, "PatientID", _hash, ("none", "cyst", "solid"))
    assert "SECRET" not in str(err.value) and "train.classify.classes" in str(err.value)


def test_a_series_claimed_by_two_labels_stops_with_both_classes(tmp_path: Path) -> None:
    f = _csv(tmp_path / "l.csv", "series_uid,label", ["1.2.9,cyst", "1.2.8,none", "1.2.9,solid"])
    with pytest.raises(
        DataError,
        match=r"rows 2 and 4 give one series_uid two different labels \('cyst' and 'solid'\)",
    ) as err:
        read_labels(f, "SeriesInstanceUID", _hash)
    assert "1.2.9" not in str(err.value)


def test_missing_key_column_says_which_setting_to_change(tmp_path: Path) -> None:
    f = _csv(tmp_path / "l.csv", "patient_id,label", ["A,0"])
    with pytest.raises(DataError, match="needs columns 'series_uid' and 'label'.*ingest.label_key"):
        read_labels(f, "SeriesInstanceUID", _hash)
