"""The MONAI transforms: thick slices are not smeared, training patches have the patch
shape and hold lesions, validation transforms are deterministic."""

from __future__ import annotations

import numpy as np
import pandas as pd

from tests.helpers import Processed


def test_anisotropic_stack_is_not_smeared_across_slices() -> None:
    import torch
    from monai.data import MetaTensor

    from medimg.transforms import AnisotropicSpacingd

    data = torch.zeros((1, 20, 20, 6))
    for k in range(6):
        data[..., k] = float(k + 1)  # one value per thick slice
    affine = torch.diag(torch.tensor([1.0, 1.0, 5.0, 1.0]))
    out = AnisotropicSpacingd(["image"], (2.0, 2.0, 2.0), ratio=3.0)(
        {"image": MetaTensor(data, affine=affine)}
    )["image"]
    assert out.shape[1:3] == (10, 10)
    assert set(torch.unique(out).tolist()) <= {1.0, 2.0, 3.0, 4.0, 5.0, 6.0}  # no blends
    smooth = AnisotropicSpacingd(["image"], (2.0, 2.0, 2.0), ratio=10.0)(
        {"image": MetaTensor(data, affine=affine)}
    )["image"]
    assert len(torch.unique(smooth)) > 6  # below the ratio: linear interpolation


def test_training_transforms_shapes_and_randomness(tiny_processed: Processed) -> None:
    from medimg.config import AugmentParams
    from medimg.transforms import training_transforms

    row = pd.read_parquet(tiny_processed.processed / "manifest.parquet").query("label == 1").iloc[0]
    item = {
        "image": str(tiny_processed.processed / row.image),
        "label": str(tiny_processed.processed / row["mask"]),
    }
    aug = AugmentParams()
    patches = training_transforms(aug, train=True, patches=True)(dict(item))
    assert len(patches) == aug.patches_per_volume
    assert tuple(patches[0]["image"].shape) == (1, *aug.patch_size)
    assert any(p["label"].sum() > 0 for p in patches)  # lesion-centred patches
    val = training_transforms(aug, train=False)
    a, b = val(dict(item)), val(dict(item))
    assert tuple(a["image"].shape) == (1, *tiny_processed.params.preprocess.spatial_size)
    assert np.array_equal(a["image"].numpy(), b["image"].numpy())
