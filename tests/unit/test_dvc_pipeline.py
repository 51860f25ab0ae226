"""dvc.yaml stays true to the code: each stage's code deps are the modules it imports."""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
# Shared plumbing: editing it changes no stage's numbers, so it retrains nothing.
PLUMBING = {
    "medimg/__init__.py",
    "medimg/config/__init__.py",
    "medimg/config/base.py",
    "medimg/config/data.py",
    "medimg/config/structures.py",
    "medimg/config/pacs.py",
    "medimg/errors.py",
    "medimg/io.py",
    "medimg/tracking/__init__.py",
    "medimg/typing.py",
    "medimg/data/__init__.py",
    "medimg/dicom/__init__.py",
    "medimg/models/__init__.py",
}
ENTRY = {  # the module(s) that implement each stage
    "synth": ["medimg.dicom.synth"],
    "ingest": ["medimg.ingest"],
    "preprocess": ["medimg.preprocess"],
    "train_segment": ["medimg.train", "medimg.models.unet", "medimg.models.pretrained"],
    "train_classify": ["medimg.train", "medimg.models.resnet", "medimg.models.pretrained"],
    "evaluate_segment": ["medimg.evaluate"],
    "evaluate_classify": ["medimg.evaluate"],
}


def _path(module: str) -> Path | None:
    base = REPO / Path(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(path: Path) -> set[str]:
    """Every medimg module imported anywhere in the file (lazy imports included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("medimg"):
            found.add(node.module)
            found |= {
                f"{node.module}.{a.name}" for a in node.names if _path(f"{node.module}.{a.name}")
            }
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("medimg")}
    return found


def _closure(modules: list[str]) -> set[str]:
    seen: set[str] = set()
    todo = list(modules)
    while todo:
        module = todo.pop()
        path = _path(module)
        if module in seen or path is None:
            continue
        seen.add(module)
        if module != "medimg.tracking":  # a side effect; its imports are not the stage's
            todo += _imports(path)
    return {str(p.relative_to(REPO)) for m in seen if (p := _path(m))}


def test_code_deps_are_exactly_the_imported_modules() -> None:
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert set(stages) == set(ENTRY)
    for name, entry in ENTRY.items():
        stage = stages[name].get("do", stages[name])  # a foreach stage: its template
        declared = {d for d in stage["deps"] if d.startswith("medimg/")}
        expected = _closure(entry) - PLUMBING
        assert declared == expected, (
            f"{name}: missing {sorted(expected - declared)}, extra {sorted(declared - expected)}"
        )


def test_stage_params_are_sections_of_params_yaml() -> None:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        for key in stage.get("do", stage).get("params", []):
            node = params
            for part in key.split("."):
                assert part in node, f"{name}: params key {key} is not in params.yaml"
                node = node[part]
