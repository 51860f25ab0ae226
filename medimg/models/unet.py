"""Segmentation: a U-Net whose encoder is a ResNet (MONAI FlexibleUNet)."""

from __future__ import annotations

from typing import Any

from torch import nn

from medimg.config import TaskTrainParams

ENCODER = "encoder"  # the encoder's module name; decoder and head are new at fine-tuning
DIVISOR = 32  # input sizes must be multiples of this (five down-samplings)
STANDARD_WIDTH = 64  # channels of a standard ResNet's first stage (MONAI's get_inplanes)


def encoder_name(arch: str, width: int = STANDARD_WIDTH) -> str:
    """The FlexibleUNet backbone of ``arch`` with ``width`` channels in its first stage:
    MONAI's own encoder at the standard width, else one registered here
    (:func:`register_encoder`), e.g. ``resnet10-w32``."""
    return arch if width == STANDARD_WIDTH else register_encoder(arch, width)


def register_encoder(arch: str, width: int) -> str:
    """Register with FlexibleUNet a ResNet encoder of ``arch`` whose stages have ``width``,
    2x, 4x and 8x channels (the standard ResNet: 64), once; returns its backbone name. Its modules are named as MONAI's
    ResNetFeatures names them (conv1, bn1, layer1-4), so medimg checkpoints of the same
    width load into it, and it down-samples exactly as MONAI's encoder does.
    """
    from monai.networks.blocks import BaseEncoder
    from monai.networks.nets.flexible_unet import FLEXUNET_BACKBONE
    from monai.networks.nets.resnet import ResNet, ResNetFeatures, resnet_params

    name = f"{arch}-w{width}"
    if name in FLEXUNET_BACKBONE.register_dict:
        return name
    block, layers, shortcut, bias_downsample, _ = resnet_params[arch]
    planes = [width * 2**i for i in range(4)]
    grow = 4 if block == "bottleneck" else 1  # bottleneck blocks widen their output 4x

    class NarrowResNetEncoder(ResNetFeatures, BaseEncoder):
        def __init__(
            self, model_name: str, pretrained: bool, spatial_dims: int, in_channels: int
        ) -> None:
            if pretrained:  # FlexibleUNet's own download: medimg loads weights itself
                raise ValueError(f"{name}: no pretrained weights at width {width}")
            ResNet.__init__(
                self,
                block=block,
                layers=layers,
                block_inplanes=planes,
                spatial_dims=spatial_dims,
                n_input_channels=in_channels,
                conv1_t_stride=2,
                shortcut_type=shortcut,
                feed_forward=False,
                bias_downsample=bias_downsample,
            )

        @classmethod
        def get_encoder_parameters(cls) -> list[dict[str, Any]]:
            return [{"model_name": name, "pretrained": False, "spatial_dims": 3, "in_channels": 1}]

        @classmethod
        def num_channels_per_output(cls) -> list[tuple[int, ...]]:
            return [(width, width * grow, *(p * grow for p in planes[1:]))]

        @classmethod
        def num_outputs(cls) -> list[int]:
            return [5]

        @classmethod
        def get_encoder_names(cls) -> list[str]:
            return [name]

    NarrowResNetEncoder.__qualname__ = NarrowResNetEncoder.__name__ = f"ResNetEncoderW{width}"
    FLEXUNET_BACKBONE.register_class(NarrowResNetEncoder)
    return name


def build_segmenter(cfg: TaskTrainParams, in_channels: int = 1, outputs: int = 2) -> nn.Module:
    """FlexibleUNet with a ResNet backbone of ``cfg.width`` and ``outputs`` channels:
    background and one per structure (two for one lesion).

    ``cfg.spatial_dims: 2`` gives a 2D U-Net for axial slices, (B, 1, H, W) -> (B, outputs, H, W);
    :func:`medimg.train.predict` runs it slice by slice over a volume.
    """
    from monai.networks.nets import FlexibleUNet

    return FlexibleUNet(
        in_channels=in_channels,
        out_channels=outputs,
        backbone=encoder_name(cfg.arch, cfg.width),
        pretrained=False,
        spatial_dims=cfg.spatial_dims,
        decoder_channels=cfg.decoder_channels,
    )
