"""Pretrained weights for the classifier and the segmenter, from local files only.

Three source layouts are understood (:func:`detect_format`):

* ``"torchvision"``: a 2D ResNet state dict (``conv1.weight`` of shape (64, 3, 7, 7),
  ``fc.*``, BatchNorm running statistics). For a 3D model conv weights are inflated to 3D
  (I3D); a 2D model (``spatial_dims: 2``) takes them as they are. Either way the RGB input
  channels are summed for our one-channel images (:func:`adapt`).
* ``"medicalnet"``: a MedicalNet 3D ResNet (``{"state_dict": {"module.conv1.weight": ...}}``,
  5-D convs, no ``fc``).
* ``"medimg"``: our own checkpoint, ``{"model": state_dict, "config": {...}}``. From the same
  task everything loads, the head included; from the other task only the backbone.

The key mapping is explicit (:func:`map_keys`): strip ``module.``, drop the source's head,
and prefix ``encoder.`` for the segmenter, whose backbone is FlexibleUNet's ResNet encoder.
:func:`load_pretrained` reports how much of the model's backbone was loaded (a
:class:`LoadReport`) and fails when too little was, which catches a wrong file or a wrong
architecture depth before hours of training on random weights.

Note on shortcuts (``layerN.0.downsample.*``): the 3D classifier and FlexibleUNet's
encoder (2D or 3D) use MedicalNet's: parameter-free for ResNet-18/34, projections without
bias for ResNet-10/50 (MONAI's ``resnet_params``). The 2D
classifier uses torchvision's projections (without bias), so an ImageNet ResNet loads into
it completely. Where the layouts differ the 15 projection tensors go unused (torchvision
into a segmenter) or stay missing: a 2D segmenter's encoder gives a 2D ResNet-18 classifier
85 of its 100 backbone tensors, below the default ``min_loaded_fraction`` of 0.9.

3D weights (MedicalNet, a 3D medimg checkpoint) do not fit a 2D model: they are refused
with a message that says so.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from medimg.errors import ConfigError
from medimg.models.resnet import HEAD
from medimg.models.unet import ENCODER
from medimg.models.weights import FORMATS, detect_format, read_state_dict, strip_wrapper

log = logging.getLogger(__name__)

# The model a weights file is loaded into, named by its task (medimg.tasks): the
# classifier (a ResNet; backbone = all but the head) or the segmenter (a FlexibleUNet;
# backbone = its ResNet encoder, under ``encoder.``).
Target = Literal["classify", "segment"]
TARGETS: tuple[str, ...] = ("classify", "segment")
_PREFIX = {"classify": "", "segment": f"{ENCODER}."}  # where each model keeps its backbone
_OLD_NAMES = {"classifier": "classify", "segmenter": "segment"}  # before medimg 0.2
_NOUN = {task: noun for noun, task in _OLD_NAMES.items()}  # what messages call the model

__all__ = ["FORMATS", "TARGETS", "LoadReport", "Target", "detect_format", "read_state_dict"]

_SOURCE_HEADS = (f"{HEAD}.", "conv_seg.")  # torchvision/MONAI head; MedicalNet's seg head
_SEG_HEADS = ("decoder.", "segmentation_head.")  # FlexibleUNet parts outside the encoder
_COUNTER = "num_batches_tracked"  # BatchNorm step counters: loaded, never counted
_MLFLOW_SCHEMES = ("models:/", "runs:/")  # resolved to a local file by medimg.tracking


@dataclass
class LoadReport:
    """What :func:`load_pretrained` did, counted over the model's backbone tensors.

    ``loaded``, ``missing`` and ``skipped_shape`` partition the backbone keys (target names,
    BatchNorm ``num_batches_tracked`` counters excluded); ``unexpected`` lists source keys
    that were not used (source names, heads that are dropped on purpose included).
    ``loaded_head`` lists non-backbone tensors loaded (a medimg checkpoint of the same task).
    """

    source_format: str
    n_model_backbone: int
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    skipped_shape: list[str] = field(default_factory=list)
    loaded_head: list[str] = field(default_factory=list)

    @property
    def fraction(self) -> float:
        """Share of the backbone's tensors that were loaded (0.0 for an empty report)."""
        return len(self.loaded) / self.n_model_backbone if self.n_model_backbone else 0.0

    def summary(self) -> str:
        """One line with the counts."""
        if self.source_format == "none":
            return "pretrained: none (random initialisation)"
        head = f", head {len(self.loaded_head)}" if self.loaded_head else ""
        return (
            f"pretrained ({self.source_format}): loaded {len(self.loaded)}/"
            f"{self.n_model_backbone} backbone tensors ({self.fraction:.1%}){head}, "
            f"missing {len(self.missing)}, wrong shape {len(self.skipped_shape)}, "
            f"unused in file {len(self.unexpected)}"
        )


# ----------------------------------------------------------------------------- mapping


def _check_target(target: str) -> Target:
    """``target`` as a task name; the names before medimg 0.2 still work, with a warning."""
    if target in _OLD_NAMES:
        warnings.warn(
            f"target {target!r} is deprecated; use the task name {_OLD_NAMES[target]!r}",
            DeprecationWarning,
            stacklevel=3,
        )
        target = _OLD_NAMES[target]
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    return target  # type: ignore[return-value]


def _medimg_task(keys: Iterable[str]) -> Target:
    """The model a medimg checkpoint holds: the one whose backbone prefix its keys use."""
    enc = _PREFIX["segment"]
    return "segment" if any(k.startswith(enc) for k in keys) else "classify"


def _rename(keys: Iterable[str], fmt: str, target: str) -> dict[str, str]:
    """Target name -> source name for the source keys that are kept (see :func:`map_keys`)."""
    target = _check_target(target)
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    flat = {strip_wrapper(k): k for k in keys}
    src_prefix = ""
    if fmt == "medimg":
        source = _medimg_task(flat)
        if source == target:
            return flat
        src_prefix = _PREFIX[source]
    if src_prefix:  # the source's backbone is under a prefix: take only it, unprefixed
        backbone = {k[len(src_prefix) :]: v for k, v in flat.items() if k.startswith(src_prefix)}
    else:
        backbone = {k: v for k, v in flat.items() if not k.startswith(_SOURCE_HEADS)}
    return {_PREFIX[target] + k: src for k, src in backbone.items()}


def map_keys(state: Mapping[str, Tensor], fmt: str, target: str) -> dict[str, Tensor]:
    """Rename source keys to the target model's names; keys of no use are dropped.

    * every format: strip the ``module.`` wrapper prefix;
    * medicalnet / torchvision: drop the head (``fc.*``; MedicalNet's ``conv_seg.*``), and
      for the segmenter prefix ``encoder.``;
    * medimg, same task: keep everything, the head included; classifier to segmenter:
      drop ``fc.*``, prefix ``encoder.``; segmenter to classifier: keep ``encoder.*``,
      unprefixed.

    Example:
        >>> w = torch.zeros(1)
        >>> list(map_keys({"module.conv1.weight": w, "fc.weight": w}, "torchvision", "segment"))
        ['encoder.conv1.weight']
    """
    return {new: state[old] for new, old in _rename(state, fmt, target).items()}


def _inflate(tensor: Tensor, depth: int) -> Tensor:
    """(out, in, kh, kw) -> (out, in, depth, kh, kw), repeated and divided by ``depth``."""
    return tensor.unsqueeze(2).repeat(1, 1, depth, 1, 1) / depth


def _adapt_in_channels(tensor: Tensor, n_in: int) -> Tensor | None:
    src = tensor.shape[1]
    if n_in == src:
        return tensor
    if n_in == 1:  # grey image = R = G = B: the summed kernel gives the same response
        return tensor.sum(dim=1, keepdim=True)
    if n_in > src:  # repeat, and scale so identical channels give the same response
        reps = math.ceil(n_in / src)
        return tensor.repeat(1, reps, *([1] * (tensor.dim() - 2)))[:, :n_in] * (src / n_in)
    return None


def adapt(tensor: Tensor, target_shape: tuple[int, ...] | torch.Size) -> Tensor | None:
    """Fit a source tensor to a target shape, or ``None`` when it cannot be fitted.

    * same shape: unchanged;
    * 2D conv weight (out, in, kh, kw) to 3D (out, in', kd, kh, kw): repeated ``kd`` times
      along depth and divided by ``kd`` (I3D inflation: a constant input gives the same
      response); the target's ``kd`` is used, ``kh`` and ``kw`` must match;
    * conv input channels: to one channel the kernel is summed over input channels (an RGB
      source for grey images); to more channels it is repeated and scaled by src/target;
    * anything else (other output channels, kernel sizes, vector lengths): ``None``.
    """
    target = tuple(int(s) for s in target_shape)
    if tuple(tensor.shape) == target:
        return tensor
    if tensor.dim() < 3 or len(target) < 3 or tensor.shape[0] != target[0]:
        return None
    out = tensor
    if out.dim() == 4 and len(target) == 5:
        out = _inflate(out, target[2])
    if out.dim() != len(target) or tuple(out.shape[2:]) != target[2:]:
        return None
    adapted = _adapt_in_channels(out, target[1])
    if adapted is None or tuple(adapted.shape) != target:
        return None
    return adapted


# ----------------------------------------------------------------------------- loading


def is_backbone(name: str, target: str) -> bool:
    """Whether a parameter/buffer name belongs to the pretrained backbone of ``target``."""
    prefix = _PREFIX[_check_target(target)]
    return name.startswith(prefix) if prefix else not name.startswith(f"{HEAD}.")


def _counted(name: str) -> bool:
    return not name.endswith(_COUNTER)


def _three_into_two(mapped: Mapping[str, Tensor], own: Mapping[str, Tensor]) -> bool:
    """Whether the source's convolutions are 3D where the model's are 2D."""
    return any(
        v.dim() == 5 and own[k].dim() == 4
        for k, v in mapped.items()
        if k.endswith("conv1.weight") and k in own
    )


def _too_little(
    report: LoadReport, label: str, fmt: str, target: Target, min_fraction: float, is_3d: bool
) -> ConfigError:
    """The error of a load that filled too little of the backbone, with the likely cause."""
    if is_3d:
        return ConfigError(
            f"{label}: holds 3D weights (5-D convolutions, {fmt} format) and the "
            f"{_NOUN[target]} is 2D (train.<task>.spatial_dims: 2); 3D kernels are not cut "
            "down to 2D. Start a 2D model from a torchvision 2D state dict or a 2D medimg "
            "checkpoint, or set spatial_dims: 3."
        )
    examples = (report.missing + report.skipped_shape)[:3]
    return ConfigError(
        f"{label}: only {len(report.loaded)}/{report.n_model_backbone} backbone tensors "
        f"of the {_NOUN[target]} loaded ({report.fraction:.1%} < min {min_fraction:.0%}): "
        f"{len(report.missing)} missing, {len(report.skipped_shape)} wrong shape "
        f"(e.g. {examples}), {len(report.unexpected)} unused in the file ({fmt} format). "
        "Wrong architecture depth (train.<task>.arch vs the file) or width "
        "(train.<task>.width; pretrained files are 64)? Wrong file? Lower "
        "train.<task>.min_loaded_fraction only if a partial load is intended."
    )


def load_pretrained(
    model: nn.Module,
    source: str | Path,
    target: str,
    min_fraction: float = 0.9,
    name: str | None = None,
) -> LoadReport:
    """Load local pretrained weights into ``model`` (non-strict) and report what loaded.

    Args:
        model: built by :func:`~medimg.models.build.build_model` for ``target``.
        source: ``"none"`` (do nothing) or a local weights file. An MLflow model URI is
            first resolved to a local file by :func:`medimg.tracking.pretrained_file`
            (``medimg train`` does so).
        target: the task ``model`` is built for (``"classify"`` or ``"segment"``).
        min_fraction: fail when a smaller share of the backbone's tensors loads.
        name: what messages call the source (default: the file's name), e.g. the URI a
            local file was resolved from.

    Raises:
        ConfigError: an MLflow URI, an unreadable file, or ``report.fraction <
            min_fraction`` (the model is then left unchanged).
    """
    target = _check_target(target)
    if str(source).strip().lower() == "none":
        return LoadReport(source_format="none", n_model_backbone=0)
    if str(source).startswith(_MLFLOW_SCHEMES):
        raise ConfigError(
            f"{source}: an MLflow model URI; resolve it to a local file first with "
            "medimg.tracking.pretrained_file (medimg train does this for train.<task>.pretrained)"
        )
    path = Path(source)
    state, fmt = read_state_dict(path)
    label = name or path.name
    source_name = _rename(state, fmt, target)  # target name -> source name
    mapped = {new: state[old] for new, old in source_name.items()}

    own = model.state_dict()
    backbone = [k for k in own if is_backbone(k, target) and _counted(k)]
    report = LoadReport(source_format=fmt, n_model_backbone=len(backbone))
    to_load: dict[str, Tensor] = {}
    skipped: dict[str, str] = {}
    for name, tensor in mapped.items():
        if name not in own:
            continue
        fitted = adapt(tensor, own[name].shape)
        if fitted is None:
            skipped[name] = f"{tuple(tensor.shape)} -> {tuple(own[name].shape)}"
            continue
        to_load[name] = fitted.to(dtype=own[name].dtype)
    used = {source_name[k] for k in to_load}
    report.unexpected = [k for k in state if k not in used and _counted(k)]
    for name in backbone:
        if name in to_load:
            report.loaded.append(name)
        elif name in skipped:
            report.skipped_shape.append(name)
        else:
            report.missing.append(name)
    report.loaded_head = [k for k in to_load if not is_backbone(k, target) and _counted(k)]

    if report.fraction < min_fraction:
        raise _too_little(report, label, fmt, target, min_fraction, _three_into_two(mapped, own))
    model.load_state_dict(to_load, strict=False)
    for name, shapes in skipped.items():
        log.debug("pretrained: %s skipped, shape %s", name, shapes)
    log.info("%s: %s", label, report.summary())
    return report


# ----------------------------------------------------------------------------- fine-tuning


def freeze_encoder(model: nn.Module, target: str, frozen: bool) -> None:
    """Set ``requires_grad`` of the backbone's parameters to ``not frozen``; the rest untouched."""
    target = _check_target(target)
    for name, param in model.named_parameters():
        if is_backbone(name, target):
            param.requires_grad_(not frozen)


def param_groups(
    model: nn.Module, target: str, lr: float, head_lr_mult: float
) -> list[dict[str, Any]]:
    """Two AdamW parameter groups: the backbone at ``lr``, the rest at ``lr * head_lr_mult``.

    Frozen parameters are included (AdamW skips those without gradients), so unfreezing
    later needs no new optimiser.
    """
    target = _check_target(target)
    backbone: list[nn.Parameter] = []
    head: list[nn.Parameter] = []
    for name, param in model.named_parameters():
        (backbone if is_backbone(name, target) else head).append(param)
    return [
        {"params": backbone, "lr": lr, "name": "backbone"},
        {"params": head, "lr": lr * head_lr_mult, "name": "head"},
    ]
