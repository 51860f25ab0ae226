"""Prefect flow for the predict stage, thin over ``medimg.predict``.

The flow reads like the stage: load the registered model, ingest the inbox (QC gate),
predict each series in a task of its own, write the report. A series that fails is a row
of the report, not a failed flow run; only I/O failures are retried.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task, unmapped
from prefect.cache_policies import NONE
from prefect.task_runners import ThreadPoolTaskRunner

from medimg import stages, tracking
from medimg.config import IngestParams, Params, PredictParams, load_params
from medimg.io import project_path
from medimg.predict import (
    Inbox,
    Predictor,
    PredictPaths,
    SeriesResult,
    finalize_predict,
    ingest_inbox,
    load_predictor,
    predict_series,
)
from pipelines.tasks import io_task


@io_task("load-model")
def load_task(params: Params, root: Path, model_uri: str) -> Predictor:
    client = tracking.configure(params, root)
    return load_predictor(model_uri, client, params.predict.device)


@io_task("ingest-inbox")
def ingest_task(
    cfg: PredictParams, ingest_cfg: IngestParams, predictor: Predictor, paths: PredictPaths
) -> Inbox:
    return ingest_inbox(cfg, ingest_cfg, predictor.preprocess, paths)


# not retried: a series that fails is reported by predict_series itself
@task(name="predict-series", task_run_name="predict-{item[0][key]}", cache_policy=NONE)
def series_task(
    item: tuple[dict[str, Any], list[Path]],
    predictor: Predictor,
    cfg: PredictParams,
    inbox: Inbox,
) -> SeriesResult:
    record, sources = item
    return predict_series(record, sources, predictor, cfg, inbox.paths.ingest.out, inbox.paths.out)


@io_task("write-report")
def report_task(
    cfg: PredictParams,
    predictor: Predictor,
    inbox: Inbox,
    results: list[SeriesResult],
    started: float,
) -> dict[str, Any]:
    everything = [*inbox.rejected, *results]
    total = time.perf_counter() - started
    return finalize_predict(cfg, predictor, inbox.paths, everything, inbox.seconds, total)


# two series side by side: one preprocesses or writes while the other infers
RUNNER: Any = ThreadPoolTaskRunner(max_workers=2)


@flow(name="predict", log_prints=False, task_runner=RUNNER)
def predict_flow(
    params: Params,
    input_dir: Path,
    output_dir: Path,
    model_uri: str | None = None,
    root: Path = Path("."),
) -> dict[str, Any]:
    """New DICOM studies in ``input_dir`` to masks, DICOM SEG, predictions.csv and
    report.html in ``output_dir``, with ``model_uri`` (default ``predict.model``)."""
    started = time.perf_counter()
    logger = get_run_logger()
    cfg = params.predict
    predictor = load_task(params, root, model_uri or cfg.model)
    paths = PredictPaths(project_path(root, input_dir), project_path(root, output_dir))
    inbox = ingest_task(cfg, stages.ingest_params(params, root), predictor, paths)
    logger.info("%d series to predict, %d rejected", len(inbox.items), len(inbox.rejected))
    futures = series_task.map(
        inbox.items, predictor=unmapped(predictor), cfg=unmapped(cfg), inbox=unmapped(inbox)
    )
    summary = report_task(cfg, predictor, inbox, [f.result() for f in futures], started)
    logger.info(
        "%d predicted, %d rejected, %d failed",
        summary["n_predicted"],
        summary["n_rejected"],
        summary["n_failed"],
    )
    return summary


def inbox_fingerprint(folder: Path) -> str:
    """A digest of the inbox's file names, sizes and modification times (names may hold
    PHI: only the digest is stored)."""
    import hashlib

    h = hashlib.sha256()
    if folder.is_dir():
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            st = path.stat()
            h.update(f"{path.relative_to(folder)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


@flow(name="predict-inbox", log_prints=False)
def predict_inbox_flow(params_file: str = "params.yaml", root: str = ".") -> dict[str, Any]:
    """The ``predict`` flow on ``orchestration.inbox`` into ``predict.output`` with
    ``predict.model``, when the inbox changed since the last run that completed (the
    scheduled deployment ``predict-inbox`` runs this); otherwise nothing is redone."""
    from medimg.io import atomic_write_text

    logger = get_run_logger()
    project = Path(root).resolve()
    pfile = Path(params_file) if Path(params_file).is_absolute() else project / params_file
    params = load_params(pfile)
    inbox = project_path(project, params.orchestration.inbox)
    out = project_path(project, params.predict.output)
    state = out / ".inbox-state"
    digest = inbox_fingerprint(inbox)
    if not inbox.is_dir() or not any(p.is_file() for p in inbox.rglob("*")):
        logger.info("the inbox %s is empty or missing: nothing to predict", inbox)
        return {"skipped": "empty inbox"}
    if state.is_file() and state.read_text().strip() == digest:
        logger.info("the inbox is unchanged since the last run: results are in %s", out)
        return {"skipped": "unchanged inbox"}
    summary = predict_flow(params, inbox, out, root=project)
    atomic_write_text(state, digest + "\n")
    return summary


def run(
    input_dir: Path,
    output_dir: Path,
    params_file: Path = Path("params.yaml"),
    root: Path = Path("."),
) -> dict[str, Any]:
    """Run the flow with the parameters of ``params_file``."""
    return predict_flow(load_params(params_file), input_dir, output_dir, root=root)


if __name__ == "__main__":
    import sys

    run(Path(sys.argv[1]), Path(sys.argv[2]))
