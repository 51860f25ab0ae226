"""Inference on whole volumes, 2D and 3D models alike.

Callers pass volumes shaped (B, 1, R, A, S) whatever the model's dimensionality:

* :func:`volume_probability`: one probability per volume from a single-logit classifier
  (a 2D classifier pools its slice logits itself, :class:`~medimg.models.resnet.SliceResNet`);
* :func:`foreground_map`: a voxel-wise foreground probability from a two-channel
  segmenter, by MONAI's sliding windows of ``roi_size`` (3D), or slice by slice with
  windows of ``roi_size[:2]`` over each axial slice, stacked back (2D, ``SliceInferer``).

Which of the two a task uses is the task spec's business (:mod:`medimg.tasks`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.data import MetaTensor
from torch import nn

from medimg.models.build import model_spatial_dims

SLICE_BATCH = 64  # 2D segmentation: in-plane windows per forward pass
WINDOW_BATCH = 4  # 3D segmentation: sliding windows per forward pass
OVERLAP = 0.25  # of neighbouring windows, as a fraction of the window


def plain(x: torch.Tensor) -> torch.Tensor:
    """``x`` without MONAI's metadata: random transforms hand out MetaTensors, whose
    bookkeeping on every operation made the model's passes measurably slower."""
    return x.as_tensor() if isinstance(x, MetaTensor) else x


@torch.no_grad()
def volume_probability(
    model: nn.Module, image: torch.Tensor, device: torch.device, amp: bool = False
) -> torch.Tensor:
    """Class probabilities per volume, on the CPU: the sigmoid of a single logit,
    (B, 1, R, A, S) -> (B,), or the softmax of K logits, -> (B, K)."""
    model.eval()
    x = image.to(device)
    with torch.autocast(device.type, enabled=amp):
        logits = model(x).float()
        if logits.shape[1] == 1:
            return torch.sigmoid(logits.squeeze(1)).cpu()
        return torch.softmax(logits, dim=1).cpu()


@torch.no_grad()
def foreground_map(
    model: nn.Module,
    image: torch.Tensor,
    roi_size: Sequence[int],
    device: torch.device,
    amp: bool = False,
    channels: str = "foreground",
) -> torch.Tensor:
    """Softmax probabilities per voxel, on the CPU, by windows of ``roi_size`` (3D) or
    ``roi_size[:2]`` per axial slice (2D): of channel 1 (``channels="foreground"``, a
    one-structure segmenter), (B, 1, R, A, S) -> (B, R, A, S); or of every channel
    (``"all"``), -> (B, C, R, A, S)."""
    from monai.inferers import SliceInferer, sliding_window_inference

    model.eval()
    x = image.to(device)
    with torch.autocast(device.type, enabled=amp):
        if model_spatial_dims(model) == 2:
            inferer = SliceInferer(
                roi_size=tuple(roi_size)[:2],
                spatial_dim=2,  # S: axial slices
                sw_batch_size=SLICE_BATCH,
                overlap=OVERLAP,
                progress=False,
            )
            logits = inferer(x, model)
        else:
            logits = sliding_window_inference(
                x,
                roi_size=tuple(roi_size),
                sw_batch_size=WINDOW_BATCH,
                predictor=model,
                overlap=OVERLAP,
            )
        prob = torch.softmax(torch.as_tensor(logits).float(), dim=1)
        return (prob if channels == "all" else prob[:, 1]).cpu()
