"""The model as MLflow sees it: weights in safetensors plus their config, behind a pyfunc
defined from code. Nothing is pickled, so loading runs no stored code, and the module that
comes back is an ordinary ``torch.nn.Module``."""

from __future__ import annotations

import json
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModel
from mlflow.tracking import MlflowClient

from medimg.config import Params, TaskTrainParams
from medimg.errors import ConfigError
from medimg.io import atomic_path
from medimg.tasks import TaskSpec, get_task

_WEIGHTS, _CONFIG, _CARD = "weights", "config", "card"

# MLflow warns at class creation that predict() has no type hints: on purpose, it would
# read them as an input schema; the signature is given explicitly when the model is logged.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*type hints to the `predict` method")

    class MedimgModel(PythonModel):
        """A medimg model behind MLflow's pyfunc interface.

        A cross-validation's model is the ensemble of its folds
        (:class:`~medimg.models.ensemble.Ensemble`; ``members`` in the config).

        Input: float32 array (N, 1, R, A, S) of preprocessed volumes. Output: per volume,
        the positive class's probability (classify, two classes: (N,)) or one per class
        ((N, K)); per voxel, the lesion's (segment, one structure: (N, R, A, S)) or one per
        label, background first ((N, K + 1, R, A, S)). The names are in
        ``model_config.json``'s ``outputs``.
        :meth:`torch_model` gives the ``torch.nn.Module`` itself.
        """

        def load_context(self, context: Any) -> None:
            from safetensors.torch import load_file

            from medimg.models.build import build_model
            from medimg.models.ensemble import build_ensemble

            self.meta = json.loads(Path(context.artifacts[_CONFIG]).read_text())
            task = get_task(str(self.meta["task"]))
            self.task = task.from_description(self.meta.get("outputs", {}))
            saved = self.meta["model"]  # the task's own section: keep the network's keys
            cfg = TaskTrainParams(
                **{k: v for k, v in saved.items() if k in TaskTrainParams.model_fields}
            )

            def build() -> Any:
                return build_model(self.task.name, cfg, self.task.n_outputs)

            members = int(self.meta.get("members", 0))  # a cross-validation's ensemble
            self.module = build_ensemble(build, members) if members else build()
            self.module.load_state_dict(load_file(context.artifacts[_WEIGHTS], device="cpu"))
            self.module.eval()

        def torch_model(self) -> Any:
            return self.module

        def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
            import torch

            x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
            patch, cpu = self.meta["patch_size"], torch.device("cpu")
            with torch.no_grad():
                return self.task.predict(self.module, x, patch, cpu).numpy()


# Models already in users' stores import MedimgModel from medimg.tracking: keep it there.
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


def log_model(params: Params, task: TaskSpec | str, model_dir: Path, run_id: str) -> str:
    """Log ``model_dir/model.pt`` as the run's pyfunc model; returns its model URI."""
    spec = get_task(task)
    import torch
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec
    from safetensors.torch import save_file

    payload = torch.load(model_dir / "model.pt", map_location="cpu", weights_only=True)
    if isinstance(task, str):  # a name: the outputs the weights were saved with
        saved = json.loads(payload.get("outputs", "{}"))
        spec = spec.configure(params).from_description(saved)
    size = tuple(params.preprocess.spatial_size)
    meta: dict[str, Any] = {
        "task": spec.name,
        "outputs": spec.describe(),
        "model": spec.train_params(params.train).model_dump(mode="json"),
        "patch_size": list(params.augment.patch_size),
        "input_shape": [1, *size],
        "preprocess": params.preprocess.model_dump(mode="json"),
    }
    if payload.get("members"):  # the folds' ensemble (medimg.cv): its members and folds
        meta["members"] = int(payload["members"])
        meta["folds"] = json.loads(payload.get("folds", "[]"))
    out_shape = spec.output_shape(size)
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
    try:
        local = client.download_artifacts(run_id, "")
    except (MlflowException, OSError):
        return 0.5
    for path in Path(local).glob("*.json"):
        data = json.loads(path.read_text())
        if isinstance(data, dict) and "threshold" in data:
            return float(data["threshold"])
    return 0.5


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


def pretrained_file(uri: str, folder: Path) -> Path:
    """The weights of the MLflow model ``uri`` as a local medimg checkpoint in ``folder``,
    for :func:`~medimg.models.pretrained.load_pretrained` (which reads local files only).

    Raises:
        ConfigError: no such model, or not one that medimg logged (naming the URI).
    """
    import torch

    state = load_state_dict(uri)
    target = folder / "pretrained.pt"
    with atomic_path(target) as tmp:
        torch.save({"model": state, "config": json.dumps({"source": uri})}, tmp)
    return target
