"""The model registry: versions with alias ``challenger``, and the promotion gate that
moves alias ``champion`` only when the challenger is better on the same test patients.

:func:`decide` is the gate's rule, a pure function of the two sides' per-case tables;
:func:`gate` gathers those from the store. The decision with its numbers is written to
the version's tags.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from medimg.config import GateParams, Params
from medimg.errors import ConfigError, TrackingError
from medimg.stats import paired_difference
from medimg.tasks import TaskSpec, get_task
from medimg.tracking.pyfunc import decision_threshold
from medimg.tracking.runs import _read_run_file
from medimg.tracking.store import configure, retrying

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"  # the registry aliases


def registered_name(params: Params, task: TaskSpec | str) -> str:
    return get_task(task).registry_name(params.registry)


def gate_metric(params: Params, task: TaskSpec | str) -> str:
    return get_task(task).gate_metric(params.registry.gate)


@dataclass(frozen=True)
class Decision:
    """What the gate decided about a challenger, with its numbers."""

    promoted: bool
    reason: str
    version: str
    champion_version: str | None = None
    metric: str = ""
    challenger_value: float | None = None
    champion_value: float | None = None
    difference: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    n_patients: int | None = None

    def tags(self, rule: str, margin: float) -> dict[str, str]:
        out = {
            "gate.decision": "promoted" if self.promoted else "rejected",
            "gate.reason": self.reason,
            "gate.rule": rule,
            "gate.min_margin": str(margin),
            "gate.metric": self.metric,
        }
        for name in (
            "champion_version",
            "challenger_value",
            "champion_value",
            "difference",
            "ci_low",
            "ci_high",
            "n_patients",
        ):
            value = getattr(self, name)
            if value is not None:
                out[f"gate.{name}"] = f"{value:.6g}" if isinstance(value, float) else str(value)
        return out


def _cases(client: MlflowClient, run_id: str) -> pd.DataFrame | None:
    """The per-case table that evaluation logged in ``run_id`` (None if there is none)."""
    try:
        local = client.download_artifacts(run_id, "plots/cases.csv")
    except (MlflowException, OSError):
        return None
    return pd.read_csv(local, dtype={"key": str, "patient": str})


@dataclass(frozen=True, eq=False)  # eq would compare the tables (ambiguous in pandas)
class Contender:
    """One side of the gate's comparison: a registered version and how it scored."""

    version: str
    cases: pd.DataFrame | None = None  # plots/cases.csv of its evaluation, one row per case
    threshold: float = 0.5  # the classification threshold chosen on validation data


def decide(
    challenger: Contender, champion: Contender | None, gate_cfg: GateParams, task: TaskSpec | str
) -> Decision:
    """The gate's rule: does ``challenger`` replace ``champion`` (None: there is none)?

    Promoted when there is no champion yet or the challenger already is it; otherwise
    compared on the cases both were scored on (:func:`medimg.stats.paired_difference`):
    rule ``paired_ci`` needs the lower 95% CI bound of the paired difference above
    ``min_margin``, rule ``margin`` the point difference.

    Raises:
        ValueError: a comparison is due but a side has no per-case table.
        TrackingError: the two sides share no test case.
    """
    spec = get_task(task)
    g, metric, version = gate_cfg, spec.gate_metric(gate_cfg), challenger.version
    if champion is None:
        return Decision(True, "no champion yet", version, metric=metric)
    if str(champion.version) == str(version):
        return Decision(True, "already the champion", version, champion.version, metric)
    if challenger.cases is None or champion.cases is None:
        raise ValueError(f"version {version} vs {champion.version}: no per-case table")
    spec = spec.for_cases(challenger.cases)
    cuts = (challenger.threshold, champion.threshold)
    a, b, d, lo, hi, n = paired_difference(
        lambda y, p, cut: spec.score(metric, y, p, cut),
        spec.case_score(metric),
        spec.gate_cases(challenger.cases),
        spec.gate_cases(champion.cases),
        g.n_boot,
        cuts,
    )
    if g.rule == "paired_ci":
        ok = math.isfinite(lo) and lo > g.min_margin
        why = f"lower 95% CI bound of the paired difference {lo:.4f} vs margin {g.min_margin}"
    else:
        ok = d > g.min_margin
        why = f"difference {d:.4f} vs margin {g.min_margin}"
    reason = ("beats the champion: " if ok else "does not beat the champion: ") + why
    return Decision(ok, reason, version, champion.version, metric, a, b, d, lo, hi, n)


def gate(
    params: Params,
    task: str,
    client: MlflowClient,
    version: str,
    champion_cases: Callable[[], pd.DataFrame] | None = None,
) -> Decision:
    """Decide whether version ``version`` replaces the current champion.

    The comparison is paired, on the test cases both models were scored on: when the
    champion's logged cases are not the challenger's test set, ``champion_cases`` (which
    scores the champion on the current test set) supplies them.
    """
    g = params.registry.gate
    name = registered_name(params, task)
    mv = client.get_model_version(name, version)
    try:
        champion_mv = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        champion_mv = None
    if champion_mv is None or str(champion_mv.version) == str(version):  # nothing to score
        bare = None if champion_mv is None else Contender(str(champion_mv.version))
        return decide(Contender(version), bare, g, task)
    mine = _cases(client, str(mv.run_id))
    if mine is None:
        raise TrackingError(
            f"{name} version {version}: its run has no evaluation; run `medimg evaluate "
            f"--task {task}` before registering"
        )
    theirs = _cases(client, str(champion_mv.run_id))
    if theirs is None or set(theirs["key"]) != set(mine["key"]):
        if champion_cases is None:
            raise TrackingError(
                f"{name}: the champion (version {champion_mv.version}) was evaluated on other "
                "test patients and cannot be re-scored here"
            )
        theirs = champion_cases()
    challenger = Contender(version, mine, decision_threshold(client, str(mv.run_id)))
    champion = Contender(
        str(champion_mv.version), theirs, decision_threshold(client, str(champion_mv.run_id))
    )
    return decide(challenger, champion, g, task)


def register(
    params: Params,
    task: str,
    root: Path,
    model_dir: Path,
    champion_cases: Callable[[str], pd.DataFrame] | None = None,
) -> Decision:
    """Register the model trained in ``model_dir`` as a new version (alias
    ``challenger``; the same run is never registered twice) and run the gate."""
    client = configure(params, root)
    record = _read_run_file(model_dir)
    if not record or "model_uri" not in record:
        raise ConfigError(
            f"{model_dir}: no tracked model here; run `medimg train --task {task}` with "
            "tracking.enabled true, then `medimg evaluate`"
        )
    name = registered_name(params, task)
    run_id = record["run_id"]
    run = client.get_run(run_id)
    if run.data.tags.get("medimg.evaluated") != "true":
        raise ConfigError(
            f"run {run_id} has no test evaluation; run `medimg evaluate --task {task}` first"
        )
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(
            name, description=f"medimg {task} model; aliases champion and challenger"
        )
    existing = client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
    if existing:
        version = str(max(int(v.version) for v in existing))
        log.info("%s: run %s is already version %s", name, run_id, version)
    else:
        mv = retrying(
            params.tracking,
            "registering the model",
            lambda: mlflow.register_model(record["model_uri"], name),
        )
        version = str(mv.version)
        for key in ("medimg.test_set", "medimg.dvc.processed_md5", "mlflow.source.git.commit"):
            if key in run.data.tags:
                client.set_model_version_tag(name, version, key, run.data.tags[key])
    client.set_registered_model_alias(name, CHALLENGER, version)
    return promote(params, task, root, version, champion_cases=champion_cases, client=client)


def promote(
    params: Params,
    task: str,
    root: Path,
    version: str | None = None,
    force: bool = False,
    reason: str = "",
    champion_cases: Callable[[str], pd.DataFrame] | None = None,
    client: MlflowClient | None = None,
) -> Decision:
    """Run the gate for ``version`` (default: the challenger) and move ``champion`` to it
    if it passes, or unconditionally with ``force`` (the reason is recorded)."""
    client = client or configure(params, root)
    name = registered_name(params, task)
    if version is None:
        try:
            version = str(client.get_model_version_by_alias(name, CHALLENGER).version)
        except MlflowException as err:
            raise ConfigError(f"{name} has no challenger; run `medimg register` first") from err
    if force:
        if not reason:
            raise ConfigError("promote --force needs --reason (it is recorded on the version)")
        decision = Decision(True, f"forced: {reason}", version, metric=gate_metric(params, task))
    else:
        scorer = (lambda: champion_cases(name)) if champion_cases else None
        decision = gate(params, task, client, version, scorer)
    g = params.registry.gate
    for key, value in decision.tags(g.rule, g.min_margin).items():
        client.set_model_version_tag(name, version, key, value)
    if decision.promoted:
        client.set_registered_model_alias(name, CHAMPION, version)
    log.info(
        "%s version %s: %s (%s)",
        name,
        version,
        "champion" if decision.promoted else "stays challenger",
        decision.reason,
    )
    return decision


def aliases(params: Params, task: str, root: Path) -> dict[str, str]:
    """``{"champion": "2", "challenger": "3", "latest": "3"}`` for the task's registered
    model (the aliases it has, and its newest version); empty when nothing is registered.

    Raises:
        TrackingError: the store could not be read (the message names it, not a password).
    """
    client = configure(params, root)
    name = registered_name(params, task)

    def read() -> dict[str, str]:
        try:
            model = client.get_registered_model(name)
        except MlflowException as e:
            if e.error_code == "RESOURCE_DOES_NOT_EXIST":
                return {}
            raise
        out = {alias: str(version) for alias, version in (model.aliases or {}).items()}
        versions = client.search_model_versions(f"name='{name}'")
        if versions:
            out["latest"] = str(max(int(v.version) for v in versions))
        return out

    return retrying(params.tracking, "reading the model registry", read)
