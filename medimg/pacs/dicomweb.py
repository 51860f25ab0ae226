"""DICOMweb with dicomweb-client: QIDO-RS queries, WADO-RS retrieval, STOW-RS storage."""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient

from medimg.config import PacsParams
from medimg.errors import PacsError
from medimg.pacs.credentials import credentials_for, host_of
from medimg.pacs.query import Query
from medimg.pacs.refs import InstanceRef, Writer, describe

STUDY_UID, SERIES_UID, SOP_UID = "0020000D", "0020000E", "00080018"


def _value(item: dict[str, Any], tag: str) -> str:
    values = item.get(tag, {}).get("Value") or [""]
    return str(values[0])


class DicomWebPacs:
    def __init__(self, cfg: PacsParams) -> None:
        self.cfg = cfg
        self.server = describe(cfg)
        session = requests.Session()
        creds = credentials_for(host_of(cfg.url), cfg.credentials)
        if creds is not None:
            session.auth = (creds.user, creds.password)
        session.verify = cfg.ca_bundle or cfg.tls_verify
        self._session = session
        self.client = DICOMwebClient(url=cfg.url, session=session)
        self.client.set_http_retry_params(retry=False)  # medimg retries whole studies
        session.request = _with_timeout(session.request, cfg.timeout_s, session.verify)  # type: ignore[method-assign]

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except requests.exceptions.SSLError:
            raise PacsError(
                f"{self.server}: TLS certificate not accepted while {what}; set "
                "pacs.ca_bundle to the CA file that signed it"
            ) from None
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout):
            raise PacsError(
                f"{self.server} cannot be reached while {what}: is it running, and is "
                "pacs.url right?"
            ) from None
        except requests.exceptions.HTTPError as e:
            code = e.response.status_code if e.response is not None else 0
            if code in (401, 403):
                raise PacsError(
                    f"{self.server} refused the credentials while {what} (HTTP {code}): "
                    f"check {self.cfg.credentials} or $MEDIMG_PACS_USER and "
                    "$MEDIMG_PACS_PASSWORD"
                ) from None
            raise PacsError(f"{self.server} answered HTTP {code} while {what}") from None

    def find_studies(self, query: Query) -> list[str]:
        found: set[str] = set()
        with self._errors("searching for studies"):
            for match in query.matches():
                for item in self.client.search_for_studies(
                    search_filters=match, fields=["StudyInstanceUID"]
                ):
                    if uid := _value(item, STUDY_UID):
                        found.add(uid)
        return sorted(found)

    def instances(self, study_uid: str) -> list[InstanceRef]:
        with self._errors("listing a study's instances"):
            items = self.client.search_for_instances(
                study_instance_uid=study_uid, fields=["SeriesInstanceUID", "SOPInstanceUID"]
            )
        refs = {InstanceRef(_value(i, SERIES_UID), _value(i, SOP_UID)) for i in items}
        return sorted(r for r in refs if r.series_uid and r.sop_uid)

    def fetch(self, study_uid: str, wanted: Sequence[InstanceRef], write: Writer) -> int:
        n = 0
        for ref in wanted:
            with self._errors("retrieving an instance"):
                ds = self.client.retrieve_instance(study_uid, ref.series_uid, ref.sop_uid)
            buffer = io.BytesIO()
            pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
            write(ref.sop_uid, buffer.getvalue())
            n += 1
        return n

    def store(self, files: Iterable[Path]) -> None:
        datasets = [pydicom.dcmread(f) for f in files]
        if datasets:
            with self._errors("storing results"):
                self.client.store_instances(datasets=datasets)

    def close(self) -> None:
        self._session.close()


def _with_timeout(request: Any, timeout: float, verify: bool | str = True) -> Any:
    """``session.request`` with a default timeout (requests has none: a silent server
    would hang a pull forever) and the certificate check of params on every request:
    requests lets ``$REQUESTS_CA_BUNDLE`` override a session's own ``verify``, which would
    silently drop ``pacs.ca_bundle`` (and ``pacs.tls_verify: false``) wherever it is set."""

    def call(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("timeout", timeout)
        kwargs.setdefault("verify", verify)
        return request(*args, **kwargs)

    return call
