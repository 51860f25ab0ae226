import os
from pathlib import Path

import pytest

from medimg.io import (
    atomic_dir,
    atomic_path,
    atomic_rewrite,
    atomic_write_text,
    remove_spare,
    remove_temporaries,
    spare_path,
)


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


def _rewrite(target: Path, data: bytes) -> None:
    with atomic_rewrite(target) as f:
        f.write(data)


def test_atomic_rewrite_overwrites_the_version_before_last_in_place(tmp_path: Path) -> None:
    target = tmp_path / "checkpoint.pt"
    _rewrite(target, b"epoch 1 " * 1000)
    first = target.stat().st_ino
    _rewrite(target, b"epoch 2 " * 1000)
    spare = spare_path(target)
    assert spare.read_bytes() == b"epoch 1 " * 1000  # the replaced version, kept whole
    assert spare.stat().st_ino == first
    _rewrite(target, b"epoch 3")  # shorter: the rest of the old content is cut off
    assert target.read_bytes() == b"epoch 3"
    assert target.stat().st_ino == first  # written into the spare's blocks
    assert spare.read_bytes() == b"epoch 2 " * 1000
    remove_spare(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_atomic_rewrite_never_writes_through_a_link(tmp_path: Path) -> None:
    target, spare = tmp_path / "checkpoint.pt", spare_path(tmp_path / "checkpoint.pt")
    outside = tmp_path / "elsewhere"
    outside.write_bytes(b"not ours")
    # a crash between the link and the rename leaves the spare as a second name of target
    _rewrite(target, b"whole")
    os.link(target, spare)
    _rewrite(target, b"next")
    assert target.read_bytes() == b"next"
    assert spare.read_bytes() == b"whole"  # the old version, untouched
    # a spare that is a symbolic link (or a hard link, as a DVC cache makes) is set aside
    spare.unlink()
    spare.symlink_to(outside)
    _rewrite(target, b"after")
    os.link(outside, tmp_path / "second-name")
    spare.unlink()
    os.link(outside, spare)
    _rewrite(target, b"last")
    assert outside.read_bytes() == b"not ours"
    assert target.read_bytes() == b"last"


def test_atomic_rewrite_keeps_old_content_on_error(tmp_path: Path) -> None:
    target = tmp_path / "checkpoint.pt"
    _rewrite(target, b"epoch 1")
    _rewrite(target, b"epoch 2")
    with pytest.raises(RuntimeError), atomic_rewrite(target) as f:
        f.write(b"half-writ")
        raise RuntimeError("crash")
    assert target.read_bytes() == b"epoch 2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]
    # a kill mid-write leaves temporaries and the spare: the next run removes them
    _rewrite(target, b"epoch 3")
    _rewrite(target, b"epoch 4")
    (tmp_path / ".checkpoint.pt.x7k2.tmp").write_bytes(b"partial")
    assert sorted(p.name for p in remove_temporaries(tmp_path, "checkpoint.pt")) == [
        ".checkpoint.pt.spare.tmp",
        ".checkpoint.pt.x7k2.tmp",
    ]
    assert target.read_bytes() == b"epoch 4"
