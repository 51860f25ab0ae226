"""Atomic writes: a reader sees the old content or the new one, never a partial file."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(target: Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` on success.

    ``suffix`` ends the temporary name, for writers that choose a format by extension
    (``".tmp.nii.gz"`` makes nibabel compress).

    The temporary file lives in the same folder, so the final ``os.replace`` is atomic on
    POSIX file systems. On error the temporary file is removed and ``target`` is untouched.

    Example:
        >>> with atomic_path(Path("labels.csv")) as tmp:  # doctest: +SKIP
        ...     frame.to_csv(tmp)
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix, dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def remove_temporaries(folder: Path, name: str = "*") -> list[Path]:
    """Delete the temporary files that :func:`atomic_path` leaves when its process is
    killed (``.<name>.<random><suffix>``); ``name`` narrows it to one target's. Returns
    what was deleted."""
    gone = []
    for tmp in Path(folder).glob(f".{name}.*.tmp*"):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)
            gone.append(tmp)
    return gone


def atomic_write_bytes(target: Path, data: bytes) -> None:
    """Write ``data`` to ``target`` atomically."""
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(target: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``target`` atomically."""
    atomic_write_bytes(target, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield an empty staging folder; on success it replaces ``target`` as a whole.

    The old folder is moved aside and deleted only after the new one is in place, so a
    crash leaves either the old or the new content under ``target`` (plus, at worst, a
    hidden leftover that the next call removes).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
        os.replace(target, old / "old")
    os.replace(staging, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
