"""The local side of a transfer: where each instance goes, what is there already, and
writing a file so that no half-written one is ever seen."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from medimg.dicom.deid import Pseudonymizer
from medimg.io import atomic_write_bytes, remove_temporaries

SUFFIX = ".dcm"
COMPLETE = "COMPLETE"  # marker file of a study the storage node has seen go quiet


@dataclass(frozen=True)
class Layout:
    """``root/<study key>/<instance key>.dcm``: keyed hashes of the UIDs (no identifier
    in a file name), the same on every run with the same salt, so a later pull knows what
    it has without opening a file."""

    root: Path
    keys: Pseudonymizer

    def study_key(self, study_uid: str) -> str:
        return self.keys.key("study", study_uid)

    def study_dir(self, study_uid: str) -> Path:
        return self.root / self.study_key(study_uid)

    def path(self, study_uid: str, sop_uid: str) -> Path:
        return self.study_dir(study_uid) / f"{self.keys.key('sop', sop_uid)}{SUFFIX}"

    def present(self, study_uid: str) -> set[str]:
        """File names of the study's instances already on disk (complete files only:
        the temporaries of an interrupted write are removed first)."""
        folder = self.study_dir(study_uid)
        if not folder.is_dir():
            return set()
        remove_temporaries(folder)
        return {p.name for p in folder.glob(f"*{SUFFIX}")}

    def write(self, study_uid: str, sop_uid: str, data: bytes) -> Path:
        """Write one instance atomically (a temporary beside it, then a rename)."""
        target = self.path(study_uid, sop_uid)
        atomic_write_bytes(target, data)
        return target
