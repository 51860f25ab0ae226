"""The 3D classifier's global pooling (train.classify.pooling)."""

from __future__ import annotations

import torch
from torch import nn

from medimg.config import ClassifyParams
from medimg.models.resnet import build_classifier


def _features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The pooled features the head sees (the head replaced by the identity)."""
    model.fc = nn.Identity()
    model.eval()
    with torch.no_grad():
        return model(x)


def test_max_pooling_sees_a_small_bright_region_the_average_dilutes() -> None:
    torch.manual_seed(0)
    cfg = ClassifyParams(arch="resnet10", pretrained="none")
    avg = build_classifier(cfg, outputs=3)
    peak = build_classifier(cfg.model_copy(update={"pooling": "max"}), outputs=3)
    peak.load_state_dict(avg.state_dict())  # same weights: pooling has no parameters
    assert isinstance(peak.avgpool, nn.AdaptiveMaxPool3d)
    assert isinstance(avg.avgpool, nn.AdaptiveAvgPool3d)

    plain = 0.3 + 0.05 * torch.randn(1, 1, 64, 64, 64)  # noisy soft tissue
    spot = plain.clone()
    spot[..., 40:44, 20:24, 30:34] = 1.0  # a lesion of 4^3 voxels in 64^3
    change = {}
    for name, model in (("avg", avg), ("max", peak)):
        base = _features(model, plain)
        change[name] = float((_features(model, spot) - base).abs().sum() / base.abs().sum())
    assert change["max"] > 1.4 * change["avg"]  # max-pooled features move more (same weights)
    assert peak(torch.zeros(2, 1, 32, 32, 32)).shape == (2, 512)  # fc now identity
