"""The tracked pipeline, run once per session against the session's MLflow server.

Ingest (PHI canaries planted in the input), preprocess, train the classifier, evaluate,
register (version 1 becomes champion); then train again from ``models:/...@champion``,
evaluate and register (version 2, judged by the gate). The session's outcome is the
``tracked`` fixture (tests/integration/conftest.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from medimg import stages
from medimg.config import (
    DataParams,
    IngestParams,
    Params,
    SplitParams,
    TaskTrainParams,
    TrackingParams,
    TrainParams,
)
from tests.helpers import Cohort, plant_canaries


@dataclass(frozen=True)
class Tracked:
    url: str  # the MLflow server
    server_dir: Path  # its database, artifacts and log
    root: Path  # the project root the stages ran in
    raw: Path  # the DICOM input, with canaries
    processed: Path
    params: Params
    run_ids: list[str]  # first and second training run
    second_decision: Any  # the gate's Decision for version 2


def run_tracked_pipeline(cohort: Cohort, root: Path, url: str, server_dir: Path) -> Tracked:
    raw, labels = plant_canaries(cohort, root / "input")
    salt = root / "salt"
    salt.write_text("medimg-test-salt-24")  # splits with both labels in every part
    salt.chmod(0o600)
    data = DataParams(
        raw=raw,
        labels=labels,
        masks=cohort.masks,
        interim=root / "data" / "interim",
        processed=root / "data" / "processed",
    )
    small = TaskTrainParams(arch="resnet10", epochs=2, batch_size=4, pretrained="none")
    params = Params(
        data=data,
        synth=cohort.params.synth,
        ingest=IngestParams(salt_file=salt),
        # the canaries change the patient IDs, hence the pseudonyms: this salt gives test
        # and both folds patients of both labels
        split=SplitParams(salt="medimg-split-v3", n_folds=2, test_fraction=0.25),
        train=TrainParams(classify=small, segment=TaskTrainParams(epochs=1)),
        tracking=TrackingParams(uri=url, retry_wait_s=0.5),
    )
    (root / "params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json")))
    stages.ingest(params, root)
    stages.preprocess(params, root)
    run_ids = []
    stages.train(params, "classify", root)
    stages.evaluate(params, "classify", root)
    first = stages.register(params, "classify", root)
    assert first.promoted, first.reason
    run_ids.append(_run_id(root))
    warm = small.model_copy(
        update={"pretrained": "models:/medimg-classifier@champion", "epochs": 1}
    )
    params2 = params.model_copy(
        update={"train": params.train.model_copy(update={"classify": warm})}
    )
    stages.train(params2, "classify", root)
    stages.evaluate(params2, "classify", root)
    second = stages.register(params2, "classify", root)
    run_ids.append(_run_id(root))
    return Tracked(url, server_dir, root, raw, Path(data.processed), params2, run_ids, second)


def _run_id(root: Path) -> str:
    import json

    return str(json.loads((root / "models/classify/mlflow_run.json").read_text())["run_id"])
