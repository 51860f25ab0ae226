"""The console script, run as a user runs it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

from tests.helpers import TINY_SYNTH, tool_path

REPO = Path(__file__).resolve().parents[2]
# Every command medimg/cli.py registers: the pipeline's stages, its summary, then its two
# services.
COMMANDS = [
    "synth",
    "ingest",
    "preprocess",
    "train",
    "evaluate",
    "register",
    "promote",
    "summary",
    "predict",
    "ui",
    "prefect-server",
    "pacs",
]


def _medimg(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool_path("medimg"), *args], cwd=cwd, capture_output=True, text=True, check=False
    )


def test_import_of_cli_stays_light() -> None:
    code = (
        "import sys, medimg.cli; "
        "heavy = [m for m in ('torch', 'monai', 'mlflow', 'prefect', 'dvc', 'pydicom') "
        "if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _listed_commands(help_text: str) -> list[str]:
    """The command names in ``--help``'s Commands section (a rich panel, or click's list):
    the first word of each entry, not the continuation lines of a wrapped description."""
    lines = help_text.splitlines()
    start = next(i for i, line in enumerate(lines) if "Commands" in line)
    entry = re.compile(r"^(?:│ |  )([a-z][a-z-]*)\s")
    return [m.group(1) for line in lines[start + 1 :] if (m := entry.match(line))]


def _commands_run_by_the_project() -> set[str]:
    """The ``medimg`` commands dvc.yaml's stages and the Makefile's recipes run."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    words = [str(stage.get("do", stage)["cmd"]).split() for stage in stages.values()]
    used = {w[1] for w in words if w[0] == "medimg"}
    recipes = (REPO / "Makefile").read_text()
    return used | set(re.findall(r"^\t\$\(BIN\)/medimg ([a-z][a-z-]*)", recipes, re.MULTILINE))


def test_help_lists_the_stages(tmp_path: Path) -> None:
    proc = _medimg("--help", cwd=tmp_path)
    assert proc.returncode == 0
    listed = _listed_commands(proc.stdout)
    assert sorted(listed) == sorted(COMMANDS), proc.stdout
    used = _commands_run_by_the_project()
    assert {"synth", "ingest", "preprocess", "train", "evaluate", "register"} <= used
    assert used <= set(listed)


def test_synth_command_writes_cohort(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"synth": TINY_SYNTH.model_dump(mode="json")}))
    proc = _medimg("synth", "--params", str(params), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "series" in proc.stdout
    assert (tmp_path / "data" / "labels.csv").exists()
    assert any((tmp_path / "data" / "raw").rglob("IM*"))


def test_bad_params_exit_2_naming_key_and_file(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("synth:\n  matrx: 64\n")
    proc = _medimg("synth", "--params", str(params), cwd=tmp_path)
    assert proc.returncode == 2
    assert "synth.matrx" in proc.stderr and "params.yaml" in proc.stderr
    assert not (tmp_path / "data").exists()
