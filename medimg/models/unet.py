"""Segmentation: a U-Net whose encoder is a ResNet (MONAI FlexibleUNet)."""

from __future__ import annotations

from torch import nn

from medimg.config import TaskTrainParams

ENCODER = "encoder"  # the encoder's module name; decoder and head are new at fine-tuning
DIVISOR = 32  # input sizes must be multiples of this (five down-samplings)


def build_segmenter(cfg: TaskTrainParams, in_channels: int = 1, outputs: int = 2) -> nn.Module:
    """FlexibleUNet with a ResNet backbone and ``outputs`` channels: background and one per
    structure (two for one lesion).

    ``cfg.spatial_dims: 2`` gives a 2D U-Net for axial slices, (B, 1, H, W) -> (B, outputs, H, W);
    :func:`medimg.train.predict` runs it slice by slice over a volume.
    """
    from monai.networks.nets import FlexibleUNet

    return FlexibleUNet(
        in_channels=in_channels,
        out_channels=outputs,
        backbone=cfg.arch,
        pretrained=False,
        spatial_dims=cfg.spatial_dims,
        decoder_channels=cfg.decoder_channels,
    )
