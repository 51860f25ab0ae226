"""The process a run happens in: device choice, seeds."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from medimg.errors import ConfigError
from medimg.runtime import distributed, resolve_device, seed_everything


def test_device_auto_and_a_missing_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """``auto`` takes the CPU where no GPU is visible; ``cuda`` then fails saying so. (A
    missing GPU is simulated: on a GPU machine it cannot be caused for real.)"""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="no CUDA device is visible; use auto or cpu"):
        resolve_device("cuda")


def test_seed_everything_repeats_python_numpy_and_torch() -> None:
    def draw() -> tuple[float, float, float]:
        return random.random(), float(np.random.rand()), float(torch.rand(1))

    seed_everything(7)
    first = draw()
    seed_everything(7)
    assert draw() == first
    seed_everything(8)
    assert draw() != first


def test_a_single_process_is_rank_0_of_1(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed() == (0, 1)
