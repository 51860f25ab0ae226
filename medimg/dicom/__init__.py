"""DICOM: discovery, series assembly, geometry, pixels, de-identification, synthesis."""

from __future__ import annotations

import logging


class _ValuesHidden(logging.Filter):
    """pydicom's messages about damaged or non-conformant elements quote their raw values,
    which may be a patient's name or ID: such records are kept, their text replaced."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = "pydicom: a damaged or non-conformant element was read (value not logged)"
        record.args = ()
        return True


logging.getLogger("pydicom").addFilter(_ValuesHidden())
