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
def test_predict_inbox_flow_takes_each_complete_study_once(
    prefect_server: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the predict-inbox deployment runs: params from the file, the inbox and output
    of params; a study folder still arriving waits, a complete one is predicted once (the
    record in processed.json), a new one alone is predicted next, a changed one again."""
    import json

    import yaml

    from medimg.config import OrchestrationParams
    from medimg.pacs.local import COMPLETE
    from pipelines.predict import predict_inbox_flow

    monkeypatch.setattr("medimg.models.build.build_model", known_model)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cohort = write_cohort(tmp_path / "cohort", EXACT_SYNTH.model_copy(update={"n_patients": 2}))
    params = project_params(tmp_path, cohort, output=Path("results"))
    uri = register_known(params, "segment", tmp_path)
    params = params.model_copy(
        update={
            "predict": params.predict.model_copy(update={"model": uri}),
            "orchestration": OrchestrationParams(inbox=Path("inbox"), inbox_quiet_s=3600),
        }
    )
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params.model_dump(mode="json")))
    with cohort.truth.open() as f:
        truth = list(csv.DictReader(f))
    results = tmp_path / "results"

    def run() -> dict:
        return predict_inbox_flow(str(params_file), str(tmp_path))

    assert run() == {"studies": {}, "unchanged": 0, "waiting": 0}
    first = tmp_path / "inbox" / "DOE^JANE 1970"  # a folder named by hand, as PHI
    shutil.copytree(cohort.raw / truth[0]["folder"], first)
    assert run() == {"studies": {}, "unchanged": 0, "waiting": 1}  # copied in just now
    (first / COMPLETE).touch()  # what the storage node writes once a study went quiet
    one = run()
    [(key, entry)] = one["studies"].items()
    assert entry["n_predicted"] >= 1 and entry["delivered"] is None, one
    report = results / key / "report.html"
    written = report.stat().st_mtime_ns
    record = (results / "processed.json").read_text()
    assert key in record and "DOE" not in record
    assert "DOE" not in (results / "index.html").read_text()
    assert not [p for p in results.rglob("*") if "DOE" in p.name]
    assert run() == {"studies": {}, "unchanged": 1, "waiting": 0}
    assert report.stat().st_mtime_ns == written

    other = next(r["folder"] for r in truth if r["folder"] != truth[0]["folder"])
    second = tmp_path / "inbox" / "second"
    shutil.copytree(cohort.raw / other, second)
    (second / COMPLETE).touch()
    two = run()
    assert list(two["studies"]) != [key] and len(two["studies"]) == 1, two
    assert two["unchanged"] == 1
    assert report.stat().st_mtime_ns == written  # the first study was left alone
    done = json.loads((results / "processed.json").read_text())["studies"]
    assert sorted(done) == sorted([key, *two["studies"]])

    extra = next(f for f in sorted(second.rglob("*")) if f.is_file() and f.name != COMPLETE)
    shutil.copy(extra, first / "one-more.dcm")  # the folder grew after it was complete
    three = run()
    assert list(three["studies"]) == [key], three
    assert report.stat().st_mtime_ns != written
