"""The PACS in the whole pipeline, against a real Orthanc (tests/integration/orthanc.py):
studies pulled from it are what ``dvc repro`` trains on, and a study it sends to
``medimg pacs listen`` is predicted by the ``predict-inbox`` flow, whose DICOM SEG and SR
go back into the same study of the PACS (and, while the PACS is away, stay on disk,
marked not delivered, until a later run sends them)."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import yaml

from medimg.config import OrchestrationParams, Params
from medimg.dicom.deid import Pseudonymizer
from medimg.dicom.sr import read_diagnosis
from medimg.pacs.client import connect
from medimg.pacs.local import COMPLETE, Layout
from medimg.pacs.pull import pull
from medimg.pacs.query import Query
from tests.helpers import free_port, port_open, tool_path, write_cohort
from tests.integration.orthanc import (
    AE_TITLE,
    PASSWORD,
    USER,
    Orthanc,
    pacs_params,
    start_orthanc,
    storescu,
)
from tests.integration.project import DvcProject, metrics_files, new_project
from tests.known_models import EXACT_SYNTH, known_model, project_params, register_known


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    server = start_orthanc(tmp_path_factory.mktemp("orthanc"))
    try:
        yield server
    finally:
        server.stop()


def sop_uids(folder: Path) -> set[str]:
    return {
        str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
        for f in folder.rglob("*")
        if f.is_file()
    }


@pytest.mark.slow
def test_dvc_repro_trains_on_studies_pulled_from_the_pacs(
    orthanc: Orthanc, dvc_project: DvcProject, tmp_path: Path
) -> None:
    """The README's way with a PACS: freeze the demo cohort's stage, ``medimg pacs pull``
    into ``data.raw``, ``dvc repro``. The tiny cohort, stored into Orthanc and pulled back
    (other folders, other file names), trains to the very metrics the folder gave."""
    project = new_project(tmp_path / "project")
    project.dvc("repro", "synth")  # the tiny cohort, images stored into the PACS
    raw = project.root / "data" / "raw"
    storescu(orthanc.dicom_port, [raw], AE_TITLE)
    stored = sop_uids(raw)
    shutil.rmtree(raw)
    project.dvc("freeze", "synth")  # your own data in data.raw: the demo cohort stays put
    params = yaml.safe_load((project.root / "params.yaml").read_text())
    pacs = pacs_params(orthanc, tmp_path).model_dump(mode="json")
    params["pacs"] = {**pacs, "credentials": ".medimg-pacs.netrc"}  # none: the environment
    (project.root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    project.env.update(MEDIMG_PACS_USER=USER, MEDIMG_PACS_PASSWORD=PASSWORD)

    out = project.run(tool_path("medimg"), "pacs", "pull")
    assert PASSWORD not in out
    assert sop_uids(raw) == stored
    assert {p.parent.parent for p in raw.rglob("*.dcm")} == {raw}  # <study key>/<key>.dcm
    repro = project.dvc("repro")
    assert "Running stage 'synth'" not in repro and "Running stage 'ingest'" in repro
    assert "Running stage 'evaluate_classify'" in repro
    assert metrics_files(project.root) == dvc_project.first_metrics


def wait_for(check: object, what: str, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            pytest.fail(f"waited {seconds:.0f} s for {what}")
        time.sleep(0.2)


@pytest.mark.slow
def test_listen_then_predict_inbox_puts_seg_and_sr_back_into_the_pacs(
    orthanc: Orthanc, prefect_server: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipelines.predict import predict_inbox_flow

    monkeypatch.setattr("medimg.models.build.build_model", known_model)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cohort = write_cohort(tmp_path / "cohort", EXACT_SYNTH.model_copy(update={"n_patients": 1}))
    storescu(orthanc.dicom_port, [cohort.raw], AE_TITLE)  # the study is in the PACS
    [study_uid] = {
        str(pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID)
        for f in cohort.raw.rglob("*")
        if f.is_file()
    }
    base = project_params(tmp_path, cohort)
    models = {task: register_known(base, task, tmp_path) for task in ("segment", "classify")}
    pacs = pacs_params(orthanc, tmp_path)
    down = pacs.model_copy(update={"url": f"http://127.0.0.1:{free_port()}/dicom-web"})

    def params_file(task: str, server: object) -> Path:
        predict = {"model": models[task], "output": Path(f"{task}-results"), "deid": "pacs"}
        if task == "classify":  # its SR carries the volumes the segmenter measured
            predict["volumes_from"] = Path("segment-results")
        params = base.model_copy(
            update={
                "predict": base.predict.model_copy(update={**predict, "push": True}),
                "orchestration": OrchestrationParams(inbox=Path("inbox"), inbox_quiet_s=3600),
                "pacs": server,
            }
        )
        path = tmp_path / f"params-{task}-{'down' if server is down else 'up'}.yaml"
        path.write_text(yaml.safe_dump(Params.model_validate(params).model_dump(mode="json")))
        return path

    # the storage node, as `medimg pacs listen` runs it; Orthanc sends it the study
    node = subprocess.Popen(
        [tool_path("medimg"), "pacs", "listen", "--params", str(params_file("segment", pacs))],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(lambda: port_open(pacs.listen.port), "the storage node to listen")
        [found] = orthanc.rest("POST", "/tools/lookup", data=study_uid).json()
        orthanc.rest(
            "POST",
            "/modalities/medimg/store",
            json={"Resources": [found["ID"]], "Synchronous": True},
        )
        wait_for(lambda: list((tmp_path / "inbox").glob(f"*/{COMPLETE}")), "the study to complete")
    finally:
        node.terminate()
        log = node.communicate(timeout=30)[0].decode()
    assert study_uid not in log and PASSWORD not in log

    # 1. the PACS is away: the results stay on disk, marked not delivered
    first = predict_inbox_flow(str(params_file("segment", down)), str(tmp_path))
    [(key, entry)] = first["studies"].items()
    assert entry["n_predicted"] == 1 and entry["delivered"] is False, first
    assert "cannot be reached" in entry["error"] and PASSWORD not in json.dumps(first)
    results = tmp_path / "segment-results"
    [seg_file] = results.glob(f"{key}/*/seg.dcm")
    assert "NOT DELIVERED" in (results / "index.html").read_text()
    report = (results / key / "report.html").stat().st_mtime_ns
    # 2. the PACS is back: the next run sends what it kept, and predicts nothing again
    second = predict_inbox_flow(str(params_file("segment", pacs)), str(tmp_path))
    assert second["studies"][key]["delivered"] is True, second
    assert second["unchanged"] == 1 and (results / key / "report.html").stat().st_mtime_ns == report
    assert predict_inbox_flow(str(params_file("segment", pacs)), str(tmp_path))["studies"] == {}
    # 3. the classifier's deployment on the same inbox: its SR
    third = predict_inbox_flow(str(params_file("classify", pacs)), str(tmp_path))
    assert third["studies"][key]["delivered"] is True, third
    [sr_file] = (tmp_path / "classify-results").glob(f"{key}/*/sr.dcm")

    # in the PACS, in the patient's own study: found by QIDO-RS and by C-FIND, the same objects
    sent = {f: pydicom.dcmread(f) for f in (seg_file, sr_file)}
    for ds in sent.values():
        assert str(ds.StudyInstanceUID) == study_uid
    for protocol in ("dicomweb", "dimse"):
        client = connect(pacs.model_copy(update={"protocol": protocol}))
        try:
            there = {r.sop_uid for r in client.instances(study_uid)}
        finally:
            client.close()
        assert {str(ds.SOPInstanceUID) for ds in sent.values()} <= there, protocol
    keys = Pseudonymizer(b"results-back")
    back = tmp_path / "back"
    pull(pacs, Query(study_uids=(study_uid,)), back, keys)
    for ds in sent.values():
        assert pydicom.dcmread(Layout(back, keys).path(study_uid, str(ds.SOPInstanceUID))) == ds
    diagnosis = read_diagnosis(sr_file)
    assert diagnosis["predicted"] in diagnosis["probabilities"]
    with (results / key / "predictions.csv").open() as f:
        [row] = [r for r in csv.DictReader(f) if r["status"] == "predicted"]
    assert diagnosis["volumes_ml"] == {"lesion": pytest.approx(float(row["volume_ml_lesion"]))}
    assert float(row["volume_ml_lesion"]) > 0
