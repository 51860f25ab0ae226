import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from medimg import multiclass
from medimg.metrics import confusion_counts, reliability_table, roc_curve
from medimg.plots import (
    plot_calibration,
    plot_calibration_multiclass,
    plot_confusion,
    plot_confusion_matrix,
    plot_per_case,
    plot_per_structure,
    plot_roc,
    plot_roc_one_vs_rest,
    plot_training_curves,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

rng = np.random.default_rng(0)
Y = rng.integers(0, 2, 120)
P = np.clip(0.35 * Y + rng.normal(0.3, 0.2, Y.size), 0, 1)
P[:20] = np.round(P[:20], 1)  # some ties
CASES = pd.DataFrame(
    {
        "series": [f"s{i:02d}" for i in range(12)],
        "patient": [f"p{i // 2}" for i in range(12)],
        "dice": np.r_[rng.random(11), np.nan],
    }
)
CLASSES = ["none", "cyst-like", "solid-like"]
Y3 = rng.permutation(np.r_[0, 1, 2, rng.integers(0, 3, 87)])
_logits = rng.normal(0, 1, (Y3.size, 3))
_logits[np.arange(Y3.size), Y3] += 1.5
P3 = np.exp(_logits) / np.exp(_logits).sum(axis=1, keepdims=True)
PRED3 = multiclass.predicted_class(P3)
STRUCTURES = ["body", "lungs", "liver", "spine", "lesion"]
PER_STRUCTURE = pd.DataFrame(
    {
        "key": np.repeat([f"k{i:02d}" for i in range(8)], 5),
        "structure": STRUCTURES * 8,
        "dice": np.r_[rng.random(39), np.nan],
        "hd95": rng.random(40) * 10,
    }
).sample(frac=1.0, random_state=1)  # shuffled: the order of first appearance is kept
HISTORY = [
    {"epoch": e, "train_loss": 1 / e, "val_loss": 1.2 / e, "val_metric": 1 - 0.5 / e, "note": "x"}
    for e in range(1, 6)
]


def _check_files(paths: list[Path], out_dir: Path, name: str) -> pd.DataFrame:
    png, csv = out_dir / f"{name}.png", out_dir / f"{name}.csv"
    assert paths == [png, csv]
    data = png.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 1000
    assert b"Software" not in data  # no version string in the metadata
    assert sorted(p.name for p in out_dir.iterdir()) == sorted([png.name, csv.name])  # no tmp
    return pd.read_csv(csv)


def test_plot_roc(tmp_path: Path) -> None:
    table = _check_files(plot_roc(Y, P, tmp_path), tmp_path, "roc")
    fpr, tpr, thresholds = roc_curve(Y, P)
    assert list(table.columns) == ["fpr", "tpr", "threshold"]
    np.testing.assert_allclose(table["fpr"], fpr)
    np.testing.assert_allclose(table["tpr"], tpr)
    np.testing.assert_array_equal(table["threshold"], thresholds)  # inf included


def test_plot_calibration(tmp_path: Path) -> None:
    table = _check_files(plot_calibration(Y, P, tmp_path, n_bins=5), tmp_path, "calibration")
    expected = reliability_table(Y, P, n_bins=5)
    pd.testing.assert_frame_equal(table, expected, check_dtype=False)
    assert table["count"].sum() == Y.size


def test_plot_confusion(tmp_path: Path) -> None:
    table = _check_files(plot_confusion(Y, P, 0.5, tmp_path), tmp_path, "confusion")
    assert list(table.columns) == ["actual", "predicted", "count"]
    pred = (P >= 0.5).astype(int)
    for row in table.itertuples():
        assert row.count == np.sum(np.equal(Y, row.actual) & (pred == row.predicted))
    assert tuple(table["count"]) == confusion_counts(Y, P, 0.5)
    assert table["count"].sum() == Y.size


def test_plot_confusion_matrix(tmp_path: Path) -> None:
    paths = plot_confusion_matrix(Y3, PRED3, CLASSES, tmp_path)
    table = _check_files(paths, tmp_path, "confusion_matrix")
    assert list(table.columns) == ["truth", "predicted", "count"]
    assert len(table) == 9  # every cell, zeros included
    counts = multiclass.confusion_matrix(Y3, PRED3, 3)
    for row in table.itertuples():
        assert row.count == counts[CLASSES.index(row.truth), CLASSES.index(row.predicted)]
    assert table["count"].sum() == Y3.size
    assert counts.trace() > Y3.size / 2  # the data lean towards the truth: not all zeros
    with pytest.raises(ValueError):
        plot_confusion_matrix(Y3, PRED3, [*CLASSES[:2], "none"], tmp_path / "x")


def test_confusion_matrix_does_not_overwrite_the_binary_one(tmp_path: Path) -> None:
    binary = plot_confusion(Y, P, 0.5, tmp_path)
    two_class = plot_confusion_matrix(Y, (P >= 0.5).astype(int), ["neg", "pos"], tmp_path)
    assert {p.name for p in binary}.isdisjoint(p.name for p in two_class)
    a, b = pd.read_csv(binary[1]), pd.read_csv(two_class[1])
    assert a["count"].tolist() == b["count"].tolist()  # same cells, in the same order


def test_plot_roc_one_vs_rest(tmp_path: Path) -> None:
    paths = plot_roc_one_vs_rest(Y3, P3, CLASSES, tmp_path)
    table = _check_files(paths, tmp_path, "roc_one_vs_rest")
    assert list(table.columns) == ["class", "fpr", "tpr"]
    assert list(dict.fromkeys(table["class"])) == CLASSES
    for k, name in enumerate(CLASSES):
        fpr, tpr, _ = roc_curve(np.equal(Y3, k), P3[:, k])
        rows = table[table["class"] == name]
        np.testing.assert_allclose(rows["fpr"], fpr)
        np.testing.assert_allclose(rows["tpr"], tpr)
        area = np.trapezoid(rows["tpr"], rows["fpr"])
        assert area == pytest.approx(multiclass.one_vs_rest_auroc(Y3, P3)[k])


def test_plot_roc_one_vs_rest_with_a_class_absent(tmp_path: Path) -> None:
    y = np.where(Y3 == 1, 0, Y3)  # nobody is cyst-like
    table = _check_files(
        plot_roc_one_vs_rest(y, P3, CLASSES, tmp_path), tmp_path, "roc_one_vs_rest"
    )
    absent = table[table["class"] == "cyst-like"]
    assert absent["tpr"].isna().all()
    assert table.loc[table["class"] != "cyst-like", ["fpr", "tpr"]].notna().all().all()


def test_plot_calibration_multiclass(tmp_path: Path) -> None:
    paths = plot_calibration_multiclass(Y3, P3, tmp_path, n_bins=5)
    table = _check_files(paths, tmp_path, "calibration_top_label")
    assert list(table.columns) == ["bin_lower", "bin_upper", "count", "mean_confidence", "accuracy"]
    confidence, correct = multiclass.top_label(Y3, P3)
    expected = reliability_table(correct, confidence, n_bins=5)
    np.testing.assert_allclose(table["mean_confidence"], expected["mean_predicted"])
    np.testing.assert_allclose(table["accuracy"], expected["fraction_positive"])
    assert table["count"].sum() == Y3.size
    assert table.loc[0, "count"] == 0  # no top class is below 1/3 sure
    full = table[table["count"] > 0]
    gap = np.abs(full["mean_confidence"] - full["accuracy"])
    assert float((full["count"] * gap).sum() / Y3.size) == pytest.approx(
        multiclass.expected_calibration_error(Y3, P3, n_bins=5)
    )


def test_plot_per_structure(tmp_path: Path) -> None:
    table = _check_files(
        plot_per_structure(PER_STRUCTURE, tmp_path), tmp_path, "dice_per_structure"
    )
    assert list(table.columns) == ["key", "structure", "dice"]
    order = list(dict.fromkeys(PER_STRUCTURE["structure"]))
    assert list(dict.fromkeys(table["structure"])) == order
    for _, rows in table.groupby("structure", sort=False):
        finite = rows["dice"].dropna()
        assert finite.is_monotonic_increasing  # worst first
        assert rows["dice"].iloc[: finite.size].notna().all()  # NaN last
    merged = table.merge(PER_STRUCTURE, on=["key", "structure"], suffixes=("", "_in"))
    assert len(merged) == len(PER_STRUCTURE)
    np.testing.assert_allclose(merged["dice"], merged["dice_in"])
    other = plot_per_structure(PER_STRUCTURE, tmp_path / "hd", "hd95_per_structure", value="hd95")
    assert list(pd.read_csv(other[1]).columns) == ["key", "structure", "hd95"]
    with pytest.raises(ValueError, match="structure"):
        plot_per_structure(PER_STRUCTURE.drop(columns="structure"), tmp_path / "x")


def test_per_structure_from_structure_scores(tmp_path: Path) -> None:
    from medimg.metrics import structure_scores

    truth = np.zeros((12, 12, 6), np.uint8)
    truth[2:6, 2:6, 1:4], truth[7:10, 7:11, 2:5] = 1, 2
    cases = []
    for i in range(3):
        pred = np.roll(truth, i, axis=0)
        for row in structure_scores(pred, truth, 2, (1.0, 1.0, 2.0), 1.0):
            cases.append(
                {"key": f"c{i}", "structure": STRUCTURES[row["structure"] - 1], "dice": row["dice"]}
            )
    table = _check_files(
        plot_per_structure(pd.DataFrame(cases), tmp_path), tmp_path, "dice_per_structure"
    )
    assert table["structure"].tolist() == ["body"] * 3 + ["lungs"] * 3
    assert table.loc[table["key"] == "c0", "dice"].tolist() == [1.0, 1.0]
    assert table["dice"].iloc[0] < 1.0 and table["dice"].iloc[3] < 1.0


def test_plot_per_case(tmp_path: Path) -> None:
    paths = plot_per_case(CASES, "dice", tmp_path, "dice_per_case")
    table = _check_files(paths, tmp_path, "dice_per_case")
    assert list(table.columns) == ["series", "dice"]
    assert sorted(table["series"]) == sorted(CASES["series"])
    assert table["dice"].iloc[:-1].is_monotonic_increasing  # sorted, worst first
    assert np.isnan(table["dice"].iloc[-1])  # NaN kept, last
    merged = table.merge(CASES, on="series", suffixes=("", "_in"))
    np.testing.assert_allclose(merged["dice"], merged["dice_in"])


def test_plot_per_case_many_cases_custom_key(tmp_path: Path) -> None:
    frame = pd.DataFrame({"case": np.arange(100), "hd95": rng.random(100)})
    table = _check_files(plot_per_case(frame, "hd95", tmp_path, "hd", key="case"), tmp_path, "hd")
    assert sorted(table["case"]) == list(range(100))


def test_plot_training_curves(tmp_path: Path) -> None:
    table = _check_files(plot_training_curves(HISTORY, tmp_path), tmp_path, "training")
    pd.testing.assert_frame_equal(table, pd.DataFrame(HISTORY))
    with pytest.raises(ValueError):
        plot_training_curves([], tmp_path)


def test_plot_training_curves_losses_only(tmp_path: Path) -> None:
    history = [{"train_loss": 0.5}, {"train_loss": 0.25}]  # no epoch column
    table = _check_files(plot_training_curves(history, tmp_path, "t"), tmp_path, "t")
    assert table["train_loss"].tolist() == [0.5, 0.25]


PLOTS: dict[str, Callable[[Path], list[Path]]] = {
    "roc": lambda d: plot_roc(Y, P, d),
    "calibration": lambda d: plot_calibration(Y, P, d),
    "confusion": lambda d: plot_confusion(Y, P, 0.4, d),
    "per_case": lambda d: plot_per_case(CASES, "dice", d, "per_case"),
    "training": lambda d: plot_training_curves(HISTORY, d),
    "confusion_matrix": lambda d: plot_confusion_matrix(Y3, PRED3, CLASSES, d),
    "roc_one_vs_rest": lambda d: plot_roc_one_vs_rest(Y3, P3, CLASSES, d),
    "calibration_top_label": lambda d: plot_calibration_multiclass(Y3, P3, d),
    "per_structure": lambda d: plot_per_structure(PER_STRUCTURE, d),
}


@pytest.mark.parametrize("kind", sorted(PLOTS))
def test_same_input_same_bytes(kind: str, tmp_path: Path) -> None:
    first = [p.read_bytes() for p in PLOTS[kind](tmp_path / "a")]
    second = [p.read_bytes() for p in PLOTS[kind](tmp_path / "b")]
    again = [p.read_bytes() for p in PLOTS[kind](tmp_path / "a")]  # overwrite in place
    assert first == second == again


def test_import_is_cheap_and_leaves_no_figures(tmp_path: Path) -> None:
    code = (
        "import sys, medimg.plots as m\n"
        "assert 'matplotlib' not in sys.modules\n"
        "from pathlib import Path\n"
        f"m.plot_confusion([0, 1], [0.2, 0.7], 0.5, Path({str(tmp_path)!r}))\n"
        "assert 'matplotlib.pyplot' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
