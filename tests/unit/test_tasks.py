"""The task specs: what each task is, asked by the library instead of its name."""

from __future__ import annotations

import math

import pytest
import torch

from medimg.config import Params, TaskTrainParams
from medimg.errors import ConfigError
from medimg.metrics import auroc, dice
from medimg.tasks import CLASSIFY, SEGMENT, TASKS, get_task

CPU = torch.device("cpu")


def test_every_task_by_name_and_unknown_names_fail_clearly() -> None:
    assert list(TASKS) == ["segment", "classify"]  # the order the pipeline runs them
    assert get_task("classify") is CLASSIFY and get_task(SEGMENT) is SEGMENT
    with pytest.raises(ConfigError, match=r"one of \('segment', 'classify'\), got 'clasify'"):
        get_task("clasify")


def test_each_spec_reads_its_own_sections() -> None:
    params = Params()
    assert CLASSIFY.train_params(params.train) is params.train.classify
    assert SEGMENT.train_params(params.train) is params.train.segment
    assert CLASSIFY.registry_name(params.registry) == "medimg-classifier"
    assert SEGMENT.registry_name(params.registry) == "medimg-segmenter"
    assert CLASSIFY.gate_metric(params.registry.gate) == "auroc"
    assert SEGMENT.gate_metric(params.registry.gate) == "dice"
    assert (CLASSIFY.has_threshold, SEGMENT.has_threshold) == (True, False)
    assert (CLASSIFY.with_masks, SEGMENT.with_masks) == (False, True)


def test_classification_validation_scores_a_batch() -> None:
    prob = torch.tensor([0.9, 0.2, 0.6])
    chunk = [{"y": 1.0}, {"y": 0.0}, {"y": 0.0}]
    losses, outputs = CLASSIFY.validation_batch(prob, chunk)
    expected = [-math.log(0.9), -math.log(0.8), -math.log(0.4)]
    assert losses == pytest.approx(expected, rel=1e-6)
    assert CLASSIFY.validation_metric(outputs) == auroc([1, 0, 0], [0.9, 0.2, 0.6]) == 1.0


def test_segmentation_validation_measures_dice_on_volumes_with_a_lesion() -> None:
    truth = torch.zeros(2, 1, 4, 4, 4)
    truth[0, 0, :2] = 1.0  # the first volume has a lesion, the second none
    prob = torch.zeros(2, 4, 4, 4)
    prob[0, :1] = 0.9  # half the lesion found
    prob[1, 0, 0, 0] = 0.9  # one false positive voxel
    chunk = [{"label": truth[0]}, {"label": truth[1]}]
    losses, outputs = SEGMENT.validation_batch(prob, chunk)
    half = dice(prob[0].numpy() > 0.5, truth[0, 0].numpy() > 0.5)
    assert half == pytest.approx(2 / 3)
    assert losses == pytest.approx([1 - half, 1.0])
    assert SEGMENT.validation_metric(outputs) == pytest.approx(half)  # the empty one left out
    assert math.isnan(SEGMENT.validation_metric([[None]]))


def test_each_task_predicts_its_output_shape() -> None:
    x = torch.rand(2, 1, 32, 32, 32)  # (B, 1, R, A, S)
    cfg = TaskTrainParams(arch="resnet10")
    torch.manual_seed(0)
    p = CLASSIFY.predict(CLASSIFY.build(cfg), x, (32, 32, 32), CPU)
    assert p.shape == (2,) and bool(((p > 0) & (p < 1)).all())
    m = SEGMENT.predict(SEGMENT.build(TaskTrainParams(arch="resnet18")), x, (32, 32, 32), CPU)
    assert m.shape == (2, 32, 32, 32) and bool(((m >= 0) & (m <= 1)).all())
    assert CLASSIFY.output_shape((32, 32, 32)) == (-1,)
    assert SEGMENT.output_shape((32, 32, 32)) == (-1, 32, 32, 32)
