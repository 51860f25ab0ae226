"""The ingest flow on a real (temporary) Prefect server equals the plain stage."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from medimg import stages
from medimg.config import DataParams, IngestParams, Params
from tests.helpers import Cohort


def _params(cohort: Cohort, out: Path, salt: Path, **ingest: object) -> Params:
    data = DataParams(raw=cohort.raw, labels=cohort.labels, masks=cohort.masks, interim=out)
    return Params(data=data, ingest=IngestParams(salt_file=salt, **ingest))  # type: ignore[arg-type]


@pytest.mark.slow
@pytest.mark.parametrize("runner", ["threads", "processes"])
def test_ingest_flow_matches_plain_stage(
    prefect_server: None, tiny_cohort: Cohort, tmp_path: Path, runner: str
) -> None:
    from pipelines.ingest import ingest_flow, task_runner

    salt = tmp_path / "salt"
    plain = stages.ingest(_params(tiny_cohort, tmp_path / "plain", salt))
    params = _params(tiny_cohort, tmp_path / "flow", salt, workers=2)
    state = ingest_flow.with_options(task_runner=task_runner(runner, 2))(params, return_state=True)
    assert state.is_completed()
    summary = state.result()
    assert summary["n_stacks"] == plain["n_stacks"]
    a = pd.read_parquet(tmp_path / "plain" / "manifest.parquet")
    b = pd.read_parquet(tmp_path / "flow" / "manifest.parquet")
    pd.testing.assert_frame_equal(a, b)
