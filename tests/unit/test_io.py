from pathlib import Path

import pytest

from medimg.io import atomic_dir, atomic_path, atomic_write_text


def test_atomic_path_keeps_old_content_on_error(tmp_path: Path) -> None:
    target = tmp_path / "labels.csv"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half-writ")
        raise RuntimeError("crash")
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]  # no temporary left behind


def test_atomic_dir_swaps_whole_folder(tmp_path: Path) -> None:
    target = tmp_path / "raw"
    with atomic_dir(target) as stage:
        (stage / "a").write_text("1")
    with pytest.raises(RuntimeError), atomic_dir(target) as stage:
        (stage / "b").write_text("2")
        raise RuntimeError("crash")
    assert sorted(p.name for p in target.iterdir()) == ["a"]
    with atomic_dir(target) as stage:
        (stage / "c").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == ["c"]
    assert [p.name for p in tmp_path.iterdir()] == ["raw"]


def test_remove_temporaries_takes_only_what_a_killed_write_left(tmp_path: Path) -> None:
    from medimg.io import remove_temporaries

    # what atomic_path names its temporaries, as a kill -9 leaves them
    for name in (".model.pt.k3j9x.tmp.pt", ".checkpoint.pt.a81q.tmp.pt", ".m.json.zz.tmp"):
        (tmp_path / name).write_bytes(b"partial")
    for name in ("model.pt", "checkpoint.pt", ".hidden-config"):
        (tmp_path / name).write_bytes(b"whole")

    gone = remove_temporaries(tmp_path, "checkpoint.pt")
    assert [p.name for p in gone] == [".checkpoint.pt.a81q.tmp.pt"]
    assert sorted(p.name for p in remove_temporaries(tmp_path)) == [
        ".m.json.zz.tmp",
        ".model.pt.k3j9x.tmp.pt",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".hidden-config",
        "checkpoint.pt",
        "model.pt",
    ]
