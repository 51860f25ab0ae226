"""Early stopping and the learning-rate schedule, without a training run."""

from __future__ import annotations

import math

import pytest

from medimg.optim import EarlyStopping, lr_schedule


def test_the_best_epoch_and_the_tie_rule() -> None:
    """A tie on the metric goes to the lower validation loss; a worse loss on a tie, or a
    worse metric, is a bad epoch."""
    stop = EarlyStopping(patience=10)
    # (metric, loss) per epoch: a new best, a tie with lower loss, a tie with higher loss,
    # a worse metric with the lowest loss of all
    script = [(1.0, 0.9), (1.0, 0.5), (1.0, 0.7), (0.8, 0.4)]
    outcomes = [stop.update(e, metric, loss) for e, (metric, loss) in enumerate(script, 1)]
    assert outcomes == [True, True, False, False]
    assert (stop.best_epoch, stop.best_metric, stop.best_loss) == (2, 1.0, 0.5)
    assert stop.bad_epochs == 2


def test_patience_counts_epochs_since_the_best() -> None:
    stop = EarlyStopping(patience=2)
    stop.update(1, 0.5, 1.0)
    stop.update(2, 0.4, 1.0)
    assert not stop.stop
    stop.update(3, 0.4, 1.0)
    assert stop.stop
    stop.update(4, 0.9, 1.0)  # a new best resets the count
    assert not stop.stop and stop.bad_epochs == 0


def test_an_undefined_metric_falls_back_to_the_loss() -> None:
    """A validation fold with one class has no AUROC: the negative loss ranks epochs."""
    stop = EarlyStopping(patience=5)
    assert stop.update(1, math.nan, 0.8)
    assert stop.update(2, math.nan, 0.6)
    assert not stop.update(3, math.nan, 0.7)
    assert stop.best_epoch == 2 and stop.best_metric == pytest.approx(-0.6)


def test_a_metric_to_minimise() -> None:
    stop = EarlyStopping(patience=5, maximize=False)
    assert stop.update(1, 10.0, 1.0)
    assert stop.update(2, 5.0, 1.0)  # lower is better
    assert not stop.update(3, 7.0, 0.1)
    assert stop.best_epoch == 2


def test_the_checkpointed_state_restores_the_object() -> None:
    stop = EarlyStopping(patience=3)
    for e, m in enumerate([0.2, 0.6, 0.5], start=1):
        stop.update(e, m, 1.0 - m)
    again = EarlyStopping(patience=3, **stop.state())
    assert again == stop
    assert list(stop.state()) == ["best_metric", "best_loss", "best_epoch", "bad_epochs"]


def test_warm_up_then_cosine_to_zero() -> None:
    factor = lr_schedule(warmup=2, total=10)
    assert [factor(0), factor(1)] == [0.5, 1.0]
    assert factor(2) == pytest.approx(1.0)
    assert factor(6) == pytest.approx(0.5)
    assert factor(10) == pytest.approx(0.0) and factor(20) == pytest.approx(0.0)


def test_patience_counts_epochs_between_sparse_validations() -> None:
    """Validated every third epoch (val_every: 3), patience still counts epochs since the
    best, not validations."""
    stop = EarlyStopping(patience=6)
    assert stop.update(3, 0.5, 1.0)
    assert not stop.update(6, 0.4, 1.0)
    assert stop.bad_epochs == 3 and not stop.stop
    assert not stop.update(9, 0.4, 1.0)
    assert stop.bad_epochs == 6 and stop.stop
