"""Training and inference cost of the segmenter's encoders, side by side in one process.

The demo's budget on a CPU is set by the segmenter's training step: one forward and
backward pass and one fused AdamW step on a batch of the params' patches
(``augment.patch_size``, ``train.segment.batch_size``), with the params' structures as
output channels. This script times that step, and a sliding-window-sized forward pass in
inference mode, for each encoder named on the command line, built as ``build_model``
builds the params' segmenter with only ``arch`` changed.

The encoders alternate (A, B, ..., then B, A, ...) so that other work on the machine
falls on all of them alike; each timed step follows warm-up steps of its own, every
round is printed, and the summary gives the median step per encoder and the median of
each round's ratio to the first encoder (above 1: the other encoder is faster).
Weights are random: the cost of a step does not depend on them.

Run: ``python bench/encoders.py [--archs resnet18 resnet10] [--rounds 5] [--steps 4]``
(about 1 min on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from medimg.config import load_params
from medimg.models.build import build_model
from medimg.optim import build_optimizer
from medimg.runtime import environment

ROOT = Path(__file__).resolve().parent.parent


def cpu_name() -> str:
    """The CPU as runs record it (``medimg.runtime``), the kernels PyTorch picks on it."""
    capability = torch.backends.cpu.get_cpu_capability()
    return f"{environment(False)['machine']} ({capability} kernels, {os.cpu_count()} CPUs)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--archs", nargs="+", default=["resnet18", "resnet10"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per round (median)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    params = load_params(args.params)
    cfg = params.train.segment
    patch = tuple(params.augment.patch_size)
    outputs = len(params.structures) + 1
    x = torch.randn(cfg.batch_size, 1, *patch)
    target = torch.randint(0, outputs, (cfg.batch_size, *patch))
    models = {
        a: build_model("segment", cfg.model_copy(update={"arch": a}), outputs) for a in args.archs
    }
    optims = {
        a: build_optimizer([{"params": list(m.parameters())}], cfg) for a, m in models.items()
    }
    loss = torch.nn.CrossEntropyLoss()

    def step(arch: str) -> float:
        model, opt = models[arch], optims[arch]
        model.train()
        t = time.perf_counter()
        loss(model(x), target).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    def infer(arch: str) -> float:
        model = models[arch].eval()
        with torch.inference_mode():
            t = time.perf_counter()
            model(x[:1])
            return time.perf_counter() - t

    print(f"{cpu_name()}, {args.threads} threads, torch {torch.__version__}")
    print(f"batch {cfg.batch_size} x {patch} voxels, {outputs} output channels")
    for a, m in models.items():
        print(f"  {a}: {sum(p.numel() for p in m.parameters()) / 1e6:.1f} M parameters")
    for a in args.archs:  # warm-up: kernels, allocator, optimiser state
        for _ in range(2):
            step(a)
    times: dict[str, list[float]] = {a: [] for a in args.archs}
    inference: dict[str, list[float]] = {a: [] for a in args.archs}
    ratios: dict[str, list[float]] = {a: [] for a in args.archs[1:]}
    for r in range(args.rounds):
        order = args.archs if r % 2 == 0 else args.archs[::-1]
        this = {a: statistics.median(step(a) for _ in range(args.steps)) for a in order}
        for a in order:
            times[a].append(this[a])
            inference[a].append(infer(a))
        for a in args.archs[1:]:
            ratios[a].append(this[args.archs[0]] / this[a])
        print(f"round {r + 1}: " + ", ".join(f"{a} {this[a]:.3f} s" for a in args.archs))
    first = args.archs[0]
    print("summary (medians):")
    for a in args.archs:
        ratio = f", {statistics.median(ratios[a]):.2f}x {first}" if a in ratios else ""
        print(
            f"  {a}: training step {statistics.median(times[a]):.3f} s, "
            f"inference window {statistics.median(inference[a]):.3f} s{ratio}"
        )


if __name__ == "__main__":
    main()
