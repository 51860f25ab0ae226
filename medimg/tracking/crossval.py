"""The MLflow side of a cross-validation (:mod:`medimg.cv`): one parent run per
evaluation of the fold ensemble, holding its cross-validation and test metrics and the
ensemble's model (the one that is registered); the folds' training runs become its
children (``mlflow.parentRunId``), so the UI shows them nested under it."""

from __future__ import annotations

import json
from pathlib import Path

from medimg.config import Params
from medimg.io import atomic_write_text
from medimg.tracking.lineage import lineage_tags, run_name
from medimg.tracking.pyfunc import log_model
from medimg.tracking.runs import (
    RUN_FILE,
    _artifact,
    _read_run_file,
    environment_tags,
    log_params,
)
from medimg.tracking.store import configure, experiment_id, retrying

PARENT = "mlflow.parentRunId"


def open_cv_run(
    params: Params,
    task: str,
    root: Path,
    model_dir: Path,
    processed: Path,
    fold_dirs: list[Path],
) -> str:
    """The parent run of an evaluation of the fold ensemble: nest the runs of the folds
    trained in ``fold_dirs`` under it, log the ensemble's model (``model_dir``) and write
    ``model_dir``'s run file, which :func:`~medimg.tracking.runs.log_evaluation` then
    adds the metrics to and ``medimg register`` registers from. Returns its id."""
    from mlflow.entities import RunTag

    client, cfg = configure(params, root), params.tracking
    folds = params.cv_folds() or []
    exp = retrying(cfg, "opening the experiment", lambda: experiment_id(client, params, task, root))
    name = run_name(params, task, root, f"cv{len(folds)}")
    run_id = retrying(
        cfg, "creating the run", lambda: client.create_run(exp, run_name=name)
    ).info.run_id
    tags = {"medimg.stage": "cross-validation", "medimg.task": task, "medimg.folds": str(folds)}
    tags.update(lineage_tags(params, root, processed))
    tags.update(environment_tags())
    children = [_read_run_file(d) for d in fold_dirs]

    def describe() -> None:
        log_params(client, run_id, params)
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        for child in children:
            if child and child.get("experiment_id") == exp:
                client.set_tag(child["run_id"], PARENT, run_id)
        for file in ("model_card.md", "config.json"):
            _artifact(client, run_id, model_dir / file)

    retrying(cfg, "describing the cross-validation run", describe)
    uri = retrying(cfg, "logging the model", lambda: log_model(params, task, model_dir, run_id))
    record = {"run_id": run_id, "experiment_id": exp, "task": task, "model_uri": uri}
    atomic_write_text(model_dir / RUN_FILE, json.dumps(record, indent=1))
    client.set_terminated(run_id, "FINISHED")  # as a training run: evaluation adds to it
    return run_id
