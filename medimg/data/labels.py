"""Labels: a CSV keyed on a DICOM attribute, joined to series before identifiers go.

The join happens on keyed hashes: raw identifiers are read here, hashed at once, and
never written anywhere. A label is a class name or an integer; the class list comes from
``train.classify.classes`` (in order) or, when that is not set, from the file's values,
sorted (integers as 0..max). Binary 0/1 files are the simplest
case: classes ``("0", "1")``.
"""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medimg.errors import DataError

# The CSV column for each supported key; the DICOM keyword itself is accepted too.
COLUMNS = {
    "PatientID": "patient_id",
    "StudyInstanceUID": "study_uid",
    "AccessionNumber": "accession_number",
    "SeriesInstanceUID": "series_uid",
}


@dataclass(frozen=True)
class Labels:
    """A labels file, read: class index per hashed key, and the class names in order."""

    values: dict[str, int]  # keyed hash -> class index
    classes: tuple[str, ...]  # class names, index order


def _sorted_classes(names: set[str]) -> tuple[str, ...]:
    """The classes a file's labels imply: integers 0..max (at least 0 and 1, so a file of
    positives only is still binary), or the names sorted."""
    if names and all(n.isdigit() for n in names):
        return tuple(str(i) for i in range(max(1, *(int(n) for n in names)) + 1))
    return tuple(sorted(names))


def _class_index(name: str, classes: Sequence[str]) -> int | None:
    """The index of label ``name``: a class name, or an integer index into ``classes``."""
    if name in classes:
        return list(classes).index(name)
    if name.lstrip("-").isdigit() and 0 <= int(name) < len(classes):
        return int(name)
    return None


def read_labels(
    path: Path,
    label_key: str,
    hash_key: Callable[[str], str],
    classes: Sequence[str] | None = None,
) -> Labels:
    """Map hashed key values to class indices.

    Args:
        path: CSV with a key column (``patient_id``, ``study_uid``, ``accession_number``
            or ``series_uid``, or the DICOM keyword) and a ``label`` column holding a class
            name or an integer.
        label_key: the DICOM attribute the CSV is keyed on.
        hash_key: turns a raw key value into its keyed hash.
        classes: the class names in order (``train.classify.classes``); None: the file's
            own values, sorted.

    Raises:
        DataError: a missing column, an empty or unknown label, or one key with two labels;
            the message names the file, the class and row numbers, never the key values.
    """
    path = Path(path)
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        column = next((c for c in (COLUMNS[label_key], label_key) if c in fields), None)
        if column is None or "label" not in fields:
            raise DataError(
                f"{path}: needs columns '{COLUMNS[label_key]}' and 'label' "
                f"(found {fields}); set ingest.label_key to match the file"
            )
        raw_labels: dict[str, str] = {}
        first_row: dict[str, int] = {}
        for row_number, row in enumerate(reader, start=2):
            raw = (row[column] or "").strip()
            if not raw:
                raise DataError(f"{path}: row {row_number} has an empty {column}")
            label = str(row["label"] or "").strip()
            if not label:
                raise DataError(f"{path}: row {row_number} has an empty label")
            key = hash_key(raw)
            if key in raw_labels and raw_labels[key] != label:
                raise DataError(
                    f"{path}: rows {first_row[key]} and {row_number} give one {column} "
                    f"two different labels ({raw_labels[key]!r} and {label!r})"
                )
            raw_labels[key] = label
            first_row.setdefault(key, row_number)
    names = tuple(classes) if classes is not None else _sorted_classes(set(raw_labels.values()))
    values: dict[str, int] = {}
    for key, label in raw_labels.items():
        index = _class_index(label, names)
        if index is None:
            raise DataError(
                f"{path}: row {first_row[key]}: label {label!r} is not one of the classes "
                f"{list(names)} (train.classify.classes); add it there or fix the file"
            )
        values[key] = index
    return Labels(values, names)


def class_counts(records: Sequence[dict[str, Any]], classes: tuple[str, ...] | None) -> Any:
    """Labelled volumes per class name (every class, zero counts included); None without
    classes."""
    if not classes:
        return None
    counts = Counter(r["label"] for r in records if r["label"] is not None)
    return {name: counts.get(i, 0) for i, name in enumerate(classes)}
