"""What a result was computed with: the versions of the packages that decide its numbers,
and the lock the environment was installed from, with what differs from it.

Read from the installed distributions' metadata, so recording them imports none of the
packages. Versions and a digest only: nothing of the data, the machine's paths or the user.
``make install`` copies the lock it installed to :data:`INSTALLED_LOCK` in the environment
(docs/installation.md); an environment installed otherwise records that it has no lock.
"""

from __future__ import annotations

import functools
import hashlib
import platform
import re
import sys
from collections.abc import Iterable, Mapping
from importlib.metadata import Distribution, PackageNotFoundError, distributions, version
from pathlib import Path

# The packages named in every MLflow run and model card (``version.<name>``); the lock
# comparison covers all the others.
PACKAGES = (
    "torch",
    "monai",
    "numpy",
    "mlflow",
    "pydicom",
    "highdicom",
    "nibabel",
    "scikit-image",
    "prefect",
    "dvc",
    "medimg",
)
INSTALLED_LOCK = "medimg.lock"  # in the environment's folder (sys.prefix)
NO_LOCK = "none"
MAX_DRIFT = 20  # differences from the lock named one by one; the rest are counted

_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")


def canonical(name: str) -> str:
    """A distribution's name as the lock and PyPI compare it: ``PyYAML`` -> ``pyyaml``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_versions(packages: Iterable[str] = PACKAGES) -> dict[str, str]:
    """``version.python`` and ``version.<name>`` for each package (``not installed``)."""
    record = {"version.python": platform.python_version()}
    for name in packages:
        try:
            record[f"version.{name}"] = version(name)
        except PackageNotFoundError:
            record[f"version.{name}"] = "not installed"
    return record


def read_lock(path: Path) -> dict[str, str]:
    """A lock's pins, canonical name -> version: its ``name==version`` lines (options,
    hashes and comments are skipped)."""
    pins: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        match = _PIN.match(line)
        if match:
            pins[canonical(match.group(1))] = match.group(2)
    return pins


def installed_distributions() -> dict[str, str]:
    """Every installed distribution, canonical name -> version (the first on sys.path
    wins, as for an import)."""
    found: dict[str, str] = {}
    for dist in distributions():
        name, installed = _name_and_version(dist)
        if name and installed:
            found.setdefault(canonical(name), installed)
    return found


def _name_and_version(dist: Distribution) -> tuple[str | None, str | None]:
    """``Name`` and ``Version`` from the header of a distribution's metadata file, read
    as lines: ``dist.metadata`` parses each whole file as an e-mail message, ten times
    slower (0.4 s for 270 distributions, at every stage's start)."""
    text = dist.read_text("METADATA") or dist.read_text("PKG-INFO") or ""
    name = number = None
    for line in text.splitlines():
        if not line:  # the header ends at the first empty line
            break
        if line.startswith("Name:"):
            name = line[5:].strip()
        elif line.startswith("Version:"):
            number = line[8:].strip()
    return name, number


def lock_drift(pins: Mapping[str, str], installed: Mapping[str, str]) -> list[str]:
    """The locked packages whose installed version is another or none, sorted by name:
    ``mlflow 3.18.0 (lock 3.17.2)``, ``uv missing (lock 0.13.9)``."""
    drift = []
    for name, locked in sorted(pins.items()):
        have = installed.get(name)
        if have != locked:
            drift.append(f"{name} {have or 'missing'} (lock {locked})")
    return drift


def lock_record(lock: Path | None, installed: Mapping[str, str]) -> dict[str, str]:
    """``lock.sha256`` of the lock (``none`` without one) and ``lock.drift``: ``none`` when
    every locked package is installed at its locked version, else what differs."""
    if lock is None or not lock.is_file():
        return {"lock.sha256": NO_LOCK, "lock.drift": "not installed from a lock"}
    drift = lock_drift(read_lock(lock), installed)
    shown = "; ".join(drift[:MAX_DRIFT])
    if len(drift) > MAX_DRIFT:
        shown += f"; and {len(drift) - MAX_DRIFT} more"
    return {
        "lock.sha256": hashlib.sha256(lock.read_bytes()).hexdigest(),
        "lock.drift": shown or "none",
    }


def environment_versions() -> dict[str, str]:
    """The versions of :data:`PACKAGES`, and the record of the lock this environment was
    installed from (:func:`lock_record`). Read once per process (about half a second for
    a few hundred distributions); each call returns a copy of its own."""
    return dict(_environment_versions())


@functools.cache
def _environment_versions() -> dict[str, str]:
    lock = Path(sys.prefix) / INSTALLED_LOCK
    return installed_versions() | lock_record(lock, installed_distributions())
