"""One interface to a PACS over either protocol: find studies, list a study's instances,
fetch the missing ones, store new objects.

:func:`connect` builds the client that ``pacs.protocol`` names. Every network failure
becomes a :class:`~medimg.errors.PacsError` that names the server and the way out.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

from medimg.config import PacsParams
from medimg.pacs.query import Query
from medimg.pacs.refs import InstanceRef, Writer

__all__ = ["InstanceRef", "Pacs", "Writer", "connect"]


class Pacs(Protocol):
    server: str  # how messages name it: address and AE title, no credential

    def find_studies(self, query: Query) -> list[str]:
        """StudyInstanceUIDs matching ``query``, sorted, each once."""
        ...

    def instances(self, study_uid: str) -> list[InstanceRef]:
        """Every instance of the study."""
        ...

    def fetch(self, study_uid: str, wanted: Sequence[InstanceRef], write: Writer) -> int:
        """Retrieve ``wanted`` (all of the study's, or some), each handed to ``write``;
        returns how many arrived."""
        ...

    def store(self, files: Iterable[Path]) -> None:
        """Send DICOM files to the PACS (STOW-RS or C-STORE)."""
        ...

    def close(self) -> None:
        """Release what the client holds (a storage node for C-MOVE)."""
        ...


def connect(cfg: PacsParams) -> Pacs:
    """The client of ``cfg.protocol``, with its credentials (:mod:`.credentials`)."""
    if cfg.protocol == "dicomweb":
        from medimg.pacs.dicomweb import DicomWebPacs

        return DicomWebPacs(cfg)
    from medimg.pacs.dimse import DimsePacs

    return DimsePacs(cfg)
