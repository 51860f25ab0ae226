"""MONAI transform chains, built from params.

Two halves: :func:`preprocessing_transforms` is deterministic (orientation, spacing,
intensity, crop) and runs once, in the preprocess stage, whose output is cached on disk;
:func:`training_transforms` loads that output and adds random augmentation at training time.
Images and masks go through the same spatial transforms; masks always with nearest
neighbour.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from monai.transforms import (
    Compose,
    CropForegroundd,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    RandAffined,
    RandCropByLabelClassesd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandGaussianNoised,
    RandShiftIntensityd,
    ResizeWithPadOrCropd,
    ScaleIntensityRanged,
    ScaleIntensityRangePercentilesd,
    Spacingd,
    SqueezeDimd,
)

from medimg.config import AugmentParams, PreprocessParams

IMAGE, LABEL = "image", "label"


class Above:
    """Foreground test for CropForegroundd (a class, so datasets can pickle it)."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x > self.threshold


class AnisotropicSpacingd(MapTransform):
    """Resample to ``pixdim``; a strongly anisotropic source (coarsest/finest spacing above
    ``ratio``) is resampled in-plane first, and along its coarse axis with nearest
    neighbour, so thick slices are not smeared into each other (nnU-Net's rule)."""

    def __init__(self, keys: list[str], pixdim: tuple[float, ...], ratio: float) -> None:
        super().__init__(keys)
        self.pixdim = tuple(float(v) for v in pixdim)
        self.ratio = ratio
        modes = ["bilinear" if k == IMAGE else "nearest" for k in keys]
        self.smooth = Spacingd(keys, pixdim=self.pixdim, mode=modes)
        self.nearest = Spacingd(keys, pixdim=self.pixdim, mode="nearest")

    def __call__(self, data: Any) -> Any:
        d = dict(data)
        current = np.asarray(d[IMAGE].pixdim[:3], dtype=float)
        if current.max() / current.min() <= self.ratio:
            return self.smooth(d)
        coarse = int(np.argmax(current))
        in_plane = list(self.pixdim)
        in_plane[coarse] = float(current[coarse])  # keep the coarse axis for now
        modes = ["bilinear" if k == IMAGE else "nearest" for k in self.keys]
        d = Spacingd(list(self.keys), pixdim=in_plane, mode=modes)(d)
        return self.nearest(d)


def _intensity(modality: str, cfg: PreprocessParams) -> MapTransform:
    if modality == "CT":
        lo, hi = cfg.ct_window_hu
        return ScaleIntensityRanged(IMAGE, a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)
    if cfg.mr_normalization == "zscore":
        return NormalizeIntensityd(IMAGE, nonzero=True)
    lo, hi = cfg.mr_percentiles
    return ScaleIntensityRangePercentilesd(
        IMAGE, lower=lo, upper=hi, b_min=0.0, b_max=1.0, clip=True
    )


def preprocessing_transforms(modality: str, cfg: PreprocessParams, with_label: bool) -> Compose:
    """Deterministic chain from an ingested NIfTI (and its mask) to the model's grid.

    Input: ``{"image": path, "label": path}``; output tensors shaped (1, R, A, S) on a RAS
    grid of ``cfg.spacing_mm`` cropped or padded to ``cfg.spatial_size``.
    """
    keys = [IMAGE, LABEL] if with_label else [IMAGE]
    return Compose(
        [
            LoadImaged(keys, reader="NibabelReader", image_only=True, ensure_channel_first=True),
            Orientationd(keys, axcodes="RAS"),
            AnisotropicSpacingd(keys, cfg.spacing_mm, cfg.anisotropy_ratio),
            _intensity(modality, cfg),
            CropForegroundd(
                keys,
                source_key=IMAGE,
                select_fn=Above(cfg.foreground_threshold),
                margin=cfg.crop_margin,
                allow_smaller=True,
            ),
            ResizeWithPadOrCropd(keys, spatial_size=cfg.spatial_size),
        ]
    )


def _patch_sampler(
    keys: list[str], patch: Any, aug: AugmentParams, ratios: Sequence[float] | None
) -> MapTransform:
    if ratios is None or len(ratios) == 1:
        return RandCropByPosNegLabeld(
            keys,
            label_key=LABEL,
            spatial_size=patch,
            pos=aug.positive_ratio,
            neg=1.0,
            num_samples=aug.patches_per_volume,
            allow_smaller=True,
        )
    return RandCropByLabelClassesd(
        keys,
        label_key=LABEL,
        spatial_size=patch,
        ratios=[1.0, *ratios],
        num_classes=len(ratios) + 1,
        num_samples=aug.patches_per_volume,
        allow_smaller=True,
        warn=False,  # a structure a volume lacks is skipped, not warned about per call
    )


def training_transforms(
    aug: AugmentParams,
    *,
    train: bool,
    with_label: bool = True,
    patches: bool = False,
    spatial_dims: int = 3,
    ratios: Sequence[float] | None = None,
) -> Compose:
    """Load preprocessed volumes (and their label maps, ``with_label``); add random
    augmentation when ``train``.

    With ``patches`` (a task that learns from label maps: segmentation), training samples
    patches of ``aug.patch_size`` around labelled and background voxels in the ratio
    ``aug.positive_ratio``; otherwise whole volumes are augmented. Of several structures,
    patches are centred on structure k in the ratio ``ratios[k]`` to the background's 1
    (:func:`~medimg.data.datasets.structure_ratios`: small structures more often).

    ``spatial_dims=2`` (a 2D model on axial slices): with ``patches``,
    ``aug.patches_per_volume`` axial slices are sampled per volume, each an in-plane patch
    of ``aug.patch_size[:2]`` centred on a labelled or background voxel in the same ratio,
    with the slice axis squeezed: (1, R, A). Without, whole volumes are kept (a bag of
    slices, see :class:`~medimg.models.resnet.SliceResNet`). Augmentation is in-plane only
    (flips of R and A, rotation about S, zoom in R and A), so slices stay slices. Without
    ``train`` the volume is returned whole, as in 3D.
    """
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    keys = [IMAGE, LABEL] if with_label else [IMAGE]
    chain: list[Any] = [
        LoadImaged(keys, reader="NibabelReader", image_only=True, ensure_channel_first=True),
        EnsureTyped(keys, dtype=torch.float32, track_meta=False),
    ]
    if not train:
        return Compose(chain)
    slices = spatial_dims == 2 and patches
    if patches:
        patch = (*aug.patch_size[:2], 1) if slices else aug.patch_size
        chain.append(_patch_sampler(keys, patch, aug, ratios))
    if slices:
        chain.append(SqueezeDimd(keys, dim=3))  # (1, R, A, 1) -> (1, R, A)
    rad = float(np.deg2rad(aug.rotate_deg))
    rotate: tuple[float, ...]  # radians about each axis (one angle in 2D)
    scale: tuple[float, ...]  # relative zoom range per axis
    if spatial_dims == 3:
        axes, rotate, scale = 3, (rad, rad, rad), (aug.scale,) * 3
    elif slices:
        axes, rotate, scale = 2, (rad,), (aug.scale,) * 2
    else:  # volumes for a 2D model: rotate about S, zoom in-plane, keep the slices
        axes, rotate, scale = 2, (0.0, 0.0, rad), (aug.scale, aug.scale, 0.0)
    chain += [RandFlipd(keys, prob=aug.flip_prob, spatial_axis=axis) for axis in range(axes)]
    modes = ["bilinear" if k == IMAGE else "nearest" for k in keys]
    chain += [
        RandAffined(
            keys,
            prob=aug.affine_prob,
            rotate_range=rotate,
            scale_range=scale,
            mode=modes,
            padding_mode="zeros",
        ),
        RandGaussianNoised(IMAGE, prob=aug.intensity_prob, std=aug.noise_std),
        RandShiftIntensityd(IMAGE, offsets=aug.shift, prob=aug.intensity_prob),
    ]
    return Compose(chain)
