import math
from collections.abc import Callable

import numpy as np
import pandas as pd
import pytest
from scipy.spatial.distance import cdist
from sklearn import metrics as sk
from sklearn.calibration import calibration_curve

from medimg.metrics import (
    auroc,
    balanced_accuracy,
    dice,
    expected_calibration_error,
    normalised_surface_dice,
    reliability_table,
    roc_curve,
    sensitivity_specificity,
    structure_scores,
    surface_distances,
    youden_threshold,
)
from medimg.stats import MeanOfMeans, bootstrap_ci, breakdown

# --- ROC -------------------------------------------------------------------------------


@pytest.mark.parametrize("drop", [True, False])
def test_roc_matches_sklearn_with_ties(drop: bool) -> None:
    rng = np.random.default_rng(3)
    for _ in range(50):
        n = int(rng.integers(2, 80))
        y = rng.permutation(np.r_[0, 1, rng.integers(0, 2, n - 2)])  # both classes, always
        assert 0 < y.sum() < n
        p = np.round(rng.random(n), 1)  # few distinct values: many ties
        ours = roc_curve(y, p, drop_intermediate=drop)
        theirs = sk.roc_curve(y, p, drop_intermediate=drop)
        for a, b in zip(ours, theirs, strict=True):
            np.testing.assert_array_equal(a, b)
        assert auroc(y, p) == pytest.approx(sk.roc_auc_score(y, p), abs=1e-12)


def test_auroc_hand_checked() -> None:
    # pairs (pos, neg): (0.8, 0.1) win, (0.8, 0.4) win, (0.4, 0.1) win, (0.4, 0.4) tie
    assert auroc([0, 0, 1, 1], [0.1, 0.4, 0.4, 0.8]) == pytest.approx(3.5 / 4)
    fpr, tpr, thr = roc_curve([0, 0, 1, 1], [0.1, 0.4, 0.4, 0.8])
    np.testing.assert_array_equal(fpr, [0, 0, 0.5, 1])
    np.testing.assert_array_equal(tpr, [0, 0.5, 1, 1])
    np.testing.assert_array_equal(thr, [np.inf, 0.8, 0.4, 0.1])
    assert auroc([0, 1], [0.5, 0.5]) == 0.5  # all tied: chance


def test_auroc_perfect_inverted_single_class() -> None:
    y = np.array([0, 0, 0, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.7, 0.9])
    assert auroc(y, p) == 1.0
    assert auroc(y, 1 - p) == 0.0
    assert math.isnan(auroc([1, 1, 1], [0.2, 0.5, 0.9]))
    assert math.isnan(auroc([0, 0], [0.2, 0.5]))
    fpr, tpr, _ = roc_curve([1, 1, 1], [0.2, 0.5, 0.9])
    assert np.all(np.isnan(fpr))
    assert not np.any(np.isnan(tpr))


def test_bad_input_rejected() -> None:
    with pytest.raises(ValueError):
        auroc([0, 1, 2], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError):
        auroc([0, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError):
        auroc([0, 1], [0.1, np.nan])


# --- thresholded -----------------------------------------------------------------------


def test_sensitivity_specificity_hand_made() -> None:
    y = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    p = [0.9, 0.6, 0.5, 0.2, 0.7, 0.5, 0.3, 0.2, 0.1, 0.0]
    # at 0.5 (>=): TP 3 of 4, FP 2 of 6 (0.7 and the tied 0.5)
    sens, spec = sensitivity_specificity(y, p, 0.5)
    assert sens == pytest.approx(3 / 4)
    assert spec == pytest.approx(4 / 6)
    assert balanced_accuracy(y, p, 0.5) == pytest.approx((3 / 4 + 4 / 6) / 2)
    assert balanced_accuracy(y, p, 0.5) == pytest.approx(
        sk.balanced_accuracy_score(y, np.asarray(p) >= 0.5)
    )


def test_sensitivity_specificity_absent_class() -> None:
    sens, spec = sensitivity_specificity([0, 0], [0.2, 0.8], 0.5)
    assert math.isnan(sens)
    assert spec == 0.5
    sens, spec = sensitivity_specificity([1, 1], [0.2, 0.8], 0.5)
    assert sens == 0.5
    assert math.isnan(spec)
    assert math.isnan(balanced_accuracy([1, 1], [0.2, 0.8], 0.5))


def test_youden_separable_lands_between_classes() -> None:
    rng = np.random.default_rng(0)
    neg = rng.uniform(0.0, 0.4, 50)
    pos = rng.uniform(0.6, 1.0, 30)
    y = np.r_[np.zeros(50, int), np.ones(30, int)]
    p = np.r_[neg, pos]
    t = youden_threshold(y, p)
    assert neg.max() < t < pos.min()
    sens, spec = sensitivity_specificity(y, p, t)
    assert (sens, spec) == (1.0, 1.0)
    assert math.isnan(youden_threshold([1, 1], [0.2, 0.3]))


def test_youden_maximises_j() -> None:
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 300)
    p = np.clip(0.3 * y + rng.normal(0.35, 0.2, 300), 0, 1)
    t = youden_threshold(y, p)
    best = max(sum(sensitivity_specificity(y, p, c)) - 1 for c in np.unique(p))
    assert sum(sensitivity_specificity(y, p, t)) - 1 == pytest.approx(best)


# --- calibration -----------------------------------------------------------------------


def test_ece_calibrated_small_overconfident_large() -> None:
    rng = np.random.default_rng(1)
    p = rng.random(100_000)
    y = (rng.random(p.size) < p).astype(int)  # y ~ Bernoulli(p): calibrated
    assert expected_calibration_error(y, p) < 0.02
    sharp = np.where(p > 0.5, 0.99, 0.01)  # same ranking, far too confident
    assert expected_calibration_error(y, sharp) > 0.2


def test_reliability_table_matches_sklearn() -> None:
    rng = np.random.default_rng(2)
    p = rng.random(1000)
    y = (rng.random(p.size) < p**2).astype(int)
    table = reliability_table(y, p, n_bins=10)
    assert list(table.columns) == [
        "bin_lower",
        "bin_upper",
        "count",
        "mean_predicted",
        "fraction_positive",
    ]
    assert len(table) == 10
    assert table["count"].sum() == 1000
    prob_true, prob_pred = calibration_curve(y, p, n_bins=10)
    full = table[table["count"] > 0]
    np.testing.assert_allclose(full["fraction_positive"], prob_true)
    np.testing.assert_allclose(full["mean_predicted"], prob_pred)
    gap = np.abs(full["mean_predicted"] - full["fraction_positive"])
    assert expected_calibration_error(y, p) == pytest.approx(
        float((full["count"] * gap).sum() / 1000)
    )


def test_reliability_table_empty_bins() -> None:
    table = reliability_table([0, 1, 1], [0.05, 0.95, 1.0], n_bins=4)
    assert table["count"].tolist() == [1, 0, 0, 2]
    assert math.isnan(table.loc[1, "mean_predicted"])
    assert table.loc[3, "fraction_positive"] == 1.0
    with pytest.raises(ValueError):
        reliability_table([0, 1], [0.5, 1.5])


# --- segmentation ----------------------------------------------------------------------

SPACING = (0.8, 1.0, 2.0)  # mm, anisotropic


def _sphere(shape: tuple[int, int, int], radius_mm: float) -> np.ndarray:
    grids = np.indices(shape).astype(float)
    centre = [(s - 1) / 2 for s in shape]
    r2 = sum(((g - c) * s) ** 2 for g, c, s in zip(grids, centre, SPACING, strict=True))
    return r2 <= radius_mm**2


def test_concentric_spheres() -> None:
    shape = (61, 49, 25)
    inner, outer = _sphere(shape, 12.0), _sphere(shape, 18.0)
    hd95, msd = surface_distances(inner, outer, SPACING)
    assert abs(hd95 - 6.0) <= max(SPACING)
    assert abs(msd - 6.0) <= max(SPACING)
    assert surface_distances(outer, inner, SPACING) == (hd95, msd)  # symmetric
    expected = 2 * inner.sum() / (inner.sum() + outer.sum())  # inner is inside outer
    assert dice(inner, outer) == pytest.approx(expected)
    assert dice(inner, outer) == pytest.approx((12 / 18) ** 3 * 2 / (1 + (12 / 18) ** 3), 0.05)


def test_identical_and_empty_masks() -> None:
    mask = _sphere((21, 21, 11), 6.0)
    empty = np.zeros_like(mask)
    assert dice(mask, mask) == 1.0
    assert surface_distances(mask, mask, SPACING) == (0.0, 0.0)
    assert dice(empty, empty) == 1.0
    assert surface_distances(empty, empty, SPACING) == (0.0, 0.0)
    assert dice(mask, empty) == 0.0
    assert dice(empty, mask) == 0.0
    assert all(math.isnan(v) for v in surface_distances(mask, empty, SPACING))
    assert all(math.isnan(v) for v in surface_distances(empty, mask, SPACING))
    with pytest.raises(ValueError):
        dice(mask, mask[:-1])
    with pytest.raises(ValueError):
        surface_distances(mask, mask, (1.0, 1.0))


def test_dice_and_distances_against_brute_force() -> None:
    from scipy import ndimage

    rng = np.random.default_rng(4)
    shape = (20, 18, 12)
    a = ndimage.gaussian_filter(rng.random(shape), 2) > 0.5
    b = ndimage.gaussian_filter(rng.random(shape), 2) > 0.5
    assert dice(a, b) == pytest.approx(2 * np.sum(a & b) / (a.sum() + b.sum()))

    def surface_points(m: np.ndarray) -> np.ndarray:
        edge = m & ~ndimage.binary_erosion(m)
        return np.argwhere(edge) * np.asarray(SPACING)

    d = cdist(surface_points(a), surface_points(b))
    pooled = np.r_[d.min(axis=1), d.min(axis=0)]
    hd95, msd = surface_distances(a, b, SPACING)
    assert hd95 == pytest.approx(np.percentile(pooled, 95))
    assert msd == pytest.approx(pooled.mean())


def test_distances_of_masks_on_the_border() -> None:
    # a slab filling the array: its border faces are surface too, and cropping keeps them
    a = np.zeros((10, 10, 10), bool)
    a[:, :, :4] = True
    b = np.zeros_like(a)
    b[:, :, :6] = True
    hd95, msd = surface_distances(a, b, (1.0, 1.0, 1.0))
    assert 0 < msd <= hd95 <= 2.0


def _shifted(mask: np.ndarray, voxels: int, axis: int = 0) -> np.ndarray:
    """The mask moved by whole voxels along one axis (nothing wraps round)."""
    out = np.zeros_like(mask)
    src = [slice(None)] * mask.ndim
    dst = [slice(None)] * mask.ndim
    src[axis], dst[axis] = slice(0, mask.shape[axis] - voxels), slice(voxels, None)
    out[tuple(dst)] = mask[tuple(src)]
    return out


def test_nsd_of_a_sphere_shifted_within_and_beyond_the_tolerance() -> None:
    sphere = _sphere((41, 41, 21), 12.0)
    moved = _shifted(sphere, 5, axis=2)  # 5 voxels of 2 mm: 10 mm along the coarse axis
    # every surface voxel has its own copy 10 mm away, so within 10 mm all of it counts
    assert normalised_surface_dice(sphere, moved, SPACING, 10.0) == 1.0
    assert normalised_surface_dice(sphere, moved, SPACING, 12.0) == 1.0
    assert normalised_surface_dice(sphere, moved, SPACING, 9.9) < 1.0
    # beyond: for spheres of radius r shifted by d, a share tol / d of the surface lies
    # within tol of the other sphere (points at cos(angle) within tol / d of d / 2r)
    for tolerance in (2.0, 4.0):
        nsd = normalised_surface_dice(sphere, moved, SPACING, tolerance)
        assert nsd == pytest.approx(tolerance / 10.0, abs=0.08)
    assert normalised_surface_dice(sphere, sphere, SPACING, 0.0) == 1.0
    empty = np.zeros_like(sphere)
    assert normalised_surface_dice(empty, empty, SPACING, 1.0) == 1.0
    assert normalised_surface_dice(sphere, empty, SPACING, 1.0) == 0.0
    assert normalised_surface_dice(empty, sphere, SPACING, 1.0) == 0.0
    with pytest.raises(ValueError):
        normalised_surface_dice(sphere, moved, SPACING, -1.0)
    with pytest.raises(ValueError):
        normalised_surface_dice(sphere, moved, (1.0, 1.0), 1.0)


def test_nsd_against_brute_force() -> None:
    from scipy import ndimage

    rng = np.random.default_rng(8)
    shape = (22, 16, 10)
    a = ndimage.gaussian_filter(rng.random(shape), 2) > 0.5
    b = ndimage.gaussian_filter(rng.random(shape), 2) > 0.5

    def surface_points(m: np.ndarray) -> np.ndarray:
        return np.argwhere(m & ~ndimage.binary_erosion(m)) * np.asarray(SPACING)

    d = cdist(surface_points(a), surface_points(b))
    pooled = np.r_[d.min(axis=1), d.min(axis=0)]
    for tolerance in (0.0, 1.0, 2.0, 3.5):
        expected = np.mean(pooled <= tolerance)
        assert normalised_surface_dice(a, b, SPACING, tolerance) == pytest.approx(expected)


def _label_maps() -> tuple[np.ndarray, np.ndarray]:
    """Truth and prediction with four structures, each a different case.

    1: a large blob, predicted a little shifted; 2: a small sphere on the array border,
    predicted eroded; 3: only in the truth (missed); 4: only predicted (false alarm);
    5: in neither.
    """
    from scipy import ndimage

    rng = np.random.default_rng(9)
    shape = (48, 40, 24)
    truth = np.zeros(shape, np.uint8)
    pred = np.zeros(shape, np.uint8)
    blob = ndimage.gaussian_filter(rng.random(shape), 3) > 0.5
    truth[blob] = 1
    pred[_shifted(blob, 2, axis=1)] = 1
    ball = np.zeros(shape, bool)
    ball[:9, :9, :7] = _sphere((9, 9, 7), 3.5)
    truth[ball] = 2
    pred[ndimage.binary_erosion(ball)] = 2
    truth[30:34, 30:34, 16:20] = 3
    pred[40:44, 2:6, 20:23] = 4
    return pred, truth


@pytest.mark.filterwarnings("ignore:the (prediction|ground truth) of class:UserWarning")
@pytest.mark.filterwarnings("ignore::FutureWarning")  # MONAI's own deprecated argument
def test_nsd_matches_monai_with_anisotropic_spacing() -> None:
    import torch
    from monai.metrics import compute_surface_dice

    pred, truth = _label_maps()
    spacing = (0.7, 1.3, 2.5)  # mm
    thresholds = [1.0, 2.0, 3.0, 1.5]  # per structure 1..4, mm
    one_hot = [
        torch.from_numpy(np.eye(6, dtype=np.uint8)[m]).permute(3, 0, 1, 2)[None]
        for m in (pred, truth)
    ]
    theirs = compute_surface_dice(
        one_hot[0][:, :5], one_hot[1][:, :5], thresholds, spacing=spacing
    )[0].numpy()
    ours = [
        normalised_surface_dice(pred == k, truth == k, spacing, tau)
        for k, tau in enumerate(thresholds, start=1)
    ]
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)
    assert 0 < ours[0] < 1 and 0 < ours[1] < 1  # the comparison is not trivial
    assert ours[2:] == [0.0, 0.0]


@pytest.mark.parametrize("tolerance", [1.0, 3.0])
def test_structure_scores_equal_the_per_mask_metrics(tolerance: float) -> None:
    pred, truth = _label_maps()
    spacing = (0.8, 1.1, 2.0)
    rows = structure_scores(pred, truth, 5, spacing, tolerance)
    assert [r["structure"] for r in rows] == [1, 2, 3, 4, 5]
    for k, row in enumerate(rows, start=1):
        a, b = pred == k, truth == k
        assert set(row) == {
            "structure",
            "dice",
            "hd95",
            "msd",
            "nsd",
            "present",
            "predicted_voxels",
        }
        assert row["dice"] == dice(a, b)
        np.testing.assert_array_equal([row["hd95"], row["msd"]], surface_distances(a, b, spacing))
        assert row["nsd"] == normalised_surface_dice(a, b, spacing, tolerance)
        assert row["present"] == bool(b.any())
        assert row["predicted_voxels"] == int(a.sum())
    assert [r["present"] for r in rows] == [True, True, True, False, False]
    assert 0 < rows[0]["dice"] < 1 and 0 < rows[1]["dice"] < 1
    assert rows[2]["dice"] == rows[3]["dice"] == 0.0
    assert math.isnan(rows[2]["hd95"]) and math.isnan(rows[3]["msd"])
    assert rows[4] == {
        "structure": 5,
        "dice": 1.0,
        "hd95": 0.0,
        "msd": 0.0,
        "nsd": 1.0,
        "present": False,
        "predicted_voxels": 0,
    }


def test_structure_scores_input() -> None:
    pred, truth = _label_maps()
    as_float = structure_scores(pred.astype(np.float32), truth.astype(np.float64), 5, SPACING, 2)
    assert as_float == structure_scores(pred, truth, 5, SPACING, 2)  # NIfTI's floats are fine
    assert len(structure_scores(pred, truth, 7, SPACING, 2)) == 7  # labels may go unused
    with pytest.raises(ValueError, match=r"0\.\.3"):
        structure_scores(pred, truth, 3, SPACING, 2.0)  # label 4 beyond the structures
    with pytest.raises(ValueError):
        structure_scores(pred + 0.5, truth, 5, SPACING, 2.0)
    with pytest.raises(ValueError):
        structure_scores(pred[:-1], truth, 5, SPACING, 2.0)
    with pytest.raises(ValueError):
        structure_scores(pred, truth, 5, SPACING[:2], 2.0)
    with pytest.raises(ValueError):
        structure_scores(pred, truth, 5, SPACING, math.inf)


# --- bootstrap -------------------------------------------------------------------------


def _mean(column: str) -> Callable[[pd.DataFrame], float]:
    return lambda f: float(f[column].mean())


def _auroc(f: pd.DataFrame) -> float:
    return auroc(f["y"].to_numpy(), f["p"].to_numpy())


def _cohort(n_patients: int, seed: int, rows_per_patient: int = 2) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    patient = np.repeat(np.arange(n_patients), rows_per_patient)
    y = rng.integers(0, 2, patient.size)
    p = np.clip(0.3 * y + rng.normal(0.35, 0.2, patient.size), 0, 1)
    return pd.DataFrame({"patient": [f"p{i:03d}" for i in patient], "y": y, "p": p})


def test_bootstrap_point_estimate_and_interval() -> None:
    frame = _cohort(100, 0)
    est, lo, hi = bootstrap_ci(frame, _auroc, n_boot=500)
    assert est == _auroc(frame)
    assert lo < est < hi
    est, lo, hi = bootstrap_ci(frame, _mean("p"), n_boot=500)
    assert est == frame["p"].mean()
    assert lo < est < hi


def test_bootstrap_narrows_with_more_patients() -> None:
    widths = []
    for n in (20, 80, 320):
        _, lo, hi = bootstrap_ci(_cohort(n, 1), _mean("p"), n_boot=400)
        widths.append(hi - lo)
    assert widths[0] > widths[1] > widths[2]
    assert widths[0] / widths[2] > 2.5  # about sqrt(16) = 4


def test_bootstrap_resamples_patients_not_rows() -> None:
    # 20 patients; one contributes 50 identical rows. Rows: 69. By patient, the mean is
    # dominated by whether that patient was drawn (0, 1, 2, ... times): a wide interval.
    rng = np.random.default_rng(7)
    values = np.r_[np.full(50, 10.0), rng.normal(0, 1, 19)]
    patients = ["big"] * 50 + [f"p{i}" for i in range(19)]
    frame = pd.DataFrame({"patient": patients, "v": values})
    _, lo, hi = bootstrap_ci(frame, _mean("v"), n_boot=1000)
    by_row = frame.assign(patient=np.arange(len(frame)))  # every row its own patient
    _, row_lo, row_hi = bootstrap_ci(by_row, _mean("v"), n_boot=1000)
    assert hi - lo > 3 * (row_hi - row_lo)
    assert lo < 3.0  # samples without "big" exist: mean of N(0, 1) rows only


def test_bootstrap_duplicates_drawn_patients() -> None:
    # 2 patients, each 1 row: every sample is {a, a}, {a, b} or {b, b}
    frame = pd.DataFrame({"patient": ["a", "b"], "v": [0.0, 1.0]})
    seen: list[tuple[float, ...]] = []

    def record(f: pd.DataFrame) -> float:
        seen.append(tuple(sorted(f["v"])))
        assert list(f.index) == list(range(len(f)))
        return float(f["v"].mean())

    bootstrap_ci(frame, record, n_boot=200)
    assert set(seen[1:]) == {(0.0, 0.0), (0.0, 1.0), (1.0, 1.0)}


def test_bootstrap_deterministic_and_seeded() -> None:
    frame = _cohort(50, 2)
    assert bootstrap_ci(frame, _auroc, seed=3, n_boot=200) == bootstrap_ci(
        frame, _auroc, seed=3, n_boot=200
    )
    assert bootstrap_ci(frame, _auroc, seed=3, n_boot=200) != bootstrap_ci(
        frame, _auroc, seed=4, n_boot=200
    )
    # row order does not matter: groups are found by value
    shuffled = frame.sample(frac=1.0, random_state=0)
    a = bootstrap_ci(frame, _mean("p"), n_boot=200)
    b = bootstrap_ci(shuffled, _mean("p"), n_boot=200)
    np.testing.assert_allclose(a, b)


def test_bootstrap_nan_handling() -> None:
    # 3 patients, one positive: a third of the samples hold a single class (NaN AUROC)
    frame = pd.DataFrame({"patient": ["a", "b", "c"], "y": [0, 0, 1], "p": [0.1, 0.2, 0.9]})
    est, lo, hi = bootstrap_ci(frame, _auroc, n_boot=200)
    assert (est, lo, hi) == (1.0, 1.0, 1.0)  # NaN samples dropped, the rest are perfect

    # valid only when "c" is drawn at least twice: 7 of 27 samples, under half
    def twice(f: pd.DataFrame) -> float:
        return 1.0 if f["y"].sum() >= 2 else math.nan

    est, lo, hi = bootstrap_ci(frame, twice, n_boot=500)
    assert math.isnan(est)
    assert math.isnan(lo) and math.isnan(hi)
    with pytest.raises(ValueError):
        bootstrap_ci(frame.assign(patient=["a", None, "c"]), _auroc)


def test_breakdown() -> None:
    frame = _cohort(60, 4)
    frame["modality"] = np.where(frame["patient"] < "p020", "MR", "CT")
    frame.loc[0, "modality"] = "CT"  # one patient in both strata
    out = breakdown(frame, "modality", _mean("p"), n_boot=200)
    assert list(out.columns) == ["modality", "n", "n_groups", "estimate", "ci_lower", "ci_upper"]
    assert out["modality"].tolist() == ["CT", "MR"]
    ct, mr = out.iloc[0], out.iloc[1]
    assert (ct["n"], ct["n_groups"]) == (81, 41)
    assert (mr["n"], mr["n_groups"]) == (39, 20)
    assert ct["estimate"] == pytest.approx(frame.loc[frame["modality"] == "CT", "p"].mean())
    assert (out["ci_lower"] < out["estimate"]).all()
    assert (out["estimate"] < out["ci_upper"]).all()


def test_the_bootstrap_moved_to_stats_and_still_answers_here() -> None:
    from medimg import metrics, stats

    with pytest.warns(DeprecationWarning, match="medimg.stats.bootstrap_ci"):
        assert metrics.bootstrap_ci is stats.bootstrap_ci
    with pytest.raises(AttributeError):
        metrics.no_such_metric  # noqa: B018


def test_mean_of_means_bootstraps_as_one_sample_at_a_time() -> None:
    """The vectorised bootstrap of MeanOfMeans gives what the generic one (a sample frame at
    a time) gives for the same statistic: the same draws, the same values to rounding."""
    rng = np.random.default_rng(11)
    n = 90  # rows of 40 patients; two structures present on some rows, NaNs among them
    frame = pd.DataFrame(
        {
            "patient": [f"p{i:02d}" for i in rng.integers(0, 40, n)],
            "dice_a": rng.uniform(0.5, 1.0, n),
            "dice_b": np.where(rng.random(n) < 0.2, np.nan, rng.uniform(0.0, 0.6, n)),
            "present_a": rng.random(n) < 0.8,
            "present_b": rng.random(n) < 0.3,
        }
    )
    stat = MeanOfMeans(("dice_a", "dice_b"), ("present_a", "present_b"))

    def by_hand(f: pd.DataFrame) -> float:  # each structure's mean where present, their mean
        means = [f.loc[f[f"present_{s}"], f"dice_{s}"].mean() for s in "ab"]
        return float(np.nanmean(means)) if not np.isnan(means).all() else math.nan

    assert stat(frame) == pytest.approx(by_hand(frame), abs=1e-12)
    fast = bootstrap_ci(frame, stat, n_boot=300, seed=5)
    slow = bootstrap_ci(frame, lambda f: stat(f), n_boot=300, seed=5)
    np.testing.assert_allclose(fast, slow, rtol=0, atol=1e-12)
    assert fast[1] < fast[0] < fast[2]
    # one column without masks: its mean, NaN ignored; no defined value: NaN, no interval
    single = MeanOfMeans(("dice_b",))
    assert single(frame) == pytest.approx(frame["dice_b"].mean(), abs=1e-12)
    np.testing.assert_allclose(
        bootstrap_ci(frame, single, n_boot=200),
        bootstrap_ci(frame, lambda f: single(f), n_boot=200),
    )
    empty = frame.assign(dice_b=np.nan)
    est, lo, hi = bootstrap_ci(empty, single, n_boot=100)
    assert math.isnan(est) and math.isnan(lo) and math.isnan(hi)
