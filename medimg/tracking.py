"""MLflow: runs, models and the registry. The only module of medimg that imports mlflow.

What a training run records, so that its model can be traced to exactly what made it:

- the resolved parameters, flattened (``train.classify.lr``), and per-epoch metrics, sent
  from a background thread so that a slow or briefly unreachable tracking server never
  holds up a training step (failed sends are retried, reported, and sent again later);
- tags: git commit and dirty flag, the DVC hashes of the processed data and of
  ``params.yaml``, the Prefect flow-run id when run under Prefect, the test-set digest;
- the processed manifest as an MLflow dataset input (pseudonymous keys only), the QC and
  split summaries, the model card, the training history;
- the model: weights in safetensors plus its config, rebuilt by medimg's own builder
  behind a pyfunc defined from code. Nothing is pickled, so loading runs no stored code,
  and the module that comes back is an ordinary ``torch.nn.Module``.

Evaluation reopens the training run and adds the test metrics with their confidence
intervals, the plots and the per-case table. Registration creates a version of
``medimg-classifier`` or ``medimg-segmenter`` with alias ``challenger``; alias ``champion``
moves only when the gate (:func:`gate`) finds the challenger better on the same test
patients, and the decision with its numbers is written to the version's tags.

The default store is ``sqlite:///mlflow.db`` with artifacts in ``mlartifacts/``, both in
the project root; ``MLFLOW_TRACKING_URI`` or ``tracking.uri`` selects any tracking server.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import queue
import subprocess
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import mlflow
import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.data.pandas_dataset import from_pandas
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModel
from mlflow.tracking import MlflowClient

from medimg.config import Params, TaskTrainParams, TrackingParams
from medimg.errors import ConfigError, TrackingError
from medimg.io import atomic_write_text

log = logging.getLogger(__name__)

T = TypeVar("T")
RUN_FILE = "mlflow_run.json"  # in models/<task>/: the run that trained the model there
CHAMPION, CHALLENGER = "champion", "challenger"
_WEIGHTS, _CONFIG, _CARD = "weights", "config", "card"


# ----------------------------------------------------------------------------- stores


_OURS = "MEDIMG_MLFLOW_URI"  # the store configure() chose, so that it can tell its own
# setting from the user's: mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI


def tracking_uri(cfg: TrackingParams, root: Path = Path(".")) -> str:
    """The store: ``MLFLOW_TRACKING_URI`` if the user set it, else ``tracking.uri``; a
    relative SQLite path is taken from the project root."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    uri = env if env and env != os.environ.get(_OURS) else cfg.uri
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        uri = prefix + str((root / uri[len(prefix) :]).resolve())
    return uri


def _is_local(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:")) or "://" not in uri


def configure(params: Params, root: Path = Path(".")) -> MlflowClient:
    """Point MLflow at the project's store (process-wide) and return a client."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    from_user = bool(env) and env != os.environ.get(_OURS)
    uri = tracking_uri(params.tracking, root)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    if from_user:
        os.environ.pop(_OURS, None)
    else:
        os.environ[_OURS] = uri
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


_TRANSIENT = {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"}


def _transient(err: Exception) -> bool:
    """A failure worth retrying: no connection, a timeout, a server error; not a request
    the server understood and refused."""
    from mlflow.exceptions import RestException

    if isinstance(err, RestException):
        return err.error_code in _TRANSIENT
    return True


def retrying(cfg: TrackingParams, what: str, call: Callable[[], T]) -> T:
    """``call()``, tried ``1 + cfg.retries`` times with doubling waits while it fails for
    a transient reason (see :func:`_transient`).

    Raises:
        TrackingError: every try failed, or the server refused the request.
    """
    wait = cfg.retry_wait_s
    for attempt in range(cfg.retries + 1):
        try:
            return call()
        except (MlflowException, OSError) as err:  # requests' errors are OSErrors
            if not _transient(err):
                raise TrackingError(f"MLflow: {what} was refused: {err}") from err
            if attempt == cfg.retries:
                raise TrackingError(
                    f"MLflow: {what} failed after {cfg.retries + 1} tries ({err}); check that "
                    f"the tracking server at {mlflow.get_tracking_uri()} is up"
                ) from err
            log.warning("MLflow: %s failed (%s); retrying in %.1f s", what, err, wait)
            time.sleep(wait)
            wait *= 2
    raise AssertionError("unreachable")


def experiment_id(client: MlflowClient, params: Params, task: str, root: Path) -> str:
    """The task's experiment (``<prefix>-<task>``), created on first use; artifacts of a
    local store go to ``tracking.artifacts`` in the project root."""
    name = f"{params.tracking.experiment_prefix}-{task}"
    found = client.get_experiment_by_name(name)
    if found is not None:
        return str(found.experiment_id)
    location = None
    if _is_local(client.tracking_uri):
        location = ((root / params.tracking.artifacts).resolve() / name).as_uri()
    try:
        # the kind makes the MLflow UI open the experiment on its runs table
        kind = {"mlflow.experimentKind": "custom_model_development"}
        return str(client.create_experiment(name, artifact_location=location, tags=kind))
    except MlflowException:  # created meanwhile by a parallel run
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return str(found.experiment_id)


# ----------------------------------------------------------------------------- lineage


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"train": {"lr": 1}}`` -> ``{"train.lr": "1"}``; lists become JSON text."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        else:
            out[name] = json.dumps(value) if isinstance(value, list | tuple) else str(value)
    return out


def file_md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def dvc_dir_md5(folder: Path) -> str:
    """The hash DVC 3 gives a tracked folder (``<md5>.dir``): the md5 of the JSON list of
    ``{"md5", "relpath"}`` entries, sorted by path. Equals ``dvc add``'s (tested)."""
    entries = [
        {"md5": file_md5(p), "relpath": p.relative_to(folder).as_posix()}
        for p in sorted(folder.rglob("*"), key=lambda q: q.relative_to(folder).as_posix())
        if p.is_file()
    ]
    text = json.dumps(entries, sort_keys=True).encode("utf-8")
    return hashlib.md5(text, usedforsecurity=False).hexdigest() + ".dir"


def _git(root: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, timeout=30, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def prefect_flow_run_id() -> str | None:
    """The id of the Prefect flow run this process works for, if any (never imports
    Prefect when it is not already loaded)."""
    import sys

    if "prefect" in sys.modules:
        from prefect.context import FlowRunContext

        ctx = FlowRunContext.get()
        if ctx is not None and ctx.flow_run is not None:
            return str(ctx.flow_run.id)
    return os.environ.get("PREFECT__FLOW_RUN_ID")


def test_set_digest(manifest: pd.DataFrame) -> str:
    """Names the test patients (pseudonyms, hashed again): equal digests, same test set."""
    keys = sorted(manifest.loc[manifest["split"] == "test", "key"].astype(str))
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]


def lineage_tags(params: Params, root: Path, processed: Path) -> dict[str, str]:
    """Tags that tie a run to its inputs."""
    tags: dict[str, str] = {}
    # the project's repository; else the one medimg's own code was installed from
    for repo in (root, Path(__file__).resolve().parent):
        commit = _git(repo, "rev-parse", "HEAD")
        if commit:
            tags["mlflow.source.git.commit"] = commit
            status = _git(repo, "status", "--porcelain", "--untracked-files=no")
            tags["medimg.git.dirty"] = str(bool(status)).lower()
            break
    if processed.is_dir():
        tags["medimg.dvc.processed_md5"] = dvc_dir_md5(processed)
        tags["medimg.test_set"] = test_set_digest(pd.read_parquet(processed / "manifest.parquet"))
    params_file = root / "params.yaml"
    if params_file.is_file():
        tags["medimg.dvc.params_md5"] = file_md5(params_file)
    resolved = json.dumps(params.model_dump(mode="json"), sort_keys=True).encode()
    tags["medimg.params_sha256"] = hashlib.sha256(resolved).hexdigest()[:16]
    flow_run = prefect_flow_run_id()
    if flow_run:
        tags["prefect.flow_run_id"] = flow_run
    return tags


# ----------------------------------------------------------------------------- metrics


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


# ----------------------------------------------------------------------------- the model


# MLflow warns at class creation that predict() has no type hints: on purpose, it would
# read them as an input schema; the signature is given explicitly when the model is logged.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*type hints to the `predict` method")

    class MedimgModel(PythonModel):
        """A medimg model behind MLflow's pyfunc interface.

        Input: float32 array (N, 1, R, A, S) of preprocessed volumes. Output: the lesion
        probability per volume (classify, shape (N,)) or per voxel (segment, (N, R, A, S)).
        :meth:`torch_model` gives the ``torch.nn.Module`` itself.
        """

        def load_context(self, context: Any) -> None:
            from safetensors.torch import load_file

            from medimg.train import build_model

            self.meta = json.loads(Path(context.artifacts[_CONFIG]).read_text())
            self.task = str(self.meta["task"])
            self.module = build_model(self.task, TaskTrainParams(**self.meta["model"]))
            self.module.load_state_dict(load_file(context.artifacts[_WEIGHTS], device="cpu"))
            self.module.eval()

        def torch_model(self) -> Any:
            return self.module

        def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
            import torch

            from medimg.train import predict

            x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
            patch, cpu = self.meta["patch_size"], torch.device("cpu")
            with torch.no_grad():
                return predict(self.module, x, self.task, patch, cpu).numpy()


_MODEL_CODE = (
    "# medimg model, defined from code: MLflow runs this file, it unpickles nothing.\n"
    "from mlflow.models import set_model\n\n"
    "from medimg.tracking import MedimgModel\n\n"
    "set_model(MedimgModel())\n"
)


def _requirements() -> list[str]:
    from importlib.metadata import version

    pins = ["torch", "monai", "safetensors", "numpy", "pydantic", "mlflow"]
    reqs = [f"{name}=={version(name).split('+')[0]}" for name in pins]
    return [*reqs, f"medimg=={version('medimg')}"]


def log_model(params: Params, task: str, model_dir: Path, run_id: str) -> str:
    """Log ``model_dir/model.pt`` as the run's pyfunc model; returns its model URI."""
    import torch
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec
    from safetensors.torch import save_file

    payload = torch.load(model_dir / "model.pt", map_location="cpu", weights_only=True)
    size = tuple(params.preprocess.spatial_size)
    meta = {
        "task": task,
        "model": getattr(params.train, task).model_dump(mode="json"),
        "patch_size": list(params.augment.patch_size),
        "input_shape": [1, *size],
        "preprocess": params.preprocess.model_dump(mode="json"),
    }
    out_shape: tuple[int, ...] = (-1,) if task == "classify" else (-1, *size)
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 1, *size))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), out_shape)]),
    )
    with tempfile.TemporaryDirectory(prefix="medimg-model-") as tmp:
        work = Path(tmp)
        weights = work / "model.safetensors"
        save_file({k: v.contiguous() for k, v in payload["model"].items()}, str(weights))
        (work / "model_config.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
        (work / "model_code.py").write_text(_MODEL_CODE)
        artifacts = {_WEIGHTS: str(weights), _CONFIG: str(work / "model_config.json")}
        if (model_dir / "model_card.md").is_file():
            artifacts[_CARD] = str(model_dir / "model_card.md")
        with mlflow.start_run(run_id=run_id), warnings.catch_warnings():
            # MLflow hints at type hints it does not need: the signature is explicit
            warnings.filterwarnings("ignore", message="Failed to infer signature")
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(work / "model_code.py"),
                artifacts=artifacts,
                signature=signature,
                # an all-zero volume documents the shape; no patient's image leaves the site
                input_example=np.zeros((1, 1, *size), dtype=np.float32),
                pip_requirements=_requirements(),
            )
    return str(info.model_uri)


def load_model(uri: str) -> Any:
    """The ``torch.nn.Module`` of a logged or registered model (``models:/name@alias``,
    ``models:/name/3``, ``runs:/<id>/model``), in eval mode."""
    try:
        return mlflow.pyfunc.load_model(uri).unwrap_python_model().torch_model()
    except MlflowException as err:
        raise ConfigError(f"{uri}: cannot load this MLflow model ({err.message})") from err


@dataclass
class ModelBundle:
    """A logged medimg model with what prediction needs besides the weights."""

    module: Any  # torch.nn.Module, eval mode, on the CPU
    meta: dict[str, Any]  # model_config.json: task, model, patch_size, preprocess, ...
    run_id: str  # the run that logged it ("" when MLflow does not say)


def load_bundle(uri: str) -> ModelBundle:
    """A medimg model by URI (``models:/name@alias``, ``models:/name/3``, ``runs:/...``)
    with its stored config, through MLflow's pyfunc path.

    Raises:
        ConfigError: no such model, or not one that medimg logged.
    """
    try:
        pyfunc = mlflow.pyfunc.load_model(uri)
    except MlflowException as err:
        raise ConfigError(
            f"{uri}: cannot load this MLflow model ({err.message}); check the name and alias "
            "in the MLflow UI and the tracking URI (tracking.uri or MLFLOW_TRACKING_URI)"
        ) from err
    model = pyfunc.unwrap_python_model()
    if not isinstance(model, MedimgModel) or "preprocess" not in model.meta:
        raise ConfigError(f"{uri}: not a medimg model (no model_config.json with preprocess)")
    return ModelBundle(model.torch_model(), dict(model.meta), str(pyfunc.metadata.run_id or ""))


def registered_version(client: MlflowClient, uri: str) -> tuple[str, str] | None:
    """(name, version) that ``models:/name@alias`` or ``models:/name/3`` points to; None
    for other URIs.

    Raises:
        ConfigError: no such registered model or alias.
    """
    if not uri.startswith("models:/"):
        return None
    ref = uri[len("models:/") :].strip("/")
    try:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            return name, str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException as err:
        raise ConfigError(f"{uri}: no such registered model or alias ({err.message})") from err
    if "/" in ref:
        name, version = ref.rsplit("/", 1)
        if version.isdigit():
            return name, version
    return None


def decision_threshold(client: MlflowClient, run_id: str) -> float:
    """The classification threshold chosen on validation data when the run's model was
    evaluated (0.5 when it was not evaluated)."""
    return _threshold(client, run_id)


def load_state_dict(uri: str) -> dict[str, Any]:
    """Weights of a logged or registered model, as a state dict (for initialisation)."""
    from safetensors.torch import load_file

    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    except MlflowException as err:
        raise ConfigError(
            f"pretrained={uri!r}: no such MLflow model ({err.message}); check the name and "
            f"alias with `medimg promote --help` or the MLflow UI, and the tracking URI "
            f"({mlflow.get_tracking_uri()})"
        ) from err
    found = sorted(local.rglob("model.safetensors"))
    if not found:
        raise ConfigError(f"pretrained={uri!r}: the MLflow model holds no medimg weights")
    return dict(load_file(str(found[0]), device="cpu"))


# ----------------------------------------------------------------------------- train runs


def _artifact(client: MlflowClient, run_id: str, path: Path, folder: str | None = None) -> None:
    if path.is_file():
        client.log_artifact(run_id, str(path), folder)


def _split_summary(manifest: pd.DataFrame) -> dict[str, Any]:
    groups = manifest.groupby("split")
    return {
        str(split): {
            "patients": int(frame["patient"].nunique()),
            "series": len(frame),
            "positive_series": int(frame["label"].sum()),
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
                lambda: self.client.create_run(
                    exp, run_name=f"train-{self.task}-{time.strftime('%Y%m%d-%H%M%S')}"
                ),
            )
            self.run_id = run.info.run_id
        self._write_run_file(exp)
        manifest = pd.read_parquet(self.processed / "manifest.parquet")
        tags = {"medimg.stage": "train", "medimg.task": self.task}
        tags.update(lineage_tags(self.params, self.root, self.processed))

        def describe() -> None:
            from mlflow.entities import DatasetInput, InputTag, Param, RunTag

            client, run_id = self.client, self.run_id
            flat = flatten(self.params.model_dump(mode="json"))
            if not previous:  # a resumed run has its params already (they cannot change)
                params = [Param(k, v) for k, v in flat.items()]
                for i in range(0, len(params), 100):
                    client.log_batch(run_id, params=params[i : i + 100])
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

    def _write_run_file(self, exp: str) -> None:
        self.model_dir.mkdir(parents=True, exist_ok=True)
        record = {"run_id": self.run_id, "experiment_id": exp, "task": self.task}
        atomic_write_text(self.model_dir / RUN_FILE, json.dumps(record, indent=1))

    def on_epoch(self, entry: Any) -> None:
        """Trainer callback: queue the epoch's metrics (returns at once)."""
        if self.sender is not None:
            self.sender.log(
                {
                    "train_loss": entry.train_loss,
                    "val_loss": entry.val_loss,
                    "val_metric": entry.val_metric,
                    "lr": entry.lr,
                    "epoch_seconds": entry.seconds,
                },
                step=entry.epoch,
            )

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
            stopped = RunTag("medimg.stopped_early", str(result.stopped_early).lower())
            client.log_batch(run_id, metrics=best, tags=[stopped])
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
) -> Iterator[TrainRun]:
    """Open the training run; marks it FAILED when the block raises."""
    run = TrainRun(params, task, root, processed, interim, model_dir, resume)
    run.start()
    try:
        yield run
    except BaseException:
        run.fail()
        raise


# ----------------------------------------------------------------------------- evaluation


def metric_values(result: Mapping[str, Any]) -> dict[str, float]:
    """``metrics/<task>.json``'s headline metrics as flat MLflow metrics with their CIs:
    ``test_auroc``, ``test_auroc_ci_lower``, ``test_auroc_ci_upper``..."""
    out: dict[str, float] = {}
    for name, m in (result.get("metrics") or {}).items():
        if not m:
            continue
        for field, suffix in (("value", ""), ("ci_lower", "_ci_lower"), ("ci_upper", "_ci_upper")):
            v = m.get(field)
            if v is not None and math.isfinite(v):
                out[f"test_{name}{suffix}"] = float(v)
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
    if not run_id:
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
        client.log_batch(run_id, metrics=values, tags=[RunTag(k, v) for k, v in tags.items()])
        _artifact(client, run_id, metrics_file)
        if plots_dir.is_dir():
            client.log_artifacts(run_id, str(plots_dir), "plots")

    retrying(cfg, "logging the evaluation", send)
    return run_id


# ----------------------------------------------------------------------------- registry


def registered_name(params: Params, task: str) -> str:
    return params.registry.classify_name if task == "classify" else params.registry.segment_name


def gate_metric(params: Params, task: str) -> str:
    g = params.registry.gate
    return g.classify_metric if task == "classify" else g.segment_metric


@dataclass(frozen=True)
class Decision:
    """What the gate decided about a challenger, with its numbers."""

    promoted: bool
    reason: str
    version: str
    champion_version: str | None = None
    metric: str = ""
    challenger_value: float | None = None
    champion_value: float | None = None
    difference: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    n_patients: int | None = None

    def tags(self, rule: str, margin: float) -> dict[str, str]:
        out = {
            "gate.decision": "promoted" if self.promoted else "rejected",
            "gate.reason": self.reason,
            "gate.rule": rule,
            "gate.min_margin": str(margin),
            "gate.metric": self.metric,
        }
        for name in (
            "champion_version",
            "challenger_value",
            "champion_value",
            "difference",
            "ci_low",
            "ci_high",
            "n_patients",
        ):
            value = getattr(self, name)
            if value is not None:
                out[f"gate.{name}"] = f"{value:.6g}" if isinstance(value, float) else str(value)
        return out


def _cases(client: MlflowClient, run_id: str) -> pd.DataFrame | None:
    """The per-case table that evaluation logged in ``run_id`` (None if there is none)."""
    try:
        local = client.download_artifacts(run_id, "plots/cases.csv")
    except (MlflowException, OSError):
        return None
    return pd.read_csv(local, dtype={"key": str, "patient": str})


def _case_score(task: str, metric: str) -> str:
    return "probability" if task == "classify" else metric


def paired_difference(
    task: str,
    metric: str,
    challenger: pd.DataFrame,
    champion: pd.DataFrame,
    n_boot: int,
    threshold: tuple[float, float] = (0.5, 0.5),
) -> tuple[float, float, float, float, float, int]:
    """The challenger's metric minus the champion's, on the cases both were scored on,
    with a 95 % CI from a bootstrap over patients that draws the same patients for both.

    Returns (challenger value, champion value, difference, ci low, ci high, n patients).
    """
    from medimg import metrics as M

    col = _case_score(task, metric)
    if task == "segment":
        challenger = challenger[challenger["lesion"].astype(bool)]
        champion = champion[champion["lesion"].astype(bool)]
    pair = challenger[["key", "patient", "label", col]].merge(
        champion[["key", col]], on="key", suffixes=("_a", "_b")
    )
    if pair.empty:
        raise TrackingError("the challenger and the champion share no test cases")

    def score(frame: pd.DataFrame, side: str, cut: float) -> float:
        y, p = frame["label"].to_numpy(), frame[f"{col}_{side}"].to_numpy()
        if task == "segment":
            return float(np.nanmean(p)) if len(p) else math.nan
        if metric == "auroc":
            return M.auroc(y, p)
        return M.balanced_accuracy(y, p, cut)

    def diff(frame: pd.DataFrame) -> float:
        return score(frame, "a", threshold[0]) - score(frame, "b", threshold[1])

    d, lo, hi = M.bootstrap_ci(pair, diff, n_boot=n_boot)
    a, b = score(pair, "a", threshold[0]), score(pair, "b", threshold[1])
    return a, b, d, lo, hi, int(pair["patient"].nunique())


def _threshold(client: MlflowClient, run_id: str) -> float:
    try:
        local = client.download_artifacts(run_id, "")
    except (MlflowException, OSError):
        return 0.5
    for path in Path(local).glob("*.json"):
        data = json.loads(path.read_text())
        if isinstance(data, dict) and "threshold" in data:
            return float(data["threshold"])
    return 0.5


def gate(
    params: Params,
    task: str,
    client: MlflowClient,
    version: str,
    champion_cases: Callable[[], pd.DataFrame] | None = None,
) -> Decision:
    """Decide whether version ``version`` replaces the current champion.

    The comparison is paired, on the test cases both models were scored on: when the
    champion's logged cases are not the challenger's test set, ``champion_cases`` (which
    scores the champion on the current test set) supplies them.
    """
    g = params.registry.gate
    name = registered_name(params, task)
    metric = gate_metric(params, task)
    challenger = client.get_model_version(name, version)
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        champion = None
    if champion is None:
        return Decision(True, "no champion yet", version, metric=metric)
    if str(champion.version) == str(version):
        return Decision(True, "already the champion", version, str(champion.version), metric)
    mine = _cases(client, str(challenger.run_id))
    if mine is None:
        raise TrackingError(
            f"{name} version {version}: its run has no evaluation; run `medimg evaluate "
            f"--task {task}` before registering"
        )
    theirs = _cases(client, str(champion.run_id))
    if theirs is None or set(theirs["key"]) != set(mine["key"]):
        if champion_cases is None:
            raise TrackingError(
                f"{name}: the champion (version {champion.version}) was evaluated on other "
                "test patients and cannot be re-scored here"
            )
        theirs = champion_cases()
    cuts = (
        _threshold(client, str(challenger.run_id)),
        _threshold(client, str(champion.run_id)),
    )
    a, b, d, lo, hi, n = paired_difference(task, metric, mine, theirs, g.n_boot, cuts)
    if g.rule == "paired_ci":
        ok = math.isfinite(lo) and lo > g.min_margin
        why = f"lower 95% CI bound of the paired difference {lo:.4f} vs margin {g.min_margin}"
    else:
        ok = d > g.min_margin
        why = f"difference {d:.4f} vs margin {g.min_margin}"
    reason = ("beats the champion: " if ok else "does not beat the champion: ") + why
    return Decision(ok, reason, version, str(champion.version), metric, a, b, d, lo, hi, n)


def register(
    params: Params,
    task: str,
    root: Path,
    model_dir: Path,
    champion_cases: Callable[[str], pd.DataFrame] | None = None,
) -> Decision:
    """Register the model trained in ``model_dir`` as a new version (alias
    ``challenger``; the same run is never registered twice) and run the gate."""
    client = configure(params, root)
    record = _read_run_file(model_dir)
    if not record or "model_uri" not in record:
        raise ConfigError(
            f"{model_dir}: no tracked model here; run `medimg train --task {task}` with "
            "tracking.enabled true, then `medimg evaluate`"
        )
    name = registered_name(params, task)
    run_id = record["run_id"]
    run = client.get_run(run_id)
    if run.data.tags.get("medimg.evaluated") != "true":
        raise ConfigError(
            f"run {run_id} has no test evaluation; run `medimg evaluate --task {task}` first"
        )
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(
            name, description=f"medimg {task} model; aliases champion and challenger"
        )
    existing = client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
    if existing:
        version = str(max(int(v.version) for v in existing))
        log.info("%s: run %s is already version %s", name, run_id, version)
    else:
        mv = retrying(
            params.tracking,
            "registering the model",
            lambda: mlflow.register_model(record["model_uri"], name),
        )
        version = str(mv.version)
        for key in ("medimg.test_set", "medimg.dvc.processed_md5", "mlflow.source.git.commit"):
            if key in run.data.tags:
                client.set_model_version_tag(name, version, key, run.data.tags[key])
    client.set_registered_model_alias(name, CHALLENGER, version)
    return promote(params, task, root, version, champion_cases=champion_cases, client=client)


def promote(
    params: Params,
    task: str,
    root: Path,
    version: str | None = None,
    force: bool = False,
    reason: str = "",
    champion_cases: Callable[[str], pd.DataFrame] | None = None,
    client: MlflowClient | None = None,
) -> Decision:
    """Run the gate for ``version`` (default: the challenger) and move ``champion`` to it
    if it passes, or unconditionally with ``force`` (the reason is recorded)."""
    client = client or configure(params, root)
    name = registered_name(params, task)
    if version is None:
        try:
            version = str(client.get_model_version_by_alias(name, CHALLENGER).version)
        except MlflowException as err:
            raise ConfigError(f"{name} has no challenger; run `medimg register` first") from err
    if force:
        if not reason:
            raise ConfigError("promote --force needs --reason (it is recorded on the version)")
        decision = Decision(True, f"forced: {reason}", version, metric=gate_metric(params, task))
    else:
        scorer = (lambda: champion_cases(name)) if champion_cases else None
        decision = gate(params, task, client, version, scorer)
    g = params.registry.gate
    for key, value in decision.tags(g.rule, g.min_margin).items():
        client.set_model_version_tag(name, version, key, value)
    if decision.promoted:
        client.set_registered_model_alias(name, CHAMPION, version)
    log.info(
        "%s version %s: %s (%s)",
        name,
        version,
        "champion" if decision.promoted else "stays challenger",
        decision.reason,
    )
    return decision
