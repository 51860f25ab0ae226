"""ResNet classifiers (MONAI), 2D or 3D, one logit for the diagnosis.

3D: a ResNet on the whole volume. 2D (:class:`SliceResNet`): a ResNet on the volume's
axial slices whose slice logits are pooled into the volume's logit, so both take the same
(B, 1, R, A, S) volumes and give (B, 1) logits, and training, validation, evaluation and
prediction treat them alike.
"""

from __future__ import annotations

import math

import torch
from monai.networks.nets.resnet import ResNet, get_inplanes, resnet_params
from torch import nn

from medimg.config import TaskTrainParams
from medimg.models.unet import STANDARD_WIDTH

HEAD = "fc"  # the classification head's module name; everything else is the encoder
TOP_K_FRACTION = 0.1  # 2D: share of a volume's axial slices whose logits are averaged


def top_k_mean(logits: torch.Tensor, fraction: float = TOP_K_FRACTION) -> torch.Tensor:
    """Mean of the ``ceil(fraction * S)`` largest of each row's S slice logits: (B, S) -> (B,),
    or per class, (B, S, K) -> (B, K).

    Example:
        >>> top_k_mean(torch.tensor([[0.0, 4.0, 2.0, -1.0]]), 0.5)
        tensor([3.])
    """
    k = max(1, math.ceil(fraction * logits.shape[1]))
    return logits.topk(k, dim=1).values.mean(dim=1)


class SliceResNet(ResNet):
    """A 2D ResNet that diagnoses a volume from its axial slices (multiple-instance learning).

    A volume is a bag of axial (S) slices, and its label says whether at least one slice
    shows a lesion. Each slice gets a logit; the volume's logit is the mean of its top
    ``top_k_fraction`` slice logits (:func:`top_k_mean`), and training back-propagates the
    volume-level loss through it. Why top-k: the max lets one slice per volume learn and
    follows a single artefact; the mean dilutes a lesion seen on 3 of 48 slices 16-fold;
    the top ~10 % of slices is about a small lesion's extent at the demo's 6 mm.

    The parameters are exactly a MONAI 2D ResNet's, so 2D weights (torchvision layout)
    load without renaming. Input (B, C, R, A, S): one logit per volume, (B, 1). Input
    (B, C, H, W): one logit per slice, (B, 1), a plain 2D ResNet.
    """

    def __init__(self, arch: str, top_k_fraction: float = TOP_K_FRACTION, **kwargs: object):
        block, layers, *_ = resnet_params[arch]
        super().__init__(block, layers, get_inplanes(), spatial_dims=2, **kwargs)  # type: ignore[arg-type]
        self.top_k_fraction = top_k_fraction

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            return super().forward(x)
        b, c, r, a, s = x.shape
        slices = x.permute(0, 4, 1, 2, 3).reshape(b * s, c, r, a)  # (B*S, C, R, A)
        logits = super().forward(slices).view(b, s, -1)  # (B, S, K)
        return top_k_mean(logits, self.top_k_fraction)  # (B, K): per class, its top slices


def build_classifier(cfg: TaskTrainParams, in_channels: int = 1, outputs: int = 1) -> nn.Module:
    """A MONAI ResNet with ``outputs`` logits (one for a binary diagnosis, one per class
    otherwise); 2D: a :class:`SliceResNet`.

    Example:
        >>> m = build_classifier(TaskTrainParams(arch="resnet10"))
        >>> m(torch.zeros(2, 1, 32, 32, 32)).shape  # doctest: +SKIP
        torch.Size([2, 1])
    """
    if cfg.spatial_dims == 2:
        # torchvision's layout (projection shortcuts, no bias), the source of 2D weights:
        # an ImageNet ResNet then loads completely, its shortcut projections included
        return SliceResNet(
            cfg.arch,
            n_input_channels=in_channels,
            num_classes=outputs,
            conv1_t_stride=cfg.conv1_stride,
            conv1_t_size=7,
            shortcut_type="B",
            bias_downsample=False,
            widen_factor=cfg.width / STANDARD_WIDTH,
        )
    from monai.networks.nets import resnet

    factory = getattr(resnet, cfg.arch)
    # The shortcuts of MedicalNet's releases, as MONAI's table has them and FlexibleUNet's
    # encoder builds them: projections without bias (type B) for ResNet-10 and -50,
    # parameter-free (A) for ResNet-18 and -34. Matching them lets MedicalNet checkpoints
    # and the segmenter's encoder load completely, downsampling projections included.
    _, _, shortcut, bias_downsample, _ = resnet_params[cfg.arch]
    model = factory(
        spatial_dims=cfg.spatial_dims,
        n_input_channels=in_channels,
        num_classes=outputs,
        conv1_t_stride=cfg.conv1_stride,
        conv1_t_size=7,
        shortcut_type=shortcut,
        bias_downsample=bias_downsample,
        widen_factor=cfg.width / STANDARD_WIDTH,  # cfg.width channels in the first stage
    )
    if getattr(cfg, "pooling", "avg") == "max":  # ClassifyParams.pooling
        model.avgpool = nn.AdaptiveMaxPool3d(1)  # the name MONAI's forward calls
    return model
