"""What to fetch: a query on study attributes, as QIDO-RS filters or a C-FIND identifier."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from medimg.errors import ConfigError

_DATE = re.compile(r"^(\d{8})?(-(\d{8})?)?$")


@dataclass(frozen=True)
class Query:
    """Studies matching every attribute given (empty: any). ``accessions``: one query per
    accession number, their studies joined."""

    patient_id: str = ""
    study_date: str = ""  # YYYYMMDD, or a range YYYYMMDD-YYYYMMDD (either end open)
    modality: str = ""  # ModalitiesInStudy, e.g. CT
    description: str = ""  # StudyDescription; * and ? are wildcards
    accessions: tuple[str, ...] = ()
    study_uids: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.study_date and not _DATE.match(self.study_date):
            raise ConfigError(f"study date {self.study_date!r}: use YYYYMMDD or YYYYMMDD-YYYYMMDD")

    def matches(self) -> list[dict[str, str]]:
        """One dict of matching keys (DICOM keywords) per query sent."""
        base = {
            k: v
            for k, v in (
                ("PatientID", self.patient_id),
                ("StudyDate", self.study_date),
                ("ModalitiesInStudy", self.modality),
                ("StudyDescription", self.description),
            )
            if v
        }
        if self.study_uids:
            return [{**base, "StudyInstanceUID": uid} for uid in self.study_uids]
        if self.accessions:
            return [{**base, "AccessionNumber": a} for a in self.accessions]
        return [base]


def read_accessions(path: Path) -> tuple[str, ...]:
    """Accession numbers from a file, one per line (blank lines and ``#`` comments skipped).

    Raises:
        ConfigError: the file is missing or holds none.
    """
    if not path.is_file():
        raise ConfigError(f"{path}: no such file of accession numbers")
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    found = tuple(dict.fromkeys(line for line in lines if line))
    if not found:
        raise ConfigError(f"{path}: no accession number in it")
    return found
