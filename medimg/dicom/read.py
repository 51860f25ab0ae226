"""Reading DICOM files without PHI in the logs.

pydicom's messages about damaged or non-conformant elements quote their raw values, which
may be a patient's name or ID. :func:`dcmread` is pydicom's, after putting a filter on
pydicom's logger (once per process, at the first read rather than at import: importing
medimg changes no logging) that keeps such records but replaces their text.
"""

from __future__ import annotations

import logging
from typing import Any

import pydicom
from pydicom.dataset import FileDataset

_LOGGER = "pydicom"


class ValuesHidden(logging.Filter):
    """Keeps pydicom's log records, with their text (and its quoted values) replaced."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = "pydicom: a damaged or non-conformant element was read (value not logged)"
        record.args = ()
        return True


def hide_element_values() -> None:
    """Put :class:`ValuesHidden` on pydicom's logger unless it is there already."""
    logger = logging.getLogger(_LOGGER)
    if not any(isinstance(f, ValuesHidden) for f in logger.filters):
        logger.addFilter(ValuesHidden())


def dcmread(fp: Any, **kwargs: Any) -> FileDataset:
    """``pydicom.dcmread(fp, **kwargs)`` with pydicom's log records free of values."""
    hide_element_values()
    return pydicom.dcmread(fp, **kwargs)
