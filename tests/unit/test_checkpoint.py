"""The background checkpoint writer: files hold the state at the moment of saving."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from medimg.checkpoint import BackgroundWriter, live_tensors


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv3d(1, 4, 3), nn.BatchNorm3d(4), nn.ReLU(), nn.Conv3d(4, 1, 1))


def step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    model.train()
    model(torch.randn(2, 1, 6, 6, 6)).mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def test_a_checkpoint_holds_the_state_of_its_save_while_training_goes_on(tmp_path: Path) -> None:
    model = small_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    step(model, optimizer)  # Adam moments exist
    want = copy.deepcopy({"model": model.state_dict(), "optimizer": optimizer.state_dict()})
    writer = BackgroundWriter()
    try:
        payload = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
        writer.save(payload, tmp_path / "checkpoint.pt", live_tensors(model, optimizer))
        # the next epoch: a forward pass changes batch-norm statistics at once (copied at
        # the save), and the trainer drains the writer before the optimiser changes weights
        model.train()
        model(torch.randn(2, 1, 6, 6, 6))
        writer.drain()
        step(model, optimizer)
    finally:
        writer.close()
    got = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    now = model.state_dict()
    for key, value in want["model"].items():
        assert torch.equal(got["model"][key], value), key
    assert not torch.equal(now["1.running_mean"], want["model"]["1.running_mean"])
    assert not torch.equal(now["0.weight"], want["model"]["0.weight"])
    for index, state in want["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(got["optimizer"]["state"][index][key], value), (index, key)


def test_a_failed_write_is_raised_not_lost(tmp_path: Path) -> None:
    blocker = tmp_path / "models"
    blocker.write_text("a file where the output folder should be")
    writer = BackgroundWriter()
    writer.save({"model": small_model().state_dict()}, blocker / "model.pt", frozenset())
    with pytest.raises(OSError):
        writer.close()
    assert blocker.read_text() == "a file where the output folder should be"
