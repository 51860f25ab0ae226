"""Networks from config: the one place a task's model is built.

The architectures live beside this file (:mod:`~medimg.models.resnet` for the classifier,
:mod:`~medimg.models.unet` for the segmenter); this module maps a task's name to its
builder, so that training, evaluation, the MLflow model and benchmarks all build the same
network from the same ``train.<task>`` section. No I/O: weights are loaded elsewhere
(:mod:`~medimg.models.pretrained`, :mod:`~medimg.checkpoint`).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from medimg.config import TaskTrainParams
from medimg.errors import ConfigError
from medimg.models.resnet import build_classifier
from medimg.models.unet import build_segmenter

# task name (medimg.tasks) -> builder of its network
BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "classify": build_classifier,
    "segment": build_segmenter,
}


def build_model(task: str, cfg: TaskTrainParams, outputs: int | None = None) -> nn.Module:
    """The network of ``task`` (a name of :data:`BUILDERS`) as ``cfg`` describes it, with
    ``outputs`` logits or channels (None: the task's binary default), randomly initialised.

    Raises:
        ConfigError: an unknown task name.
    """
    try:
        builder = BUILDERS[task]
    except KeyError:
        raise ConfigError(f"task must be one of {tuple(BUILDERS)}, got {task!r}") from None
    return builder(cfg) if outputs is None else builder(cfg, outputs=outputs)


def model_spatial_dims(model: nn.Module) -> int:
    """2 or 3: the dimensionality of the model's first convolution."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return 2
        if isinstance(module, nn.Conv3d):
            return 3
    raise ConfigError(f"{type(model).__name__} has no 2D or 3D convolution; not a medimg model")
