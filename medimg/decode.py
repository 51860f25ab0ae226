"""From a model's probabilities to a series' results: the predicted class, or the label
map on the series' own grid with its volumes per structure (:mod:`medimg.predict`)."""

from __future__ import annotations

from typing import Any

import nibabel as nib
import numpy as np
import numpy.typing as npt

from medimg.inbox import SeriesResult


def to_original_grid(
    values: npt.NDArray[np.floating],
    model_affine: npt.NDArray[np.float64],
    shape: tuple[int, ...],
    affine: npt.NDArray[np.float64],
) -> npt.NDArray[np.float32]:
    """Resample a map on the model's grid onto the series' grid (linear; 0 outside the
    model's field of view). Both affines are voxel to RAS mm."""
    from nibabel.processing import resample_from_to

    src = nib.Nifti1Image(np.asarray(values, dtype=np.float32), model_affine)
    out = resample_from_to(src, (tuple(shape), affine), order=1, mode="constant", cval=0.0)
    return np.asarray(out.dataobj, dtype=np.float32)


def diagnosis(
    res: SeriesResult, result: Any, labels: tuple[str, ...], threshold: float | None
) -> None:
    """A diagnosis' columns: the probability of each class and the predicted class (the
    validation-chosen threshold for two classes, argmax for more, where ``threshold`` is
    None)."""
    names = labels
    if isinstance(result, float):
        res.probability = round(result, 6)
        res.label = int(result >= (0.5 if threshold is None else threshold))
        res.extra = {
            f"probability_{names[0]}": round(1 - result, 6),
            f"probability_{names[1]}": res.probability,
        }
    else:
        probs = np.asarray(result, dtype=np.float64)
        res.label = int(np.argmax(probs))
        res.probability = round(float(probs[res.label]), 6)
        res.extra = {
            f"probability_{n}": round(float(p), 6) for n, p in zip(names, probs, strict=True)
        }
    res.predicted = names[res.label]


def label_map(
    spec: Any,
    result: Any,
    model_affine: npt.NDArray[np.float64],
    shape: tuple[int, ...],
    affine: npt.NDArray[np.float64],
    res: SeriesResult,
) -> npt.NDArray[np.uint8]:
    """The predicted label map on the series' grid (each channel's probability resampled,
    then the most probable label per voxel), and its volumes per structure."""
    if np.ndim(result) == 3:  # one structure: its probability, cut at 0.5
        prob = to_original_grid(result, model_affine, shape, affine)
        mask = (prob >= 0.5).astype(np.uint8)
        res.probability = round(float(prob.max()), 6)
    else:
        channels = np.stack([to_original_grid(c, model_affine, shape, affine) for c in result])
        channels[0] += channels.sum(axis=0) == 0  # outside the model's view: background
        mask = np.argmax(channels, axis=0).astype(np.uint8)
        res.probability = round(float(channels[1:].max()), 6)
    voxel_ml = float(abs(np.linalg.det(affine[:3, :3]))) / 1000.0
    if len(spec.labels) == 1:  # one lesion: its voxels, volume and whether there is one
        res.lesion_voxels = int(np.count_nonzero(mask))
        res.lesion_ml = round(res.lesion_voxels * voxel_ml, 3)
        res.label = int(res.lesion_voxels > 0)
    res.extra = {
        f"volume_ml_{name}": round(int((mask == i).sum()) * voxel_ml, 3)
        for i, name in enumerate(spec.labels, start=1)
    }
    return mask
