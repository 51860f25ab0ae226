"""DIMSE with pynetdicom: C-FIND to query, C-GET or C-MOVE to retrieve, C-STORE to store.

C-GET brings the instances back on the same association (the PACS plays the storage
user, we the storage provider for the image classes). C-MOVE asks the PACS to send them
to ``pacs.listen.ae_title``, which must be known to it: a storage node of ours runs for
the move's duration on ``pacs.listen.port``.
"""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from medimg.config import PacsParams
from medimg.errors import PacsError
from medimg.pacs.query import Query
from medimg.pacs.refs import InstanceRef, Writer, describe

PENDING = (0xFF00, 0xFF01)
# What C-GET and C-MOVE bring back: CT and MR images (single- and multi-frame), and the
# annotation and result objects medimg reads or writes (SEG, RTSTRUCT, SR).
STORAGE_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.2",  # CT Image
    "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT Image
    "1.2.840.10008.5.1.4.1.1.4",  # MR Image
    "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR Image
    "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation
    "1.2.840.10008.5.1.4.1.1.481.3",  # RT Structure Set
    "1.2.840.10008.5.1.4.1.1.88.33",  # Comprehensive SR
    "1.2.840.10008.5.1.4.1.1.88.34",  # Comprehensive 3D SR
)


def store_event_bytes(event: Any) -> bytes:
    """The received instance as a DICOM file: preamble, file meta, the dataset as sent."""
    return bytes(event.encoded_dataset())


class DimsePacs:
    def __init__(self, cfg: PacsParams) -> None:
        self.cfg = cfg
        self.server = describe(cfg)
        self._lock = threading.Lock()
        self._server: Any = None  # the C-MOVE destination, started when first needed
        self._routes: dict[str, tuple[Writer, list[int]]] = {}

    def _ae(self) -> AE:
        ae = AE(ae_title=self.cfg.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.cfg.timeout_s
        return ae

    def _tls(self) -> tuple[ssl.SSLContext, str] | None:
        if not self.cfg.dimse_tls:
            return None
        context = ssl.create_default_context(cafile=self.cfg.ca_bundle or None)
        return context, self.cfg.host

    @contextmanager
    def _association(self, ae: AE, what: str, **kwargs: Any) -> Iterator[Association]:
        try:  # pynetdicom reports a refused connection as an aborted association
            socket.create_connection((self.cfg.host, self.cfg.port), self.cfg.timeout_s).close()
        except OSError:
            raise PacsError(
                f"{self.server} cannot be reached while {what}: is it running, and are "
                "pacs.host and pacs.port right?"
            ) from None
        try:
            assoc = ae.associate(
                self.cfg.host,
                self.cfg.port,
                ae_title=self.cfg.called_ae,
                tls_args=self._tls(),
                **kwargs,
            )
        except (OSError, ssl.SSLError) as e:
            raise PacsError(f"{self.server}: {type(e).__name__} while {what}") from None
        if self.cfg.dimse_tls and not (assoc.is_established or assoc.is_rejected):
            raise PacsError(  # it answered TCP, then dropped the handshake: most often TLS
                f"{self.server}: no TLS session while {what}: is pacs.ca_bundle the CA that "
                "signed its certificate, and does it speak DICOM TLS on pacs.port?"
            )
        if assoc.is_rejected or assoc.is_aborted:
            how = "rejected" if assoc.is_rejected else "aborted"
            raise PacsError(
                f"{self.server} {how} the association while {what}: does it know the "
                f"calling AE title {self.cfg.calling_ae!r} (pacs.calling_ae), and is "
                "pacs.called_ae its own?"
            )
        if not assoc.is_established:
            raise PacsError(
                f"{self.server} cannot be reached while {what}: is it running, and are "
                "pacs.host and pacs.port right?"
            )
        try:
            yield assoc
        finally:
            if assoc.is_established:
                assoc.release()

    def _find(self, identifier: Dataset, what: str) -> list[Dataset]:
        ae = self._ae()
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        found = []
        with self._association(ae, what) as assoc:
            for status, answer in assoc.send_c_find(
                identifier, StudyRootQueryRetrieveInformationModelFind
            ):
                code = getattr(status, "Status", None)
                if code is None:
                    raise PacsError(f"{self.server} stopped answering while {what}")
                if code in PENDING and answer is not None:
                    found.append(answer)
                elif code not in PENDING and code != 0x0000:
                    raise PacsError(f"{self.server} answered status 0x{code:04X} while {what}")
        return found

    def find_studies(self, query: Query) -> list[str]:
        uids: set[str] = set()
        for match in query.matches():
            q = Dataset()
            q.QueryRetrieveLevel = "STUDY"
            q.StudyInstanceUID = match.pop("StudyInstanceUID", "")
            for keyword, value in match.items():
                setattr(q, keyword, value)
            for answer in self._find(q, "searching for studies"):
                if uid := str(answer.get("StudyInstanceUID", "")):
                    uids.add(uid)
        return sorted(uids)

    def instances(self, study_uid: str) -> list[InstanceRef]:
        q = Dataset()
        q.QueryRetrieveLevel, q.StudyInstanceUID, q.SeriesInstanceUID = "SERIES", study_uid, ""
        series = [str(a.SeriesInstanceUID) for a in self._find(q, "listing a study's series")]
        refs = set()
        for series_uid in series:
            q = Dataset()
            q.QueryRetrieveLevel = "IMAGE"
            q.StudyInstanceUID, q.SeriesInstanceUID, q.SOPInstanceUID = study_uid, series_uid, ""
            for a in self._find(q, "listing a series' instances"):
                refs.add(InstanceRef(series_uid, str(a.SOPInstanceUID)))
        return sorted(refs)

    def _identifiers(self, study_uid: str, wanted: Sequence[InstanceRef]) -> Iterator[Dataset]:
        """One IMAGE-level identifier per series, listing its wanted instances."""
        by_series: dict[str, list[str]] = {}
        for ref in wanted:
            by_series.setdefault(ref.series_uid, []).append(ref.sop_uid)
        for series_uid, sops in by_series.items():
            q = Dataset()
            q.QueryRetrieveLevel = "IMAGE"
            q.StudyInstanceUID, q.SeriesInstanceUID = study_uid, series_uid
            q.SOPInstanceUID = sops if len(sops) > 1 else sops[0]
            yield q

    def fetch(self, study_uid: str, wanted: Sequence[InstanceRef], write: Writer) -> int:
        if not wanted:
            return 0
        return (self._get if self.cfg.retrieve == "get" else self._move)(study_uid, wanted, write)

    def _handler(self, write: Writer, counter: list[int]) -> Any:
        def on_store(event: Any) -> int:
            data = store_event_bytes(event)
            write(str(event.request.AffectedSOPInstanceUID), data)
            counter[0] += 1
            return 0x0000

        return on_store

    def _check(self, responses: Iterable[tuple[Dataset, Any]], what: str) -> None:
        for status, _ in responses:
            code = getattr(status, "Status", None)
            if code is None:
                raise PacsError(f"{self.server} stopped answering while {what}")
            if code not in PENDING and code not in (0x0000, 0xB000):
                raise PacsError(f"{self.server} answered status 0x{code:04X} while {what}")

    def _get(self, study_uid: str, wanted: Sequence[InstanceRef], write: Writer) -> int:
        ae = self._ae()
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
        for uid in STORAGE_CLASSES:
            ae.add_requested_context(uid)
        roles = [build_role(uid, scp_role=True) for uid in STORAGE_CLASSES]
        counter = [0]
        handlers = [(evt.EVT_C_STORE, self._handler(write, counter))]
        with self._association(ae, "retrieving (C-GET)", ext_neg=roles, evt_handlers=handlers) as a:
            for q in self._identifiers(study_uid, wanted):
                self._check(a.send_c_get(q, StudyRootQueryRetrieveInformationModelGet), "C-GET")
        return counter[0]

    def _move(self, study_uid: str, wanted: Sequence[InstanceRef], write: Writer) -> int:
        counter = [0]
        with self._lock:
            self._routes[study_uid] = (write, counter)
        try:
            self._storage_node()
            ae = self._ae()
            ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
            with self._association(ae, "retrieving (C-MOVE)") as a:
                for q in self._identifiers(study_uid, wanted):
                    responses = a.send_c_move(
                        q, self.cfg.listen.ae_title, StudyRootQueryRetrieveInformationModelMove
                    )
                    self._check(responses, "C-MOVE")
        finally:
            with self._lock:
                del self._routes[study_uid]
        return counter[0]

    def _storage_node(self) -> None:
        """Our storage node, where the PACS sends what C-MOVE asks for: one per client,
        shared by the studies in flight (each instance goes to its study's writer)."""
        with self._lock:
            if self._server is not None:
                return
            listen = self.cfg.listen
            scp = AE(ae_title=listen.ae_title)
            for uid in STORAGE_CLASSES:
                scp.add_supported_context(uid)
            handlers: list[Any] = [(evt.EVT_C_STORE, self._on_moved)]
            try:
                self._server = scp.start_server(
                    (listen.host, listen.port), block=False, evt_handlers=handlers
                )
            except OSError as e:
                raise PacsError(
                    f"our storage node cannot listen on {listen.host}:{listen.port} for the "
                    f"C-MOVE ({type(e).__name__}): is `medimg pacs listen` running there? "
                    "Stop it, or retrieve with pacs.retrieve: get"
                ) from None

    def _on_moved(self, event: Any) -> int:
        study_uid = str(event.dataset.get("StudyInstanceUID", ""))
        with self._lock:
            route = self._routes.get(study_uid)
        if route is None:
            return 0xA801  # refused: not a study this client asked for
        write, counter = route
        write(str(event.request.AffectedSOPInstanceUID), store_event_bytes(event))
        with self._lock:
            counter[0] += 1
        return 0x0000

    def close(self) -> None:
        """Stop the C-MOVE storage node, if one was started."""
        with self._lock:
            server, self._server = self._server, None
        if server is not None:
            server.shutdown()

    def store(self, files: Iterable[Path]) -> None:
        datasets = [pydicom.dcmread(f) for f in files]
        if not datasets:
            return
        ae = self._ae()
        for uid in sorted({str(ds.SOPClassUID) for ds in datasets}):
            ae.add_requested_context(uid)
        with self._association(ae, "storing results") as assoc:
            for ds in datasets:
                status = assoc.send_c_store(ds)
                code = getattr(status, "Status", None)
                if code is None:
                    raise PacsError(f"{self.server} stopped answering while storing results")
                if code not in (0x0000, 0xB000, 0xB007, 0xB006):
                    raise PacsError(
                        f"{self.server} answered status 0x{code:04X} while storing results"
                    )
