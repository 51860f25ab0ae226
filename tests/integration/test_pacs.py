"""medimg pacs against a real PACS: Debian's Orthanc with its DICOMweb plugin, started on
loopback (tests/integration/orthanc.py). The tiny synthetic cohort goes in with a plain
storescu (pynetdicom's); pulls by either protocol must give back the same datasets,
incrementally; listening receives from storescu and from Orthanc's C-MOVE; results pushed
back are found again by QIDO-RS and by C-FIND. Faults are caused for real: a server that
is down, a wrong password, a wrong AE title, an interrupted pull, a sender cut off
mid-instance. The PACS is shared by the module: the tests that push results into its
studies come after those that compare pulls with the originals (pytest keeps file order).
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from medimg.config import ListenParams, PacsParams
from medimg.dicom.deid import Pseudonymizer
from medimg.dicom.sr import build_diagnosis_sr, read_diagnosis, write_diagnosis_sr
from medimg.errors import PacsError
from medimg.pacs.client import connect
from medimg.pacs.listen import COMPLETE, StorageNode, complete_studies
from medimg.pacs.local import Layout
from medimg.pacs.pull import pull
from medimg.pacs.push import push
from medimg.pacs.query import Query
from tests.helpers import TINY_SYNTH, Cohort, free_port, write_cohort
from tests.integration.orthanc import (
    AE_TITLE,
    OURS,
    USER,
    Orthanc,
    https_front,
    pacs_params,
    start_orthanc,
    storescu,
)

KEYS = Pseudonymizer(b"pacs-test-key")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Cohort:
    # with annotations as DICOM SEG and RTSTRUCT too, in the PACS beside the images
    synth = TINY_SYNTH.model_copy(update={"seg_fraction": 0.5, "rtstruct_fraction": 0.25})
    return write_cohort(tmp_path_factory.mktemp("pacs-cohort"), synth)


@pytest.fixture(scope="module")
def orthanc(cohort: Cohort, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    server = start_orthanc(tmp_path_factory.mktemp("orthanc"))
    try:
        storescu(server.dicom_port, [cohort.raw, cohort.masks], AE_TITLE)
        yield server
    finally:
        server.stop()


def originals(cohort: Cohort) -> dict[str, pydicom.Dataset]:
    found = {}
    for f in [*cohort.raw.rglob("*"), *cohort.masks.rglob("*.dcm")]:
        if f.is_file():
            ds = pydicom.dcmread(f)
            found[str(ds.SOPInstanceUID)] = ds
    return found


def pulled(folder: Path) -> dict[str, pydicom.Dataset]:
    return {str(ds.SOPInstanceUID): ds for ds in map(pydicom.dcmread, folder.rglob("*.dcm"))}


@pytest.mark.parametrize(
    "protocol, retrieve", [("dicomweb", "get"), ("dimse", "get"), ("dimse", "move")]
)
def test_pull_gives_back_the_originals_and_then_only_what_is_new(
    orthanc: Orthanc, cohort: Cohort, tmp_path: Path, protocol: str, retrieve: str
) -> None:
    cfg = pacs_params(orthanc, tmp_path, protocol=protocol, retrieve=retrieve)
    out = tmp_path / "raw"
    summary = pull(cfg, Query(), out, KEYS)
    want = originals(cohort)
    got = pulled(out)
    assert summary.failed == [] and len(summary.studies) == len(
        {d.StudyInstanceUID for d in want.values()}
    )
    assert got.keys() == want.keys()
    for uid, ds in got.items():  # the same dataset; the file meta is each writer's own
        assert ds == want[uid], uid
    names = [p.relative_to(out) for p in out.rglob("*.dcm")]
    assert all(len(n.parts) == 2 and len(n.stem) == 16 for n in names)  # keys, no UIDs
    again = pull(cfg, Query(), out, KEYS)
    assert again.as_dict()["instances_fetched"] == 0
    assert again.as_dict()["instances_present"] == len(want)


def test_a_query_narrows_the_studies(orthanc: Orthanc, cohort: Cohort, tmp_path: Path) -> None:
    want = originals(cohort)
    mr = {d.StudyInstanceUID for d in want.values() if d.Modality == "MR"}
    assert 0 < len(mr) < len({d.StudyInstanceUID for d in want.values()})
    for protocol in ("dicomweb", "dimse"):
        cfg = pacs_params(orthanc, tmp_path, protocol=protocol)
        assert connect(cfg).find_studies(Query(modality="MR")) == sorted(mr)


def test_an_interrupted_pull_resumes(orthanc: Orthanc, cohort: Cohort, tmp_path: Path) -> None:
    cfg = pacs_params(orthanc, tmp_path, protocol="dimse")
    out = tmp_path / "raw"
    pull(cfg, Query(), out, KEYS)
    files = sorted(out.rglob("*.dcm"))
    for f in files[::3]:
        f.unlink()
    leftover = files[1].parent / f".{files[1].name}.abc123.tmp"  # a write cut short
    leftover.write_bytes(b"DICM half")
    summary = pull(cfg, Query(), out, KEYS).as_dict()
    assert summary["instances_fetched"] == len(files[::3])
    assert not leftover.exists()
    assert sorted(out.rglob("*.dcm")) == files


def test_a_server_that_is_down_names_itself_and_writes_nothing(tmp_path: Path) -> None:
    port = free_port()
    for protocol in ("dicomweb", "dimse"):
        cfg = PacsParams(protocol=protocol, url=f"http://127.0.0.1:{port}/dicom-web", port=port,
                         credentials=tmp_path / "none", timeout_s=5.0)  # fmt: skip
        with pytest.raises(PacsError, match=f"127.0.0.1:{port}.*cannot be reached"):
            pull(cfg, Query(), tmp_path / "raw", KEYS)
        assert not (tmp_path / "raw").exists()


def test_dicomweb_over_https_checks_the_certificate(
    orthanc: Orthanc, cohort: Cohort, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DICOMweb through an https front (stunnel, a self-signed certificate): with
    pacs.ca_bundle naming it the pull matches the originals; with the system's CAs (the
    default, verify on) it is refused with a message naming the setting, nothing
    written; pacs.tls_verify: false is the user's explicit choice to skip the check."""
    # as on many hospital machines: requests would let it override pacs.ca_bundle
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt")
    with https_front(orthanc, tmp_path / "tls") as (url, cert):
        cfg = pacs_params(orthanc, tmp_path, url=url, ca_bundle=str(cert))
        pull(cfg, Query(), tmp_path / "raw", KEYS)
        assert set(pulled(tmp_path / "raw")) == set(originals(cohort))
        with pytest.raises(PacsError, match=r"TLS certificate not accepted.*pacs\.ca_bundle"):
            pull(cfg.model_copy(update={"ca_bundle": ""}), Query(), tmp_path / "refused", KEYS)
        assert not (tmp_path / "refused").exists()
        unchecked = cfg.model_copy(update={"ca_bundle": "", "tls_verify": False})
        summary = pull(unchecked, Query(), tmp_path / "raw", KEYS)
        assert summary.failed == [] and summary.as_dict()["instances_fetched"] == 0


def test_dimse_over_tls_checks_the_certificate(cohort: Cohort, tmp_path: Path) -> None:
    """An Orthanc whose DICOM port speaks DICOM TLS only, with a self-signed certificate:
    with pacs.ca_bundle naming it, C-FIND and C-GET pull the study; with the system's CAs
    it is refused, the message says what to set, and nothing is written. (DICOMweb over
    https is not tested against Orthanc: Debian's 1.10.1 crashes on its first HTTPS
    request.)"""
    server = start_orthanc(tmp_path / "orthanc", tls=True)
    try:
        images = [pydicom.dcmread(f) for f in sorted(cohort.raw.rglob("*")) if f.is_file()]
        study = str(images[0].StudyInstanceUID)
        expected = set()
        for ds in images:  # one study, in by the REST API
            if str(ds.StudyInstanceUID) == study:
                server.rest("POST", "/instances", data=Path(str(ds.filename)).read_bytes())
                expected.add(str(ds.SOPInstanceUID))
        cfg = pacs_params(
            server, tmp_path, protocol="dimse", ca_bundle=str(server.ca), dimse_tls=True
        )
        pull(cfg, Query(), tmp_path / "raw", KEYS)
        assert set(pulled(tmp_path / "raw")) == expected
        with pytest.raises(PacsError, match=r"no TLS session .*pacs\.ca_bundle"):
            pull(cfg.model_copy(update={"ca_bundle": ""}), Query(), tmp_path / "refused", KEYS)
        with pytest.raises(PacsError, match=r"(rejected|aborted|cannot be reached)"):
            plain = cfg.model_copy(update={"dimse_tls": False})  # TLS is required
            pull(plain, Query(), tmp_path / "refused", KEYS)
        assert not (tmp_path / "refused").exists()
    finally:
        server.stop()


def test_a_wrong_password_is_refused_and_not_shown(
    orthanc: Orthanc, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MEDIMG_PACS_USER", USER)
    monkeypatch.setenv("MEDIMG_PACS_PASSWORD", "not-the-password")
    cfg = pacs_params(orthanc, tmp_path)
    with pytest.raises(PacsError, match="refused the credentials") as e:
        pull(cfg, Query(), tmp_path / "raw", KEYS)
    assert "not-the-password" not in str(e.value) and orthanc.dicomweb in str(e.value)


def test_a_wrong_ae_title_is_rejected(orthanc: Orthanc, tmp_path: Path) -> None:
    cfg = pacs_params(orthanc, tmp_path, protocol="dimse", called_ae="NOTORTHANC")
    with pytest.raises(
        PacsError,
        match=r"NOTORTHANC at 127\.0\.0\.1:\d+ (rejected|aborted) the association",
    ):
        pull(cfg, Query(), tmp_path / "raw", KEYS)


def test_the_node_receives_from_storescu_and_from_orthanc(
    orthanc: Orthanc, cohort: Cohort, tmp_path: Path
) -> None:
    want = originals(cohort)
    study = sorted({str(d.StudyInstanceUID) for d in want.values()})[0]
    files = [
        f
        for f in cohort.raw.rglob("*")
        if f.is_file()
        and str(pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID) == study
    ]
    listen = ListenParams(ae_title=OURS, port=orthanc.listen_port, quiet_s=1.0)
    inbox = tmp_path / "inbox"
    node = StorageNode(listen, inbox, KEYS)
    node.start()
    try:
        storescu(orthanc.listen_port, [files[0].parent], OURS)
        folder = inbox / KEYS.key("study", study)
        deadline = time.monotonic() + 10
        while not (folder / COMPLETE).exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert complete_studies(inbox) == [folder]
        got = pulled(inbox)
        assert got.keys() == {str(pydicom.dcmread(f).SOPInstanceUID) for f in files}
        # Orthanc sends the whole study (C-STORE as the C-MOVE's sub-operations would)
        other = sorted({str(d.StudyInstanceUID) for d in want.values()})[1]
        ids = orthanc.rest("POST", "/tools/lookup", data=other).json()
        orthanc.rest(
            "POST",
            "/modalities/medimg/store",
            json={"Resources": [ids[0]["ID"]], "Synchronous": True},
        )
        expected = {u for u, d in want.items() if d.StudyInstanceUID == other}
        assert {u for u, d in pulled(inbox / KEYS.key("study", other)).items()} == expected
    finally:
        node.stop()


def test_a_caller_not_allowed_is_refused(orthanc: Orthanc, cohort: Cohort, tmp_path: Path) -> None:
    listen = ListenParams(ae_title=OURS, port=free_port(), allowed_callers=("PACS",), quiet_s=1.0)
    node = StorageNode(listen, tmp_path / "inbox", KEYS)
    node.start()
    try:
        first = next(p for p in sorted(cohort.raw.rglob("*")) if p.is_file())
        command = [sys.executable, "-m", "pynetdicom", "storescu", "127.0.0.1",
                   str(listen.port), str(first), "-aec", OURS, "-aet", "STRANGER"]  # fmt: skip
        subprocess.run(command, capture_output=True, timeout=60)
        assert node.received == 0 and not list((tmp_path / "inbox").rglob("*.dcm"))
    finally:
        node.stop()


@pytest.mark.parametrize("protocol", ["dicomweb", "dimse"])
def test_results_pushed_back_are_found_in_the_pacs(
    orthanc: Orthanc, cohort: Cohort, tmp_path: Path, protocol: str
) -> None:
    """A SEG and the classifier's SR, sent by one protocol, found by both (QIDO-RS and
    C-FIND), and retrieved back as they were sent."""
    seg = pydicom.dcmread(
        next(f for f in cohort.masks.rglob("*.dcm") if pydicom.dcmread(f).Modality == "SEG")
    )
    seg.SOPInstanceUID = seg.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    seg.SeriesInstanceUID = generate_uid()
    series = [d for d in originals(cohort).values() if d.Modality in ("CT", "MR")]
    series = [d for d in series if d.SeriesInstanceUID == series[0].SeriesInstanceUID]
    version = f"{protocol}-1"  # one SR per test run: UIDs derive from model and version
    sr = build_diagnosis_sr(series, {"none": 0.2, "cyst": 0.5, "solid": 0.3}, "cyst", "m", version)
    files = [tmp_path / "seg.dcm", tmp_path / "sr.dcm"]
    seg.save_as(files[0], enforce_file_format=True)
    write_diagnosis_sr(sr, files[1])
    delivery = push(pacs_params(orthanc, tmp_path, protocol=protocol), files)
    assert delivery.delivered and delivery.files == 2
    for way in ("dicomweb", "dimse"):
        client = connect(pacs_params(orthanc, tmp_path, protocol=way))
        for sent in (seg, sr):
            refs = client.instances(str(sent.StudyInstanceUID))
            assert str(sent.SOPInstanceUID) in {r.sop_uid for r in refs}
    back = tmp_path / "back"
    pull(pacs_params(orthanc, tmp_path), Query(study_uids=(str(sr.StudyInstanceUID),)), back, KEYS)
    found = pulled(back)
    for sent, file in zip((seg, sr), files, strict=True):
        assert found[str(sent.SOPInstanceUID)] == pydicom.dcmread(file)
    assert (
        read_diagnosis(Layout(back, KEYS).path(str(sr.StudyInstanceUID), str(sr.SOPInstanceUID)))[
            "predicted"
        ]
        == "cyst"
    )


@pytest.mark.parametrize("protocol", ["dicomweb", "dimse"])
def test_a_push_that_fails_keeps_the_files(cohort: Cohort, tmp_path: Path, protocol: str) -> None:
    port = free_port()  # nothing listens there
    seg = next(f for f in cohort.masks.rglob("*.dcm") if pydicom.dcmread(f).Modality == "SEG")
    result = tmp_path / "seg.dcm"
    result.write_bytes(seg.read_bytes())
    url = f"http://127.0.0.1:{port}/dicom-web"
    cfg = PacsParams(protocol=protocol, url=url, port=port, retries=1, retry_wait_s=0.0,
                     timeout_s=5.0, credentials=tmp_path / "none")  # fmt: skip
    delivery = push(cfg, [result])
    assert not delivery.delivered and "cannot be reached" in delivery.error
    assert result.read_bytes() == seg.read_bytes()


def test_the_prefect_flow_pulls_one_task_per_study(
    orthanc: Orthanc, cohort: Cohort, tmp_path: Path, prefect_server: None
) -> None:
    """The flow of the pull: MR studies by a query file, one task per study named by its
    key; the patient ID of the query stays out of the flow run's parameters."""
    from prefect.client.orchestration import get_client

    from medimg.config import DataParams, IngestParams, Params
    from pipelines.pacs import pacs_pull_flow

    want = originals(cohort)
    mr = {str(d.StudyInstanceUID) for d in want.values() if d.Modality == "MR"}
    patient = next(str(d.PatientID) for d in want.values() if d.Modality == "MR")
    query = tmp_path / "query.yaml"
    query.write_text(f"modality: MR\npatient_id: '{patient}'\n")
    salt = tmp_path / "salt"
    salt.write_text("pacs-flow-test-salt")
    salt.chmod(0o600)
    params = Params(
        data=DataParams(raw=tmp_path / "raw"),
        ingest=IngestParams(salt_file=salt),
        pacs=pacs_params(orthanc, tmp_path, protocol="dicomweb"),
    )
    summary = pacs_pull_flow(params, query, tmp_path)
    mine = {str(d.StudyInstanceUID) for d in want.values() if str(d.PatientID) == patient} & mr
    assert summary["studies"] == len(mine) > 0 and summary["failed"] == {}
    # what the PACS holds of those studies (other tests push results into them)
    held = sum(len(connect(params.pacs).instances(uid)) for uid in mine)
    assert (
        summary["instances_fetched"]
        == held
        >= sum(1 for d in want.values() if str(d.StudyInstanceUID) in mine)
    )
    assert len(list((tmp_path / "raw").rglob("*.dcm"))) == held

    async def runs() -> list:
        async with get_client() as client:
            flows = await client.read_flow_runs()
            return [
                r for r in flows if r.name and r.flow_id and str(r.parameters).find(patient) >= 0
            ]

    import asyncio

    assert asyncio.run(runs()) == []  # no flow run holds the patient ID


def _send_c_store_pdus(port: int, ds: pydicom.Dataset, fraction: float) -> None:
    """Send the first ``fraction`` of a C-STORE request's PDUs on a new association, then
    abort it: a sender that dies mid-instance (pynetdicom's own message encoder)."""
    import io

    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom import AE
    from pynetdicom.dimse_messages import C_STORE_RQ
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.dsutils import encode

    ae = AE(ae_title="SENDER")
    ae.add_requested_context(ds.SOPClassUID, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title=OURS)
    assert assoc.is_established
    request = C_STORE()
    request.MessageID, request.Priority = 1, 2
    request.AffectedSOPClassUID, request.AffectedSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    request.DataSet = io.BytesIO(encode(ds, False, True))
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    context = assoc.accepted_contexts[0].context_id
    pdus = list(message.encode_msg(context, assoc.acceptor.maximum_length))
    assert len(pdus) > 10  # the instance spans many PDUs
    for pdu in pdus[: int(len(pdus) * fraction)]:
        assoc.dul.send_pdu(pdu)
    time.sleep(0.5)
    assoc.abort()


def test_a_sender_that_drops_mid_instance_leaves_nothing(cohort: Cohort, tmp_path: Path) -> None:
    import numpy as np

    first = next(p for p in sorted(cohort.raw.rglob("*")) if p.is_file())
    ds = pydicom.dcmread(first)
    ds.Rows = ds.Columns = 512  # about 0.5 MB of pixels: many PDUs
    ds.PixelData = np.zeros((512, 512), np.int16).tobytes()
    listen = ListenParams(ae_title=OURS, port=free_port(), quiet_s=0.5)
    inbox = tmp_path / "inbox"
    node = StorageNode(listen, inbox, KEYS)
    node.start()
    try:
        _send_c_store_pdus(listen.port, ds, 0.5)
        time.sleep(1.0)
        assert node.received == 0 and [p for p in inbox.rglob("*") if p.is_file()] == []
        _send_c_store_pdus(listen.port, ds, 1.0)  # the whole instance, then the abort
        deadline = time.monotonic() + 10
        while node.received == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert node.received == 1 and pulled(inbox).keys() == {str(ds.SOPInstanceUID)}
    finally:
        node.stop()
