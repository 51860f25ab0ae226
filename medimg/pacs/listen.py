"""``medimg pacs listen``: a DICOM storage node (C-STORE SCP) that fills the inbox.

Each received instance is written atomically to ``inbox/<study key>/<instance key>.dcm``
only once it has arrived whole (pynetdicom hands the dataset over after its last PDU), so
a sender that drops the association mid-instance leaves nothing behind. A study is
complete once ``quiet_s`` seconds pass without a new instance: then ``<study key>/
COMPLETE`` is written, and the ``predict-inbox`` deployment takes it.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from pynetdicom import AE, evt
from pynetdicom.transport import ThreadedAssociationServer

from medimg.config import ListenParams
from medimg.dicom.deid import Pseudonymizer
from medimg.errors import PacsError
from medimg.io import atomic_write_text
from medimg.pacs.dimse import STORAGE_CLASSES, store_event_bytes
from medimg.pacs.local import COMPLETE, Layout

log = logging.getLogger(__name__)

__all__ = ["COMPLETE", "StorageNode", "complete_studies"]


class StorageNode:
    """The node: :meth:`start` listens in background threads, :meth:`stop` ends it."""

    def __init__(self, cfg: ListenParams, inbox: Path, keys: Pseudonymizer) -> None:
        self.cfg = cfg
        self.layout = Layout(inbox, keys)
        self.last: dict[str, float] = {}  # study key -> time of its latest instance
        self.received = 0
        self._lock = threading.Lock()
        self._server: ThreadedAssociationServer | None = None
        self._stop = threading.Event()
        self._watch: threading.Thread | None = None

    def _on_store(self, event: Any) -> int:
        ds = event.dataset
        study_uid = str(ds.get("StudyInstanceUID", ""))
        sop_uid = str(event.request.AffectedSOPInstanceUID)
        if not study_uid:
            log.warning("refused an instance without StudyInstanceUID")
            return 0xC000  # cannot understand
        self.layout.write(study_uid, sop_uid, store_event_bytes(event))
        key = self.layout.study_key(study_uid)
        with self._lock:
            self.last[key] = time.time()
            self.received += 1
        (self.layout.root / key / COMPLETE).unlink(missing_ok=True)  # more came in
        return 0x0000

    def start(self) -> None:
        ae = AE(ae_title=self.cfg.ae_title)
        for uid in STORAGE_CLASSES:
            ae.add_supported_context(uid)
        ae.add_supported_context("1.2.840.10008.1.1")  # verification (C-ECHO)
        ae.require_called_aet = True
        ae.require_calling_aet = list(self.cfg.allowed_callers)  # [] accepts any
        handlers: list[Any] = [(evt.EVT_C_STORE, self._on_store)]
        try:
            self._server = ae.start_server(
                (self.cfg.host, self.cfg.port), block=False, evt_handlers=handlers
            )
        except OSError as e:
            raise PacsError(
                f"cannot listen on {self.cfg.host}:{self.cfg.port} ({type(e).__name__}): "
                "is another node using the port? Set pacs.listen.port"
            ) from None
        self._resume()
        self._watch = threading.Thread(target=self._mark_complete, daemon=True)
        self._watch.start()
        log.info(
            "storage node %s listening on %s:%d", self.cfg.ae_title, self.cfg.host, self.cfg.port
        )

    def _resume(self) -> None:
        """Studies that an earlier run received but had not marked complete wait their
        quiet time from their newest file."""
        for folder in self.layout.root.glob("*"):
            if folder.is_dir() and not (folder / COMPLETE).exists():
                times = [f.stat().st_mtime for f in folder.glob("*.dcm")]
                if times:
                    self.last.setdefault(folder.name, max(times))

    def _mark_complete(self) -> None:
        while not self._stop.wait(min(1.0, self.cfg.quiet_s / 4)):
            self.complete_quiet()

    def complete_quiet(self, now: float | None = None) -> list[str]:
        """Mark the studies quiet for ``quiet_s``; returns their keys."""
        now = time.time() if now is None else now
        with self._lock:
            quiet = [k for k, t in self.last.items() if now - t >= self.cfg.quiet_s]
            for key in quiet:
                del self.last[key]
        for key in quiet:
            atomic_write_text(self.layout.root / key / COMPLETE, "")
            log.info("study %s complete", key)
        return quiet

    def stop(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
        if self._watch is not None:
            self._watch.join()


def complete_studies(inbox: Path) -> list[Path]:
    """The study folders of ``inbox`` that a node has marked complete, sorted."""
    return sorted(p.parent for p in Path(inbox).glob(f"*/{COMPLETE}"))
