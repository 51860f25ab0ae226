"""Results back to the PACS: DICOM objects sent by STOW-RS or C-STORE, retried; a send
that still fails leaves the files where they are and says so, so nothing is lost."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from medimg.config import PacsParams
from medimg.errors import PacsError
from medimg.pacs.client import Pacs, connect

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Delivery:
    delivered: bool
    files: int
    server: str
    error: str = ""  # after the retries; the files stay on disk


def push(cfg: PacsParams, files: Sequence[Path], pacs: Pacs | None = None) -> Delivery:
    """Send ``files`` (all at once: a study's results arrive together or not at all)."""
    own = pacs is None
    pacs = pacs or connect(cfg)
    try:
        return _push(cfg, files, pacs)
    finally:
        if own:
            pacs.close()


def _push(cfg: PacsParams, files: Sequence[Path], pacs: Pacs) -> Delivery:
    error = ""
    for n in range(cfg.retries + 1):
        try:
            pacs.store(files)
            log.info("%d result objects delivered to %s", len(files), pacs.server)
            return Delivery(True, len(files), pacs.server)
        except PacsError as e:
            error = str(e)
            if n < cfg.retries:
                log.warning("%s; retry %d of %d", error, n + 1, cfg.retries)
                time.sleep(cfg.retry_wait_s)
    log.error("not delivered, kept on disk: %s", error)
    return Delivery(False, len(files), pacs.server, error)
