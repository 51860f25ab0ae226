"""Runs: the training run (parameters, lineage tags, inputs, per-epoch metrics sent from a
background thread, the model) and the test results that evaluation adds to it."""

from __future__ import annotations

import json
import logging
import math
import queue
import re
import threading
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from mlflow.data.pandas_dataset import from_pandas
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from medimg.config import Params, TrackingParams
from medimg.errors import TrackingError
from medimg.io import atomic_write_text
from medimg.report import metric_rows
from medimg.tracking.lineage import flatten, lineage_tags, run_name, test_set_digest
from medimg.tracking.pyfunc import log_model
from medimg.tracking.store import configure, experiment_id, retrying
from medimg.versions import environment_versions

log = logging.getLogger(__name__)

RUN_FILE = "mlflow_run.json"  # in models/<task>/: the run that trained the model there


class MetricSender:
    """Sends metrics from a background thread, so a training step never waits on the
    tracking server. A batch that fails after the retries stays queued, is reported, and
    is sent again with the next one; :meth:`close` makes a last attempt and says what (if
    anything) could not be sent."""

    def __init__(self, client: MlflowClient, run_id: str, cfg: TrackingParams) -> None:
        self.client, self.run_id, self.cfg = client, run_id, cfg
        self.pending: list[Metric] = []
        self.failures = 0
        self._queue: queue.Queue[list[Metric] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="mlflow-metrics", daemon=True)
        self._thread.start()

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if math.isfinite(v)]
        self._queue.put(batch)

    def _send(self) -> None:
        batch, self.pending = self.pending, []
        try:
            for i in range(0, len(batch), 1000):  # MLflow's batch limit
                chunk = batch[i : i + 1000]

                def send(chunk: list[Metric] = chunk) -> None:
                    self.client.log_batch(self.run_id, metrics=chunk)

                retrying(self.cfg, "logging metrics", send)
        except TrackingError as err:
            self.failures += 1
            self.pending = batch + self.pending
            log.warning("%s; %d metric values kept to send later", err, len(self.pending))

    def _work(self) -> None:
        while True:
            batch = self._queue.get()
            if batch is None:
                return
            self.pending.extend(batch)
            self._send()

    def close(self, timeout: float = 600.0) -> list[Metric]:
        """Flush and stop; returns what could not be sent."""
        self._queue.put(None)
        self._thread.join(timeout)
        if self.pending:
            self._send()
        if self.pending:
            log.error("MLflow: %d metric values could not be sent", len(self.pending))
        return self.pending


def _artifact(client: MlflowClient, run_id: str, path: Path, folder: str | None = None) -> None:
    if path.is_file():
        client.log_artifact(run_id, str(path), folder)


def _split_summary(manifest: pd.DataFrame) -> dict[str, Any]:
    groups = manifest.groupby("split")
    return {
        str(split): {
            "patients": int(frame["patient"].nunique()),
            "series": len(frame),
            "positive_series": int((frame["label"] != 0).sum()),  # a class other than 0
            "series_by_class": {str(k): int(v) for k, v in frame["label"].value_counts().items()},
            "modalities": {str(k): int(v) for k, v in frame["modality"].value_counts().items()},
            "vendors": {str(k): int(v) for k, v in frame["vendor"].value_counts().items()},
        }
        for split, frame in groups
    }


@dataclass
class TrainRun:
    """The MLflow run of one training stage: open it, feed :meth:`on_epoch` to the
    trainer's callbacks, then :meth:`finish` with the trained model's folder."""

    params: Params
    task: str
    root: Path
    processed: Path
    interim: Path
    model_dir: Path
    resume: bool = False
    fold: int | None = None  # a cross-validation's fold: the model is the folds' ensemble,
    # logged by evaluation into the parent run (medimg.cv), not here

    def __post_init__(self) -> None:
        self.client = configure(self.params, self.root)
        self.cfg = self.params.tracking
        self.run_id = ""
        self.sender: MetricSender | None = None

    def start(self) -> str:
        cfg = self.cfg
        exp = retrying(
            cfg,
            "opening the experiment",
            lambda: experiment_id(self.client, self.params, self.task, self.root),
        )
        previous = _read_run_file(self.model_dir) if self.resume else None
        if previous and previous.get("experiment_id") == exp:
            self.run_id = previous["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            run = retrying(
                cfg,
                "creating the run",
                lambda: self.client.create_run(exp, run_name=self._run_name()),
            )
            self.run_id = run.info.run_id
        self._write_run_file(exp)
        manifest = pd.read_parquet(self.processed / "manifest.parquet")
        tags = {"medimg.stage": "train", "medimg.task": self.task}
        if self.fold is not None:
            tags["medimg.fold"] = str(self.fold)
        tags.update(lineage_tags(self.params, self.root, self.processed))
        tags.update(environment_tags())  # from the start: a run that dies keeps them too

        def describe() -> None:
            from mlflow.entities import DatasetInput, InputTag, RunTag

            client, run_id = self.client, self.run_id
            if not previous:  # a resumed run has its params already (they cannot change)
                log_params(client, run_id, self.params)
            client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
            keep = ["key", "patient", "modality", "vendor", "plane", "label", "split"]
            with warnings.catch_warnings():  # the manifest's int columns are meant as ints
                warnings.filterwarnings("ignore", message=".*integer column")
                warnings.filterwarnings("ignore", message=".*interpreted in multiple ways")
                dataset = from_pandas(
                    manifest[keep],
                    source=str(self.processed.resolve()),
                    name="processed",
                    digest=tags.get("medimg.dvc.processed_md5", "")[:8] or None,
                )
            entity = DatasetInput(
                dataset._to_mlflow_entity(), [InputTag("mlflow.data.context", "training")]
            )
            client.log_inputs(run_id, datasets=[entity])
            client.log_dict(run_id, _split_summary(manifest), "summaries/split.json")
            _artifact(client, run_id, self.processed / "qc.json", "summaries/preprocess")
            _artifact(client, run_id, self.interim / "qc.json", "summaries/ingest")

        retrying(cfg, "describing the run", describe)
        self.sender = MetricSender(self.client, self.run_id, cfg)
        return self.run_id

    def _run_name(self) -> str:
        what = "train" if self.fold is None else f"train-fold{self.fold}"
        return run_name(self.params, self.task, self.root, what)

    def _write_run_file(self, exp: str) -> None:
        self.model_dir.mkdir(parents=True, exist_ok=True)
        record = {"run_id": self.run_id, "experiment_id": exp, "task": self.task}
        atomic_write_text(self.model_dir / RUN_FILE, json.dumps(record, indent=1))

    def on_epoch(self, entry: Any) -> None:
        """Trainer callback: queue the epoch's metrics (returns at once)."""
        if self.sender is not None:
            values = {
                "train_loss": entry.train_loss,
                "val_loss": entry.val_loss,
                "val_metric": entry.val_metric,
                "lr": entry.lr,
                "epoch_seconds": entry.seconds,
            }  # the sender drops the NaN val_* of an epoch not validated (val_every)
            self.sender.log(values, step=entry.epoch)

    def finish(self, result: Any, metrics_file: Path | None) -> str:
        """Log the summary, the files and the model; returns the model URI."""
        unsent = self.sender.close() if self.sender else []
        cfg = self.cfg

        def summary() -> None:
            from mlflow.entities import RunTag

            client, run_id = self.client, self.run_id
            now = int(time.time() * 1000)
            best = [
                Metric("best_val_metric", float(result.best_metric), now, 0),
                Metric("best_epoch", float(result.best_epoch), now, 0),
            ]
            tags = [RunTag("medimg.stopped_early", str(result.stopped_early).lower())]
            tags += [RunTag(f"medimg.env.{k}", v) for k, v in sorted(result.environment.items())]
            client.log_batch(run_id, metrics=best, tags=tags)
            for name in ("model_card.md", "config.json"):
                _artifact(client, run_id, self.model_dir / name)
            if metrics_file is not None:
                _artifact(client, run_id, metrics_file)

        retrying(cfg, "logging the run summary", summary)
        if unsent:
            retrying(
                cfg,
                "sending the held-back epoch metrics",
                lambda: self.client.log_batch(self.run_id, metrics=unsent),
            )
        uri = ""
        if self.fold is None:  # a fold's model is logged as part of the ensemble
            uri = retrying(
                cfg,
                "logging the model",
                lambda: log_model(self.params, self.task, self.model_dir, self.run_id),
            )
            record = _read_run_file(self.model_dir) or {}
            record["model_uri"] = uri
            atomic_write_text(self.model_dir / RUN_FILE, json.dumps(record, indent=1))
        self.client.set_terminated(self.run_id, "FINISHED")
        log.info("MLflow run %s (%s): model %s", self.run_id, self.client.tracking_uri, uri)
        return uri

    def fail(self) -> None:
        if self.sender is not None:
            self.sender.close(timeout=30)
        if self.run_id:
            try:
                self.client.set_terminated(self.run_id, "FAILED")
            except (MlflowException, OSError) as err:
                log.warning("MLflow: could not mark run %s failed (%s)", self.run_id, err)


def log_params(client: MlflowClient, run_id: str, params: Params) -> None:
    """Every parameter, flattened (``train.classify.lr``), in MLflow's batches of 100."""
    from mlflow.entities import Param

    flat = [Param(k, v) for k, v in flatten(params.model_dump(mode="json")).items()]
    for i in range(0, len(flat), 100):
        client.log_batch(run_id, params=flat[i : i + 100])


def environment_tags() -> dict[str, str]:
    """The installed versions and the lock they came from, as ``medimg.env.*`` tags:
    ``medimg.env.version.torch``, ``medimg.env.lock.sha256``, ``medimg.env.lock.drift``."""
    return {f"medimg.env.{k}": v for k, v in environment_versions().items()}


def _evaluation_environment(client: MlflowClient, run_id: str, new: bool) -> dict[str, str]:
    """A run of its own gets the environment tags; the training run gets, as
    ``medimg.evaluate.env.*``, those of the evaluating environment that differ from what
    training recorded (its test metrics came from this one)."""
    env = environment_tags()
    if new:
        return env
    trained = client.get_run(run_id).data.tags
    prefix = "medimg.evaluate.env."
    return {prefix + k.split(".", 2)[2]: v for k, v in env.items() if trained.get(k) != v}


def _read_run_file(model_dir: Path) -> dict[str, Any] | None:
    path = model_dir / RUN_FILE
    if not path.is_file():
        return None
    return dict(json.loads(path.read_text()))


@contextmanager
def train_run(
    params: Params,
    task: str,
    root: Path,
    processed: Path,
    interim: Path,
    model_dir: Path,
    resume: bool = False,
    fold: int | None = None,
) -> Iterator[TrainRun]:
    """Open the training run (of one fold of a cross-validation when ``fold`` is given);
    marks it FAILED when the block raises."""
    run = TrainRun(params, task, root, processed, interim, model_dir, resume, fold)
    run.start()
    try:
        yield run
    except BaseException:
        run.fail()
        raise


def metric_values(result: Mapping[str, Any]) -> dict[str, float]:
    """``metrics/<task>.json``'s headline metrics as flat MLflow metrics with their CIs:
    ``test_auroc``, ``test_auroc_ci_lower``, ``test_auroc_ci_upper``...; per class or
    structure too: ``test_liver_dice``, ``test_cyst_auroc``...; those of a
    cross-validation's out-of-fold cases as ``cv_auroc``, ``cv_liver_dice``..."""
    out: dict[str, float] = {}
    sources = (("test", dict(result)), ("cv", dict(result.get("cv") or {})))  # cv: out of fold
    fields = (("value", ""), ("ci_lower", "_ci_lower"), ("ci_upper", "_ci_upper"))
    for part, source in sources:
        for owner, name, m in metric_rows(source):
            prefix = re.sub(r"[^A-Za-z0-9_.-]", "_", owner) + "_" if owner else ""
            for field, suffix in fields:
                v = m.get(field)
                if v is not None and math.isfinite(v):
                    out[f"{part}_{prefix}{name}{suffix}"] = float(v)
    for key in ("n_test_patients", "n_test_series"):
        if key in result:
            out[key] = float(result[key])
    return out


def log_evaluation(
    params: Params,
    task: str,
    root: Path,
    model_dir: Path,
    processed: Path,
    result: Mapping[str, Any],
    metrics_file: Path,
    plots_dir: Path,
) -> str:
    """Add the test results to the run that trained the model (a new run in the task's
    experiment when the model was trained without tracking); returns the run id."""
    client = configure(params, root)
    cfg = params.tracking
    record = _read_run_file(model_dir)
    run_id = record["run_id"] if record else ""
    new = not run_id
    if new:
        exp = retrying(
            cfg, "opening the experiment", lambda: experiment_id(client, params, task, root)
        )
        run_id = client.create_run(exp, run_name=f"evaluate-{task}").info.run_id
    manifest = pd.read_parquet(processed / "manifest.parquet")

    def send() -> None:
        from mlflow.entities import RunTag

        now = int(time.time() * 1000)
        values = [Metric(k, v, now, 0) for k, v in metric_values(result).items()]
        tags = {
            "medimg.evaluated": "true",
            "medimg.test_set": test_set_digest(manifest),
            "medimg.ci": str(result.get("ci", "")),
        }
        tags.update(_evaluation_environment(client, run_id, new))
        client.log_batch(run_id, metrics=values, tags=[RunTag(k, v) for k, v in tags.items()])
        _artifact(client, run_id, metrics_file)
        if plots_dir.is_dir():
            client.log_artifacts(run_id, str(plots_dir), "plots")

    retrying(cfg, "logging the evaluation", send)
    return run_id
