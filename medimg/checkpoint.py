"""Checkpoints and best weights: written in the background, atomically, byte-deterministic.

A training run writes ``model.pt`` (the best weights so far, with the resolved config) and
``checkpoint.pt`` (everything a resumed run needs: weights, optimiser, scheduler, scaler,
RNG state, early-stopping state and history) after each epoch. :class:`BackgroundWriter`
writes them on one thread while the next epoch trains; :func:`save` makes each file
atomically and byte for byte the same for the same content, so a run resumed after a kill
writes what an uninterrupted one does. :func:`resume_state` reads a checkpoint back.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medimg.io import atomic_rewrite, remove_spare

CHECKPOINT = "checkpoint.pt"  # the resume file in the model folder
WEIGHTS = "model.pt"  # the best weights in the model folder


class BackgroundWriter:
    """Writes checkpoints and best weights on one thread while the next epoch trains.

    :meth:`save` takes a snapshot at once and queues the write; files are written in order,
    each atomically (:func:`save`). The snapshot copies every tensor except the ``live``
    ones, CPU tensors that only the optimiser step changes (weights, Adam moments): those
    are written in place, and the trainer calls :meth:`drain` before each optimiser step,
    so the first step of the next epoch waits until they are on disk (copying them instead
    costs more than the first batch's passes hide: docs/performance.md). Buffers that a
    forward pass changes (batch-norm statistics) are copied.

    :meth:`drain` raises a failed write's error (a full disk fails the run at the next
    step, not silently); :meth:`close` (or leaving a ``with`` block) drains, stops the
    thread and deletes the spare copies that rewriting keeps (:func:`save`). A run killed
    mid-write leaves the previous file whole and temporary files that the next run removes.
    """

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="medimg-checkpoint")
        self._pending: list[Future[None]] = []
        self._targets: set[Path] = set()

    def save(
        self, payload: dict[str, Any], target: Path, live: frozenset[int], crc32: bool = True
    ) -> None:
        self._targets.add(target)
        self._pending.append(self._pool.submit(save, snapshot(payload, live), target, crc32))

    def drain(self) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()

    def close(self) -> None:
        try:
            self.drain()
        finally:
            self._pool.shutdown(wait=True)
            for target in self._targets:  # the spare copies kept for rewriting, no longer
                remove_spare(target)

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def live_tensors(model: nn.Module, optimizer: Any = None) -> frozenset[int]:
    """Storage addresses of the CPU tensors that only an optimiser step changes."""
    tensors: list[torch.Tensor] = list(model.parameters())
    if optimizer is not None:
        for state in optimizer.state.values():
            tensors += [v for k, v in state.items() if k != "step" and torch.is_tensor(v)]
    return frozenset(t.untyped_storage().data_ptr() for t in tensors if t.device.type == "cpu")


def _map(obj: Any, leaf: Callable[[Any], Any]) -> Any:
    """``obj`` rebuilt with ``leaf`` applied to every value and dict key below it."""
    if isinstance(obj, dict):
        return {_map(k, leaf): _map(v, leaf) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_map(v, leaf) for v in obj)
    return leaf(obj)


def snapshot(obj: Any, live: frozenset[int] = frozenset()) -> Any:
    """``obj`` with every tensor copied to the CPU but the ``live`` ones (state dicts share
    storage with the model and optimiser)."""

    def copy(value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        if value.device.type == "cpu" and value.untyped_storage().data_ptr() in live:
            return value.detach()
        return value.detach().to("cpu", copy=True)

    return _map(obj, copy)


def _canonical(obj: Any) -> Any:
    """``obj`` with every string interned: pickle writes a string once per object, so
    equal strings must be one object (a resumed run's are partly unpickled copies)."""
    return _map(obj, lambda value: sys.intern(value) if isinstance(value, str) else value)


def save(payload: dict[str, Any], target: Path, crc32: bool = True) -> None:
    """``torch.save`` atomically, byte for byte the same for the same content (a resumed
    run writes what an uninterrupted one does): through a file object, since with a path
    torch names the archive's root folder after the file, here a random temporary name;
    and with canonical strings (:func:`_canonical`). The file is rewritten in place of the
    version before last (:func:`~medimg.io.atomic_rewrite`): a run rewrites its checkpoint
    every epoch, and overwriting a file costs the kernel a fraction of writing a new one.

    ``crc32=False`` leaves the zip records' CRC-32 at zero, half the CPU time of writing a
    large checkpoint (docs/performance.md). ``torch.load`` never checks it (a checkpoint
    with a flipped byte loads, wrong, either way), so medimg's own resume loses nothing;
    other zip tools would report the file as damaged.
    """
    from torch.utils.serialization import config as serialization

    with (
        atomic_rewrite(target) as f,
        serialization.patch({"save.compute_crc32": crc32}),  # type: ignore[attr-defined]
    ):
        torch.save(_canonical(payload), f)


def weights_payload(
    model: nn.Module, task: str, config: dict[str, Any], outputs: dict[str, Any] | None = None
) -> dict[str, Any]:
    """What ``model.pt`` holds: the weights, the resolved config (JSON), the task and its
    outputs (class or structure names, :meth:`medimg.tasks.TaskSpec.describe`, JSON)."""
    payload = {
        "model": model.state_dict(),
        "config": json.dumps(config, sort_keys=True, default=str),
        "task": task,
    }
    if outputs is not None:
        payload["outputs"] = json.dumps(outputs, sort_keys=True)
    return payload


def checkpoint_payload(
    model: nn.Module, optimizer: Any, scheduler: Any, scaler: Any, state: dict[str, Any]
) -> dict[str, Any]:
    """What ``checkpoint.pt`` holds: every piece of training state a resumed run needs."""
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "rng_torch": torch.get_rng_state(),
        **state,
        # wall-clock seconds vary run to run: out of the checkpoint, which an
        # interrupted and resumed run must write byte for byte as an uninterrupted one
        "history": [{k: v for k, v in h.items() if k != "seconds"} for h in state["history"]],
    }


def resume_state(
    path: Path,
    device: torch.device,
    model: nn.Module,
    optimizer: Any,
    scheduler: Any,
    scaler: Any,
    state: dict[str, Any],
) -> dict[str, Any]:
    """Load ``path`` into the model and its optimiser, scheduler and scaler; return the
    training state it holds (the keys of ``state``, with ``state``'s values as defaults).
    Wall-clock seconds of resumed epochs are unknown (NaN)."""
    ckpt = torch.load(path, map_location=device, weights_only=True)
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    scaler.load_state_dict(ckpt["scaler"])
    out = {k: ckpt.get(k, v) for k, v in state.items()}
    out["history"] = [{**h, "seconds": float("nan")} for h in out["history"]]
    return out
