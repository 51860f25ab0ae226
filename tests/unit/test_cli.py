"""The console script, run as a user runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import TINY_SYNTH, tool_path


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


def test_help_lists_the_stages(tmp_path: Path) -> None:
    proc = _medimg("--help", cwd=tmp_path)
    assert proc.returncode == 0
    assert "synth" in proc.stdout


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
