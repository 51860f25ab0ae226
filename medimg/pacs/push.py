"""Results back to the PACS: DICOM objects sent by STOW-RS or C-STORE, retried; a send
that still fails leaves the files where they are and says so, so nothing is lost."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from medimg.config import PacsParams
from medimg.pacs.client import Pacs, opened, retried

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Delivery:
    delivered: bool
    files: int
    server: str
    error: str = ""  # after the retries; the files stay on disk


def push(cfg: PacsParams, files: Sequence[Path], pacs: Pacs | None = None) -> Delivery:
    """Send ``files`` (all at once: a study's results arrive together or not at all)."""
    with opened(cfg, pacs) as client:

        def send() -> bool:
            client.store(files)
            return True

        delivered, error = retried(cfg, send)
        if delivered:
            log.info("%d result objects delivered to %s", len(files), client.server)
            return Delivery(True, len(files), client.server)
        log.error("not delivered, kept on disk: %s", error)
        return Delivery(False, len(files), client.server, error)
