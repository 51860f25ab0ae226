"""ResNet classifiers (MONAI), 2D or 3D, one logit for the diagnosis."""

from __future__ import annotations

from torch import nn

from medimg.config import TaskTrainParams

HEAD = "fc"  # the classification head's module name; everything else is the encoder


def build_classifier(cfg: TaskTrainParams, in_channels: int = 1) -> nn.Module:
    """A MONAI ResNet with one output logit.

    Example:
        >>> m = build_classifier(TaskTrainParams(arch="resnet10"))
        >>> m(torch.zeros(2, 1, 32, 32, 32)).shape  # doctest: +SKIP
        torch.Size([2, 1])
    """
    from monai.networks.nets import resnet

    factory = getattr(resnet, cfg.arch)
    return factory(
        spatial_dims=cfg.spatial_dims,
        n_input_channels=in_channels,
        num_classes=1,
        conv1_t_stride=cfg.conv1_stride,
        conv1_t_size=7,
        # MedicalNet's ResNet-10/18/34 use parameter-free shortcuts (type A), deeper ones
        # projections (B); matching them lets its checkpoints load completely.
        shortcut_type="B" if cfg.arch == "resnet50" else "A",
    )
