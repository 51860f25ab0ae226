"""Training throughput of medimg's loop against a plain MONAI tutorial loop, side by side.

Same model (the 3D ResNet classifier of the params), same cached data, transforms, batch
size and epochs; both validate once per epoch and keep the best weights on disk, as MONAI's
3D classification tutorial does (see :func:`plain_monai_loop`). Prints training
samples per second for both, their ratio (above 1: medimg is faster), and for each loop
the share of its time spent outside forward and backward passes.

Both clocks run from the call to the return: medimg's is the whole
:func:`medimg.train.train` call (building its data cache and model, writing a checkpoint
every epoch, the best weights, the model card); the plain loop's takes in building its
cache and model too, and it writes only the best weights (no checkpoint, no model card),
so the ratio, if anything, understates medimg.
A second ratio leaves the set-up out of both (from each loop's first forward pass to its
return). MLflow tracking (``stages.train``) is left out: it is an adapter at the edge, not
the loop.

Each timed run has a fresh process of its own, after one untimed epoch of its loop
(imports, kernel set-up): nothing one loop does to the process (medimg tunes glibc's
allocator, :func:`medimg.train.tune_allocator`; caches, heap) carries over to the other.
Other work on the same machine makes single timings noisy, so the loops alternate (plain,
medimg, then medimg, plain, ...), every run is printed, and the summary takes medians: of
samples/s per loop, and of the ratio of each adjacent pair.

Run: ``python bench/train.py [--patients N] [--epochs E] [--repeats R]`` (about 1.5 min
per repeat on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from cohort import scratch_params

from medimg import stages
from medimg.config import Params, TaskTrainParams
from medimg.data.datasets import fold_items
from medimg.models.build import build_model
from medimg.runtime import seed_everything
from medimg.tasks import CLASSIFY
from medimg.train import TrainConfig, Trainer, train
from medimg.transforms import training_transforms


@dataclass
class Run:
    loop: str
    seconds: float  # wall clock of the timed part
    cpu: float  # CPU time of this process (all its threads) in the timed part, seconds
    fwd_bwd: float  # of which forward and backward passes, seconds
    samples: int  # training samples seen
    setup: float = 0.0  # from the call to its first forward pass (cache, model), seconds

    @property
    def rate(self) -> float:
        return self.samples / self.seconds

    @property
    def epoch_rate(self) -> float:
        """Samples per second after the set-up: the epochs alone."""
        return self.samples / (self.seconds - self.setup)

    def line(self) -> str:
        return (
            f"{self.loop:>6}: {self.rate:6.2f} samples/s ({self.seconds:.1f} s, "
            f"set-up {self.setup:.1f} s; epochs alone {self.epoch_rate:.2f} samples/s; "
            f"outside forward+backward {100 * (1 - self.fwd_bwd / self.seconds):.1f} %; "
            f"CPU {self.cpu / self.samples:.2f} s/sample)"
        )


def plain_monai_loop(params: Params, processed: Path, epochs: int, out_dir: Path) -> Run:
    """The shape of MONAI's 3D classification tutorial (``3d_classification/torch/
    densenet_training_dict.py``): a DataLoader over the training data, forward, backward,
    step, the loss read with ``.item()`` every step; then a validation pass through a
    DataLoader over the validation items, AUROC with ``ROCAUCMetric``, and
    ``torch.save(model.state_dict())`` whenever it improves. Validation runs every epoch,
    as medimg's does (the tutorial's ``val_interval``), and the training data is cached
    (``CacheDataset``) as medimg caches it."""
    from monai.data import CacheDataset, DataLoader, Dataset
    from monai.metrics import ROCAUCMetric

    cfg = params.train.classify
    t0, cpu0 = time.perf_counter(), time.process_time()
    seed_everything(0)
    train_items, val_items = fold_items(processed, params.train.fold, False)
    train_t = training_transforms(params.augment, train=True, with_label=False)
    val_t = training_transforms(params.augment, train=False, with_label=False)
    ds = CacheDataset(train_items, transform=train_t, progress=False)
    loader = DataLoader(ds, batch_size=cfg.batch_size, shuffle=True, num_workers=0)
    val_loader = DataLoader(Dataset(val_items, transform=val_t), batch_size=cfg.batch_size)
    model = build_model("classify", cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    auc_metric = ROCAUCMetric()
    out_dir.mkdir(parents=True, exist_ok=True)
    best = -1.0
    fwd_bwd, samples, first, epoch_loss = 0.0, 0, None, 0.0
    for _ in range(epochs):
        model.train()
        for batch in loader:
            t = time.perf_counter()
            first = first or t
            loss = loss_fn(model(batch["image"]).squeeze(1), batch["y"].float())
            opt.zero_grad()
            loss.backward()
            fwd_bwd += time.perf_counter() - t
            opt.step()
            epoch_loss += loss.item()
            samples += len(batch["image"])
        model.eval()
        with torch.no_grad():
            y_pred, y = [], []
            for val in val_loader:
                y_pred.append(torch.sigmoid(model(val["image"]).squeeze(1)))
                y.append(val["y"])
            auc_metric(torch.cat(y_pred), torch.cat(y))
            auc = auc_metric.aggregate()
            auc_metric.reset()
            if float(auc) > best:
                best = float(auc)
                torch.save(model.state_dict(), out_dir / "best_metric_model.pth")
    seconds = time.perf_counter() - t0
    shutil.rmtree(out_dir)
    return Run("plain", seconds, time.process_time() - cpu0, fwd_bwd, samples, (first or t0) - t0)


@contextlib.contextmanager
def forward_backward_clock() -> Iterator[dict[str, Any]]:
    """Time medimg's training forward passes (``Trainer.batch_loss``, loss included)
    and backward passes (``Tensor.backward``) while the block runs; validation is outside."""
    clock: dict[str, Any] = {"seconds": 0.0, "first": None, "inside": False}
    forward, backward = Trainer.batch_loss, torch.Tensor.backward

    def timed_forward(self: Trainer, *args: Any, **kwargs: Any) -> torch.Tensor:
        t = time.perf_counter()
        clock["first"] = clock["first"] or t
        try:
            return forward(self, *args, **kwargs)
        finally:
            clock["seconds"] += time.perf_counter() - t

    def timed_backward(self: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        if clock["inside"]:  # a tensor subclass's backward calls Tensor.backward again
            return backward(self, *args, **kwargs)
        clock["inside"], t = True, time.perf_counter()
        try:
            backward(self, *args, **kwargs)
        finally:
            clock["inside"] = False
            clock["seconds"] += time.perf_counter() - t

    Trainer.batch_loss = timed_forward  # type: ignore[method-assign]
    torch.Tensor.backward = timed_backward  # type: ignore[method-assign]
    try:
        yield clock
    finally:
        Trainer.batch_loss = forward  # type: ignore[method-assign]
        torch.Tensor.backward = backward  # type: ignore[method-assign]


def medimg_loop(params: Params, processed: Path, out_dir: Path) -> Run:
    """The library's training function, as the CLI and the flows call it."""
    with forward_backward_clock() as clock:
        t0, cpu0 = time.perf_counter(), time.process_time()
        result = train(
            CLASSIFY,
            TrainConfig.from_params(params, CLASSIFY),
            processed,
            out_dir,
            metrics_file=out_dir / "classify_train.json",
        )
        seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    shutil.rmtree(out_dir)  # about 0.5 GB of checkpoint and weights
    n_train = len(fold_items(processed, params.train.fold, False)[0])
    samples = n_train * result.epochs_run
    return Run("medimg", seconds, cpu, clock["seconds"], samples, clock["first"] - t0)


def child(args: argparse.Namespace) -> None:
    """One loop in this fresh process: an untimed epoch (imports, kernels), then the timed
    run; its figures go to stdout as one JSON line."""
    root = Path(args.root)
    params = Params.model_validate(yaml.safe_load((root / "params.yaml").read_text()))
    processed = root / "processed"
    cls = params.train.classify
    one_epoch = params.model_copy(
        update={
            "train": params.train.model_copy(
                update={"classify": cls.model_copy(update={"epochs": 1})}
            )
        }
    )
    if args.child == "plain":
        plain_monai_loop(one_epoch, processed, 1, root / f"warmup-{args.run}")
        run = plain_monai_loop(params, processed, cls.epochs, root / f"run-{args.run}")
    else:
        medimg_loop(one_epoch, processed, root / f"warmup-{args.run}")
        run = medimg_loop(params, processed, root / f"run-{args.run}")
    print(json.dumps(asdict(run)))


def timed(loop: str, root: Path, run: int) -> Run:
    done = subprocess.run(
        [sys.executable, __file__, "--child", loop, "--root", str(root), "--run", str(run)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode:
        sys.exit(f"the {loop} loop failed:\n{done.stderr[-3000:]}")
    return Run(**json.loads(done.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=24)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each loop")
    parser.add_argument("--child", choices=("plain", "medimg"), help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--run", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
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
        (root / "params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json")))
        n_train = len(fold_items(root / "processed", params.train.fold, False)[0])
        print(
            f"{n_train} training volumes x {args.epochs} epochs, batch {cls.batch_size}, {cls.arch}"
            f"; each run in a fresh process after an untimed epoch"
        )
        ratios, epoch_ratios, cpu_ratios, runs = [], [], [], []
        for r in range(args.repeats):
            pair = []
            for loop in ("plain", "medimg") if r % 2 == 0 else ("medimg", "plain"):
                run = timed(loop, root, r)
                print(f"run {r + 1} {run.line()}", flush=True)
                pair.append(run)
            runs += pair
            by = {run.loop: run for run in pair}
            ratios.append(by["medimg"].rate / by["plain"].rate)
            epoch_ratios.append(by["medimg"].epoch_rate / by["plain"].epoch_rate)
            cpu_ratios.append(
                (by["plain"].cpu / by["plain"].samples) / (by["medimg"].cpu / by["medimg"].samples)
            )
    for loop in ("medimg", "plain"):
        mine = [run for run in runs if run.loop == loop]
        rate = statistics.median(run.rate for run in mine)
        outside = statistics.median(1 - run.fwd_bwd / run.seconds for run in mine)
        label = "medimg loop:     " if loop == "medimg" else "plain MONAI loop:"
        print(f"{label} {rate:6.2f} samples/s  (median of {len(mine)})")
        print(f"  {loop} loop, share outside forward+backward: {100 * outside:.1f} %")
    print(
        f"ratio medimg/plain: {statistics.median(ratios):.2f}x "
        f"(median; per pair {' '.join(f'{x:.2f}' for x in ratios)})"
    )
    print(
        f"ratio, epochs alone (set-up left out of both): {statistics.median(epoch_ratios):.2f}x "
        f"(median; per pair {' '.join(f'{x:.2f}' for x in epoch_ratios)})"
    )
    print(
        f"ratio in CPU time per sample, plain/medimg: {statistics.median(cpu_ratios):.2f}x "
        f"(less sensitive to other work on the machine; per pair "
        f"{' '.join(f'{x:.2f}' for x in cpu_ratios)})"
    )


if __name__ == "__main__":
    main()
