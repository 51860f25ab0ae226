"""PHI canaries, end to end: from DICOM with identifiers everywhere to a de-identified
prediction, through Prefect flows and MLflow, and no identifier comes out anywhere.

The input is the tiny cohort with a unique ``CNRY...`` string in every text attribute of
PS3.15 Annex E Table E.1-1, in a private tag, in the patient's name and ID, in folder and
file names, and a unique date and time in every Annex E date and time attribute. The
pipeline runs as a user runs it: the ingest flow and the predict flow under Prefect (the
session's server), preprocessing, training, evaluation and registration of both models in
a local MLflow store. Then every byte medimg wrote is searched (compressed files opened,
tables read), as is the Prefect server's database (logs, task and flow runs, artifacts,
results): no canary, no planted date, and no original UID may appear.
"""

from __future__ import annotations

import gzip
import io
import re
from pathlib import Path

import pandas as pd
import pydicom
import pytest

from medimg import stages
from medimg.config import (
    DataParams,
    IngestParams,
    Params,
    PredictParams,
    SplitParams,
    TaskTrainParams,
    TrackingParams,
    TrainParams,
)
from tests.helpers import CANARY, Cohort, plant_canaries

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

DATE, DATETIME, TIME = "18230517", "18230517235959", "235959.1234"
UID_LIKE = re.compile(rb"[0-9]+(?:\.[0-9]+){2,}")  # 2.25.<integer> and longer


def _plant_everything(cohort: Cohort, dest: Path) -> tuple[Path, Path, set[str]]:
    """The canary cohort, plus dates, times and canary file names; returns the raw folder,
    the labels and every original UID of the input."""
    from medimg.dicom.deid import ANNEX_E

    raw, labels = plant_canaries(cohort, dest)
    uids: set[str] = set()
    for n, path in enumerate(sorted(p for p in raw.rglob("*") if p.is_file())):
        ds = pydicom.dcmread(path)
        for elem in ds.iterall():
            if elem.VR == "UI" and elem.value and elem.tag.group != 0x0002:
                uids.update(str(v) for v in (elem.value if elem.VM > 1 else [elem.value]))
        for tag in ANNEX_E:
            vr = (
                pydicom.datadict.dictionary_VR(tag)
                if pydicom.datadict.dictionary_has_tag(tag)
                else ""
            )
            keyword = pydicom.datadict.keyword_for_tag(tag)
            if vr in ("DA", "DT", "TM") and keyword:
                setattr(ds, keyword, {"DA": DATE, "DT": DATETIME, "TM": TIME}[vr])
        ds.save_as(path.with_name(f"{CANARY}FILE{n:04d}_{path.name}"), enforce_file_format=True)
        path.unlink()
    uids = {u for u in uids if not u.startswith("1.2.840.10008.")}  # standard UIDs (SOP classes)
    return raw, labels, uids


def _texts(path: Path) -> list[bytes]:
    """What a file holds, decompressed or as a table's text where it is compressed."""
    data = path.read_bytes()
    out = [data]
    if path.name.endswith(".gz"):
        out.append(gzip.decompress(data))
    if path.suffix == ".parquet":
        out.append(pd.read_parquet(io.BytesIO(data)).to_csv().encode())
    return out


def _leaks(paths: list[Path], uids: set[str]) -> dict[str, list[str]]:
    needles = [CANARY.encode(), DATE.encode(), TIME.encode()]
    found: dict[str, list[str]] = {}
    for path in paths:
        if CANARY in str(path):
            found.setdefault(str(path), []).append("canary in the file name")
        for text in _texts(path):
            upper = text.upper()
            hits = [n.decode() for n in needles if n in upper]
            hits += sorted({m.decode() for m in UID_LIKE.findall(text)} & uids)
            if hits:
                found.setdefault(str(path), []).extend(hits[:5])
    return found


def _files(*folders: Path) -> list[Path]:
    return [p for f in folders if f.exists() for p in sorted(f.rglob("*")) if p.is_file()]


def test_no_phi_from_dicom_to_prediction(
    prefect_server: None,
    tiny_cohort: Cohort,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from prefect.settings import PREFECT_HOME, PREFECT_SERVER_DATABASE_CONNECTION_URL

    from pipelines.ingest import ingest_flow
    from pipelines.predict import predict_flow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = tmp_path / "project"
    raw, labels, uids = _plant_everything(tiny_cohort, tmp_path / "input")
    assert len(uids) > 100  # studies, series, instances, frames of reference
    # the search finds what was planted: in the input every kind of leak is there
    planted = next(p for p in raw.rglob("*") if p.is_file())
    hits = _leaks([planted], uids)[str(planted)]
    assert {CANARY, DATE, TIME, "canary in the file name"} <= set(hits) and len(hits) >= 5
    salt = tmp_path / "salt"
    salt.write_text("medimg-test-salt-24")
    salt.chmod(0o600)
    small = TaskTrainParams(arch="resnet10", epochs=1, batch_size=4, pretrained="none")
    params = Params(
        data=DataParams(raw=raw, labels=labels, masks=tiny_cohort.masks),
        ingest=IngestParams(salt_file=salt),
        split=SplitParams(salt="medimg-split-v3", n_folds=2, test_fraction=0.25),
        train=TrainParams(classify=small, segment=small.model_copy(update={"batch_size": 2})),
        tracking=TrackingParams(retry_wait_s=0.1),  # sqlite:///mlflow.db in the root
        predict=PredictParams(output=Path("predictions")),
    )
    root.mkdir()

    state = ingest_flow(params, root, return_state=True)
    assert state.is_completed(), state.message
    stages.preprocess(params, root)
    for task in ("segment", "classify"):
        stages.train(params, task, root)
        stages.evaluate(params, task, root)
        assert stages.register(params, task, root).promoted
    for task, name in (("segment", "segmenter"), ("classify", "classifier")):
        summary = predict_flow(
            params, raw, Path(f"predictions-{task}"), f"models:/medimg-{name}@champion", root=root
        )
        assert summary["n_predicted"] > 0, summary

    written = _files(root)
    kinds = {p.relative_to(root).parts[0] for p in written}
    for expected in ("data", "models", "metrics", "plots", "mlflow.db", "mlartifacts"):
        assert expected in kinds, sorted(kinds)
    assert any(p.name == "seg.dcm" for p in written)
    assert any(p.name == "predictions.csv" for p in written)
    # quarantine.csv names source files by path (never DVC-tracked, never uploaded); the
    # canary input has nothing to set aside, so it holds no path either
    assert _leaks(written, uids) == {}

    database = Path(PREFECT_SERVER_DATABASE_CONNECTION_URL.value().split("///", 1)[1])
    prefect_files = [p for p in database.parent.glob(f"{database.name}*") if p.is_file()]
    prefect_files += _files(Path(PREFECT_HOME.value()) / "storage")
    assert database in prefect_files
    assert _leaks(prefect_files, uids) == {}
