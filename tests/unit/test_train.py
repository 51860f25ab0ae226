"""Training: the loss falls, runs repeat exactly, a killed run resumes to the same end,
checkpoints load with weights_only, and DDP runs on two CPU processes."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from medimg.config import TaskTrainParams
from tests.helpers import (
    TINY_SYNTH,
    Processed,
    fold_or_none,
    process_cohort,
    tool_path,
    train_params,
    write_cohort,
)


class Stop(Exception):
    pass


@pytest.mark.slow
def test_classifier_learns_and_repeats_exactly(tiny_processed: Processed, tmp_path: Path) -> None:
    from medimg import stages

    seen: list = []
    a = stages.train(
        train_params(tiny_processed, tmp_path / "a", epochs=4, lr=3e-3),
        "classify",
        callbacks=[seen.append],
    )
    assert [e.epoch for e in seen] == [1, 2, 3, 4]
    assert a.history[-1]["train_loss"] < a.history[0]["train_loss"]  # the loss falls
    b = stages.train(train_params(tiny_processed, tmp_path / "b", epochs=4, lr=3e-3), "classify")
    strip = lambda h: [{k: v for k, v in e.items() if k != "seconds"} for e in h]  # noqa: E731
    assert strip(a.history) == strip(b.history)
    m = json.loads((tmp_path / "a" / "metrics" / "classify_train.json").read_text())
    assert m["best_epoch"] == a.best_epoch and len(m["history"]) == 4
    weights = torch.load(tmp_path / "a" / "models" / "classify" / "model.pt", weights_only=True)
    assert "fc.weight" in weights["model"]


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_result(tiny_processed: Processed, tmp_path: Path) -> None:
    from medimg import stages

    whole = stages.train(train_params(tiny_processed, tmp_path / "whole", epochs=4), "segment")

    def kill_after_two(entry: object) -> None:
        if entry.epoch == 2:
            raise Stop

    params = train_params(tiny_processed, tmp_path / "cut", epochs=4)
    with pytest.raises(Stop):
        stages.train(params, "segment", callbacks=[kill_after_two])
    ckpt = torch.load(tmp_path / "cut" / "models" / "segment" / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 2
    resumed = stages.train(params, "segment", resume=True)
    strip = lambda h: [{k: v for k, v in e.items() if k != "seconds"} for e in h]  # noqa: E731
    assert strip(resumed.history) == strip(whole.history)
    assert resumed.best_metric == whole.best_metric
    a = torch.load(tmp_path / "whole" / "models" / "segment" / "model.pt", weights_only=True)[
        "model"
    ]
    b = torch.load(tmp_path / "cut" / "models" / "segment" / "model.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_ddp_on_two_cpu_processes(tiny_processed: Processed, tmp_path: Path) -> None:
    params = train_params(tiny_processed, tmp_path, epochs=1)
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params.model_dump(mode="json")))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            tool_path("torchrun"),
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "medimg.cli",
            "train",
            "--task",
            "classify",
            "--params",
            str(params_file),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "models" / "classify" / "model.pt").is_file()
    m = json.loads((tmp_path / "metrics" / "classify_train.json").read_text())
    assert m["epochs_run"] == 1


@pytest.mark.slow
def test_trained_segmenter_encoder_initialises_the_classifier(
    tiny_processed: Processed, tmp_path: Path
) -> None:
    """The demo's recipe: a segmenter trained on a related cohort hands its whole encoder
    to the classifier, and the load report says so tensor by tensor."""
    from medimg import stages
    from medimg.models.pretrained import load_pretrained
    from medimg.models.resnet import build_classifier

    for seed in range(11, 30):  # another cohort, with a usable fold
        cfg = TINY_SYNTH.model_copy(update={"seed": seed})
        related = write_cohort(tmp_path / f"related{seed}", cfg)
        source = process_cohort(related, tmp_path / f"related_processed{seed}")
        if fold_or_none(source) is not None:
            break
    stages.train(train_params(source, tmp_path / "pre", epochs=2), "segment")
    weights = tmp_path / "pre" / "models" / "segment" / "model.pt"
    trained = torch.load(weights, weights_only=True)["model"]

    model = build_classifier(TaskTrainParams(arch="resnet18"))
    report = load_pretrained(model, weights, "classify")
    assert report.n_model_backbone == len(report.loaded) == 85  # every ResNet-18 tensor but fc
    assert report.missing == [] and report.skipped_shape == []
    assert all(k.startswith(("decoder.", "segmentation_head.")) for k in report.unexpected)
    own = model.state_dict()
    for key in report.loaded:
        torch.testing.assert_close(own[key], trained["encoder." + key])
    params = train_params(tiny_processed, tmp_path / "warm", epochs=2, pretrained=str(weights))
    params = params.model_copy(
        update={
            "train": params.train.model_copy(
                update={
                    "classify": params.train.classify.model_copy(
                        update={"arch": "resnet18", "freeze_encoder_epochs": 1}
                    )
                }
            )
        }
    )
    result = stages.train(params, "classify")
    assert result.epochs_run == 2
    # the run keeps its load report: in the result and in the model card
    assert "loaded 85/85 backbone tensors (100.0%)" in result.initialisation
    card = (tmp_path / "warm" / "models" / "classify" / "model_card.md").read_text()
    assert result.initialisation in card
    # and what decided the numbers besides the inputs
    capability = torch.backends.cpu.get_cpu_capability()
    assert "**Environment.** reproducible mode" in card
    assert f"ran {capability} kernels on 2 threads" in card


def test_a_metric_tie_goes_to_the_lower_validation_loss(
    tiny_processed: Processed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A small validation fold often reaches AUROC 1.0 early; among epochs that tie, the
    best weights are those of the lowest validation loss, not the first."""
    from medimg import stages
    from medimg.train import Trainer

    scripted = iter([(0.9, 1.0), (0.5, 1.0), (0.7, 1.0), (0.4, 0.8)])  # (loss, AUROC)
    monkeypatch.setattr(Trainer, "validate", lambda self, *a: next(scripted))
    result = stages.train(train_params(tiny_processed, tmp_path, epochs=4), "classify")
    assert (result.best_epoch, result.best_metric) == (2, 1.0)
    assert [h["best"] for h in result.history] == [True, True, False, False]


def test_the_fused_optimiser_step_is_the_reference_adamw_up_to_rounding() -> None:
    """The trainer's fused AdamW is a speed choice only: given the same gradients, its
    weights must be those of PyTorch's reference per-tensor AdamW up to float rounding, in
    both parameter groups (the encoder, and the head at its larger learning rate). The
    gradients are given, not computed: through a network, rounding differences in the
    weights change the next gradients, and Adam's normalised step amplifies them."""
    import copy

    from medimg.models.build import build_model
    from medimg.models.pretrained import param_groups
    from medimg.optim import build_optimizer

    cfg = TaskTrainParams(arch="resnet10", conv1_stride=2, lr=1e-3, weight_decay=0.1)
    torch.manual_seed(0)
    base = build_model("classify", cfg)
    weights = {}
    for kind in ("reference", "trainer"):
        model = copy.deepcopy(base)
        groups = param_groups(model, "classify", cfg.lr, 10.0)  # two groups, as trained
        if kind == "reference":
            opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=False)
        else:
            opt = build_optimizer(groups, cfg)
            assert opt.defaults["fused"]
        for seed in range(4):
            torch.manual_seed(seed)
            for p in model.parameters():
                p.grad = torch.randn_like(p) * 10.0 ** torch.randint(-6, 0, p.shape)
            opt.step()
        weights[kind] = [p.detach().clone() for p in model.parameters()]
    moved = max(
        (a - b).abs().max().item()
        for a, b in zip(weights["trainer"], base.parameters(), strict=True)
    )
    assert moved > 1e-3  # four steps of about lr each
    for ref, got in zip(weights["reference"], weights["trainer"], strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_validation_every_other_epoch(tiny_processed: Processed, tmp_path: Path) -> None:
    """``val_every: 2``: epochs 2, 4 and the last, 5, are validated and only they can be the
    best; the others have no validation values in the history, the metrics file (null) and
    the plot's table, and training runs every epoch all the same."""
    from medimg import stages

    seen: list = []
    result = stages.train(
        train_params(tiny_processed, tmp_path, epochs=5, val_every=2),
        "segment",
        callbacks=[seen.append],
    )
    assert [e.epoch for e in seen] == [1, 2, 3, 4, 5]
    validated = [h["epoch"] for h in result.history if h["val_metric"] == h["val_metric"]]
    assert validated == [2, 4, 5]
    assert result.best_epoch in (2, 4, 5)
    assert all(h["train_loss"] > 0 for h in result.history)
    summary = json.loads((tmp_path / "metrics" / "segment_train.json").read_text())
    assert [h["val_loss"] is None for h in summary["history"]] == [True, False, True, False, False]
    from medimg.plots import plot_training_curves

    plot_training_curves(summary["history"], tmp_path / "plots")  # as evaluate draws it
    table = (tmp_path / "plots" / "training.csv").read_text().splitlines()
    assert len(table) == 6 and table[1].split(",")[table[0].split(",").index("val_metric")] == ""
