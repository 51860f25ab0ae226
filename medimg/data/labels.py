"""Labels: a CSV keyed on a DICOM attribute, joined to series before identifiers go.

The join happens on keyed hashes: raw identifiers are read here, hashed at once, and
never written anywhere.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path

from medimg.errors import DataError

# The CSV column for each supported key; the DICOM keyword itself is accepted too.
COLUMNS = {
    "PatientID": "patient_id",
    "StudyInstanceUID": "study_uid",
    "AccessionNumber": "accession_number",
}


def read_labels(path: Path, label_key: str, hash_key: Callable[[str], str]) -> dict[str, int]:
    """Map hashed key values to 0/1 labels.

    Args:
        path: CSV with a key column (``patient_id``, ``study_uid`` or ``accession_number``,
            or the DICOM keyword) and a ``label`` column holding 0 or 1.
        label_key: the DICOM attribute the CSV is keyed on.
        hash_key: turns a raw key value into its keyed hash.

    Raises:
        DataError: a missing column, a label other than 0/1, or one key with two labels;
            the message names the file and row numbers, never the key values.
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
        labels: dict[str, int] = {}
        first_row: dict[str, int] = {}
        for row_number, row in enumerate(reader, start=2):
            raw = (row[column] or "").strip()
            if not raw:
                raise DataError(f"{path}: row {row_number} has an empty {column}")
            try:
                label = int(str(row["label"]).strip())
            except ValueError:
                label = -1
            if label not in (0, 1):
                raise DataError(f"{path}: row {row_number}: label must be 0 or 1")
            key = hash_key(raw)
            if key in labels and labels[key] != label:
                raise DataError(
                    f"{path}: rows {first_row[key]} and {row_number} give one {column} "
                    "two different labels"
                )
            labels[key] = label
            first_row.setdefault(key, row_number)
    return labels
