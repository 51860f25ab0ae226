"""The fine-tuning loop, for every task. No tracking imports: progress goes out via callbacks.

What a run does, per epoch: train on every fold but the validation one (augmented,
AdamW, warm-up then cosine schedule, optional gradient accumulation, AMP on CUDA),
validate (the task's metric: AUROC for diagnosis, mean Dice with sliding windows for
segmentation), keep the best weights, stop early after ``patience`` epochs without
improvement, and write a checkpoint atomically (:mod:`medimg.checkpoint`). The randomness
of epoch e depends only on (seed, e), so a run resumed after epoch k is the same, bit for
bit on CPU, as one never stopped.

What differs between tasks (network, loss, metric) comes from :mod:`medimg.tasks`; 2D
models train on axial slices with the same loop. ``torchrun --nproc_per_node=N -m
medimg.cli train ...`` runs DistributedDataParallel; rank 0 validates and writes.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import Dataset
from torch import nn

from medimg import runtime
from medimg.checkpoint import (
    CHECKPOINT,
    WEIGHTS,
    BackgroundWriter,
    checkpoint_payload,
    live_tensors,
    resume_state,
    weights_payload,
)
from medimg.config import AugmentParams, LoaderParams, Params, TaskTrainParams
from medimg.data import datasets as D
from medimg.data.manifest import read_classes
from medimg.infer import plain
from medimg.io import atomic_write_text, remove_temporaries
from medimg.models.pretrained import LoadReport, freeze_encoder, load_pretrained, param_groups
from medimg.optim import EarlyStopping, build_optimizer, lr_schedule
from medimg.report import write_model_card, write_training_summary
from medimg.tasks import TaskSpec, configured_task

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run reads: its task's section and the shared settings."""

    model: TaskTrainParams  # train.<task>: the network and its optimisation
    augment: AugmentParams
    loader: LoaderParams
    seed: int = 0  # train.seed
    device: str = "auto"  # train.device
    amp: bool = True  # train.amp (CUDA only)
    fold: int = 0  # train.fold, the validation fold
    reproducible: bool = False  # train.reproducible: pin what makes CPU results vary
    threads: int = 2  # train.threads, in reproducible mode
    resolved: Mapping[str, Any] = field(default_factory=dict)  # saved with the weights
    pretrained_file: Path | None = None  # the local file model.pretrained resolves to,
    # when that is an MLflow model URI (medimg.tracking.pretrained_file)

    @classmethod
    def from_params(cls, params: Params, task: TaskSpec) -> TrainConfig:
        t = params.train
        return cls(
            model=task.train_params(t),
            augment=params.augment,
            loader=params.loader,
            seed=t.seed,
            device=t.device,
            amp=t.amp,
            fold=t.fold,
            reproducible=t.reproducible,
            threads=t.threads,
            resolved=params.model_dump_for_model(),
        )


@dataclass(frozen=True)
class EpochLog:
    """What one epoch measured; callbacks receive it."""

    epoch: int  # 1-based
    train_loss: float
    val_loss: float
    val_metric: float  # the task's validation metric (AUROC, mean Dice)
    lr: float
    seconds: float
    best: bool  # this epoch's weights are the best so far


Callback = Callable[[EpochLog], None]


@dataclass
class TrainResult:
    task: str
    best_epoch: int
    best_metric: float
    epochs_run: int
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped_early: bool = False
    initialisation: str = "pretrained: none (random initialisation)"  # the load report
    environment: dict[str, str] = field(default_factory=dict)  # medimg.runtime.environment


@dataclass
class Components:
    """What :meth:`Trainer.build_components` makes: the data, the model and its optimiser."""

    loader: Any  # the training loader
    val_data: Dataset | list[dict[str, Any]]  # prepared validation items (rank 0)
    train_transform: Any  # reseeded every epoch
    generator: torch.Generator  # the loader's shuffling, reseeded every epoch
    sampler: Any  # DistributedSampler under DDP, else None
    model: nn.Module
    net: nn.Module  # what the loop calls: the model or its DDP wrapper
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    loss_fn: nn.Module
    report: LoadReport | None  # what the pretrained weights gave


class Trainer:
    """One task's training run; see the module docstring."""

    def __init__(self, task: TaskSpec, config: TrainConfig, processed: Path, out_dir: Path):
        self.task, self.config = task, config
        self.processed, self.out_dir = processed, out_dir
        self.device = runtime.resolve_device(config.device)
        self.amp = config.amp and self.device.type == "cuda"
        self.rank, self.world = runtime.distributed()
        self.writer = BackgroundWriter()

    def _loaders(self) -> tuple[Any, Any, Any, Any, Dataset | list[dict[str, Any]]]:
        """The training loader (with its transform, sampler and generator) and the
        validation items transformed (rank 0; cached within what the training cache
        leaves of the memory budget)."""
        from medimg.transforms import training_transforms

        cfg, masks = self.config, self.task.with_masks
        classes = self.task.training_classes()
        train_items, val_items = D.fold_items(self.processed, cfg.fold, masks, classes)
        self.train_labels, dims = [it["y"] for it in train_items], cfg.model.spatial_dims
        k = self.task.n_outputs - 1  # of a task that learns label maps: its structures
        ratio = cfg.augment.positive_ratio
        ratios = D.structure_ratios(self.processed, cfg.fold, k, ratio) if masks and k > 1 else None
        transform = training_transforms(
            cfg.augment, train=True, with_label=masks, patches=masks, spatial_dims=dims,
            ratios=ratios)  # fmt: skip
        ds = D.build_dataset(train_items, transform, cfg.loader)
        generator = torch.Generator()
        weights = self.task.sample_weights(cfg.model, self.train_labels)
        sampler = D.training_sampler(ds, weights, self.world > 1, cfg.seed, generator)
        loader = D.build_loader(
            ds,
            cfg.loader,
            batch_size=cfg.model.batch_size,
            shuffle=True,
            prefetch=self.device.type == "cuda",
            sampler=sampler,
            generator=generator,
        )
        if self.rank > 0:  # only rank 0 validates
            return loader, transform, sampler, generator, []
        val_transform = training_transforms(
            cfg.augment, train=False, with_label=masks, spatial_dims=dims
        )
        left = max(0.0, cfg.loader.cache_gib - D.cached_gib(ds))
        val_cfg = cfg.loader.model_copy(update={"cache_gib": left})
        val_data = D.build_dataset(val_items, val_transform, val_cfg)
        return loader, transform, sampler, generator, val_data

    def build_components(self) -> Components:
        """Loaders, the model (with its pretrained weights), optimiser, schedule, scaler
        and loss, in an order that fixes what the random generators give each."""
        cfg = self.config.model
        loader, transform, sampler, generator, val_data = self._loaders()
        model = self.task.build(cfg).to(self.device)
        report = None
        if cfg.pretrained != "none":
            local = self.config.pretrained_file
            report = load_pretrained(
                model,
                local or cfg.pretrained,
                self.task.name,
                cfg.min_loaded_fraction,
                name=cfg.pretrained if local else None,
            )
        groups = param_groups(model, self.task.name, cfg.lr, cfg.head_lr_mult)
        optimizer = build_optimizer(groups, cfg)
        steps = max(1, math.ceil(len(loader) / cfg.accumulate))
        schedule = lr_schedule(cfg.warmup_epochs * steps, cfg.epochs * steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp)
        net: nn.Module = model
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            net = DistributedDataParallel(model, device_ids=ids)
        return Components(
            loader, val_data, transform, generator, sampler, model, net,
            optimizer, scheduler, scaler, self.task.loss(cfg, self.train_labels), report,
        )  # fmt: skip

    def batch_loss(self, net: nn.Module, batch: dict[str, Any], loss_fn: nn.Module) -> torch.Tensor:
        x = plain(batch["image"]).to(self.device)
        with torch.autocast(self.device.type, enabled=self.amp):
            return self.task.batch_loss(loss_fn, net(x), batch, self.device)

    def train_one_epoch(self, c: Components, epoch: int) -> float:
        """One pass over the training data; the mean training loss per sample."""
        cfg = self.config.model
        # Epoch e's randomness is a function of (seed, e): resuming repeats it exactly.
        epoch_seed = self.config.seed * 1000 + epoch
        runtime.seed_everything(epoch_seed)
        c.generator.manual_seed(epoch_seed)
        c.train_transform.set_random_state(seed=epoch_seed)
        if c.sampler is not None:
            c.sampler.set_epoch(epoch)
        freeze_encoder(c.model, self.task.name, epoch <= cfg.freeze_encoder_epochs)
        c.net.train()
        total, n = 0.0, 0
        c.optimizer.zero_grad(set_to_none=True)
        for i, batch in enumerate(c.loader):
            loss = self.batch_loss(c.net, batch, c.loss_fn)
            c.scaler.scale(loss / cfg.accumulate).backward()
            if (i + 1) % cfg.accumulate == 0 or i + 1 == len(c.loader):
                # the writer reads the live weights and optimiser state: the first step
                # after an epoch's end waits until it has written them
                self.writer.drain()
                c.scaler.step(c.optimizer)
                c.scaler.update()
                c.optimizer.zero_grad(set_to_none=True)
                c.scheduler.step()
            total += float(loss.detach()) * len(batch["image"])
            n += len(batch["image"])
        return total / max(n, 1)

    def validate(
        self, model: nn.Module, val_items: Sequence[dict[str, Any]] | Dataset
    ) -> tuple[float, float]:
        """(loss, metric) over prepared validation items, a training batch at a time."""
        losses: list[float] = []
        outputs: list[Any] = []
        size, patch = self.config.model.batch_size, self.config.augment.patch_size
        for start in range(0, len(val_items), size):
            chunk = [val_items[i] for i in range(start, min(start + size, len(val_items)))]
            image = torch.stack([torch.as_tensor(d["image"]) for d in chunk])  # (B, 1, R, A, S)
            prob = self.task.predict(model, image, patch, self.device, self.amp)
            chunk_losses, chunk_outputs = self.task.validation_batch(prob, chunk)
            losses += chunk_losses
            outputs += chunk_outputs
        return float(np.mean(losses)), float(self.task.validation_metric(outputs))

    def run(self, callbacks: Sequence[Callback] = (), resume: bool = False) -> TrainResult:
        if self.device.type == "cpu":
            runtime.tune_allocator()
        runtime.seed_everything(self.config.seed)
        c = self.build_components()
        cfg, out = self.config.model, self.out_dir
        stopper = EarlyStopping(cfg.patience, self.task.maximize)
        state: dict[str, Any] = {"epoch": 0, **stopper.state(), "history": []}
        if resume and (out / CHECKPOINT).is_file():
            state = resume_state(
                out / CHECKPOINT, self.device, c.model, c.optimizer, c.scheduler, c.scaler, state
            )
            for key in stopper.state():
                setattr(stopper, key, state[key])
            log.info("resumed %s training after epoch %d", self.task.name, state["epoch"])
        stopped_early = False
        with self.writer:  # every file is on disk (or its error raised) when the block ends
            for epoch in range(state["epoch"] + 1, cfg.epochs + 1):
                if stopper.stop:
                    stopped_early = True
                    break
                t0 = time.perf_counter()
                train_loss = self.train_one_epoch(c, epoch)
                val_loss, val_metric, best = math.nan, math.nan, False
                if self.rank == 0 and (epoch % cfg.val_every == 0 or epoch == cfg.epochs):
                    val_loss, val_metric = self.validate(c.model, c.val_data)
                    best = stopper.update(epoch, val_metric, val_loss)
                if best:
                    payload = weights_payload(
                        c.model, self.task.name, dict(self.config.resolved), self.task.describe()
                    )
                    self.writer.save(payload, out / WEIGHTS, live=live_tensors(c.model))
                if self.world > 1:
                    stopper.share()
                seconds = time.perf_counter() - t0
                lr = float(c.scheduler.get_last_lr()[0])
                entry = EpochLog(epoch, train_loss, val_loss, val_metric, lr, seconds, best)
                state = {"epoch": epoch, **stopper.state(), "history": state["history"]}
                state["history"].append(asdict(entry))
                if self.rank == 0:
                    self._end_epoch(c, state, callbacks, entry)
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()
        return TrainResult(
            task=self.task.name,
            best_epoch=int(stopper.best_epoch),
            best_metric=float(stopper.best_metric),
            epochs_run=int(state["epoch"]),
            history=list(state["history"]),
            stopped_early=stopped_early,
            initialisation=c.report.summary() if c.report else TrainResult.initialisation,
        )

    def _end_epoch(
        self, c: Components, state: dict[str, Any], callbacks: Sequence[Callback], e: EpochLog
    ) -> None:
        """Rank 0 at an epoch's end: the resume file (no zip CRC, see
        :func:`~medimg.checkpoint.save`), the callbacks, the log line."""
        payload = checkpoint_payload(c.model, c.optimizer, c.scheduler, c.scaler, state)
        live = live_tensors(c.model, c.optimizer)
        self.writer.save(payload, self.out_dir / CHECKPOINT, live, crc32=False)
        for cb in callbacks:
            cb(e)
        shown = (  # nothing for an epoch that was not validated (val_every)
            f", val loss {e.val_loss:.4f}, val {self.task.val_metric_title} {e.val_metric:.4f}"
            if math.isfinite(e.val_loss)
            else ""
        )
        log.info("%s epoch %d: train loss %.4f%s%s", self.task.name, e.epoch, e.train_loss,
                 shown, " (best)" if e.best else "")  # fmt: skip


def _configured(task: str, config: TrainConfig, processed: Path) -> TaskSpec:
    params = Params.model_validate(config.resolved) if config.resolved else Params()
    return configured_task(task, params, read_classes(processed))


def train(
    task: TaskSpec | str,
    config: TrainConfig,
    processed: Path,
    out_dir: Path,
    metrics_file: Path | None = None,
    callbacks: Sequence[Callback] = (),
    resume: bool = False,
) -> TrainResult:
    """Train one task; write ``out_dir/model.pt`` (best weights), ``checkpoint.pt``,
    ``config.json``, ``model_card.md`` and, when given, ``metrics_file`` (history and
    best epoch)."""
    spec = task if isinstance(task, TaskSpec) else _configured(task, config, processed)
    # before the run's first tensor operation: the libraries read their settings once
    env = (
        runtime.pin_reproducible(config.threads)
        if config.reproducible
        else runtime.environment(False)
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    # a run killed while writing leaves its temporary files: a rerun starts without them
    remove_temporaries(out_dir)
    if metrics_file is not None and metrics_file.parent.is_dir():
        remove_temporaries(metrics_file.parent, metrics_file.name)
    trainer = Trainer(spec, config, processed, out_dir)
    try:
        result = trainer.run(callbacks, resume=resume)
    finally:
        if trainer.world > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
    result.environment = env
    if trainer.rank == 0:
        write_model_card(
            out_dir / "model_card.md",
            spec,
            config.model,
            result,
            manifest=processed / "manifest.parquet",
            fold=config.fold,
            seed=config.seed,
        )
        atomic_write_text(
            out_dir / "config.json",
            json.dumps(dict(config.resolved), indent=1, sort_keys=True, default=str),
        )
        if metrics_file is not None:
            write_training_summary(metrics_file, spec.val_metric, result)
    return result
