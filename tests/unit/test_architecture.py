"""The shape of the code, checked: import layers (import-linter contracts in
pyproject.toml), no import cycle, no branching on a task's name outside its spec, and the
size limits of modules and functions."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LIBRARY = ROOT / "medimg"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80
# where a task's name may be compared with a literal: the specs and the network builders
TASK_HOMES = {*(LIBRARY / "tasks").glob("*.py"), LIBRARY / "models" / "build.py"}


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """import-linter on the packages under ``root``, with ``root``'s contracts."""
    tool = Path(sys.executable).with_name("lint-imports")
    return subprocess.run(
        [str(tool), str(root / "pyproject.toml"), "--no-cache"],
        cwd=root,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_import_contracts_hold() -> None:
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 kept, 0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        # a low layer reaching up: config importing the training loop
        ("config/base.py", "import medimg.train", "Layers: an import only goes down"),
        # the library importing the orchestrator
        ("io.py", "import prefect", "The library never imports Prefect"),
        # MLflow outside the tracking package
        ("evaluate.py", "import mlflow", "Only medimg.tracking imports MLflow"),
        # DICOM networking outside the pacs package
        ("predict.py", "import pynetdicom", "Only medimg.pacs speaks DICOM networking"),
    ],
)
def test_each_contract_fails_when_broken(
    tmp_path: Path, module: str, line: str, contract: str
) -> None:
    """The contracts can fail: one bad import in a copy of the code breaks each."""
    for name in ("medimg", "pipelines"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / "medimg" / module
    target.write_text(target.read_text() + f"\n{line}  # noqa\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0
    assert f"{contract}" in result.stdout and "BROKEN" in result.stdout
    assert "3 kept, 1 broken" in result.stdout


def _imports(path: Path, package: str) -> set[str]:
    """The medimg modules a file imports (function-level imports included)."""
    tree = ast.parse(path.read_text())
    parts = path.relative_to(ROOT).with_suffix("").parts
    here = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == package}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] == package:
                found.add(node.module)
                found |= {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            base = here.rsplit(".", node.level - (parts[-1] == "__init__"))[0]
            found.add(f"{base}.{node.module}" if node.module else base)
    return found


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(LIBRARY.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def test_no_import_cycle() -> None:
    """No module reaches itself through the modules it imports (a package's __init__
    re-exporting its own submodules excepted)."""
    modules = _modules()
    graph = {
        name: {m for m in _imports(path, "medimg") if m in modules and m != name}
        for name, path in modules.items()
    }
    # an __init__ importing its own submodules is not a cycle of the code
    for name in graph:
        graph[name] = {m for m in graph[name] if not m.startswith(f"{name}.") or name == "medimg"}
        graph[name] -= {"medimg"}
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str], on_path: set[str], done: set[str]) -> None:
        for nxt in sorted(graph[node]):
            if nxt in on_path:
                cycles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in done:
                visit(nxt, [*path, nxt], on_path | {nxt}, done)
        done.add(node)

    done: set[str] = set()
    for start in sorted(graph):
        if start not in done:
            visit(start, [start], {start}, done)
    assert graph["medimg.train"], "the import graph was not read"
    assert cycles == []


TASK_LITERAL = re.compile(
    r"""(==|!=)\s*["'](classify|segment|classifier|segmenter)["']"""
    r"""|["'](classify|segment|classifier|segmenter)["']\s*(==|!=)"""
    r"""|\bin\s*\(\s*["'](classify|segment)["']"""
)


def test_no_branch_on_a_task_name_outside_its_spec() -> None:
    """The library asks a task's spec (medimg/tasks/) instead of comparing its name."""
    found = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for path in sorted([*LIBRARY.rglob("*.py"), *(ROOT / "pipelines").rglob("*.py")])
        if path not in TASK_HOMES
        for n, line in enumerate(path.read_text().splitlines(), start=1)
        if TASK_LITERAL.search(line)
    ]
    assert TASK_LITERAL.search('if task == "classify":')  # the pattern finds a branch
    assert found == []


def test_modules_and_functions_stay_small() -> None:
    too_long = []
    for path in sorted(LIBRARY.rglob("*.py")):
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            too_long.append(f"{path.relative_to(ROOT)}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}()")
    assert len(list(LIBRARY.rglob("*.py"))) > 20
    assert too_long == []
