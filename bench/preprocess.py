"""Preprocessing throughput, and how long training waits for data, cached versus not.

On the demo cohort (generated into a temporary folder): volumes per second through the
deterministic MONAI chain (the preprocess stage), then one training epoch of a 3D ResNet-18
classifier step (forward, backward, optimiser) fed by

- the in-memory cache (``loader.dataset: cache``): loading is done once, only random
  augmentation runs per step;
- a plain dataset: every step loads the NIfTI files again and augments.

For each, the fraction of step time spent waiting for the next batch is printed, and the
loader's own throughput without a model (the ThreadDataLoader prefetches in a thread, so
a slower loader can still hide behind the model's step), measured in the same run.
Run: ``python bench/preprocess.py [--patients N] [--batch B]``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from cohort import scratch_params
from monai.networks.nets import resnet18

from medimg import stages
from medimg.config import (
    AugmentParams,
    LoaderParams,
)
from medimg.data.datasets import build_dataset, build_loader, items
from medimg.transforms import training_transforms


def epoch(
    loader: torch.utils.data.DataLoader, model: torch.nn.Module, opt: torch.optim.Optimizer
) -> tuple[float, float]:
    """Seconds waiting for batches and seconds in training steps, over one epoch."""
    wait = step = 0.0
    t = time.perf_counter()
    for batch in loader:
        t1 = time.perf_counter()
        wait += t1 - t
        logits = model(batch["image"]).squeeze(1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, batch["y"].float())
        opt.zero_grad()
        loss.backward()
        opt.step()
        t = time.perf_counter()
        step += t - t1
    return wait, step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=40)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        params = scratch_params(root, args.patients)
        stages.synth(params)
        stages.ingest(params)
        t0 = time.perf_counter()
        qc = stages.preprocess(params)
        t_pre = time.perf_counter() - t0
        n = qc["n_volumes"]
        print(f"deterministic chain: {n} volumes in {t_pre:.2f} s = {n / t_pre:.1f} volumes/s")

        table = pd.read_parquet(root / "processed" / "manifest.parquet")
        data = items(root / "processed", table[table["split"] != "test"])
        transform = training_transforms(AugmentParams(), train=True)
        results = {}
        for kind in ("cache", "plain"):
            cfg = LoaderParams(dataset=kind, cache_gib=2.0)  # type: ignore[arg-type]
            ds = build_dataset(data, transform, cfg)
            loader = build_loader(ds, cfg, batch_size=args.batch, shuffle=True, prefetch=True)
            model = resnet18(spatial_dims=3, n_input_channels=1, num_classes=1, conv1_t_stride=2)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            epoch(loader, model, opt)  # warm-up epoch (fills the cache, warms kernels)
            wait, step = epoch(loader, model, opt)
            results[kind] = (wait, step)
            t0 = time.perf_counter()
            n_batches = sum(1 for _ in loader)  # the loader alone, no model
            alone = time.perf_counter() - t0
            share = wait / (wait + step)
            print(
                f"{kind:>5} dataset: epoch {wait + step:6.2f} s, waiting for data {wait:5.2f} s "
                f"= {100 * share:4.1f} % of step time; "
                f"loader alone {n_batches / alone:6.1f} batches/s"
            )
        cached, plain = (results[k][0] / sum(results[k]) for k in ("cache", "plain"))
        print(f"data-wait share, cached vs plain: {100 * cached:.1f} % vs {100 * plain:.1f} %")


if __name__ == "__main__":
    main()
