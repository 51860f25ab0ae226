import math

import numpy as np
import pytest
from sklearn import metrics as sk

from medimg import metrics
from medimg.multiclass import (
    balanced_accuracy,
    confusion_matrix,
    expected_calibration_error,
    macro_auroc,
    matthews_corrcoef,
    one_vs_rest_auroc,
    predicted_class,
    sensitivity_specificity,
    top_label,
)


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _cohort(n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels with every class, and probabilities that lean towards the truth."""
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.r_[np.arange(k), rng.integers(0, k, n - k)])
    logits = rng.normal(0, 1, (n, k))
    logits[np.arange(n), y] += 1.2
    probs = _softmax(logits)
    probs[:15] = np.round(probs[:15], 1)  # ties, and rows that sum to 1 within 1e-3 only
    probs[:15] /= probs[:15].sum(axis=1, keepdims=True)
    return y, probs


# --- against scikit-learn on random data -----------------------------------------------


@pytest.mark.parametrize(("k", "seed"), [(3, 0), (4, 1), (6, 2)])
def test_auroc_matches_sklearn(k: int, seed: int) -> None:
    y, probs = _cohort(200, k, seed)
    ours = one_vs_rest_auroc(y, probs)
    assert len(ours) == k
    theirs = sk.roc_auc_score(y, probs, multi_class="ovr", average=None)
    np.testing.assert_allclose(ours, theirs, atol=1e-12)
    assert macro_auroc(y, probs) == pytest.approx(
        sk.roc_auc_score(y, probs, multi_class="ovr", average="macro"), abs=1e-12
    )


@pytest.mark.parametrize(("k", "seed"), [(3, 3), (5, 4)])
def test_decision_metrics_match_sklearn(k: int, seed: int) -> None:
    y, probs = _cohort(300, k, seed)
    pred = predicted_class(probs)
    np.testing.assert_array_equal(pred, np.argmax(probs, axis=1))
    counts = confusion_matrix(y, pred, k)
    assert counts.shape == (k, k)
    np.testing.assert_array_equal(counts, sk.confusion_matrix(y, pred, labels=range(k)))
    assert balanced_accuracy(y, pred, k) == pytest.approx(sk.balanced_accuracy_score(y, pred))
    assert matthews_corrcoef(y, pred, k) == pytest.approx(sk.matthews_corrcoef(y, pred))
    sens_spec = sensitivity_specificity(y, pred, k)
    recalls = sk.recall_score(y, pred, labels=range(k), average=None)
    np.testing.assert_allclose([s for s, _ in sens_spec], recalls)
    for c, (_, spec) in enumerate(sens_spec):  # specificity: recall of "not c"
        assert spec == pytest.approx(sk.recall_score(y != c, pred != c))


def test_two_classes_agree_with_the_binary_metrics() -> None:
    y, probs = _cohort(150, 2, 5)
    pred = predicted_class(probs)
    assert one_vs_rest_auroc(y, probs)[1] == pytest.approx(metrics.auroc(y, probs[:, 1]))
    # argmax of two probabilities is the threshold 0.5, except that a tie goes to class 0
    untied = probs[:, 1] != 0.5
    assert np.array_equal(pred[untied], (probs[untied, 1] >= 0.5).astype(int))
    assert sensitivity_specificity(y, pred, 2)[1] == pytest.approx(
        metrics.sensitivity_specificity(y, pred, 0.5)
    )
    assert balanced_accuracy(y, pred, 2) == pytest.approx(metrics.balanced_accuracy(y, pred, 0.5))


# --- hand-computed ---------------------------------------------------------------------

Y = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 2])
PRED = np.array([0, 0, 1, 1, 2, 2, 2, 2, 0, 1])


def test_confusion_and_rates_by_hand() -> None:
    expected = [[2, 1, 0], [0, 1, 1], [1, 1, 3]]
    np.testing.assert_array_equal(confusion_matrix(Y, PRED, 3), expected)
    # class 0: 2 of 3 found; 1 of the 7 others called 0.  class 1: 1 of 2; 2 of 8.
    # class 2: 3 of 5; 1 of 5.
    np.testing.assert_allclose(
        sensitivity_specificity(Y, PRED, 3), [(2 / 3, 6 / 7), (1 / 2, 6 / 8), (3 / 5, 4 / 5)]
    )
    assert balanced_accuracy(Y, PRED, 3) == pytest.approx((2 / 3 + 1 / 2 + 3 / 5) / 3)
    # Gorodkin: s = 10, c = 6, t = (3, 2, 5), p = (3, 3, 4)
    # (6*10 - (9 + 6 + 20)) / sqrt((100 - 34)(100 - 38)) = 25 / sqrt(66 * 62)
    assert matthews_corrcoef(Y, PRED, 3) == pytest.approx(25 / math.sqrt(66 * 62))


def test_auroc_by_hand() -> None:
    y = [0, 1, 2, 0]
    probs = [[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.1, 0.3, 0.6], [0.3, 0.5, 0.2]]
    # class 0: (0.6, 0.3) above (0.2, 0.1): 1.  class 1: 0.5 above 0.3 and 0.3, tied with
    # 0.5: (1 + 1 + 0.5) / 3.  class 2: 0.6 above 0.1, 0.3, 0.2: 1.
    assert one_vs_rest_auroc(y, probs) == pytest.approx([1.0, 2.5 / 3, 1.0])
    assert macro_auroc(y, probs) == pytest.approx((2 + 2.5 / 3) / 3)


def test_ties_go_to_the_lowest_class() -> None:
    probs = [[0.5, 0.5, 0.0], [0.2, 0.4, 0.4], [1 / 3, 1 / 3, 1 / 3], [0.1, 0.2, 0.7]]
    assert predicted_class(probs).tolist() == [0, 1, 0, 2]


def test_top_label_ece_by_hand() -> None:
    y = [0, 1, 2, 1]
    probs = [[0.9, 0.05, 0.05], [0.7, 0.2, 0.1], [0.1, 0.2, 0.7], [0.2, 0.35, 0.45]]
    confidence, correct = top_label(y, probs)
    np.testing.assert_allclose(confidence, [0.9, 0.7, 0.7, 0.45])
    assert correct.tolist() == [1, 0, 1, 0]
    # bins of width 0.5: (0.45 -> 0 right) gap 0.45; (0.9, 0.7, 0.7 -> 2 of 3) gap 0.1
    assert expected_calibration_error(y, probs, n_bins=2) == pytest.approx(
        (1 * 0.45 + 3 * abs(2.3 / 3 - 2 / 3)) / 4
    )
    assert expected_calibration_error(y, probs, n_bins=10) == pytest.approx(
        metrics.expected_calibration_error(correct, confidence, n_bins=10)
    )


def test_top_label_ece_small_when_calibrated_large_when_overconfident() -> None:
    rng = np.random.default_rng(6)
    probs = _softmax(rng.normal(0, 1.5, (50_000, 4)))
    y = np.array([rng.choice(4, p=row) for row in probs[:5000]])  # y ~ Categorical(probs)
    assert expected_calibration_error(y, probs[:5000]) < 0.03
    sharp = _softmax(np.log(probs[:5000]) * 6)  # same decisions, far too confident
    assert expected_calibration_error(y, sharp) > 0.2


# --- edge cases ------------------------------------------------------------------------


def test_perfect_and_inverted() -> None:
    y = np.array([0, 0, 1, 1, 2, 2])
    perfect = np.eye(3)[y] * 0.8 + 0.2 / 3
    assert one_vs_rest_auroc(y, perfect) == [1.0, 1.0, 1.0]
    assert macro_auroc(y, perfect) == 1.0
    pred = predicted_class(perfect)
    np.testing.assert_array_equal(confusion_matrix(y, pred, 3), np.diag([2, 2, 2]))
    assert balanced_accuracy(y, pred, 3) == 1.0
    assert matthews_corrcoef(y, pred, 3) == pytest.approx(1.0)
    assert sensitivity_specificity(y, pred, 3) == [(1.0, 1.0)] * 3
    assert expected_calibration_error(y, perfect) == pytest.approx(0.4 / 3)  # 0.867 sure, all right
    # inverted: every case scored lowest for its class
    inverted = (1 - np.eye(3)[y]) / 2
    assert one_vs_rest_auroc(y, inverted) == [0.0, 0.0, 0.0]
    wrong = (y + 1) % 3
    assert balanced_accuracy(y, wrong, 3) == 0.0
    assert matthews_corrcoef(y, wrong, 3) == pytest.approx(sk.matthews_corrcoef(y, wrong))
    assert matthews_corrcoef(y, wrong, 3) == pytest.approx(-0.5)  # the floor for 3 classes
    assert matthews_corrcoef([0, 0, 1, 1], [1, 1, 0, 0], 2) == pytest.approx(-1.0)


def test_a_class_absent() -> None:
    y = np.array([0, 0, 2, 2, 0])  # class 1 never the truth, but predicted once
    probs = np.array(
        [[0.7, 0.2, 0.1], [0.3, 0.6, 0.1], [0.1, 0.1, 0.8], [0.3, 0.3, 0.4], [0.5, 0.1, 0.4]]
    )
    areas = one_vs_rest_auroc(y, probs)
    assert math.isnan(areas[1])
    assert areas[0] == pytest.approx(sk.roc_auc_score(y == 0, probs[:, 0]))
    assert macro_auroc(y, probs) == pytest.approx((areas[0] + areas[2]) / 2)
    pred = predicted_class(probs)
    assert pred.tolist() == [0, 1, 2, 2, 0]
    with pytest.warns(UserWarning):  # sklearn warns about the predicted-only class
        expected = sk.balanced_accuracy_score(y, pred)
    assert balanced_accuracy(y, pred, 3) == pytest.approx(expected)
    assert balanced_accuracy(y, pred, 3) == pytest.approx((2 / 3 + 1) / 2)
    sens, spec = sensitivity_specificity(y, pred, 3)[1]
    assert math.isnan(sens)
    assert spec == pytest.approx(4 / 5)
    assert matthews_corrcoef(y, pred, 3) == pytest.approx(sk.matthews_corrcoef(y, pred))
    # a class in every case has no AUROC either, and then none is defined at all
    assert all(math.isnan(a) for a in one_vs_rest_auroc([1, 1], [[0.2, 0.8], [0.6, 0.4]]))
    assert math.isnan(macro_auroc([1, 1], [[0.2, 0.8], [0.6, 0.4]]))


def test_single_class_decisions_and_no_cases() -> None:
    # all truth one class: MCC undefined (sklearn says 0.0); recall of that class only
    assert math.isnan(matthews_corrcoef([1, 1, 1], [1, 0, 1], 3))
    assert sk.matthews_corrcoef([1, 1, 1], [1, 0, 1]) == 0.0
    assert balanced_accuracy([1, 1, 1], [1, 0, 1], 3) == pytest.approx(2 / 3)
    assert math.isnan(matthews_corrcoef([0, 1, 2], [1, 1, 1], 3))  # one class predicted
    np.testing.assert_array_equal(confusion_matrix([], [], 3), np.zeros((3, 3), int))
    assert math.isnan(balanced_accuracy([], [], 3))
    assert math.isnan(expected_calibration_error(np.zeros(0, int), np.zeros((0, 3))))


@pytest.mark.parametrize(
    ("y", "probs"),
    [
        ([0, 3], [[0.5, 0.5, 0.0], [0.2, 0.2, 0.6]]),  # a label beyond K - 1
        ([0, 1.5], [[0.5, 0.5], [0.2, 0.8]]),  # not an index
        ([0, 1, 1], [[0.5, 0.5], [0.2, 0.8]]),  # counts differ
        ([0, 1], [[0.5, 0.6], [0.2, 0.8]]),  # a row not summing to 1
        ([0, 1], [[1.5, -0.5], [0.2, 0.8]]),  # not probabilities
        ([0, 1], [[np.nan, 1.0], [0.2, 0.8]]),
        ([0, 1], [0.4, 0.8]),  # one column: use medimg.metrics
    ],
)
def test_bad_input_rejected(y: list[float], probs: list[list[float]]) -> None:
    with pytest.raises(ValueError):
        one_vs_rest_auroc(y, probs)
    with pytest.raises(ValueError):
        expected_calibration_error(y, probs)


def test_bad_decisions_rejected() -> None:
    with pytest.raises(ValueError):
        confusion_matrix([0, 1], [0, 3], 3)
    with pytest.raises(ValueError):
        confusion_matrix([0, 1], [0], 3)
    with pytest.raises(ValueError):
        balanced_accuracy([0, -1], [0, 1], 2)
    with pytest.raises(ValueError):
        predicted_class([0.2, 0.8])
