"""Reading weights files: the file formats and layouts pretrained weights come in.

Local files only: a ``.pth``/``.pt`` loaded with ``weights_only=True`` (no code runs) or a
``.safetensors`` file. :func:`detect_format` names the layout (MedicalNet, torchvision or
medimg); :func:`~medimg.models.pretrained.load_pretrained` maps it onto a model.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from medimg.errors import ConfigError
from medimg.models.ensemble import first_member

WRAPPER = "module."  # DataParallel prefix (MedicalNet)
FORMATS: tuple[str, ...] = ("medicalnet", "torchvision", "medimg")


def strip_wrapper(key: str) -> str:
    """``key`` without the ``module.`` prefix DataParallel adds."""
    return key[len(WRAPPER) :] if key.startswith(WRAPPER) else key


def detect_format(state: Mapping[str, Any]) -> str:
    """Name the layout of a loaded checkpoint: ``"medicalnet"``, ``"torchvision"`` or ``"medimg"``.

    ``state`` is what ``torch.load`` returned (a wrapper dict with ``"state_dict"`` or
    ``"model"``), or an already unwrapped state dict.

    Raises:
        ConfigError: the layout is none of these; the message says what was found.
    """
    if isinstance(state.get("model"), Mapping) and "config" in state:
        return "medimg"
    inner = state.get("state_dict", state)
    if not isinstance(inner, Mapping):
        inner = state
    conv1 = next(
        (
            v
            for k, v in inner.items()
            if strip_wrapper(str(k)) == "conv1.weight" and isinstance(v, Tensor)
        ),
        None,
    )
    if conv1 is not None and conv1.dim() == 5:
        return "medicalnet"
    if conv1 is not None and conv1.dim() == 4:
        return "torchvision"
    keys = [str(k) for k in inner][:5]
    found = (
        f"conv1.weight of shape {tuple(conv1.shape)}" if conv1 is not None else "no conv1.weight"
    )
    raise ConfigError(
        f"unrecognised checkpoint layout: {len(inner)} entries, first keys {keys}, {found}; "
        "expected a MedicalNet 3D ResNet ({'state_dict': {'module.conv1.weight': 5-D, ...}}), "
        "a torchvision 2D ResNet state dict (conv1.weight 4-D, fc.*) or a medimg checkpoint "
        "({'model': ..., 'config': ...})"
    )


def _load_file(path: Path) -> Any:
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as err:
            raise ConfigError(
                f"{path.name}: reading .safetensors needs the 'safetensors' package, which is "
                "not installed; install it, or convert the file to a torch .pth state dict"
            ) from err
        try:
            return load_file(str(path), device="cpu")
        except Exception as err:
            raise ConfigError(f"{path.name}: not a readable safetensors file ({err})") from err
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only" in str(err).lower():
            raise ConfigError(
                f"{path.name}: holds Python objects that safe loading (weights_only=True) "
                "refuses, so it is not a plain state dict; from trusted code, re-save it with "
                "torch.save(model.state_dict(), path)"
            ) from err
        raise ConfigError(
            f"{path.name}: not a PyTorch checkpoint ({type(err).__name__}: {err}); "
            "point train.<task>.pretrained at a .pth/.pt state dict, or 'none'"
        ) from err
    except Exception as err:  # torch raises KeyError, EOFError, RuntimeError... on junk
        raise ConfigError(
            f"{path.name}: not a PyTorch checkpoint ({type(err).__name__}: {err}); "
            "point train.<task>.pretrained at a .pth/.pt state dict, or 'none'"
        ) from err


def read_state_dict(path: Path) -> tuple[dict[str, Tensor], str]:
    """Read a weights file into a flat ``{name: tensor}`` dict and name its format.

    ``"state_dict"`` and ``"model"`` wrappers are unwrapped; key names are left as stored
    (:func:`map_keys` renames them).

    Raises:
        ConfigError: the file is missing, unreadable, refused by ``weights_only`` loading,
            not a state dict, or of an unknown layout.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"pretrained weights file {path} not found; set train.<task>.pretrained to an "
            "existing local file (MedicalNet/torchvision .pth, medimg checkpoint) or 'none'"
        )
    obj = _load_file(path)
    if not isinstance(obj, Mapping):
        raise ConfigError(
            f"{path.name}: holds a {type(obj).__name__}, not a state dict (a dict of tensors); "
            "save weights with torch.save(model.state_dict(), path)"
        )
    fmt = detect_format(obj)
    inner: Any = obj
    for wrapper in ("model", "state_dict"):
        if isinstance(inner.get(wrapper), Mapping):
            inner = inner[wrapper]
            break
    state = first_member({str(k): v for k, v in inner.items() if isinstance(v, Tensor)})
    if not state:
        raise ConfigError(
            f"{path.name}: contains no tensors (keys {list(inner)[:5]}); not a state dict"
        )
    return state, fmt
