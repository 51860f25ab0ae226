"""Prefect flow of ``medimg pacs pull``: one task per study, retried on network errors,
at most ``pacs.concurrency`` studies at once (tagged ``pacs``, so ``prefect
concurrency-limit create pacs N`` also caps every flow that talks to the PACS).

The query comes from a file (YAML: patient_id, study_date, modality, description,
accessions), not from flow parameters: Prefect keeps a flow run's parameters, and a
patient ID must not land there. Task names and results carry study keys only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE
from prefect.task_runners import ThreadPoolTaskRunner

from medimg import stages
from medimg.config import Params, load_params
from medimg.errors import ConfigError
from medimg.pacs.client import Pacs, opened
from medimg.pacs.local import Layout
from medimg.pacs.pull import PullSummary, StudyResult, pull_study
from medimg.pacs.query import Query

QUERY_KEYS = {"patient_id", "study_date", "modality", "description", "accessions"}


def read_query(path: Path) -> Query:
    """A query file (YAML mapping of :data:`QUERY_KEYS`; empty or missing: every study)."""
    if not path.is_file():
        return Query()
    data = yaml.safe_load(path.read_text()) or {}
    unknown = set(data) - QUERY_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown query keys {sorted(unknown)}; use {sorted(QUERY_KEYS)}")
    return Query(**{**data, "accessions": tuple(data.get("accessions") or ())})


@task(name="pacs-find-studies", cache_policy=NONE, persist_result=False, tags=["pacs"])
def find_task(pacs: Pacs, query: Query) -> list[str]:
    return pacs.find_studies(query)


@task(
    name="pacs-pull-study",
    task_run_name="pull-{key}",
    cache_policy=NONE,
    persist_result=False,
    tags=["pacs"],
)
def study_task(pacs: Pacs, layout: Layout, study_uid: str, key: str) -> StudyResult:
    return pull_study(pacs, layout, study_uid)


@flow(name="pacs-pull", log_prints=False)
def pacs_pull_flow(params: Params, query_file: Path, root: Path = Path(".")) -> dict[str, Any]:
    """The studies of the query file from ``params.pacs`` into ``data.raw``."""
    logger = get_run_logger()
    cfg = params.pacs
    with opened(cfg) as pacs:
        layout = Layout(root / params.data.raw, stages.pacs_keys(params, root))
        studies = find_task(pacs, read_query(query_file))
        retried = study_task.with_options(retries=cfg.retries, retry_delay_seconds=cfg.retry_wait_s)
        futures = [retried.submit(pacs, layout, uid, layout.study_key(uid)) for uid in studies]
        summary = PullSummary(server=pacs.server)
        for uid, future in zip(studies, futures, strict=True):
            future.wait()
            state = future.state
            if state.is_completed():
                summary.studies.append(future.result())
            else:
                key = layout.study_key(uid)
                summary.studies.append(StudyResult(key=key, error=str(state.message or "failed")))
        logger.info("pulled %s", summary.as_dict())
        return summary.as_dict()


def run(
    params_file: Path = Path("params.yaml"),
    query_file: Path = Path("pacs-query.yaml"),
    root: Path = Path("."),
) -> dict[str, Any]:
    """Run the flow, ``pacs.concurrency`` studies at once."""
    params = load_params(params_file)
    runner: Any = ThreadPoolTaskRunner(max_workers=params.pacs.concurrency)
    return pacs_pull_flow.with_options(task_runner=runner)(params, query_file, root)


if __name__ == "__main__":
    run()
