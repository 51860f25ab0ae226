"""Training throughput of medimg's loop against a plain MONAI tutorial loop, side by side.

Same model (the 3D ResNet classifier of the params), same cached data, transforms, batch
size and epochs; both validate once per epoch as the MONAI tutorials do. Prints training
samples per second for both, their ratio (above 1: medimg is faster), and for the plain
loop the share of its time spent outside forward and backward passes.

Run: ``python bench/train.py [--patients N] [--epochs E]``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from cohort import scratch_params

from medimg import stages
from medimg.config import Params, TaskTrainParams
from medimg.train import _split_items, build_model, seed_everything
from medimg.transforms import training_transforms


def plain_monai_loop(params: Params, processed: Path, epochs: int) -> tuple[float, float, int]:
    """The MONAI tutorial shape: CacheDataset, DataLoader, forward/backward/step, validate."""
    from monai.data import CacheDataset, DataLoader

    cfg = params.train.classify
    seed_everything(0)
    train_items, val_items = _split_items(processed, params.train.fold, False)
    train_t = training_transforms("classify", params.augment, train=True, with_label=False)
    val_t = training_transforms("classify", params.augment, train=False, with_label=False)
    ds = CacheDataset(train_items, transform=train_t, progress=False)
    loader = DataLoader(ds, batch_size=cfg.batch_size, shuffle=True, num_workers=0)
    model = build_model("classify", cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    fwd_bwd, samples = 0.0, 0
    t0 = time.perf_counter()
    for _ in range(epochs):
        model.train()
        for batch in loader:
            t = time.perf_counter()
            loss = loss_fn(model(batch["image"]).squeeze(1), batch["y"].float())
            opt.zero_grad()
            loss.backward()
            fwd_bwd += time.perf_counter() - t
            opt.step()
            samples += len(batch["image"])
        model.eval()
        with torch.no_grad():
            for item in val_items:
                model(val_t(dict(item))["image"][None])
    return time.perf_counter() - t0, fwd_bwd, samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=24)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        params = scratch_params(root, args.patients)
        cls = TaskTrainParams(arch="resnet18", epochs=args.epochs, patience=args.epochs + 1)
        params = params.model_copy(
            update={"train": params.train.model_copy(update={"classify": cls})}
        )
        stages.synth(params)
        stages.ingest(params)
        stages.preprocess(params)
        n_train = len(_split_items(root / "processed", params.train.fold, False)[0])
        t0 = time.perf_counter()
        stages.train(params, "classify")
        t_medimg = time.perf_counter() - t0
        t_plain, fwd_bwd, samples = plain_monai_loop(params, root / "processed", args.epochs)
    n = n_train * args.epochs
    print(f"{n_train} training volumes x {args.epochs} epochs, batch {cls.batch_size}, {cls.arch}")
    print(f"medimg loop:      {n / t_medimg:6.2f} samples/s  ({t_medimg:.1f} s)")
    print(f"plain MONAI loop: {samples / t_plain:6.2f} samples/s  ({t_plain:.1f} s)")
    print(f"ratio medimg/plain: {(n / t_medimg) / (samples / t_plain):.2f}x")
    print(f"plain loop, share outside forward+backward: {100 * (1 - fwd_bwd / t_plain):.1f} %")


if __name__ == "__main__":
    main()
