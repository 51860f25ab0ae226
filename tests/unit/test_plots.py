import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from medimg.metrics import confusion_counts, reliability_table, roc_curve
from medimg.plots import (
    plot_calibration,
    plot_confusion,
    plot_per_case,
    plot_roc,
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
