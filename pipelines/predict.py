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
from medimg.config import IngestParams, PacsParams, Params, PredictParams, load_params
from medimg.inbox import InboxRecord, ready_studies
from medimg.io import project_path
from medimg.outputs import segmenter_volumes
from medimg.pacs.push import Delivery
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
    volumes: dict[str, dict[str, float]],
) -> SeriesResult:
    record, sources = item
    work, out = inbox.paths.ingest.out, inbox.paths.out
    return predict_series(record, sources, predictor, cfg, work, out, volumes)


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
    cfg = stages.predict_params(params, root)
    predictor = load_task(params, root, model_uri or cfg.model)
    paths = PredictPaths(project_path(root, input_dir), project_path(root, output_dir))
    inbox = ingest_task(cfg, stages.ingest_params(params, root), predictor, paths)
    logger.info("%d series to predict, %d rejected", len(inbox.items), len(inbox.rejected))
    volumes = segmenter_volumes(cfg.volumes_from)  # read once, for every series' SR
    futures = series_task.map(
        inbox.items,
        predictor=unmapped(predictor),
        cfg=unmapped(cfg),
        inbox=unmapped(inbox),
        volumes=unmapped(volumes),
    )
    summary = report_task(cfg, predictor, inbox, [f.result() for f in futures], started)
    logger.info(
        "%d predicted, %d rejected, %d failed",
        summary["n_predicted"],
        summary["n_rejected"],
        summary["n_failed"],
    )
    return summary


@task(name="push-results", task_run_name="push-{key}", cache_policy=NONE, tags=["pacs"])
def push_task(pacs: PacsParams, files: list[Path], key: str) -> Delivery:
    """A study's SEG and SR objects to the PACS (retried inside; never raises for it)."""
    from medimg.pacs.push import push

    return push(pacs, files)


def result_files(folder: Path) -> list[Path]:
    """The DICOM results of one study's prediction: every series' SEG and SR."""
    return sorted([*folder.glob("*/seg.dcm"), *folder.glob("*/sr.dcm")])


@flow(name="predict-inbox", log_prints=False)
def predict_inbox_flow(params_file: str = "params.yaml", root: str = ".") -> dict[str, Any]:
    """The ``predict`` flow on each new complete study folder of ``orchestration.inbox``
    (:func:`medimg.inbox.ready_studies`), into ``predict.output/<study key>/`` with
    ``predict.model``; the scheduled deployment ``predict-inbox`` runs this. What it has
    done is kept in ``predict.output/processed.json`` (and ``index.html``): a study is
    predicted again only when its files change. With ``predict.push`` each study's SEG and
    SR go to the PACS; one that the PACS did not take is sent again on the next run."""
    logger = get_run_logger()
    project = Path(root).resolve()
    pfile = Path(params_file) if Path(params_file).is_absolute() else project / params_file
    params = load_params(pfile)
    inbox = project_path(project, params.orchestration.inbox)
    out = project_path(project, params.predict.output)
    keys = stages.pacs_keys(params, project)
    studies, waiting = ready_studies(inbox, keys, params.orchestration.inbox_quiet_s)
    record = InboxRecord(out / "processed.json")
    new = [s for s in studies if record.is_new(s)]
    logger.info(
        "inbox: %d new complete studies, %d done before, %d still arriving",
        len(new),
        len(studies) - len(new),
        waiting,
    )
    done: dict[str, Any] = {}
    for study in new:
        summary = predict_flow.with_options(flow_run_name=f"predict-{study.key}")(
            params, study.folder, out / study.key, root=project
        )
        entry = {
            "fingerprint": study.fingerprint,
            "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "delivered": None,
            **{k: summary[k] for k in ("n_series", "n_predicted", "n_rejected", "n_failed")},
        }
        record.put(study.key, entry)
        done[study.key] = entry
    if params.predict.push:
        for key in record.undelivered():  # sent again: the PACS did not take it
            done.setdefault(key, record.studies[key])
        for key, entry in done.items():
            files = result_files(out / key)
            if not files:  # every series rejected or failed: nothing to send
                continue
            sent = push_task(params.pacs, files, key)
            entry.update(delivered=sent.delivered, error=sent.error, n_objects=len(files))
            record.put(key, entry)
    return {
        "studies": {k: {n: v for n, v in e.items() if n != "fingerprint"} for k, e in done.items()},
        "unchanged": len(studies) - len(new),
        "waiting": waiting,
    }


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
