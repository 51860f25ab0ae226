"""The servers medimg starts listen on loopback only, unless the user asks otherwise.

``medimg ui`` (``make ui``: the MLflow UI) and ``medimg prefect-server`` (``make
prefect-server``) are started for real on free ports; once they answer, every listening
socket of their process trees is read from the operating system.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import yaml

from medimg.config import Params
from tests.helpers import free_port, tool_path

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@contextlib.contextmanager
def _server(
    args: list[str], cwd: Path, health: str, ui: bool = False
) -> Iterator[subprocess.Popen[bytes]]:
    """Start ``args``, wait until ``health`` answers 200, stop the whole group after."""
    env = {
        **os.environ,
        "PREFECT_HOME": str(cwd / "prefect-home"),
        "PREFECT_UI_ENABLED": str(ui).lower(),
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{cwd}/prefect.db",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    log = cwd / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            args, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(OSError), urllib.request.urlopen(health, timeout=2) as r:
                if r.status == 200:
                    break
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _listening(pid: int) -> set[tuple[str, int]]:
    """(address, port) of every listening TCP socket of ``pid`` and its descendants."""
    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    found = set()
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    found.add((conn.laddr.ip, conn.laddr.port))
    return found


@pytest.mark.parametrize(
    ("command", "health"),
    [("ui", "/health"), ("prefect-server", "/api/health")],
    ids=["mlflow-ui", "prefect-server"],
)
def test_server_listens_on_loopback_only(tmp_path: Path, command: str, health: str) -> None:
    # the MLflow UI reads the project's store from params.yaml in its working folder
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(Params().model_dump(mode="json")))
    port = free_port()
    args = [tool_path("medimg"), command, "--port", str(port)]
    with _server(args, tmp_path, f"http://127.0.0.1:{port}{health}") as proc:
        sockets = _listening(proc.pid)
    assert ("127.0.0.1", port) in sockets, sockets
    assert {ip for ip, _ in sockets} == {"127.0.0.1"}, sockets


def test_a_wider_address_is_a_choice_and_warns(capsys: pytest.CaptureFixture[str]) -> None:
    """Listening beyond loopback needs --host, and then warns about authentication."""
    from medimg.cli import _warn_if_exposed

    _warn_if_exposed("127.0.0.1", "the MLflow UI")
    assert capsys.readouterr().err == ""
    _warn_if_exposed("0.0.0.0", "the MLflow UI")
    err = capsys.readouterr().err
    assert "0.0.0.0" in err and "authentication" in err and "README" in err
    shown = subprocess.run(
        [tool_path("medimg"), "ui", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "127.0.0.1" in shown  # the documented default


@pytest.mark.parametrize("external", ["", "https://prefect.example.org/"])
def test_the_prefect_ui_asks_the_api_it_is_served_with(tmp_path: Path, external: str) -> None:
    """On a port other than Prefect's default (or behind a proxy), the UI's settings name
    the API of this server, not the default port's: otherwise its pages stay empty."""
    port = free_port()
    args = [tool_path("medimg"), "prefect-server", "--port", str(port)]
    if external:
        args += ["--external-url", external]
    ui_settings = f"http://127.0.0.1:{port}/ui-settings"
    with (
        _server(args, tmp_path, f"http://127.0.0.1:{port}/api/health", ui=True),
        urllib.request.urlopen(ui_settings, timeout=10) as r,
    ):
        settings = json.loads(r.read())
    expected = f"{external.rstrip('/')}/api" if external else f"http://127.0.0.1:{port}/api"
    assert settings["api_url"] == expected
