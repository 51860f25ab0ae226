"""requirements/cpu.lock, the environment `make install` installs: every dependency of
pyproject.toml pinned with hashes, torch as the Makefile names it, and the install rule
checking every file against the lock."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import tomllib
from packaging.requirements import Requirement

from medimg.versions import canonical

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "requirements" / "cpu.lock"
HASH = re.compile(r"--hash=sha256:[0-9a-f]{64}\b")


def lock_entries(text: str) -> dict[str, tuple[str, int]]:
    """Canonical name -> (the requirement as written, its number of sha256 hashes)."""
    entries: dict[str, tuple[str, int]] = {}
    name = ""
    for line in text.splitlines():
        if line and not line[0].isspace() and not line.startswith("#"):
            requirement = line.split(" ")[0]
            name = canonical(re.split(r"[=<>!~\[;]", requirement)[0])
            entries[name] = (requirement, len(HASH.findall(line)))
        elif name and HASH.search(line):
            requirement, hashes = entries[name]
            entries[name] = (requirement, hashes + len(HASH.findall(line)))
    return entries


def declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [
        Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]
    ]


def test_the_lock_pins_every_dependency_with_hashes() -> None:
    entries = lock_entries(LOCK.read_text())
    for requirement in declared():
        name = canonical(requirement.name)
        assert name in entries, f"{name} is in pyproject.toml, not in the lock: run make lock"
        pin, hashes = entries[name]
        assert re.fullmatch(r"[A-Za-z0-9._-]+==[^=\s]+", pin), pin
        assert requirement.specifier.contains(pin.split("==")[1], prereleases=True), (
            f"{pin} is outside pyproject.toml's {requirement}: run make lock"
        )
        assert hashes >= 1, f"{pin} has no hash"
    # and everything it pulls in: pip's --require-hashes refuses a file otherwise
    assert len(entries) > len(declared())
    assert all("==" in pin and hashes >= 1 for pin, hashes in entries.values())


def make(*args: str) -> str:
    out = subprocess.run(
        ["make", "--no-print-directory", *args], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_the_lock_has_the_torch_the_makefile_installs_by_default() -> None:
    torch = make("-s", "--eval", "show-torch: ; @echo $(TORCH)", "show-torch").strip()
    assert re.fullmatch(r"torch==[0-9.]+", torch), torch
    assert lock_entries(LOCK.read_text())["torch"][0] == f"{torch}+cpu"  # the CPU build


def test_make_install_installs_the_lock_with_its_hashes_checked(tmp_path: Path) -> None:
    steps = make("-n", "install", f"VENV={tmp_path}").splitlines()
    pip = f"{tmp_path}/bin/python -m pip install --quiet"
    lock = f"{pip} --no-deps --require-hashes -r requirements/cpu.lock"
    editable = f"{pip} --no-deps -e ."
    assert (
        steps.index(lock)
        < steps.index(editable)
        < steps.index(f"{tmp_path}/bin/python -m pip check")
    )
    assert f"cp requirements/cpu.lock {tmp_path}/medimg.lock" in steps
    assert not any("torch" in step for step in steps)  # torch comes from the lock alone


def test_another_torch_goes_in_first_and_the_rest_of_the_lock_after(tmp_path: Path) -> None:
    cuda = "torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
    steps = make("-n", "install", f"VENV={tmp_path}", f"TORCH={cuda}").splitlines()
    rest = tmp_path / "lock-without-torch.txt"
    pip = f"{tmp_path}/bin/python -m pip install --quiet"
    first = steps.index(f"{pip} {cuda}")
    assert first < steps.index(f"{pip} --no-deps --require-hashes -r {rest}")
    (cut,) = [step for step in steps if step.startswith("awk ")]
    subprocess.run(["bash", "-c", cut], cwd=ROOT, check=True)  # the Makefile's own filter
    full, without = lock_entries(LOCK.read_text()), lock_entries(rest.read_text())
    assert "torch" not in without
    assert without == {k: v for k, v in full.items() if k != "torch"}
    assert shlex.split(cut)[-1] == str(rest)
