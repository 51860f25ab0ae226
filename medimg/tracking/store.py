"""The MLflow store: where it is, the client, retries on transient failures, experiments."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from medimg.config import Params, TrackingParams
from medimg.errors import TrackingError

log = logging.getLogger(__name__)

T = TypeVar("T")

_OURS = "MEDIMG_MLFLOW_URI"  # the store configure() chose, so that it can tell its own
# setting from the user's: mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI


_SQLITE = "sqlite:///"


def tracking_uri(cfg: TrackingParams, root: Path = Path(".")) -> str:
    """The store: ``MLFLOW_TRACKING_URI`` if the user set it, else ``tracking.uri``; a
    relative SQLite path is taken from the project root."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    uri = env if env and env != os.environ.get(_OURS) else cfg.uri
    if uri.startswith(_SQLITE) and not uri.startswith(_SQLITE + "/"):
        uri = _SQLITE + str((root / uri[len(_SQLITE) :]).resolve())
    return uri


def missing_sqlite_store(cfg: TrackingParams, root: Path = Path(".")) -> Path | None:
    """The file of a SQLite store that does not exist yet (MLflow creates an empty one
    when it is opened, so a reader that only asks should not open it); None otherwise."""
    uri = tracking_uri(cfg, root)
    if uri.startswith(_SQLITE) and not (path := Path(uri[len(_SQLITE) :])).exists():
        return path
    return None


def is_server(uri: str) -> bool:
    """A tracking server, which serves its own UI, rather than a store (SQLite, a folder,
    a database) that ``mlflow ui`` opens here: the one place this is decided."""
    return uri.startswith(("http://", "https://", "databricks"))


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
    name = params.tracking.experiment(task)
    found = client.get_experiment_by_name(name)
    if found is not None:
        return str(found.experiment_id)
    location = None
    if _is_local(client.tracking_uri):
        location = ((root / params.tracking.artifacts).resolve() / name).as_uri()
    try:
        # the kind says what the experiment is (MLflow before 3.17 opened on it)
        kind = {"mlflow.experimentKind": "custom_model_development"}
        return str(client.create_experiment(name, artifact_location=location, tags=kind))
    except MlflowException:  # created meanwhile by a parallel run
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return str(found.experiment_id)


# MLflow 3's UI shows either its GenAI pages or its model-training pages, by a choice it
# keeps per browser (GenAI unless chosen) and reads from this query parameter first; from
# 3.17 on it no longer follows the experiment's ``mlflow.experimentKind`` tag. Every link
# we print carries it, so that it opens on the runs table, not on an empty traces page.
TRAINING_VIEW = "workflowType=machine_learning"


def ui_base(cfg: TrackingParams, root: Path) -> str:
    """The MLflow UI's address: the tracking server's own, or ``tracking.ui_url`` (``make
    ui``) for a local store."""
    uri = tracking_uri(cfg, root)
    return (uri if is_server(uri) else cfg.ui_url).rstrip("/")


def experiment_url(cfg: TrackingParams, root: Path, experiment_id: str) -> str:
    """Where a person opens the runs table of experiment ``experiment_id``."""
    return f"{ui_base(cfg, root)}/#/experiments/{experiment_id}/runs?{TRAINING_VIEW}"


def run_url(cfg: TrackingParams, root: Path, experiment_id: str, run_id: str) -> str:
    """Where a person opens run ``run_id`` in the MLflow UI."""
    return f"{ui_base(cfg, root)}/#/experiments/{experiment_id}/runs/{run_id}?{TRAINING_VIEW}"


def experiment_urls(params: Params, tasks: tuple[str, ...], root: Path) -> dict[str, str]:
    """The runs table's URL of each task's experiment that exists (none is created).

    Raises:
        TrackingError: the store could not be read (the message names it, not a password).
    """
    client = configure(params, root)

    def read() -> dict[str, str]:
        found = {t: client.get_experiment_by_name(params.tracking.experiment(t)) for t in tasks}
        return {
            t: experiment_url(params.tracking, root, str(e.experiment_id))
            for t, e in found.items()
            if e is not None
        }

    return retrying(params.tracking, "reading the experiments", read)
