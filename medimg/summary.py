"""The one-screen summary that ``make demo`` ends with (``medimg summary``).

Per task: the test metrics of the registered model (the fold ensemble under
cross-validation) and the out-of-fold ones, each with its patient-level 95 % interval,
the gate metric per class or structure, the registered versions, then where to look
next. It reads what the stages wrote (``metrics/<task>.json``) and asks the registry; it
computes no metric of its own.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from medimg.config import Params
from medimg.errors import TrackingError
from medimg.io import project_path
from medimg.report import metric_rows
from medimg.tasks import TASKS, get_task

WIDTH = 24  # characters of the row label
COLUMN = 28  # characters of the test column: "-0.123 (-0.456 to 0.789)" and HD95s in mm


def interval(m: dict[str, Any] | None) -> str:
    """``0.846 (0.821 to 0.869)``; ``-`` where the metric is absent or undefined.

    Example:
        >>> interval({"value": 0.8461, "ci_lower": 0.8213, "ci_upper": 0.869})
        '0.846 (0.821 to 0.869)'
    """
    if not m or m.get("value") is None:
        return "-"
    value = f"{m['value']:.3f}"
    if m.get("ci_lower") is None or m.get("ci_upper") is None:
        return value
    return f"{value} ({m['ci_lower']:.3f} to {m['ci_upper']:.3f})"


def metric_table(result: dict[str, Any], per_owner: str) -> list[str]:
    """Rows ``label  test  cross-validation``: every headline metric, then ``per_owner``
    (the gate metric) for each class or structure."""
    cv = {(o, n): m for o, n, m in metric_rows(result.get("cv") or {})}
    rows = [(o, n, m) for o, n, m in metric_rows(result) if not o or n == per_owner]
    lines = [f"  {'':{WIDTH}} {'test':{COLUMN}} cross-validation"]
    for owner, name, m in rows:
        label = f"{owner} {name}" if owner else name
        lines.append(f"  {label:{WIDTH}} {interval(m):{COLUMN}} {interval(cv.get((owner, name)))}")
    return lines


def registry_line(params: Params, task: str, root: Path) -> str:
    name = get_task(task).registry_name(params.registry)
    if not params.tracking.enabled:
        return f"  registry: tracking off (tracking.enabled), {name} not registered"
    from medimg import tracking

    if (store := tracking.missing_sqlite_store(params.tracking, root)) is not None:
        return f"  registry: no store yet at {store}, {name} not registered (make demo)"

    try:
        found = tracking.aliases(params, task, root)
    except TrackingError as e:
        return f"  registry: not reachable ({e})"
    if not found:
        return f"  registry: {name} has no version yet (medimg register --task {task})"
    named = ", ".join(f"{a} v{v}" for a, v in sorted(found.items()) if a != "latest")
    return f"  registry: {name} v{found.get('latest', '?')} is the newest ({named or 'no alias'})"


def task_block(params: Params, task: str, root: Path) -> list[str]:
    path = project_path(root, params.data.metrics) / f"{task}.json"
    if not path.is_file():
        return [f"{task}: not evaluated yet ({path} missing; dvc repro)"]
    result = json.loads(path.read_text())
    cv = result.get("cv") or {}
    members = (result.get("ensemble") or {}).get("members")
    what = f"ensemble of {members} fold models" if members else "one model"
    head = f"{task}: {what}, {result.get('n_test_patients', '?')} test patients"
    if cv:
        head += f", {cv.get('n_patients', '?')} out of fold"
    spec = get_task(task)
    lines = [head, *metric_table(result, spec.gate_metric(params.registry.gate))]
    return [*lines, registry_line(params, task, root)]


def ui_lines(params: Params, root: Path) -> list[str]:
    """Each experiment's runs table in the MLflow UI, where runs are compared."""
    t = params.tracking
    if not t.enabled:
        return ["  runs                   tracking off (tracking.enabled)"]
    from medimg import tracking

    if (store := tracking.missing_sqlite_store(t, root)) is not None:
        return [f"  runs                   no store yet at {store} (dvc repro logs them)"]

    try:
        urls = tracking.experiment_urls(params, tuple(TASKS), root)
    except TrackingError as e:
        return [f"  runs                   not reachable ({e})"]
    local = not tracking.is_server(tracking.tracking_uri(t, root))
    lines = ["  runs, compare          " + ("make ui, then open" if local else "open")]
    lines += [f"    {task:20} {urls.get(task, 'no runs yet')}" for task in TASKS]
    return lines


def summary(params: Params, root: Path = Path(".")) -> list[str]:
    """The summary's lines, both tasks then where to look."""
    lines: list[str] = []
    for task in TASKS:
        lines += [*task_block(params, task, root), ""]
    d = params.data
    lines += [
        "Where to look:",
        *ui_lines(params, root),
        f"  model cards            {d.models}/<task>/model_card.md",
        f"  plots and cases        {d.plots}/<task>/ (out of fold: {d.plots}/<task>/cv/)",
        f"  ingest QC              {d.interim}/qc.html",
        "  reproduction           .venv/bin/dvc metrics diff; git status dvc.lock metrics/",
    ]
    return lines
