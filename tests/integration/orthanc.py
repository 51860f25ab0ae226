"""A real PACS for the tests: Debian's Orthanc with its DICOMweb plugin, on loopback.

Started on free ports with HTTP authentication, our AE title registered as a modality
(so Orthanc answers its C-FIND, C-GET and C-MOVE and can send to its storage node), and
nothing listening beyond 127.0.0.1.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from medimg.config import ListenParams, PacsParams
from tests.helpers import free_port, port_open

PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
USER, PASSWORD = "medimg", "orthanc-test-secret"
AE_TITLE = "ORTHANCTEST"
OURS = "MEDIMG"


@dataclass
class Orthanc:
    http_port: int
    dicom_port: int
    listen_port: int  # where Orthanc sends C-MOVEs and stores to our AE title
    process: subprocess.Popen[bytes]
    log: Path
    ca: Path | None = None  # the self-signed certificate of a server started with TLS

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    def rest(self, method: str, path: str, **kwargs: object) -> requests.Response:
        response = requests.request(
            method, f"{self.url}{path}", auth=(USER, PASSWORD), timeout=30, **kwargs
        )
        response.raise_for_status()
        return response

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()


def orthanc_binary() -> str:
    found = shutil.which("Orthanc") or (
        "/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").exists() else None
    )
    if found is None or not PLUGIN.is_file():
        pytest.fail(
            "Orthanc and its DICOMweb plugin are needed: run `make system-packages` "
            "(apt-get install orthanc orthanc-dicomweb)"
        )
    return found


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key (openssl), valid for two days."""
    folder.mkdir(parents=True, exist_ok=True)
    cert, key = folder / "cert.pem", folder / "key.pem"
    command = ["openssl", "req", "-x509", "-nodes", "-days", "2", "-newkey", "rsa:2048",
               "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
               "-addext", "subjectAltName=IP:127.0.0.1"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    return cert, key


def start_orthanc(root: Path, tls: bool = False) -> Orthanc:
    """Orthanc on free loopback ports; with ``tls``, its DICOM port speaks DICOM TLS only,
    with a self-signed certificate (its ``ca``)."""
    binary = orthanc_binary()
    http, dicom, listen = free_port(), free_port(), free_port()
    (root / "db").mkdir(parents=True, exist_ok=True)
    config = {
        "Name": "medimg-test",
        "StorageDirectory": str(root / "db"),
        "IndexDirectory": str(root / "db"),
        "HttpPort": http,
        "DicomPort": dicom,
        "DicomAet": AE_TITLE,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {USER: PASSWORD},
        "DicomCheckCalledAet": True,
        "DicomModalities": {"medimg": {"AET": OURS, "Host": "127.0.0.1", "Port": listen}},
        "Plugins": [str(PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        "StableAge": 1,
        "HttpsVerifyPeers": False,
    }
    ca = None
    if tls:  # DICOM TLS only: Debian's Orthanc 1.10.1 crashes on its first HTTPS request
        ca, key = self_signed(root / "tls")
        config.update(
            DicomTlsEnabled=True,
            DicomTlsCertificate=str(ca), DicomTlsPrivateKey=str(key),
            DicomTlsTrustedCertificates=str(ca), DicomTlsRemoteCertificateRequired=False,
        )  # fmt: skip
    (root / "orthanc.json").write_text(json.dumps(config))
    log = root / "orthanc.log"
    with log.open("wb") as out:
        process = subprocess.Popen([binary, str(root / "orthanc.json")], stdout=out, stderr=out)
    server = Orthanc(http, dicom, listen, process, log, ca)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"Orthanc exited at start:\n{log.read_text()[-3000:]}")
        try:
            server.rest("GET", "/system")
            return server
        except requests.RequestException:
            time.sleep(0.3)
    server.stop()
    pytest.fail(f"Orthanc did not answer within 60 s:\n{log.read_text()[-3000:]}")


def storescu(port: int, paths: list[Path], called: str, calling: str = "STORESCU") -> None:
    """pynetdicom's storescu application: a plain sender, not medimg's code."""
    for path in paths:
        command = [sys.executable, "-m", "pynetdicom", "storescu", "127.0.0.1", str(port),
                   str(path), "-r", "-aec", called, "-aet", calling]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]


def pacs_params(server: Orthanc, tmp: Path, **changes: object) -> PacsParams:
    netrc = tmp / "pacs.netrc"
    netrc.write_text(f"machine 127.0.0.1 login {USER} password {PASSWORD}\n")
    netrc.chmod(0o600)
    base = PacsParams(
        url=server.dicomweb, port=server.dicom_port, called_ae=AE_TITLE, calling_ae=OURS,
        credentials=netrc, retries=0, retry_wait_s=0.0, timeout_s=20.0,
        listen=ListenParams(ae_title=OURS, port=server.listen_port, quiet_s=1.0),
    )  # fmt: skip
    return base.model_copy(update=changes)


@contextmanager
def https_front(server: Orthanc, folder: Path) -> Iterator[tuple[str, Path]]:
    """stunnel (Debian's stunnel4) in front of Orthanc's HTTP port: DICOMweb over https
    with a self-signed certificate for 127.0.0.1. Yields the https DICOMweb root and the
    certificate. (Orthanc's own HTTPS crashes in Debian's 1.10.1.)"""
    binary = shutil.which("stunnel4") or shutil.which("stunnel")
    if binary is None:
        pytest.fail("stunnel is needed for the https tests: run `make system-packages`")
    cert, key = self_signed(folder)
    both = folder / "both.pem"
    both.write_text(cert.read_text() + key.read_text())
    port = free_port()
    conf = folder / "stunnel.conf"
    conf.write_text(
        f"foreground = yes\npid =\n[dicomweb]\naccept = 127.0.0.1:{port}\n"
        f"connect = 127.0.0.1:{server.http_port}\ncert = {both}\n"
    )
    log = folder / "stunnel.log"
    with log.open("wb") as out:
        process = subprocess.Popen([binary, str(conf)], stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 20
        while not port_open(port):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"stunnel did not start:\n{log.read_text()[-2000:]}")
            time.sleep(0.2)
        yield f"https://127.0.0.1:{port}/dicom-web", cert
    finally:
        process.terminate()
        process.wait(timeout=20)
