"""Narrow ResNets (train.<task>.width): the segmenter's encoder and the classifier."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from monai.networks.nets.flexible_unet import FLEXUNET_BACKBONE
from torch import nn

from medimg.config import ClassifyParams, SegmentParams
from medimg.errors import ConfigError
from medimg.models.pretrained import load_pretrained
from medimg.models.resnet import build_classifier
from medimg.models.unet import build_segmenter


def _n(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _stage_channels(model: nn.Module) -> list[int]:
    """Output channels of conv1 and of each ResNet stage's last convolution."""
    return [model.conv1.out_channels] + [
        getattr(model, f"layer{i}")[-1].conv2.out_channels for i in range(1, 5)
    ]


@pytest.mark.parametrize("arch", ["resnet10", "resnet18", "resnet50"])
def test_narrow_segmenter_has_the_stages_of_its_width(arch: str) -> None:
    seg = build_segmenter(SegmentParams(arch=arch, width=32), outputs=6).eval()
    standard = build_segmenter(SegmentParams(arch=arch), outputs=6)
    assert type(seg.encoder).__name__ == "ResNetEncoderW32"
    assert f"{arch}-w32" in FLEXUNET_BACKBONE.register_dict
    # same module names as MONAI's encoder, every tensor narrower where it has channels
    assert seg.encoder.state_dict().keys() == standard.encoder.state_dict().keys()
    assert seg.encoder.conv1.out_channels == 32 and standard.encoder.conv1.out_channels == 64
    assert _n(seg) < _n(standard) / 3
    with torch.no_grad():
        out = seg(torch.rand(1, 1, 32, 64, 32))
    assert out.shape == (1, 6, 32, 64, 32)


def test_width_16_and_the_standard_width_64() -> None:
    assert type(build_segmenter(SegmentParams(arch="resnet10")).encoder).__name__ == "ResNetEncoder"
    assert _stage_channels(build_segmenter(SegmentParams(arch="resnet10", width=16)).encoder) == [
        16,
        16,
        32,
        64,
        128,
    ]


def test_narrow_classifier_and_its_logits() -> None:
    cls = build_classifier(ClassifyParams(arch="resnet10", width=32, pretrained="none"), 1, 3)
    assert _stage_channels(cls) == [32, 32, 64, 128, 256]
    assert cls.fc.in_features == 256
    cls.eval()
    with torch.no_grad():
        assert cls(torch.rand(2, 1, 32, 32, 32)).shape == (2, 3)
    slices = build_classifier(
        ClassifyParams(arch="resnet10", width=16, spatial_dims=2, pretrained="none"), 1, 3
    )
    assert _stage_channels(slices) == [16, 16, 32, 64, 128]


def test_width_is_checked() -> None:
    with pytest.raises(ValueError, match="width"):
        SegmentParams(width=48)


def test_narrow_segmenter_encoder_starts_a_narrow_classifier(tmp_path: Path) -> None:
    """The segmenter-encoder initialisation of the classifier works at the same width, and
    a width that does not match is refused with the file named, not loaded partly."""
    seg = build_segmenter(SegmentParams(arch="resnet10", width=32), outputs=6)
    path = tmp_path / "model.pt"
    torch.save({"model": seg.state_dict(), "config": {}}, path)
    narrow = build_classifier(ClassifyParams(arch="resnet10", width=32, pretrained="none"), 1, 3)
    report = load_pretrained(narrow, path, "classify")
    assert report.fraction == 1.0
    torch.testing.assert_close(narrow.conv1.weight, seg.encoder.conv1.weight)
    wide = build_classifier(ClassifyParams(arch="resnet10", pretrained="none"), 1, 3)
    with pytest.raises(ConfigError, match=r"model\.pt"):
        load_pretrained(wide, path, "classify")
