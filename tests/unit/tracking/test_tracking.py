"""medimg.tracking against real local MLflow stores (SQLite) and a real ``dvc``."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from medimg import tracking
from medimg.cli import app
from medimg.config import GateParams, Params, RegistryParams, TrackingParams
from medimg.errors import ConfigError
from tests.helpers import tool_path


@pytest.fixture(autouse=True)
def _no_store_from_earlier_tests(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test picks its store from its own params: configure() in an earlier test of
    the session exports MLFLOW_TRACKING_URI (as MLflow does) with its marker; both are
    cleared here and restored after the test."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MEDIMG_MLFLOW_URI", raising=False)


def _params(tmp_path: Path, **gate: object) -> Params:
    return Params(
        tracking=TrackingParams(uri=f"sqlite:///{tmp_path / 'mlflow.db'}", retry_wait_s=0.1),
        registry=RegistryParams(gate=GateParams(**gate)),  # type: ignore[arg-type]
    )


def test_store_uri_from_params_env_and_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = TrackingParams()
    assert tracking.tracking_uri(cfg, tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    absolute = TrackingParams(uri="sqlite:////srv/runs.db")
    assert tracking.tracking_uri(absolute, tmp_path) == "sqlite:////srv/runs.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert tracking.tracking_uri(cfg, tmp_path) == "http://tracking.example:5000"
    # configure() exports the store it picks (MLflow does); that must not pin later calls
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    tracking.configure(Params(tracking=cfg), tmp_path / "a")
    assert tracking.tracking_uri(cfg, tmp_path / "b").endswith("b/mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    tracking.configure(Params(tracking=cfg), tmp_path / "a")  # the user's choice stays
    assert tracking.tracking_uri(cfg, tmp_path / "b") == "http://tracking.example:5000"


LOCAL_UI = "http://127.0.0.1:5000"  # tracking.ui_url: `make ui`


@pytest.mark.parametrize(
    ("uri", "server", "ui"),
    [
        ("http://tracking.example:5000", True, "http://tracking.example:5000"),
        ("https://mlflow.hospital.example/", True, "https://mlflow.hospital.example"),
        ("sqlite:////srv/runs.db", False, LOCAL_UI),
        ("file:///srv/mlruns", False, LOCAL_UI),
        ("postgresql://mlflow@db.example/mlflow", False, LOCAL_UI),
        ("mlruns", False, LOCAL_UI),
    ],
)
def test_a_server_has_its_own_ui_a_store_opens_in_ours(uri: str, server: bool, ui: str) -> None:
    """Links point at a tracking server's UI, or at `make ui` for a store opened here."""
    assert tracking.is_server(uri) is server
    cfg = TrackingParams(uri=uri, ui_url=LOCAL_UI)
    assert tracking.store.ui_base(cfg, Path(".")) == ui


def test_make_ui_on_a_tracking_server_points_at_its_ui(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`medimg ui` starts no local UI when the runs are on a server; it names the server."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://mlflow.hospital.example")
    pfile = tmp_path / "params.yaml"
    pfile.write_text(json.dumps(Params().model_dump(mode="json")))
    result = CliRunner().invoke(app, ["ui", "--params", str(pfile)])
    assert result.exit_code == 0, result.output
    assert "runs are on a tracking server: open https://mlflow.hospital.example" in result.output


def test_flatten_names_every_leaf() -> None:
    flat = tracking.flatten(Params().model_dump(mode="json"))
    assert flat["train.classify.lr"] == "0.001"
    assert flat["preprocess.spatial_size"] == "[64, 48, 48]"
    assert flat["registry.gate.rule"] == "paired_ci"
    assert not any(isinstance(v, dict) for v in flat.values())


def test_dvc_folder_hash_equals_dvc_add(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    (folder / "images").mkdir(parents=True)
    (folder / "manifest.parquet").write_bytes(b"\x00\x01" * 1000)
    (folder / "images" / "a.nii.gz").write_bytes(np.arange(5000, dtype=np.int16).tobytes())
    (folder / "images" / "b.nii.gz").write_text("b\n")
    (folder / "qc.json").write_text('{"ok": true}\n')
    dvc = tool_path("dvc")
    subprocess.run([dvc, "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    subprocess.run([dvc, "add", "-q", "data"], cwd=tmp_path, check=True)
    import yaml

    recorded = yaml.safe_load((tmp_path / "data.dvc").read_text())["outs"][0]["md5"]
    assert tracking.dvc_dir_md5(folder) == recorded


# ----------------------------------------------------------------------------- the gate


def _cases(quality: float, seed: int, n: int = 40) -> pd.DataFrame:
    """Test cases of ``n`` patients; ``quality`` near 1 separates the classes well."""
    rng = np.random.default_rng(seed)
    label = np.arange(n) % 2
    noise = rng.normal(0, 1, n)
    score = 1 / (1 + np.exp(-(quality * 6 * (label - 0.5) + (1 - quality) * 2 * noise)))
    return pd.DataFrame(
        {
            "key": [f"k{i:03d}" for i in range(n)],
            "patient": [f"p{i:03d}" for i in range(n)],
            "modality": "CT",
            "vendor": "GE",
            "label": label,
            "probability": score,
        }
    )


# ----------------------------------------------------------------------------- decide(), no store


def _table(positive: list[float], negative: list[float]) -> pd.DataFrame:
    """Per-case table, one case per patient: the positives' scores, then the negatives'."""
    scores = [*positive, *negative]
    return pd.DataFrame(
        {
            "key": [f"k{i:03d}" for i in range(len(scores))],
            "patient": [f"p{i:03d}" for i in range(len(scores))],
            "label": [1] * len(positive) + [0] * len(negative),
            "probability": scores,
        }
    )


PERFECT = _table([0.7] * 20, [0.3] * 20)  # AUROC 1.0
ONE_MISS = _table([0.2] + [0.7] * 19, [0.3] * 20)  # one positive below every negative: 0.95
COIN = _table([0.5] * 20, [0.5] * 20)  # AUROC 0.5


def test_decide_without_a_champion_promotes_without_comparing() -> None:
    d = tracking.decide(tracking.Contender("1"), None, GateParams(), "classify")
    assert d == tracking.Decision(True, "no champion yet", "1", metric="auroc")


def test_decide_keeps_the_champion_a_champion() -> None:
    me = tracking.Contender("3", COIN)
    d = tracking.decide(me, tracking.Contender("3", PERFECT), GateParams(), "classify")
    assert d.promoted and d.reason == "already the champion"
    assert d.champion_version == "3" and d.difference is None  # nothing was compared


def test_decide_paired_ci_promotes_a_clearly_better_challenger() -> None:
    d = tracking.decide(
        tracking.Contender("2", PERFECT), tracking.Contender("1", COIN), GateParams(), "classify"
    )
    assert d.promoted, d.reason
    assert d.reason.startswith("beats the champion: lower 95% CI bound of the paired")
    assert (d.challenger_value, d.champion_value, d.difference) == (1.0, 0.5, 0.5)
    assert d.ci_low is not None and d.ci_low > 0.3 and d.n_patients == 40
    assert d.champion_version == "1" and d.metric == "auroc"


def test_decide_paired_ci_rejects_a_gain_from_one_patient() -> None:
    """Better by 0.05 on one patient: the bootstrap often leaves that patient out, so the
    lower CI bound is 0, not above the margin of 0."""
    d = tracking.decide(
        tracking.Contender("2", PERFECT),
        tracking.Contender("1", ONE_MISS),
        GateParams(),
        "classify",
    )
    assert not d.promoted
    assert d.difference == pytest.approx(0.05) and d.ci_low == 0.0
    assert d.reason == (
        "does not beat the champion: lower 95% CI bound of the paired difference 0.0000 "
        "vs margin 0.0"
    )


def test_decide_margin_rule_takes_the_point_difference() -> None:
    mine, theirs = tracking.Contender("2", PERFECT), tracking.Contender("1", ONE_MISS)
    d = tracking.decide(mine, theirs, GateParams(rule="margin", min_margin=0.01), "classify")
    assert d.promoted and d.reason == "beats the champion: difference 0.0500 vs margin 0.01"
    d = tracking.decide(mine, theirs, GateParams(rule="margin", min_margin=0.1), "classify")
    assert not d.promoted
    assert d.reason == "does not beat the champion: difference 0.0500 vs margin 0.1"


def test_decide_scores_each_side_at_its_own_threshold() -> None:
    high = _table([0.8] * 20, [0.6] * 20)  # separated at 0.7, not at 0.5
    gate_cfg = GateParams(rule="margin", classify_metric="balanced_accuracy")
    mine = tracking.Contender("2", high, threshold=0.7)
    d = tracking.decide(mine, tracking.Contender("1", PERFECT), gate_cfg, "classify")
    assert (d.challenger_value, d.champion_value) == (1.0, 1.0) and not d.promoted
    d = tracking.decide(
        tracking.Contender("2", high), tracking.Contender("1", PERFECT), gate_cfg, "classify"
    )
    assert d.challenger_value == 0.5 and d.metric == "balanced_accuracy"


def test_decide_segment_compares_dice_on_volumes_with_a_lesion() -> None:
    def volumes(dice: list[float]) -> pd.DataFrame:
        n = len(dice)
        keys = [f"k{i:03d}" for i in range(n)]
        return pd.DataFrame(
            {
                "key": keys,
                "patient": keys,
                "label": 1,
                "lesion": [True] * (n - 1) + [False],
                "dice": dice,
            }
        )

    mine = volumes([0.9] * 29 + [0.0])  # the lesion-free volume does not count
    d = tracking.decide(
        tracking.Contender("2", mine),
        tracking.Contender("1", volumes([0.6] * 30)),
        GateParams(),
        "segment",
    )
    assert d.promoted and d.metric == "dice" and d.n_patients == 29
    assert d.difference == pytest.approx(0.3)


def _version(client: MlflowClient, params: Params, cases: pd.DataFrame, tmp: Path) -> str:
    """A registered classifier version whose run holds evaluated test cases."""
    exp = tracking.experiment_id(client, params, "classify", tmp)
    run = client.create_run(exp)
    run_id = run.info.run_id
    (tmp / "plots").mkdir(exist_ok=True)
    cases.to_csv(tmp / "plots" / "cases.csv", index=False)
    client.log_artifact(run_id, str(tmp / "plots" / "cases.csv"), "plots")
    client.log_text(run_id, "weights would be here", "model/README.txt")
    client.log_dict(run_id, {"threshold": 0.5}, "classify.json")
    name = tracking.registered_name(params, "classify")
    if not client.search_registered_models(f"name='{name}'"):
        client.create_registered_model(name)
    mv = client.create_model_version(name, f"{run.info.artifact_uri}/model", run_id=run_id)
    client.set_registered_model_alias(name, tracking.CHALLENGER, str(mv.version))
    return str(mv.version)


def test_gate_keeps_a_worse_challenger_out_and_promotes_a_better_one(tmp_path: Path) -> None:
    params = _params(tmp_path)
    client = tracking.configure(params, tmp_path)
    name = tracking.registered_name(params, "classify")

    first = _version(client, params, _cases(0.2, seed=1), tmp_path)  # AUROC 0.74
    d = tracking.promote(params, "classify", tmp_path, first)
    assert d.promoted and d.reason == "no champion yet"
    assert str(client.get_model_version_by_alias(name, "champion").version) == first

    worse = _version(client, params, _cases(0.05, seed=2), tmp_path)  # 0.43
    d = tracking.promote(params, "classify", tmp_path)  # the challenger by default
    assert d.version == worse and not d.promoted
    assert d.difference is not None and d.difference < 0
    assert str(client.get_model_version_by_alias(name, "champion").version) == first
    tags = client.get_model_version(name, worse).tags
    assert tags["gate.decision"] == "rejected"
    assert tags["gate.champion_version"] == first
    assert float(tags["gate.challenger_value"]) < float(tags["gate.champion_value"])
    assert tags["gate.n_patients"] == "40"

    better = _version(client, params, _cases(0.95, seed=3), tmp_path)  # 1.0
    d = tracking.promote(params, "classify", tmp_path)
    assert d.promoted, d.reason
    assert d.ci_low is not None and d.ci_low > 0  # paired CI clear of zero
    assert str(client.get_model_version_by_alias(name, "champion").version) == better
    tags = client.get_model_version(name, better).tags
    assert tags["gate.decision"] == "promoted"
    assert float(tags["gate.ci_low"]) > 0 and tags["gate.rule"] == "paired_ci"


def test_gate_margin_rule_and_ties(tmp_path: Path) -> None:
    params = _params(tmp_path, rule="margin", min_margin=0.05)
    client = tracking.configure(params, tmp_path)
    tracking.promote(
        params, "classify", tmp_path, _version(client, params, _cases(0.4, 1), tmp_path)
    )
    same = _version(client, params, _cases(0.4, 1), tmp_path)  # identical scores
    d = tracking.promote(params, "classify", tmp_path, same)
    assert not d.promoted and d.difference == 0.0
    slightly = _cases(0.4, 1)
    slightly.loc[0, "probability"] = 1.0 - slightly.loc[0, "probability"]  # one case flips
    d = tracking.promote(params, "classify", tmp_path, _version(client, params, slightly, tmp_path))
    assert not d.promoted and abs(d.difference or 0) < 0.05


def test_forced_promotion_needs_a_reason_and_records_it(tmp_path: Path) -> None:
    params = _params(tmp_path)
    client = tracking.configure(params, tmp_path)
    name = tracking.registered_name(params, "classify")
    tracking.promote(
        params, "classify", tmp_path, _version(client, params, _cases(0.9, 1), tmp_path)
    )
    worse = _version(client, params, _cases(0.1, 2), tmp_path)
    with pytest.raises(ConfigError, match="--reason"):
        tracking.promote(params, "classify", tmp_path, worse, force=True)
    d = tracking.promote(params, "classify", tmp_path, worse, force=True, reason="rollback drill")
    assert d.promoted
    assert str(client.get_model_version_by_alias(name, "champion").version) == worse
    assert client.get_model_version(name, worse).tags["gate.reason"] == "forced: rollback drill"


def test_cli_promote_reports_the_decision(tmp_path: Path) -> None:
    params = _params(tmp_path)
    client = tracking.configure(params, tmp_path)
    tracking.promote(
        params, "classify", tmp_path, _version(client, params, _cases(0.4, 1), tmp_path)
    )
    _version(client, params, _cases(0.95, 3), tmp_path)
    pfile = tmp_path / "params.yaml"
    pfile.write_text(json.dumps(params.model_dump(mode="json")))  # JSON is YAML
    result = CliRunner().invoke(app, ["promote", "--task", "classify", "--params", str(pfile)])
    assert result.exit_code == 0, result.output
    assert "version 2 is champion" in result.output
    assert "95% CI" in result.output and "40 test patients" in result.output
    result = CliRunner().invoke(
        app, ["promote", "--task", "classify", "--force", "--params", str(pfile)]
    )
    assert result.exit_code != 0 and "--reason" in result.output


def test_unknown_registered_model_as_pretrained_fails_clearly(tmp_path: Path) -> None:
    import torch

    from medimg.config import TaskTrainParams
    from medimg.models.build import build_model
    from medimg.models.pretrained import load_pretrained

    tracking.configure(_params(tmp_path), tmp_path)
    model = build_model("classify", TaskTrainParams(arch="resnet10"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # medimg train resolves the URI to a local file first: that fails, naming the URI
    with pytest.raises(ConfigError, match="models:/medimg-nothing@champion"):
        tracking.pretrained_file("models:/medimg-nothing@champion", tmp_path)
    assert list(tmp_path.glob("pretrained*")) == []  # nothing half-written
    # the models package reads local files only, and says where a URI is resolved
    with pytest.raises(ConfigError, match=r"models:/medimg-nothing@champion.*pretrained_file"):
        load_pretrained(model, "models:/medimg-nothing@champion", "classify")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_metric_sender_delivers_every_epoch_in_order(tmp_path: Path) -> None:
    params = _params(tmp_path)
    client = tracking.configure(params, tmp_path)
    run = client.create_run(tracking.experiment_id(client, params, "segment", tmp_path))
    sender = tracking.MetricSender(client, run.info.run_id, params.tracking)
    for epoch in range(1, 6):
        sender.log({"train_loss": 1.0 / epoch, "val_metric": float("nan")}, step=epoch)
    assert sender.close() == []
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert [(m.step, m.value) for m in history] == [(e, 1.0 / e) for e in range(1, 6)]
    assert client.get_metric_history(run.info.run_id, "val_metric") == []  # NaN not sent


def test_pipeline_report_links_runs_in_the_mlflow_ui(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pipeline's Prefect artifact links each task's run in the MLflow UI: the
    tracking server's own UI, or make ui's for a local store; never a bare run id."""
    import json

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MEDIMG_MLFLOW_URI", raising=False)

    from medimg.config import TrackingParams
    from pipelines.pipeline import _run_link

    params = _params(tmp_path)
    folder = tmp_path / params.data.models / "classify"
    folder.mkdir(parents=True)
    (folder / "mlflow_run.json").write_text(
        json.dumps({"run_id": "0123456789abcdef", "experiment_id": "7"})
    )
    local = _run_link(params, tmp_path, "classify")
    view = "?workflowType=machine_learning"  # MLflow's model-training pages, not GenAI's
    assert local == f"[01234567](http://127.0.0.1:5000/#/experiments/7/runs/0123456789abcdef{view})"
    server = params.model_copy(update={"tracking": TrackingParams(uri="http://mlflow.lan:5000")})
    assert _run_link(server, tmp_path, "classify") == (
        f"[01234567](http://mlflow.lan:5000/#/experiments/7/runs/0123456789abcdef{view})"
    )
    assert _run_link(params, tmp_path, "segment") == "-"  # no run yet


def _tiny_project(tmp_path: Path) -> tuple[Path, Path]:
    """A processed folder with a manifest of four series, and an empty ingest folder."""
    processed, interim = tmp_path / "processed", tmp_path / "interim"
    processed.mkdir()
    interim.mkdir()
    manifest = pd.DataFrame(
        {
            "key": ["a", "b", "c", "d"],
            "patient": ["p1", "p2", "p3", "p4"],
            "modality": ["CT", "CT", "MR", "CT"],
            "vendor": ["X"] * 4,
            "plane": ["axial"] * 4,
            "label": [0, 1, 0, 1],
            "split": ["0", "1", "test", "test"],
        }
    )
    manifest.to_parquet(processed / "manifest.parquet")
    return processed, interim


def test_every_run_records_the_installed_versions_and_the_lock(tmp_path: Path) -> None:
    """The training run has them from its start (a run that dies keeps them), a run of
    evaluation alone has them, and an evaluation in another environment than training
    says what differed."""
    from importlib.metadata import version

    from medimg.tracking.runs import environment_tags
    from medimg.versions import PACKAGES, environment_versions

    params = _params(tmp_path)
    processed, interim = _tiny_project(tmp_path)
    env = environment_tags()
    assert env == {f"medimg.env.{k}": v for k, v in environment_versions().items()}
    assert {f"medimg.env.version.{name}" for name in PACKAGES} < set(env)
    assert {"medimg.env.lock.sha256", "medimg.env.lock.drift"} < set(env)

    run = tracking.TrainRun(params, "classify", tmp_path, processed, interim, tmp_path / "m")
    run.start()
    run.fail()
    client = tracking.configure(params, tmp_path)
    trained = client.get_run(run.run_id)
    assert trained.info.status == "FAILED"
    assert {k: trained.data.tags[k] for k in env} == env
    for name in ("torch", "monai", "numpy", "mlflow", "pydicom", "scikit-image", "dvc"):
        assert trained.data.tags[f"medimg.env.version.{name}"] == version(name)

    # trained elsewhere: that environment had another numpy
    client.set_tag(run.run_id, "medimg.env.version.numpy", "1.0")
    result = {"metrics": {}, "n_test_patients": 2, "ci": "95%"}
    args = (processed, result, tmp_path / "none.json", tmp_path / "no-plots")
    same = tracking.log_evaluation(params, "classify", tmp_path, tmp_path / "m", *args)
    assert same == run.run_id
    tags = client.get_run(same).data.tags
    assert {k: v for k, v in tags.items() if k.startswith("medimg.evaluate.env.")} == {
        "medimg.evaluate.env.version.numpy": version("numpy")
    }
    assert tags["medimg.env.version.numpy"] == "1.0"  # what training had stays

    alone = tracking.log_evaluation(params, "classify", tmp_path, tmp_path / "untracked", *args)
    assert alone != run.run_id
    tags = client.get_run(alone).data.tags
    assert {k: tags[k] for k in env} == env
