"""Train, evaluate and register against a real ``mlflow server`` over HTTP.

The input is the tiny synthetic cohort with PHI canaries planted in every identifying
attribute; after the pipeline has run, the canaries must be nowhere in the server's
database or artifact store.
"""

from __future__ import annotations

import gzip
import logging
import subprocess
from pathlib import Path

import mlflow
import numpy as np
import pydicom
import pytest
import torch
from mlflow.tracking import MlflowClient

from medimg import stages, tracking
from medimg.config import TaskTrainParams, TrackingParams
from medimg.evaluate import load_model
from medimg.models.pretrained import load_pretrained
from tests.helpers import CANARY
from tests.integration.mlflow_server import start_mlflow_server
from tests.integration.tracked import Tracked

REPO = Path(__file__).resolve().parents[2]


def test_runs_metrics_tags_and_artifacts_reach_the_server(tracked: Tracked) -> None:
    client = MlflowClient(tracking_uri=tracked.url)
    exp = client.get_experiment_by_name("medimg-classify")
    assert exp is not None
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
    assert [r.info.run_id for r in runs] == tracked.run_ids
    first = runs[0]
    assert first.info.status == "FINISHED"
    assert first.info.run_name.startswith("train-classify-")
    # params: resolved and flattened
    assert first.data.params["train.classify.epochs"] == "2"
    assert first.data.params["train.classify.arch"] == "resnet10"
    assert first.data.params["split.salt"] == "medimg-split-v3"
    # per-epoch metrics and the test metrics with their CIs
    history = client.get_metric_history(first.info.run_id, "train_loss")
    assert [m.step for m in history] == [1, 2]
    assert all(np.isfinite(m.value) for m in history)
    metrics = first.data.metrics
    assert 0.0 <= metrics["test_auroc"] <= 1.0
    assert metrics["n_test_patients"] == 2
    assert {"best_val_metric", "test_balanced_accuracy", "test_ece"} <= set(metrics)
    # lineage tags
    tags = first.data.tags
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert tags["mlflow.source.git.commit"] == head
    assert tags["medimg.git.dirty"] in ("true", "false")
    # what decided the numbers besides the inputs: reproducible mode, as params.yaml says
    assert tags["medimg.env.reproducible"] == "true"
    capability = str(torch.backends.cpu.get_cpu_capability())  # this process's, recorded
    assert (tags["medimg.env.cpu_capability"], tags["medimg.env.threads"]) == (capability, "2")
    assert tags["medimg.env.version.torch"] == torch.__version__
    assert tags["medimg.dvc.processed_md5"] == tracking.dvc_dir_md5(tracked.processed)
    assert tags["medimg.dvc.params_md5"] == tracking.file_md5(tracked.root / "params.yaml")
    assert len(tags["medimg.test_set"]) == 16 and tags["medimg.evaluated"] == "true"
    # the dataset input
    inputs = first.inputs.dataset_inputs
    assert [i.dataset.name for i in inputs] == ["processed"]
    assert inputs[0].dataset.digest == tags["medimg.dvc.processed_md5"][:8]
    # artifacts
    top = {a.path for a in client.list_artifacts(first.info.run_id)}
    assert {"model_card.md", "config.json", "classify.json", "classify_train.json"} <= top
    assert {"plots", "summaries"} <= top
    plots = {a.path for a in client.list_artifacts(first.info.run_id, "plots")}
    assert {"plots/roc.png", "plots/calibration.png", "plots/cases.csv"} <= plots
    summaries = {a.path for a in client.list_artifacts(first.info.run_id, "summaries")}
    assert {"summaries/split.json", "summaries/ingest", "summaries/preprocess"} <= summaries
    card = Path(client.download_artifacts(first.info.run_id, "model_card.md")).read_text()
    assert "Intended use" in card and "Limitations" in card


def test_registry_versions_aliases_and_gate_tags(tracked: Tracked) -> None:
    client = MlflowClient(tracking_uri=tracked.url, registry_uri=tracked.url)
    name = "medimg-classifier"
    v1 = client.get_model_version(name, "1")
    assert v1.run_id == tracked.run_ids[0]
    assert v1.tags["gate.decision"] == "promoted" and v1.tags["gate.reason"] == "no champion yet"
    assert v1.tags["medimg.test_set"] == client.get_run(v1.run_id).data.tags["medimg.test_set"]
    v2 = client.get_model_version(name, "2")
    assert v2.run_id == tracked.run_ids[1]
    assert str(client.get_model_version_by_alias(name, "challenger").version) == "2"
    champion = str(client.get_model_version_by_alias(name, "champion").version)
    decision = tracked.second_decision
    assert champion == ("2" if decision.promoted else "1")
    assert v2.tags["gate.decision"] == ("promoted" if decision.promoted else "rejected")
    assert v2.tags["gate.champion_version"] == "1"
    assert float(v2.tags["gate.difference"]) == pytest.approx(decision.difference, abs=1e-5)
    assert v2.tags["gate.n_patients"] == "2"
    # registering the same run again adds no version
    again = stages.register(tracked.params, "classify", tracked.root)
    assert again.version == "2"
    assert len(client.search_model_versions(f"name='{name}'")) == 2


def test_registered_model_loads_back_by_uri(tracked: Tracked, tmp_path: Path) -> None:
    mlflow.set_tracking_uri(tracked.url)
    mlflow.set_registry_uri(tracked.url)
    model = tracking.load_model("models:/medimg-classifier/2")
    assert isinstance(model, torch.nn.Module)
    model.eval()  # an ordinary module (MLflow's pt2 format gives one whose eval() raises)
    local = load_model("classify", tracked.params, tracked.root / "models/classify/model.pt")
    local.eval()
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(2, 1, 64, 48, 48))).float()
    with torch.no_grad():
        torch.testing.assert_close(model(x), local(x))
    # the pyfunc interface: probabilities from a numpy batch
    pyfunc = mlflow.pyfunc.load_model("models:/medimg-classifier/2")
    probs = pyfunc.predict(x.numpy())
    assert probs.shape == (2,) and np.all((probs >= 0) & (probs <= 1))
    # and as pretrained initialisation: every tensor, head included
    fresh = tracking.load_model("models:/medimg-classifier/1")
    target = torch.nn.Module()
    from medimg.models.build import build_model

    target = build_model("classify", TaskTrainParams(arch="resnet10"))
    local = tracking.pretrained_file("models:/medimg-classifier/1", tmp_path)
    report = load_pretrained(target, local, "classify", name="models:/medimg-classifier/1")
    assert report.fraction == 1.0 and not report.missing and len(report.loaded_head) == 2
    for key, value in fresh.state_dict().items():
        torch.testing.assert_close(target.state_dict()[key], value)


def test_no_phi_in_the_tracking_database_or_artifacts(tracked: Tracked) -> None:
    uids: set[bytes] = set()
    for path in sorted(tracked.raw.rglob("*"))[:60]:
        if path.is_file():
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            uids |= {str(ds[k].value).encode() for k in ("StudyInstanceUID", "SeriesInstanceUID")}
    scanned = 0
    for path in tracked.server_dir.rglob("*"):
        if not path.is_file():
            continue
        data = path.read_bytes()
        if path.suffix == ".gz":
            data = gzip.decompress(data)
        assert CANARY.encode() not in data.upper(), path
        for uid in uids:
            assert uid not in data, path
        scanned += 1
    assert scanned > 20  # the database, the server log and the artifact files
    assert (tracked.server_dir / "mlflow.db").is_file()


def test_training_survives_a_tracking_server_outage(
    tracked: Tracked,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The server goes down after epoch 1 and comes back at epoch 3: training goes on,
    failures are reported, and every epoch's metrics arrive in the end."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # our own retries decide
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    workdir = tmp_path / "server"
    outage = start_mlflow_server(workdir)
    url = outage.__enter__()
    port = int(url.rsplit(":", 1)[1])
    restarted: list[object] = []

    def server_trouble(entry: object) -> None:
        epoch = entry.epoch  # type: ignore[attr-defined]
        if epoch == 1:
            outage.__exit__(None, None, None)
        if epoch == 3:
            back = start_mlflow_server(workdir, port=port)
            back.__enter__()
            restarted.append(back)

    cfg = tracked.params.train.classify.model_copy(update={"epochs": 3, "pretrained": "none"})
    params = tracked.params.model_copy(
        update={
            "tracking": TrackingParams(uri=url, retries=2, retry_wait_s=0.2),
            "train": tracked.params.train.model_copy(update={"classify": cfg}),
        }
    )
    try:
        with caplog.at_level(logging.WARNING, logger="medimg.tracking"):
            result = stages.train(params, "classify", tmp_path, callbacks=[server_trouble])
        assert result.epochs_run == 3
        assert "logging metrics failed" in caplog.text  # reported, not raised
        client = MlflowClient(tracking_uri=url)
        run_id = tracking._read_run_file(tmp_path / "models" / "classify")["run_id"]  # type: ignore[index]
        steps = [m.step for m in client.get_metric_history(run_id, "train_loss")]
        assert sorted(steps) == [1, 2, 3]
        assert client.get_run(run_id).info.status == "FINISHED"
    finally:
        for back in restarted:
            back.__exit__(None, None, None)  # type: ignore[attr-defined]
