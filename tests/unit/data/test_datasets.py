from __future__ import annotations

import pandas as pd
from monai.data import CacheDataset, Dataset, PersistentDataset

from medimg.config import AugmentParams, LoaderParams
from medimg.data.datasets import build_dataset, build_loader, cache_capacity, items
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
