"""What the clients of both protocols hand around."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from medimg.config import PacsParams

Writer = Callable[[str, bytes], None]  # (SOPInstanceUID, the instance's file bytes)


@dataclass(frozen=True, order=True)
class InstanceRef:
    series_uid: str
    sop_uid: str


def describe(cfg: PacsParams) -> str:
    """The PACS as messages name it (a client's ``server``): address and AE title only."""
    if cfg.protocol == "dicomweb":
        return f"DICOMweb server {cfg.url}"
    return f"DICOM node {cfg.called_ae} at {cfg.host}:{cfg.port}"
