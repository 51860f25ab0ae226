"""The ``pacs`` section: where the hospital's PACS is and how medimg talks to it.

Kept beside :mod:`medimg.config` (which re-exports it) so that each file stays small.
Credentials are never a parameter: they come from the environment or from a netrc-style
file that git ignores (:mod:`medimg.pacs.credentials`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from medimg.config.base import StrictModel

AE_TITLE = r"^[ -~]{1,16}$"  # DICOM AE title: 1-16 printable ASCII characters


def _ae(value: str) -> str:
    if value != value.strip() or "\\" in value:
        raise ValueError(f"AE title {value!r}: no leading or trailing spaces, no backslash")
    return value


class ListenParams(StrictModel):
    """``medimg pacs listen``: a DICOM storage node (C-STORE SCP) that fills the inbox."""

    ae_title: str = Field("MEDIMG", pattern=AE_TITLE)  # our AE title (C-MOVE destination)
    host: str = "127.0.0.1"  # address to listen on; loopback unless you open it
    port: int = Field(11112, ge=1, le=65535)
    allowed_callers: tuple[str, ...] = ()  # calling AE titles accepted; () = any
    quiet_s: float = Field(30.0, gt=0)  # a study is complete this long after its last file

    _ae = field_validator("ae_title")(_ae)


class PacsParams(StrictModel):
    """The PACS: DICOMweb (QIDO-RS, WADO-RS, STOW-RS) or DIMSE (C-FIND, C-GET or C-MOVE,
    C-STORE), with pydicom's dicomweb-client and pynetdicom."""

    protocol: Literal["dicomweb", "dimse"] = "dicomweb"
    url: str = "http://127.0.0.1:8042/dicom-web"  # DICOMweb root (QIDO, WADO, STOW below)
    host: str = "127.0.0.1"  # DIMSE peer
    port: int = Field(4242, ge=1, le=65535)  # DIMSE port of the PACS
    called_ae: str = Field("ORTHANC", pattern=AE_TITLE)  # the PACS's AE title
    calling_ae: str = Field("MEDIMG", pattern=AE_TITLE)  # ours, as the PACS knows it
    retrieve: Literal["get", "move"] = "get"  # DIMSE retrieval; move: to listen.ae_title
    credentials: Path = Path(".medimg-pacs.netrc")  # netrc-style file (git-ignored)
    tls_verify: bool = True  # DICOMweb over https: check the server's certificate
    ca_bundle: str = ""  # CA file for TLS (DICOMweb and DIMSE); "" = the system's
    dimse_tls: bool = False  # DIMSE over TLS (the PACS must offer it)
    timeout_s: float = Field(30.0, gt=0)  # per network operation
    retries: int = Field(3, ge=0)  # further tries of a study after a network error
    retry_wait_s: float = Field(2.0, ge=0)
    concurrency: int = Field(2, ge=1)  # studies in flight at once (flow and CLI)
    listen: ListenParams = ListenParams()

    _called = field_validator("called_ae", "calling_ae")(_ae)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"pacs.url {value!r} must start with http:// or https://")
        if "@" in value.split("//", 1)[1].split("/", 1)[0]:
            raise ValueError("pacs.url must not hold credentials; use pacs.credentials")
        return value.rstrip("/")
