from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from monai.data import CacheDataset, Dataset, PersistentDataset

from medimg.config import AugmentParams, LoaderParams
from medimg.data.datasets import (
    build_dataset,
    build_loader,
    cache_capacity,
    items,
    structure_ratios,
)
from medimg.transforms import training_transforms
from tests.helpers import Processed


def test_cache_respects_memory_budget(tiny_processed: Processed, tmp_path) -> None:
    table = pd.read_parquet(tiny_processed.processed / "manifest.parquet")
    data = items(tiny_processed.processed, table)
    transform = training_transforms(AugmentParams(), train=True)
    item_bytes = 2 * 4 * 64 * 48 * 48  # image and mask, float32
    budget = 5.5 * item_bytes / 2**30  # room for five items and a half
    assert cache_capacity(data, training_transforms(AugmentParams(), train=False), budget) == 5
    ds = build_dataset(data, transform, LoaderParams(dataset="cache", cache_gib=budget))
    assert isinstance(ds, CacheDataset) and ds.cache_num == 5
    assert len(ds) == len(data)
    big = build_dataset(data, transform, LoaderParams(dataset="cache", cache_gib=8))
    assert big.cache_num == len(data)
    assert isinstance(build_dataset(data, transform, LoaderParams(dataset="plain")), Dataset)
    persistent = build_dataset(data, transform, LoaderParams(dataset="persistent"), tmp_path)
    assert isinstance(persistent, PersistentDataset)
    loader = build_loader(ds, LoaderParams(), batch_size=4, shuffle=True)
    batch = next(iter(loader))
    assert tuple(batch["image"].shape) == (4, 1, 64, 48, 48)
    assert set(batch["y"].tolist()) <= {0.0, 1.0}


def test_small_structures_are_patch_centres_more_often(tmp_path: Path) -> None:
    table = pd.DataFrame(
        {
            "split": ["0", "1", "1", "test"],
            # body, liver, lesion voxels per volume; fold 1 trains, the test set never does
            "label_voxels": [[4000, 400, 40], [5000, 500, 0], [3000, 300, 60], [1, 1, 10**6]],
        }
    )
    table.to_parquet(tmp_path / "manifest.parquet")
    ratios = structure_ratios(tmp_path, 0, 3, positive_ratio=1.0)
    shares = np.array([8000, 800, 60], dtype=float)  # the training folds' (1) counts
    expected = np.sqrt(shares.max() / shares)
    assert ratios == pytest.approx(list(expected / expected.mean()), rel=1e-5)
    assert ratios[2] > ratios[1] > ratios[0] and np.mean(ratios) == pytest.approx(1.0)
    assert structure_ratios(tmp_path, 0, 4, 2.0)[3] == 0.0  # a structure never labelled
