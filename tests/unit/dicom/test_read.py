"""Reading DICOM leaves no element value in pydicom's log records (possible PHI)."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
from pydicom.data import get_testdata_file

from medimg.dicom.read import ValuesHidden, dcmread


def test_importing_medimg_changes_no_logging() -> None:
    code = (
        "import logging, medimg.dicom, medimg.ingest, medimg.stages; "
        "print(len(logging.getLogger('pydicom').filters))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0"


def test_a_read_hides_the_values_pydicom_would_log(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("pydicom")
    before = list(logger.filters)
    try:
        ds = dcmread(get_testdata_file("CT_small.dcm"))
        assert ds.Modality == "CT"
        assert sum(isinstance(f, ValuesHidden) for f in logger.filters) == 1
        dcmread(get_testdata_file("CT_small.dcm"))  # a second read adds no second filter
        assert sum(isinstance(f, ValuesHidden) for f in logger.filters) == 1
        with caplog.at_level(logging.WARNING, logger="pydicom"):
            logger.warning("Invalid value for VR PN: %r", "DOE^JANE")
        assert "DOE^JANE" not in caplog.text
        assert "value not logged" in caplog.text
    finally:
        logger.filters[:] = before
