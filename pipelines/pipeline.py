"""The whole pipeline as a Prefect flow: DVC's stages in order, then the registry.

Each stage of ``dvc.yaml`` is one task that asks DVC (its Python API) to reproduce that
stage alone, so a scheduled run skips what is up to date and leaves ``dvc.lock`` true, as
``dvc repro`` would. The folds of a cross-validation (a ``foreach`` stage) are mapped:
one task per out-of-date fold on the flow's task runner, ``orchestration.fold_workers``
at a time, each fold a process of its own on the next GPU of ``orchestration.fold_gpus``
(a deployment on a work pool of GPU machines trains its folds side by side there); DVC
then records them (``dvc commit``), as if ``dvc repro`` had run them one by one. Then
each task's model is registered and goes through the promotion gate. A markdown artifact
summarises the run for a human: what ran and what was skipped, the test metrics with
their intervals, the gate's decisions with links to MLflow, and the ingest QC counts.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE
from prefect.futures import wait
from prefect.runtime import flow_run

from medimg import stages
from medimg.config import Params, load_params
from medimg.report import metric_rows
from medimg.tasks import TASKS
from pipelines.tasks import retry_on_io


def dvc_stages(root: Path) -> list[list[str]]:
    """The stages of ``root/dvc.yaml`` in file order (which is dependency order): each a
    list of the stage's name, or of the stages a ``foreach`` generates (``name@item``)."""
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    params = yaml.safe_load((root / "params.yaml").read_text()) or {}
    groups = []
    for name, stage in stages.items():
        items = stage.get("foreach")
        if items is None:
            groups.append([name])
            continue
        if isinstance(items, str):  # ${train.folds}: a list in params.yaml
            node = params
            for part in items.strip("${} ").split("."):
                node = node[part]
            items = node
        groups.append([f"{name}@{item}" for item in items])
    return groups


@task(name="dvc-out-of-date", cache_policy=NONE, persist_result=False)
def out_of_date(root: Path, names: list[str]) -> dict[str, str]:
    """The commands of the stages among ``names`` that are out of date."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        status = repo.status(targets=names)
        return {n: str(repo.stage.collect(n)[0].cmd) for n in names if n in status}


@task(
    name="dvc-fold-stage",
    task_run_name="dvc-{stage}",
    cache_policy=NONE,
    persist_result=False,
)
def run_stage_command(root: Path, stage: str, cmd: str, gpu: str = "") -> None:
    """One fold's stage command, in the project (a process of its own, on ``gpu``)."""
    import subprocess

    env = {**os.environ, **({"CUDA_VISIBLE_DEVICES": gpu} if gpu else {})}
    done = subprocess.run(cmd, shell=True, cwd=root, env=env, capture_output=True, text=True)
    logger = get_run_logger()
    logger.info("%s: %s", stage, done.stdout.strip().splitlines()[-1:] or "done")
    if done.returncode:
        raise RuntimeError(f"{stage}: `{cmd}` failed ({done.returncode}):\n{done.stderr[-3000:]}")


@task(name="dvc-commit", cache_policy=NONE, persist_result=False)
def commit_stages(root: Path, names: list[str]) -> None:
    """Record stages that ran outside ``dvc repro`` in ``dvc.lock`` and the cache."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        for name in names:
            repo.commit(name, force=True)


def reproduce_folds(params: Params, root: Path, names: list[str]) -> dict[str, bool]:
    """The out-of-date stages of a ``foreach`` group, mapped as concurrent tasks."""
    todo = out_of_date(root, names)
    cfg = params.orchestration
    gpus, items = [str(g) for g in cfg.fold_gpus], list(todo.items())
    for start in range(0, len(items), cfg.fold_workers):
        batch = items[start : start + cfg.fold_workers]
        futures = [
            run_stage_command.submit(root, n, cmd, gpus[(start + i) % len(gpus)] if gpus else "")
            for i, (n, cmd) in enumerate(batch)
        ]
        wait(futures)  # the whole batch, then the first failure (if any) raises
        for future in futures:
            future.result()
    if todo:
        commit_stages(root, list(todo))
    return {n: n in todo for n in names}


@task(
    name="dvc-stage",
    task_run_name="dvc-{stage}",
    retries=2,
    retry_delay_seconds=[10, 60],
    retry_condition_fn=retry_on_io,  # storage hiccups; a failing stage command is not retried
    cache_policy=NONE,
    persist_result=False,
)
def reproduce_stage(root: Path, stage: str) -> bool:
    """Reproduce one stage if it is out of date; True if it ran."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        ran = repo.reproduce(stage, single_item=True)
    logger = get_run_logger()
    logger.info("%s: %s", stage, "ran" if ran else "up to date, skipped")
    return bool(ran)


@task(name="register", task_run_name="register-{task_name}", cache_policy=NONE)
def register_task(params: Params, root: Path, task_name: str) -> dict[str, Any]:
    """Register the task's evaluated model and run the promotion gate."""
    decision = stages.register(params, task_name, root)
    return {k: v for k, v in vars(decision).items()}


def _run_link(params: Params, root: Path, task_name: str) -> str:
    """A Markdown link to the task's training run in the MLflow UI: the tracking server's
    own UI, or ``make ui``'s (``tracking.ui_url``) for a local store."""
    record = root / params.data.models / task_name / "mlflow_run.json"
    if not record.is_file():
        return "-"
    run = json.loads(record.read_text())
    from medimg.tracking import run_url

    url = run_url(params.tracking, root, str(run["experiment_id"]), str(run["run_id"]))
    return f"[{run['run_id'][:8]}]({url})"


def summary_markdown(
    params: Params, root: Path, ran: dict[str, bool], decisions: dict[str, dict[str, Any]]
) -> str:
    """The run's report: stages, test metrics with CIs, gate decisions, QC counts."""
    lines = ["# medimg pipeline run", "", "| stage | |", "|---|---|"]
    lines += [f"| {s} | {'ran' if r else 'up to date, skipped'} |" for s, r in ran.items()]
    lines += ["", "## Test metrics (95 % CI, bootstrap over patients)", ""]
    lines += ["| task | metric | value | CI | MLflow run |", "|---|---|---|---|---|"]
    for task_name in TASKS:
        path = root / params.data.metrics / f"{task_name}.json"
        if not path.is_file():
            continue
        link = _run_link(params, root, task_name)
        for owner, name, m in metric_rows(json.loads(path.read_text())):
            ci = f"{m['ci_lower']} to {m['ci_upper']}"
            what = f"{owner}: {name}" if owner else name
            lines.append(f"| {task_name} | {what} | {m['value']} | {ci} | {link} |")
    lines += ["", "## Registry", "", "| model | version | decision | reason |", "|---|---|---|---|"]
    for task_name, d in decisions.items():
        verdict = "champion" if d["promoted"] else "challenger"
        lines.append(f"| {task_name} | {d['version']} | {verdict} | {d['reason']} |")
    qc_file = root / params.data.interim / "qc.json"
    if qc_file.is_file():
        qc = json.loads(qc_file.read_text())
        lines += ["", "## Ingest QC", ""]
        for key in ("n_stacks", "n_ok", "n_flagged", "n_quarantined_files", "n_labelled"):
            lines.append(f"- {key}: {qc.get(key)}")
    return "\n".join(lines) + "\n"


@flow(name="pipeline", log_prints=False)
def pipeline_flow(
    params_file: str = "params.yaml", root: str = ".", register: bool = True
) -> dict[str, Any]:
    """``dvc repro`` stage by stage, then registration and the promotion gate."""
    logger = get_run_logger()
    project = Path(root).resolve()
    pfile = Path(params_file) if Path(params_file).is_absolute() else project / params_file
    # The stage commands run `medimg` from this environment and tag their MLflow runs
    # with this flow run.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    if flow_run.id:
        os.environ["PREFECT__FLOW_RUN_ID"] = str(flow_run.id)
    ran: dict[str, bool] = {}
    before = load_params(pfile)
    for group in dvc_stages(project):
        if len(group) == 1 and "@" not in group[0]:
            ran[group[0]] = reproduce_stage(project, group[0])
        else:
            ran.update(reproduce_folds(before, project, group))
    decisions: dict[str, dict[str, Any]] = {}
    params = load_params(pfile)  # after the stages: as the stages ran with it
    if register and params.tracking.enabled:
        for task_name in TASKS:
            decisions[task_name] = register_task(params, project, task_name)
    report = summary_markdown(params, project, ran, decisions)
    create_markdown_artifact(report, key="medimg-pipeline", description="medimg pipeline run")
    logger.info(
        "stages run: %s; skipped: %s",
        [s for s, r in ran.items() if r],
        [s for s, r in ran.items() if not r],
    )
    return {"ran": ran, "decisions": decisions}


if __name__ == "__main__":
    pipeline_flow()
