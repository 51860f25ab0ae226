"""Shared fixtures: a tiny synthetic cohort written once per test session.

What they are built from (the cohort's params, ``Cohort``, ``Processed``, ...) is in
tests/helpers.py: import it from there, never from this module.
"""

from __future__ import annotations

import pytest

from tests.helpers import Cohort, Processed, process_cohort, write_cohort

# tool_path is only re-exported, for tests/unit/test_tracking.py until it imports it from
# tests.helpers (and the F401 exemption above covers it until then).


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory: pytest.TempPathFactory) -> Cohort:
    """The tiny cohort; tests must not modify it."""
    return write_cohort(tmp_path_factory.mktemp("cohort"))


@pytest.fixture(scope="session")
def tiny_processed(tiny_cohort: Cohort, tmp_path_factory: pytest.TempPathFactory) -> Processed:
    """The tiny cohort, ingested and preprocessed with default params; do not modify."""
    return process_cohort(tiny_cohort, tmp_path_factory.mktemp("processed"))
