"""Cross-validation: the fold ensemble, temperature scaling, out-of-fold metrics, and the
ensemble as the model that is evaluated, logged, registered, gated and loaded back."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pandas as pd
import pytest
import torch
import yaml
from torch import nn

from medimg.calibration import apply_temperature, fit_temperature, nll
from medimg.config import Params, TrackingParams
from medimg.models.ensemble import Ensemble, ensemble_state, first_member, n_members
from medimg.stats import rounded
from tests.helpers import Cohort, Processed, train_params


def _nets(outputs: int, n: int = 3) -> list[nn.Module]:
    torch.manual_seed(0)
    return [nn.Conv3d(1, outputs, 3, padding=1) for _ in range(n)]


@pytest.mark.parametrize("outputs", [1, 3])
def test_ensemble_gives_the_mean_of_its_members_temperature_scaled(outputs: int) -> None:
    members, x = _nets(outputs), torch.randn(2, 1, 6, 5, 4)
    with torch.no_grad():
        logits = [m(x) for m in members]
        ens = Ensemble(members)
        if outputs == 1:
            mean = torch.stack([torch.sigmoid(z) for z in logits]).mean(0)
            got = torch.sigmoid(ens(x))
        else:
            mean = torch.stack([torch.softmax(z, 1) for z in logits]).mean(0)
            got = torch.softmax(ens(x), 1)
        torch.testing.assert_close(got, mean, atol=1e-5, rtol=0)
        ens.temperature = torch.tensor(2.5)
        scaled = torch.sigmoid(ens(x)) if outputs == 1 else torch.softmax(ens(x), 1)

    def table(p: torch.Tensor) -> npt.NDArray[np.float64]:  # one row per voxel
        return np.asarray(
            p.numpy().reshape(-1) if outputs == 1 else p.movedim(1, -1).reshape(-1, 3)
        )

    # each member is scaled as the out-of-fold table of its cases is (medimg.calibration),
    # then the scaled probabilities are averaged: calibrate, then pool
    act = torch.sigmoid if outputs == 1 else (lambda z: torch.softmax(z, 1))
    members_scaled = [apply_temperature(table(act(z)), 2.5) for z in logits]
    np.testing.assert_allclose(table(scaled), np.mean(members_scaled, axis=0), atol=1e-5)
    pooled_then_scaled = apply_temperature(table(mean), 2.5)
    assert not np.allclose(table(scaled), pooled_then_scaled, atol=1e-3)  # not the mean scaled
    assert not np.allclose(table(scaled), table(mean), atol=1e-3)  # T changed them


def test_ensemble_state_round_trips_and_gives_its_first_member() -> None:
    members = _nets(2, n=2)
    state = ensemble_state([m.state_dict() for m in members], temperature=1.7)
    ens = Ensemble(_nets(2, n=2))
    ens.load_state_dict(state)
    assert float(ens.temperature) == pytest.approx(1.7)
    assert n_members(state) == 2 and n_members(members[0].state_dict()) == 0
    first = first_member(state)
    assert set(first) == set(members[0].state_dict())
    torch.testing.assert_close(first["weight"], members[0].weight)
    plain = members[1].state_dict()
    assert first_member(plain).keys() == plain.keys()  # not an ensemble's: as it is
    assert torch.equal(first_member(plain)["weight"], plain["weight"])


def test_temperature_scaling_undoes_overconfidence() -> None:
    rng = np.random.default_rng(0)
    q = rng.uniform(0.05, 0.95, 4000)  # the true probabilities
    y = (rng.uniform(size=q.size) < q).astype(int)
    z = np.log(q) - np.log1p(-q)
    overconfident = 1 / (1 + np.exp(-3.0 * z))  # logits three times too large
    t = fit_temperature(y, overconfident)
    assert t == pytest.approx(3.0, rel=0.1)
    assert nll(y, apply_temperature(overconfident, t)) < nll(y, overconfident) - 0.05
    # several classes: softmax of three times the true log-probabilities
    p3 = rng.dirichlet([1.0, 1.0, 1.0], 4000)
    y3 = np.array([rng.choice(3, p=p) for p in p3])
    sharp = apply_temperature(p3, 1 / 3)
    t3 = fit_temperature(y3, sharp)
    assert t3 == pytest.approx(3.0, rel=0.1)
    np.testing.assert_array_equal(  # the order of the classes never changes
        apply_temperature(sharp, t3).argmax(1), sharp.argmax(1)
    )
    with pytest.raises(ValueError, match="two classes"):
        fit_temperature([1, 1, 1], [0.2, 0.7, 0.9])


def test_out_of_fold_cases_of_one_class_leave_the_temperature_at_one() -> None:
    from medimg.tasks import get_task

    spec = get_task("classify")  # binary
    oof = pd.DataFrame({"label": [1, 1, 1], "probability": [0.2, 0.7, 0.9], "patient": "p"})
    t, scaled, info = spec.calibrate(oof)
    assert t == 1.0 and info["fitted_on"].startswith("not fitted")
    pd.testing.assert_frame_equal(scaled, oof)
    fitted = spec.calibrate(oof.assign(label=[0, 1, 1]))[2]
    assert fitted["fitted_on"].startswith("3 out-of-fold series")


def _cv_params(p: Processed, out: Path, **task: object) -> Params:
    params = train_params(p, out, epochs=2, **task)
    folds = list(range(params.split.n_folds))
    tracked = TrackingParams(
        uri=f"sqlite:///{out / 'mlflow.db'}", artifacts=out / "mlartifacts", retry_wait_s=0.1
    )
    train = params.train.model_copy(update={"folds": folds})
    return params.model_copy(update={"train": train, "tracking": tracked})


@pytest.fixture(autouse=True)
def _own_store(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MEDIMG_MLFLOW_URI", raising=False)


@pytest.mark.slow
@pytest.mark.parametrize("task", ["classify", "segment"])
def test_cross_validation_scores_every_patient_out_of_fold_and_registers_the_ensemble(
    tiny_cohort: Cohort, tiny_processed: Processed, tmp_path: Path, task: str
) -> None:
    from mlflow.tracking import MlflowClient

    from medimg import stages, tracking
    from medimg.cv import fold_dir
    from medimg.evaluate import load_trained, predict_table
    from medimg.metrics import youden_threshold

    params = _cv_params(tiny_processed, tmp_path)
    folds = params.cv_folds()
    assert folds == [0, 1]
    with pytest.raises(Exception, match="train one of them"):
        stages.train(params, task, tmp_path)  # which fold: it must be said
    results = stages.train_folds(params, task, tmp_path)
    assert len(results) == 2
    models = tmp_path / "models" / task
    assert all((fold_dir(models, k) / "model.pt").is_file() for k in folds)
    assert not (models / "model.pt").exists()  # the ensemble is evaluation's to make
    result = stages.evaluate(params, task, tmp_path)

    table = pd.read_parquet(tiny_processed.processed / "manifest.parquet")
    rest, test = table[table["split"] != "test"], table[table["split"] == "test"]
    oof = pd.read_csv(tmp_path / "plots" / task / "cv" / "cases.csv")
    # every non-test series once, scored by the model of the fold that held it out
    assert sorted(oof["key"]) == sorted(rest["key"])
    split_of = dict(zip(rest["key"], rest["split"].astype(int), strict=True))
    assert [split_of[k] for k in oof["key"]] == oof["fold"].tolist()
    assert result["cv"]["n_series"] == len(rest) and result["cv"]["folds"] == folds
    assert result["ensemble"]["members"] == 2

    spec, ensemble = load_trained(task, params, models / "model.pt")
    assert isinstance(ensemble, Ensemble) and len(ensemble.members) == 2
    cases = pd.read_csv(tmp_path / "plots" / task / "cases.csv")
    assert sorted(cases["key"]) == sorted(test["key"])
    if task == "classify":  # binary: one probability, the OOF threshold, a temperature
        t = result["ensemble"]["calibration"]["temperature"]
        assert float(ensemble.temperature) == pytest.approx(t)
        files = [fold_dir(models, k) / "model.pt" for k in folds]
        fold_models = [load_trained(task, params, f)[1] for f in files]
        fold_probs = [
            predict_table(spec, params, m, tiny_processed.processed, test)["probability"]
            for m in fold_models
        ]
        want = np.mean([apply_temperature(p, t) for p in fold_probs], axis=0)
        got = cases.set_index("key").loc[test["key"], "probability"].to_numpy()
        np.testing.assert_allclose(got, want, atol=1e-5)
        cut = youden_threshold(oof["label"].to_numpy(), oof["probability"].to_numpy())
        assert result["threshold"] == rounded(cut)
        cal = result["ensemble"]["calibration"]
        assert {"oof_ece_before", "oof_ece_after", "test_ece_before", "test_ece_after"} <= set(cal)
        assert cal["oof_nll_after"] <= cal["oof_nll_before"] + 1e-9  # fitted to lower it
    else:  # the same metrics out of fold as on the test patients
        assert set(result["cv"]["metrics"]) == set(result["metrics"])
    saved = json.loads((tmp_path / "metrics" / f"{task}.json").read_text())
    assert saved["cv"] == json.loads(json.dumps(result["cv"]))
    assert "Ensemble" in (models / "model_card.md").read_text()

    # MLflow: the folds' runs nest under the parent, which holds the ensemble's model
    record = tracking._read_run_file(models)
    client = MlflowClient(tracking.tracking_uri(params.tracking, tmp_path))
    parent = client.get_run(record["run_id"])
    assert parent.data.tags["medimg.stage"] == "cross-validation"
    metric_names = set(parent.data.metrics)
    assert any(n.startswith("cv_") for n in metric_names)
    assert any(n.startswith("test_") for n in metric_names)
    for k in folds:
        child = client.get_run(tracking._read_run_file(fold_dir(models, k))["run_id"])
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.data.tags["medimg.fold"] == str(k)
    decision = stages.register(params, task, tmp_path)
    assert decision.promoted  # the first version becomes champion
    name = spec.registry_name(params.registry)
    champion = tracking.load_model(f"models:/{name}@{tracking.CHAMPION}")
    assert isinstance(champion, Ensemble) and len(champion.members) == 2
    for a, b in zip(champion.state_dict().values(), ensemble.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)
    # medimg predict with the registered ensemble, on the cohort's DICOM files
    out = tmp_path / "predictions"
    summary = stages.predict(params, tmp_path, tiny_cohort.raw, out, f"models:/{name}@champion")
    rows = pd.read_csv(out / "predictions.csv")
    assert summary["task"] == task and len(rows) == len(table)  # every series predicted
    assert (rows["status"] == "predicted").all() and (rows["model_version"] == 1).all()
    if task == "classify":  # at the threshold chosen out of fold
        assert rows["threshold"].tolist() == [result["threshold"]] * len(rows)
    else:
        assert all((out / k / "seg.dcm").is_file() for k in rows["key"])
    # a second evaluation (a new parent run) goes through the gate against the champion:
    # both are ensembles, scored on the same test patients
    from typer.testing import CliRunner

    from medimg.cli import app

    pfile = tmp_path / "params.yaml"
    pfile.write_text(yaml.safe_dump(params.model_dump(mode="json")))
    said = CliRunner().invoke(app, ["evaluate", "--task", task, "--params", str(pfile)])
    assert said.exit_code == 0, said.output
    headline = "macro_auroc" if task == "classify" and len(spec.labels) > 2 else "auroc"
    headline = headline if task == "classify" else "dice"
    assert f"{task} {headline}: " in said.output  # the test patients
    assert f"{task} cross-validation {headline}: " in said.output  # out of fold
    second = stages.register(params, task, tmp_path)
    assert second.version != decision.version and not second.promoted  # no better
    # the summary that make demo ends with: the numbers of metrics/<task>.json, the versions
    from medimg.summary import interval

    said = CliRunner().invoke(app, ["summary", "--params", str(pfile)])
    assert said.exit_code == 0, said.output
    lines = said.output.splitlines()
    saved = json.loads((tmp_path / "metrics" / f"{task}.json").read_text())  # as re-evaluated
    n_test, n_oof = saved["n_test_patients"], saved["cv"]["n_patients"]
    assert (
        f"{task}: ensemble of 2 fold models, {n_test} test patients, {n_oof} out of fold" in lines
    )
    row = next(line for line in lines if line.split()[:1] == [headline])
    test_ci, cv_ci = (
        interval(saved["metrics"][headline]),
        interval(saved["cv"]["metrics"][headline]),
    )
    assert test_ci != "-" and cv_ci != "-"
    assert row.split(None, 1)[1].split() == [*test_ci.split(), *cv_ci.split()]
    assert f"  registry: {name} v2 is the newest (challenger v2, champion v1)" in lines
    other = "segment" if task == "classify" else "classify"
    assert any(line.startswith(f"{other}: not evaluated yet") for line in lines)
    assert "Where to look:" in lines
    # the task's runs table, in MLflow's model-training view (not its GenAI pages)
    experiment = client.get_run(record["run_id"]).info.experiment_id
    runs_table = (
        f"{params.tracking.ui_url}/#/experiments/{experiment}/runs?workflowType=machine_learning"
    )
    assert f"    {task:20} {runs_table}" in lines
    assert f"    {other:20} no runs yet" in lines


def test_the_saved_ensemble_holds_the_model_sections_only(tmp_path: Path) -> None:
    """Like each fold's model.pt, the ensemble's leaves out where runs are logged, sent or
    scheduled: editing those sections (the PACS, prediction) leaves its bytes alone."""
    from medimg.cv import save_ensemble
    from medimg.tasks import configured_task

    params = Params()
    other = params.model_copy(
        update={
            "pacs": params.pacs.model_copy(update={"url": "https://pacs.example/dicom-web"}),
            "predict": params.predict.model_copy(update={"output": Path("elsewhere")}),
        }
    )
    spec = configured_task("classify", params)
    written = []
    for n, p in enumerate((params, other)):
        save_ensemble(Ensemble(_nets(1, 2)), spec, p, tmp_path / str(n), [0, 1])
        written.append((tmp_path / str(n) / "model.pt").read_bytes())
    assert written[0] == written[1]
    saved = json.loads(torch.load(tmp_path / "0" / "model.pt", weights_only=False)["config"])
    assert set(saved) == set(Params.MODEL_SECTIONS)
