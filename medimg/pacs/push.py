"""Results back to the PACS: DICOM objects sent by STOW-RS or C-STORE, retried; a send
that still fails leaves the files where they are and says so, so nothing is lost."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from medimg.config import PacsParams
from medimg.errors import PacsError
from medimg.pacs.client import Pacs, describe, opened, retried

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Delivery:
    delivered: bool
    files: int
    server: str
    error: str = ""  # after the retries; the files stay on disk


def push(cfg: PacsParams, files: Sequence[Path], pacs: Pacs | None = None) -> Delivery:
    """Send ``files`` (all at once: a study's results arrive together or not at all).
    Never raises for the PACS: a client that cannot even be made is an undelivered push."""
    try:
        with opened(cfg, pacs) as client:

            def send() -> bool:
                client.store(files)
                return True

            delivered, error = retried(cfg, send)
            server = client.server
    except PacsError as e:
        delivered, error, server = None, str(e), describe(cfg)
    if delivered:
        log.info("%d result objects delivered to %s", len(files), server)
        return Delivery(True, len(files), server)
    log.error("not delivered, kept on disk: %s", error)
    return Delivery(False, len(files), server, error)
