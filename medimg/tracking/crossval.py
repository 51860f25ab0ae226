"""The MLflow side of a cross-validation (:mod:`medimg.cv`): one parent run per
evaluation of the fold ensemble, holding its cross-validation and test metrics and the
ensemble's model (the one that is registered); the folds' training runs become its
children (``mlflow.parentRunId``), so the UI shows them nested under it."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from medimg.config import Params
from medimg.io import atomic_write_text
from medimg.tracking.lineage import flatten, lineage_tags
from medimg.tracking.pyfunc import log_model
from medimg.tracking.runs import RUN_FILE, _artifact, _read_run_file, environment_tags
from medimg.tracking.runs import log_evaluation as _log_evaluation
from medimg.tracking.store import configure, experiment_id, retrying

PARENT = "mlflow.parentRunId"


def log_cv_evaluation(
    params: Params,
    task: str,
    root: Path,
    model_dir: Path,
    processed: Path,
    result: Mapping[str, Any],
    metrics_file: Path,
    plots_dir: Path,
    fold_dirs: list[Path],
) -> str:
    """Open the parent run, nest the runs of the folds trained in ``fold_dirs`` under it,
    log the ensemble's model and the evaluation; write ``model_dir``'s run file for
    ``medimg register``. Returns the parent run's id."""
    from mlflow.entities import Param, RunTag

    client, cfg = configure(params, root), params.tracking
    folds = params.cv_folds() or []
    exp = retrying(cfg, "opening the experiment", lambda: experiment_id(client, params, task, root))
    name = f"cv-{task}-{len(folds)}folds-{time.strftime('%Y%m%d-%H%M%S')}"
    run_id = retrying(
        cfg, "creating the run", lambda: client.create_run(exp, run_name=name)
    ).info.run_id
    tags = {"medimg.stage": "cross-validation", "medimg.task": task, "medimg.folds": str(folds)}
    tags.update(lineage_tags(params, root, processed))
    tags.update(environment_tags())
    children = [_read_run_file(d) for d in fold_dirs]

    def describe() -> None:
        flat = [Param(k, v) for k, v in flatten(params.model_dump(mode="json")).items()]
        for i in range(0, len(flat), 100):
            client.log_batch(run_id, params=flat[i : i + 100])
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
    _log_evaluation(params, task, root, model_dir, processed, result, metrics_file, plots_dir)
    client.set_terminated(run_id, "FINISHED")
    return run_id
