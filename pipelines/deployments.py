"""Prefect deployments: scheduled pipeline runs without anyone present.

``nightly-retrain`` runs :func:`pipelines.pipeline.pipeline_flow` on the cron schedule and
time zone of ``orchestration`` in ``params.yaml``; ``predict-inbox`` runs
:func:`pipelines.predict.predict_inbox_flow` on the inbox folder every
``orchestration.inbox_interval_s`` seconds. ``python -m pipelines.deployments``
(``make serve``) serves it from this process against the Prefect server in
``PREFECT_API_URL`` (``make prefect-server`` starts one on 127.0.0.1); scheduled runs
then happen while it runs. To run on a work pool and workers instead, see the README.
"""

from __future__ import annotations

import argparse
from datetime import timedelta
from pathlib import Path
from typing import Any

from prefect import serve
from prefect.schedules import Cron, Interval

from medimg.config import Params, load_params
from pipelines.pipeline import pipeline_flow
from pipelines.predict import predict_inbox_flow


def nightly_retrain(
    params: Params, params_file: Path, root: Path, every_seconds: float | None = None
) -> Any:
    """The retrain deployment; ``every_seconds`` replaces the cron (demos, tests)."""
    o = params.orchestration
    schedule = (
        Interval(timedelta(seconds=every_seconds), timezone=o.timezone)
        if every_seconds
        else Cron(o.retrain_cron, timezone=o.timezone)
    )
    return pipeline_flow.to_deployment(
        name="nightly-retrain",
        schedules=[schedule],
        parameters={"params_file": str(params_file.resolve()), "root": str(root.resolve())},
        description="dvc repro (what is out of date), register, promotion gate",
        tags=["medimg"],
    )


def predict_inbox(params: Params, params_file: Path, root: Path) -> Any:
    """The inbox deployment: predicts new studies every ``orchestration.inbox_interval_s``."""
    o = params.orchestration
    return predict_inbox_flow.to_deployment(
        name="predict-inbox",
        schedules=[Interval(timedelta(seconds=o.inbox_interval_s), timezone=o.timezone)],
        parameters={"params_file": str(params_file.resolve()), "root": str(root.resolve())},
        description="predict (masks, DICOM SEG, predictions.csv, report) on the inbox folder",
        tags=["medimg"],
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve medimg's Prefect deployments.")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--root", type=Path, default=Path("."))
    parser.add_argument(
        "--every-seconds", type=float, help="run the pipeline at this interval instead of cron"
    )
    args = parser.parse_args(argv)
    params = load_params(args.params)
    serve(
        nightly_retrain(params, args.params, args.root, args.every_seconds),
        predict_inbox(params, args.params, args.root),
    )


if __name__ == "__main__":
    main()
