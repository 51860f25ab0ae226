"""Prefect flow for the ingest stage: one task per series, thin over ``medimg.ingest``.

The flow reads like the stage: plan (walk and check the folder), map ``ingest_stack`` over
the stacks that need work, finalize (labels, manifest, QC). Tasks hold identifiers in
memory only: results are not persisted and inputs are not hashed into cache keys.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, unmapped
from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner

from medimg import stages
from medimg.config import IngestParams, Params, StructureParams, load_params
from medimg.ingest import (
    IngestPaths,
    Job,
    Plan,
    StackResult,
    finalize_ingest,
    ingest_stack,
    plan_ingest,
    workers,
)
from pipelines.tasks import io_task


@io_task("plan-ingest")
def plan_task(
    cfg: IngestParams, paths: IngestPaths, structures: tuple[StructureParams, ...]
) -> Plan:
    return plan_ingest(cfg, paths, structures)


@io_task("ingest-series", task_run_name="ingest-{job.key}")
def series_task(job: Job, cfg: IngestParams, paths: IngestPaths) -> StackResult:
    try:
        return ingest_stack(job, cfg, paths)
    except OSError as err:
        # Named by the series' pseudonymous key; the file name is left out, since the
        # folders of a PACS export may carry patient names.
        raise OSError(
            err.errno,
            f"series {job.key}: {err.strerror or type(err).__name__} (I/O errors are "
            f"retried up to {series_task.retries} times); check the storage of the input "
            f"and of {paths.out}, then rerun: finished series are kept",
        ) from err


@io_task("finalize-ingest")
def finalize_task(
    cfg: IngestParams, paths: IngestPaths, plan: Plan, results: list[StackResult]
) -> dict[str, Any]:
    return finalize_ingest(cfg, paths, plan, results)


def task_runner(kind: str, workers: int, dask_address: str = "") -> Any:
    """The task runner named in params (``ingest.runner``).

    Args:
        kind: ``threads`` (default), ``processes`` or ``dask``.
        workers: threads or processes in the pool; for ``dask`` without an address, the
            worker processes of a local cluster started for the flow run and closed after it.
        dask_address: ``tcp://host:8786`` of a running Dask scheduler (``dask`` only). Its
            workers must import ``medimg`` and see the data folders at the same paths.

    Returns:
        A Prefect task runner, for ``ingest_flow.with_options(task_runner=...)``.
    """
    if kind == "dask":
        # Imported here, so that the other runners never load dask (half a second).
        from prefect_dask import DaskTaskRunner

        if dask_address:
            return DaskTaskRunner(address=dask_address)
        return DaskTaskRunner(
            cluster_class="distributed.LocalCluster",
            cluster_kwargs={
                "n_workers": workers,
                "threads_per_worker": 1,  # one series at a time per process, as processes do
                "processes": True,  # pydicom parses in pure Python: processes avoid the GIL
                "dashboard_address": None,  # no dashboard (it needs bokeh)
                # The scheduler's HTTP endpoint (health, metrics) listens anyway: on a free
                # local port, not 8787, which a second cluster would find taken (a warning).
                "scheduler_kwargs": {"dashboard_address": "127.0.0.1:0"},
            },
        )
    if kind == "processes":
        return ProcessPoolTaskRunner(max_workers=workers)
    return ThreadPoolTaskRunner(max_workers=workers)


@flow(name="ingest", log_prints=False)
def ingest_flow(params: Params, root: Path = Path(".")) -> dict[str, Any]:
    """DICOM folder to volumes and manifest, one task per series."""
    logger = get_run_logger()
    cfg = stages.ingest_params(params, root)
    paths = stages.ingest_paths(params, root)
    plan = plan_task(cfg, paths, params.structures)
    logger.info("%d stacks to ingest, %d unchanged", len(plan.jobs), len(plan.reused))
    futures = series_task.map(plan.jobs, cfg=unmapped(cfg), paths=unmapped(paths))
    results = [f.result() for f in futures]
    summary = finalize_task(cfg, paths, plan, results)
    logger.info(
        "%d volumes, %d files quarantined", summary["n_stacks"], summary["n_quarantined_files"]
    )
    return summary


def run(params_file: Path = Path("params.yaml"), root: Path = Path(".")) -> dict[str, Any]:
    """Run the flow with the task runner and worker count from params."""
    params = load_params(params_file)
    cfg = params.ingest
    runner = task_runner(cfg.runner, workers(cfg), cfg.dask_address)
    return ingest_flow.with_options(task_runner=runner)(params, root)


if __name__ == "__main__":
    run()
