"""What a run records of its environment: the installed versions, read from metadata, and
the lock the environment was installed from, with what differs from it."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import sysconfig
from importlib.metadata import version
from pathlib import Path

from medimg import versions
from tests.helpers import write_lock

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "requirements" / "cpu.lock"


def test_installed_versions_name_each_package_from_its_metadata() -> None:
    record = versions.installed_versions()
    assert record["version.python"] == ".".join(map(str, sys.version_info[:3]))
    for name in versions.PACKAGES:
        assert record[f"version.{name}"] == version(name)
    assert versions.installed_versions(["no-such-distribution-medimg"]) == {
        "version.python": record["version.python"],
        "version.no-such-distribution-medimg": "not installed",
    }


def test_read_lock_takes_every_pin_of_the_real_lock() -> None:
    pins = versions.read_lock(LOCK)
    lines = [line for line in LOCK.read_text().splitlines() if "==" in line.split(" ")[0]]
    assert len(pins) == len(lines) > 200
    assert pins["torch"].endswith("+cpu")
    assert pins["pyyaml"] == pins[versions.canonical("PyYAML")]


def test_the_lock_record_names_what_differs_from_the_lock(tmp_path: Path) -> None:
    installed = versions.installed_distributions()
    numpy, mlflow = version("numpy"), version("mlflow")
    same = write_lock(tmp_path / "same.lock", {"numpy": numpy, "MLflow": mlflow})
    assert versions.lock_record(same, installed) == {
        "lock.sha256": hashlib.sha256(same.read_bytes()).hexdigest(),
        "lock.drift": "none",
    }
    pins = {"numpy": numpy, "mlflow": "0.0.1", "no-such-distribution-medimg": "1.0"}
    drifted = versions.lock_record(write_lock(tmp_path / "drifted.lock", pins), installed)
    assert drifted["lock.drift"] == (
        f"mlflow {mlflow} (lock 0.0.1); no-such-distribution-medimg missing (lock 1.0)"
    )
    assert versions.lock_record(None, installed) == {
        "lock.sha256": "none",
        "lock.drift": "not installed from a lock",
    }


def test_a_long_drift_is_counted_past_its_first_entries(tmp_path: Path) -> None:
    pins = {f"no-such-distribution-{i:02d}": "1.0" for i in range(versions.MAX_DRIFT + 3)}
    record = versions.lock_record(write_lock(tmp_path / "many.lock", pins), {})
    assert record["lock.drift"].count("missing") == versions.MAX_DRIFT
    assert record["lock.drift"].endswith("; and 3 more")


def test_an_environment_reads_the_lock_make_install_left_in_it(tmp_path: Path) -> None:
    """A real second environment (a venv that sees this one's packages through a .pth
    file) with a lock at its prefix, as ``make install`` leaves it: its record has the
    lock's digest and what differs; and reading the versions imports none of the packages."""
    env = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    purelib = Path(sysconfig.get_paths(vars={"base": str(env)})["purelib"])
    here = sysconfig.get_paths()["purelib"]
    (purelib / "outer.pth").write_text(f"{ROOT}\n{here}\n")
    lock = write_lock(env / versions.INSTALLED_LOCK, {"numpy": "0.0.1", "torch": "0.0.2"})
    code = (
        "import json, sys; from medimg.versions import environment_versions;"
        "r = environment_versions();"
        "r['imported'] = sorted({'torch', 'monai', 'mlflow', 'prefect', 'dvc'} & set(sys.modules));"
        "print(json.dumps(r))"
    )
    out = subprocess.run(
        [str(env / "bin" / "python"), "-c", code], capture_output=True, text=True, check=True
    )
    record = json.loads(out.stdout)
    assert record["lock.sha256"] == hashlib.sha256(lock.read_bytes()).hexdigest()
    numpy, torch = version("numpy"), version("torch")
    assert record["lock.drift"] == f"numpy {numpy} (lock 0.0.1); torch {torch} (lock 0.0.2)"
    assert record["version.monai"] == version("monai") and record["imported"] == []


def test_installed_distributions_read_as_importlib_parses_them() -> None:
    """The metadata headers read as lines give every distribution importlib.metadata
    finds, with the version its full parse gives."""
    from importlib.metadata import distributions

    parsed: dict[str, str] = {}
    for dist in distributions():
        if dist.metadata["Name"]:
            parsed.setdefault(versions.canonical(dist.metadata["Name"]), dist.version)
    installed = versions.installed_distributions()
    assert installed == parsed and len(installed) > 200
    assert installed["torch"] == version("torch")
