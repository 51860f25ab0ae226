"""MLflow: runs, models and the registry. The only package of medimg that imports mlflow.

- :mod:`~medimg.tracking.store`: where the store is (``MLFLOW_TRACKING_URI``, else
  ``tracking.uri``; a relative SQLite path is taken from the project root), the client,
  retries on transient failures, the task's experiment.
- :mod:`~medimg.tracking.lineage`: the tags that tie a run to its inputs: git commit and
  dirty flag, the DVC hashes of the processed data and of ``params.yaml``, the Prefect
  flow-run id, the test-set digest.
- :mod:`~medimg.tracking.runs`: the training run (flattened parameters, lineage, the
  manifest as a dataset input, summaries, per-epoch metrics sent from a background thread
  so that a slow tracking server never holds up a training step) and the test results
  that evaluation adds to it.
- :mod:`~medimg.tracking.pyfunc`: the model, weights in safetensors plus its config behind
  a pyfunc defined from code (nothing pickled), and loading it back as a
  ``torch.nn.Module``.
- :mod:`~medimg.tracking.registry`: versions with alias ``challenger``; alias ``champion``
  moves only when the gate finds the challenger better on the same test patients.
"""

from medimg.stats import paired_difference
from medimg.tracking.crossval import open_cv_run
from medimg.tracking.lineage import (
    dvc_dir_md5,
    file_md5,
    flatten,
    lineage_tags,
    prefect_flow_run_id,
    test_set_digest,
)
from medimg.tracking.pyfunc import (
    MedimgModel,
    ModelBundle,
    decision_threshold,
    load_bundle,
    load_model,
    load_state_dict,
    log_model,
    pretrained_file,
    registered_version,
)
from medimg.tracking.registry import (
    CHALLENGER,
    CHAMPION,
    Contender,
    Decision,
    aliases,
    decide,
    gate,
    gate_metric,
    promote,
    register,
    registered_name,
)
from medimg.tracking.runs import (
    RUN_FILE,
    MetricSender,
    TrainRun,
    _read_run_file,
    log_evaluation,
    metric_values,
    train_run,
)
from medimg.tracking.store import (
    configure,
    experiment_id,
    experiment_url,
    experiment_urls,
    is_server,
    missing_sqlite_store,
    retrying,
    run_url,
    tracking_uri,
)

__all__ = [
    "CHALLENGER",
    "CHAMPION",
    "RUN_FILE",
    "Contender",
    "Decision",
    "MedimgModel",  # models logged by medimg run `from medimg.tracking import MedimgModel`
    "MetricSender",
    "ModelBundle",
    "TrainRun",
    "_read_run_file",
    "aliases",
    "configure",
    "decide",
    "decision_threshold",
    "dvc_dir_md5",
    "experiment_id",
    "experiment_url",
    "experiment_urls",
    "file_md5",
    "flatten",
    "gate",
    "gate_metric",
    "is_server",
    "lineage_tags",
    "load_bundle",
    "load_model",
    "load_state_dict",
    "log_evaluation",
    "log_model",
    "metric_values",
    "missing_sqlite_store",
    "open_cv_run",
    "paired_difference",
    "prefect_flow_run_id",
    "pretrained_file",
    "promote",
    "register",
    "registered_name",
    "registered_version",
    "retrying",
    "run_url",
    "test_set_digest",
    "tracking_uri",
    "train_run",
]
