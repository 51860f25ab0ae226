"""Training and inference cost of the segmenter's encoders, side by side in one process.

The demo's budget on a CPU is set by the segmenter's training step: one forward and
backward pass and one fused AdamW step on a batch of the params' patches
(``augment.patch_size``, ``train.segment.batch_size``), with the params' structures as
output channels. This script times that step, and a sliding-window-sized forward pass in
inference mode, for each encoder named on the command line, built as ``build_model``
builds the params' segmenter with only ``arch`` changed, or ``arch:width`` (``resnet10:32``:
``train.segment.width`` too, the decoder's channels scaled by the width's ratio to the
params' width, at least 4), or ``arch:width:decoder`` (``resnet10:64:128,64,32,16,8``).

``--batches`` times each encoder at several batch sizes too: on a CPU a small batch of
small patches is dominated by per-step costs that do not grow with it (oneDNN's weight
reorders, the optimiser), so the cost per patch is compared as well.

The variants alternate (A, B, ..., then B, A, ...) so that other work on the machine
falls on all of them alike; each timed step follows warm-up steps of its own, every
round is printed, and the summary gives the median step per variant and the median of
each round's ratio to the first variant, per patch (above 1: the other is faster).
Weights are random: the cost of a step does not depend on them.

Run: ``python bench/encoders.py [--archs resnet18 resnet10 resnet10:32] [--batches 2 8]
[--rounds 5] [--steps 4]`` (about 1 min on 2 CPU cores with the defaults). For the kernels
of reproducible mode (AVX2) on a newer CPU, run it with ``ATEN_CPU_CAPABILITY=avx2
ONEDNN_MAX_CPU_ISA=AVX2`` in the environment.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from medimg.config import SegmentParams, load_params
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
    ap.add_argument("--batches", nargs="+", type=int, help="default: the params' batch size")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    params = load_params(args.params)
    cfg = params.train.segment
    patch = tuple(params.augment.patch_size)
    outputs = len(params.structures) + 1
    batches = args.batches or [cfg.batch_size]
    variants = [(a, b) for a in args.archs for b in batches]
    names = [f"{a} x{b}" for a, b in variants]
    inputs = {
        b: (torch.randn(b, 1, *patch), torch.randint(0, outputs, (b, *patch))) for b in batches
    }

    def variant_cfg(spec: str) -> SegmentParams:
        arch, _, rest = spec.partition(":")
        width, _, channels = rest.partition(":")
        if not width:
            return cfg.model_copy(update={"arch": arch})
        w = int(width)
        decoder = (
            tuple(int(c) for c in channels.split(","))
            if channels
            else tuple(max(4, c * w // cfg.width) for c in cfg.decoder_channels)
        )
        return SegmentParams.model_validate(
            {**cfg.model_dump(), "arch": arch, "width": w, "decoder_channels": decoder}
        )

    cfgs = {a: variant_cfg(a) for a in args.archs}
    models = {a: build_model("segment", c, outputs) for a, c in cfgs.items()}
    optims = {
        a: build_optimizer([{"params": list(m.parameters())}], cfg) for a, m in models.items()
    }
    loss = torch.nn.CrossEntropyLoss()

    def step(variant: tuple[str, int]) -> float:
        arch, (x, target) = variant[0], inputs[variant[1]]
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
            model(inputs[batches[0]][0][:1])
            return time.perf_counter() - t

    print(f"{cpu_name()}, {args.threads} threads, torch {torch.__version__}")
    print(f"batches {batches} x {patch} voxels, {outputs} output channels")
    for a, m in models.items():
        c = cfgs[a]
        print(
            f"  {a}: {sum(p.numel() for p in m.parameters()) / 1e6:.1f} M parameters, width"
            f" {c.width}, decoder {list(c.decoder_channels)}"
        )
    for v in variants:  # warm-up: kernels, allocator, optimiser state
        for _ in range(2):
            step(v)
    times: dict[str, list[float]] = {n: [] for n in names}
    inference: dict[str, list[float]] = {a: [] for a in args.archs}
    ratios: dict[str, list[float]] = {n: [] for n in names[1:]}
    for r in range(args.rounds):
        order = list(zip(variants, names, strict=True))
        this = {
            n: statistics.median(step(v) for _ in range(args.steps))
            for v, n in order[:: 1 if r % 2 == 0 else -1]
        }
        for n in names:
            times[n].append(this[n])
        for a in args.archs:
            inference[a].append(infer(a))
        per_patch = {n: this[n] / b for (_, b), n in order}
        for n in names[1:]:
            ratios[n].append(per_patch[names[0]] / per_patch[n])
        print(f"round {r + 1}: " + ", ".join(f"{n} {this[n]:.3f} s" for n in names))
    print("summary (medians):")
    for (_, b), n in zip(variants, names, strict=True):
        step_s = statistics.median(times[n])
        ratio = f", {statistics.median(ratios[n]):.2f}x {names[0]} per patch" if n in ratios else ""
        print(f"  {n}: training step {step_s:.3f} s, {b / step_s:.1f} patches/s{ratio}")
    for a in args.archs:
        print(f"  {a}: inference window {statistics.median(inference[a]):.3f} s")


if __name__ == "__main__":
    main()
