"""The Prefect ``predict`` flow on an inbox folder: good studies get every output, bad
ones end in the report with their reason."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pydicom
import pytest

from tests.helpers import write_cohort
from tests.known_models import EXACT_SYNTH, known_model, project_params, register_known


@pytest.mark.slow
def test_predict_flow_on_inbox(
    prefect_server: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipelines.predict import predict_flow

    monkeypatch.setattr("medimg.models.build.build_model", known_model)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cohort = write_cohort(tmp_path / "cohort", EXACT_SYNTH.model_copy(update={"n_patients": 2}))
    params = project_params(tmp_path, cohort)
    uri = register_known(params, "segment", tmp_path)
    with cohort.truth.open() as f:
        truth = list(csv.DictReader(f))
    inbox = tmp_path / "inbox"
    good, bad = truth[0], truth[-1]
    shutil.copytree(cohort.raw / good["folder"], inbox / "good")
    bad_files = [p for p in (cohort.raw / bad["folder"]).iterdir() if p.is_file()]
    bad_files = [p for p in bad_files if pydicom.dcmread(p).SeriesInstanceUID == bad["series_uid"]]
    by_position = sorted(bad_files, key=lambda p: float(pydicom.dcmread(p).SliceLocation))
    for p in by_position[:5] + by_position[6:]:  # one slice missing from the middle
        (inbox / "bad").mkdir(exist_ok=True)
        shutil.copy(p, inbox / "bad" / p.name)
    # a file cut off inside its header: damaged, of no known series
    (inbox / "bad" / "broken.dcm").write_bytes(bad_files[0].read_bytes()[:300])

    out = tmp_path / "out"
    summary = predict_flow(params, inbox, out, uri, root=tmp_path)

    rows = {r["key"]: r for r in csv.DictReader((out / "predictions.csv").open())}
    predicted = [r for r in rows.values() if r["status"] == "predicted"]
    assert predicted and summary["n_failed"] == 0
    for row in predicted:
        for name in ("mask.nii.gz", "seg.dcm", "montage.png"):
            assert (out / row["key"] / name).is_file(), name
        assert row["model_version"] == "1"
    rejected = [r for r in rows.values() if r["status"] == "rejected"]
    assert any(r["reason"].startswith("missing_slices") for r in rejected), rejected
    page = (out / "report.html").read_text()
    assert "missing_slices" in page and "rejected" in page
    assert (out / "summary.json").is_file() and (out / "ingest" / "quarantine.csv").is_file()
    for row in rejected:  # not guessed at: no mask, SEG or montage
        assert not (out / row["key"]).exists()
    # the damaged file belongs to no known series: a row of its own, without its path
    assert any(r["key"] == "(files)" for r in rejected), rejected
    assert "broken.dcm" not in page


@pytest.mark.slow
def test_predict_inbox_flow_runs_once_per_inbox_change(
    prefect_server: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the predict-inbox deployment runs: params from the file, the inbox and output
    of params; a second run over an unchanged inbox redoes nothing, a new study reruns."""
    import yaml

    from medimg.config import OrchestrationParams
    from pipelines.predict import predict_inbox_flow

    monkeypatch.setattr("medimg.models.build.build_model", known_model)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cohort = write_cohort(tmp_path / "cohort", EXACT_SYNTH.model_copy(update={"n_patients": 2}))
    params = project_params(tmp_path, cohort, output=Path("results"))
    uri = register_known(params, "segment", tmp_path)
    params = params.model_copy(
        update={
            "predict": params.predict.model_copy(update={"model": uri}),
            "orchestration": OrchestrationParams(inbox=Path("inbox")),
        }
    )
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params.model_dump(mode="json")))
    with cohort.truth.open() as f:
        truth = list(csv.DictReader(f))

    empty = predict_inbox_flow(str(params_file), str(tmp_path))
    assert empty == {"skipped": "empty inbox"}
    shutil.copytree(cohort.raw / truth[0]["folder"], tmp_path / "inbox" / "first")
    first = predict_inbox_flow(str(params_file), str(tmp_path))
    assert first["n_predicted"] >= 1, first
    report = tmp_path / "results" / "report.html"
    written = report.stat().st_mtime_ns
    again = predict_inbox_flow(str(params_file), str(tmp_path))
    assert again == {"skipped": "unchanged inbox"}
    assert report.stat().st_mtime_ns == written
    other = next(r["folder"] for r in truth if r["folder"] != truth[0]["folder"])
    shutil.copytree(cohort.raw / other, tmp_path / "inbox" / "second")
    second = predict_inbox_flow(str(params_file), str(tmp_path))
    assert second["n_predicted"] > first["n_predicted"], (first, second)
