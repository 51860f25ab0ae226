"""Task outputs as configuration: N-class diagnoses and several structures, through one
spec each (binary and one structure are the simplest case, tested in test_tasks.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from medimg import multiclass as MC
from medimg import tracking
from medimg.config import (
    LESION,
    ClassifyParams,
    CodeParams,
    GateParams,
    Params,
    StructureParams,
    TaskTrainParams,
    TrainParams,
)
from medimg.decode import diagnosis, label_map
from medimg.inbox import SeriesResult
from medimg.tasks import CLASSIFY, SEGMENT, configured_task, get_task

CPU = torch.device("cpu")
CLASSES = ("none", "cyst", "solid")


def _structure(name: str, value: str) -> StructureParams:
    return StructureParams(
        name=name,
        category=CodeParams(value="91723000", meaning="Anatomical Structure"),
        type=CodeParams(value=value, meaning=name.title()),
    )


STRUCTURES = (_structure("body", "38266002"), _structure("liver", "10200004"), LESION)


def _params() -> Params:
    return Params(
        train=TrainParams(classify=ClassifyParams(classes=CLASSES)), structures=STRUCTURES
    )


def test_outputs_come_from_params_or_the_labels_file() -> None:
    three = configured_task("classify", _params())
    assert three.labels == CLASSES and three.n_outputs == 3 and not three.has_threshold
    assert configured_task("classify", Params(), ["benign", "malignant"]).labels == (
        "benign",
        "malignant",
    )
    binary = configured_task("classify", Params())
    assert binary.labels == ("0", "1") and binary.n_outputs == 1 and binary.has_threshold
    seg = configured_task("segment", _params())
    assert seg.labels == ("body", "liver", "lesion") and seg.n_outputs == 4
    assert get_task("segment").n_outputs == 2  # one lesion: background and lesion
    assert seg.from_description(json.loads(json.dumps(seg.describe()))) == seg
    assert CLASSIFY.from_description({}) is CLASSIFY  # a model saved before outputs


@pytest.mark.parametrize("dims", [3, 2])
def test_networks_have_one_output_per_class_and_channel_per_structure(dims: int) -> None:
    cfg = TaskTrainParams(arch="resnet10", spatial_dims=dims)
    three = configured_task("classify", _params())
    x = torch.zeros(2, 1, 32, 32, 32)
    assert three.build(cfg).eval()(x).shape == (2, 3)
    prob = three.predict(three.build(cfg), x, (32, 32, 32), CPU)
    assert prob.shape == (2, 3) and torch.allclose(prob.sum(dim=1), torch.ones(2))
    seg = configured_task("segment", _params())
    out = seg.predict(seg.build(cfg), x, (32, 32, 32), CPU)
    assert out.shape == (2, 4, 32, 32, 32) and torch.allclose(out.sum(dim=1), torch.ones(1))
    assert seg.output_shape((32, 32, 32)) == (-1, 4, 32, 32, 32)
    assert three.output_shape((32, 32, 32)) == (-1, 3)


def test_class_weights_and_balanced_sampling() -> None:
    three = configured_task("classify", _params())
    y = [0.0] * 6 + [1.0] * 3 + [2.0] * 1
    weighted = three.loss(ClassifyParams(balance="weights"), y)
    assert weighted.weight.tolist() == pytest.approx([10 / 18, 10 / 9, 10 / 3])
    assert three.loss(ClassifyParams(), y).weight is None
    w = three.sample_weights(ClassifyParams(balance="sampler"), y)
    totals = [sum(wi for wi, yi in zip(w, y, strict=True) if yi == c) for c in range(3)]
    assert totals == pytest.approx([10 / 3] * 3)  # every class drawn equally often
    assert three.sample_weights(ClassifyParams(balance="weights"), y) is None
    binary = configured_task("classify", Params())
    assert binary.loss(ClassifyParams(balance="weights"), [0, 0, 0, 1]).pos_weight.item() == 3.0


def test_multiclass_validation_scores_cross_entropy_and_macro_auroc() -> None:
    three = configured_task("classify", _params())
    prob = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6], [0.6, 0.35, 0.05]])
    chunk = [{"y": 0.0}, {"y": 1.0}, {"y": 2.0}, {"y": 2.0}]
    losses, outputs = three.validation_batch(prob, chunk)
    assert losses == pytest.approx([-math.log(p) for p in (0.7, 0.8, 0.6, 0.05)], rel=1e-5)
    expected = MC.macro_auroc(np.array([0, 1, 2, 2]), prob.numpy())
    assert three.validation_metric(outputs) == pytest.approx(expected)
    assert expected < 1.0  # the last case ranks below a non-solid one


def _multiclass_cases(rng: np.random.Generator, n: int, skill: float) -> pd.DataFrame:
    y = np.arange(n) % 3
    logits = rng.normal(size=(n, 3)) + skill * np.eye(3)[y]
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    frame = pd.DataFrame({f"probability_{c}": p[:, i] for i, c in enumerate(CLASSES)})
    return frame.assign(
        key=[f"k{i}" for i in range(n)],
        patient=[f"p{i}" for i in range(n)],
        label=y,
        predicted=MC.predicted_class(p),
        modality=np.where(np.arange(n) % 4 == 0, "MR", "CT"),
        vendor=np.where(np.arange(n) % 2 == 0, "A", "B"),
    )


def test_multiclass_summary_reports_what_metrics_reloaded_recommends(tmp_path: Path) -> None:
    three = configured_task("classify", _params())
    cases = _multiclass_cases(np.random.default_rng(0), 30, 2.0)
    out = three.summarise(cases, lambda: pytest.fail("no threshold for N classes"), tmp_path)
    assert set(out["metrics"]) == {"macro_auroc", "balanced_accuracy", "mcc", "ece"}
    m = out["metrics"]["macro_auroc"]
    assert m["ci_lower"] < m["value"] < m["ci_upper"]
    probs = cases[[f"probability_{c}" for c in CLASSES]].to_numpy()
    assert m["value"] == pytest.approx(MC.macro_auroc(cases["label"].to_numpy(), probs), abs=1e-4)
    assert set(out["per_class"]) == set(CLASSES)
    assert set(out["per_class"]["cyst"]) == {"auroc", "sensitivity", "specificity", "n_cases"}
    counts = np.array(out["confusion_matrix"]["counts"])
    assert counts.shape == (3, 3) and counts.sum() == 30 and counts.sum(axis=1).tolist() == [10] * 3
    assert "argmax" in out["decision"]
    assert {r["vendor"] for r in out["by_vendor"]} == {"A", "B"}
    assert (tmp_path / "confusion_matrix.png").is_file()


def test_gate_compares_macro_auroc_of_several_classes() -> None:
    rng = np.random.default_rng(1)
    good, coin = _multiclass_cases(rng, 30, 4.0), _multiclass_cases(rng, 30, 0.0)
    d = tracking.decide(
        tracking.Contender("2", good), tracking.Contender("1", coin), GateParams(), "classify"
    )
    assert d.promoted and d.metric == "auroc" and d.ci_low > 0
    probs = good[[f"probability_{c}" for c in CLASSES]].to_numpy()
    assert d.challenger_value == pytest.approx(MC.macro_auroc(good["label"].to_numpy(), probs))
    worse = tracking.decide(
        tracking.Contender("3", coin), tracking.Contender("2", good), GateParams(), "classify"
    )
    assert not worse.promoted


def _label_volume() -> np.ndarray:
    truth = np.zeros((12, 12, 12), dtype=np.uint8)
    truth[1:11, 1:11, 1:11] = 1  # body
    truth[2:7, 2:7, 2:7] = 2  # liver
    truth[3:5, 3:5, 3:5] = 3  # a lesion inside the liver wins over it
    return truth


def test_segmentation_of_several_structures_scores_each(tmp_path: Path) -> None:
    seg = configured_task("segment", _params())
    truth = _label_volume()
    onehot = np.eye(4, dtype=np.float32)[truth].transpose(3, 0, 1, 2)  # (4, R, A, S)
    pred = onehot.copy()
    pred[:, 3:5, 3:5, 3:5] = np.eye(4, dtype=np.float32)[2][:, None, None, None]  # lesion missed
    item = {"label": torch.as_tensor(truth[None].astype(np.float32))}
    losses, outputs = seg.validation_batch(torch.as_tensor(pred[None]), [item])
    assert losses == pytest.approx([1 - np.mean(outputs[0])])
    assert outputs[0][0] == pytest.approx(1.0) and outputs[0][2] == 0.0
    assert seg.validation_metric(outputs) == pytest.approx(np.mean(outputs[0]))
    row = seg.case_values(torch.as_tensor(pred[None]), item, (2.0, 2.0, 2.0))
    assert row["dice_body"] == pytest.approx(1.0) and row["dice_lesion"] == 0.0
    assert row["present_lesion"] and row["nsd_body"] == pytest.approx(1.0)
    assert row["dice_liver"] < 1.0  # the lesion's voxels went to the liver
    cases = pd.DataFrame(
        [
            row | {"key": f"k{i}", "patient": f"p{i}", "label": 1, "modality": "CT", "vendor": "A"}
            for i in range(4)
        ]
    )
    out = seg.summarise(cases, lambda: pytest.fail("unused"), tmp_path)
    assert set(out["per_structure"]) == {"body", "liver", "lesion"}
    assert out["per_structure"]["lesion"]["dice"]["value"] == 0.0
    mean = np.mean([row["dice_body"], row["dice_liver"], row["dice_lesion"]])
    assert out["metrics"]["dice"]["value"] == pytest.approx(mean, abs=1e-4)
    assert (tmp_path / "dice_per_structure.csv").is_file()


def test_prediction_rows_carry_every_class_and_structure() -> None:
    res = SeriesResult(key="k")
    diagnosis(res, np.array([0.1, 0.3, 0.6], dtype=np.float32), CLASSES, 0.5)
    assert (res.label, res.predicted, res.probability) == (2, "solid", pytest.approx(0.6))
    assert res.extra == pytest.approx(
        {"probability_none": 0.1, "probability_cyst": 0.3, "probability_solid": 0.6}
    )
    binary = SeriesResult(key="b")
    diagnosis(binary, 0.7, ("0", "1"), 0.8)  # below the validation-chosen threshold
    assert (binary.label, binary.predicted) == (0, "0")
    seg = configured_task("segment", _params())
    truth = _label_volume()
    prob = np.eye(4, dtype=np.float32)[truth].transpose(3, 0, 1, 2)
    out = SeriesResult(key="s")
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    got = label_map(seg, prob, affine, truth.shape, affine, out)
    assert np.array_equal(got, truth)
    assert out.extra["volume_ml_lesion"] == pytest.approx(8 * 8 / 1000)
    assert set(out.extra) == {"volume_ml_body", "volume_ml_liver", "volume_ml_lesion"}
    assert out.label is None and out.lesion_voxels is None  # no one "lesion" of several
    assert SEGMENT.labels == ("lesion",)
