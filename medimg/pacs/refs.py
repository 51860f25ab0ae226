"""What the clients of both protocols hand around."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

Writer = Callable[[str, bytes], None]  # (SOPInstanceUID, the instance's file bytes)


@dataclass(frozen=True, order=True)
class InstanceRef:
    series_uid: str
    sop_uid: str
