"""One interface to a PACS over either protocol: find studies, list a study's instances,
fetch the missing ones, store new objects.

:func:`connect` builds the client that ``pacs.protocol`` names. Every network failure
becomes a :class:`~medimg.errors.PacsError` that names the server and the way out.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol, TypeVar

from medimg.config import PacsParams
from medimg.errors import PacsError
from medimg.pacs.query import Query
from medimg.pacs.refs import InstanceRef, Writer, describe

__all__ = ["InstanceRef", "Pacs", "Writer", "connect", "describe", "opened", "retried"]

log = logging.getLogger(__name__)
T = TypeVar("T")


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


@contextmanager
def opened(cfg: PacsParams, pacs: Pacs | None = None) -> Iterator[Pacs]:
    """``pacs`` as given (its owner closes it), or a client of ``cfg`` closed after use."""
    if pacs is not None:
        yield pacs
        return
    own = connect(cfg)
    try:
        yield own
    finally:
        own.close()


def retried(cfg: PacsParams, attempt: Callable[[], T], label: str = "") -> tuple[T | None, str]:
    """``attempt`` up to 1 + ``cfg.retries`` times, ``cfg.retry_wait_s`` apart, while it
    raises :class:`PacsError`: (its result, "") or (None, the last error). ``label``
    starts the warning logged before each retry (a study key, never an identifier)."""
    error = ""
    for n in range(cfg.retries + 1):
        try:
            return attempt(), ""
        except PacsError as e:
            error = str(e)
            if n < cfg.retries:
                log.warning("%s%s; retry %d of %d", label, error, n + 1, cfg.retries)
                time.sleep(cfg.retry_wait_s)
    return None, error
