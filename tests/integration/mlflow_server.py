"""A real ``mlflow server`` process for integration tests.

The server keeps its runs in a SQLite file and proxies artifacts (``--serve-artifacts``), so
a client that only knows the server's URL can log params, metrics and artifacts over HTTP,
the way a team server is used.

MLflow 3 servers also start a job-execution runner (a job runner and seven Huey consumer
processes, for scorers, trace rollups and other periodic tasks) whenever the backend is a
database. On two cores it made start-up about 12 s slower (31 s against 19 s, measured), and
it watches the server only by polling its PID, so it can outlive it. The tests need none of
it: ``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false`` (read by ``mlflow.server._run_server``; there
is no command-line flag) turns it off. Stopping kills the whole process group anyway.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from tests.helpers import free_port

_log = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 90.0
STOP_GRACE_S = 5.0

# Set for the server process only, never in the test process's own environment.
SERVER_ENV = {
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "PYTHONUNBUFFERED": "1",
}


class MlflowServerError(RuntimeError):
    """The server did not come up."""


def mlflow_executable() -> str:
    """The ``mlflow`` command of the environment running the tests."""
    path = Path(sys.executable).parent / "mlflow"
    if not path.exists():
        raise MlflowServerError(f"{path} not found: install medimg into this environment")
    return str(path)


def _tail(path: Path, n_chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n_chars:]
    except OSError:
        return "(no log)"


def _healthy(url: str) -> bool:
    # No proxy: the server is on the loopback interface whatever the environment says.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"{url}/health", timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the server's whole process group, SIGKILL whatever is left after a grace."""
    pgid = proc.pid  # start_new_session: the server leads its own group
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=STOP_GRACE_S)
    # Also reaches children (uvicorn) left behind by a leader that exited or hung.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    proc.wait()


@contextlib.contextmanager
def start_mlflow_server(workdir: Path, port: int | None = None) -> Iterator[str]:
    """Run ``mlflow server`` on a loopback port (a free one unless given) with its data
    under ``workdir`` (a server restarted on the same port and folder has the same runs).

    Yields the server's URL once ``GET /health`` answers; stops the server and every process
    it started on exit. Fails with the tail of the server's log if it dies or does not answer
    within ``STARTUP_TIMEOUT_S``.
    """
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    command = [
        mlflow_executable(),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{workdir / 'mlflow.db'}",
        "--serve-artifacts",
        "--artifacts-destination",
        str(workdir / "artifacts"),
    ]
    log_path = workdir / "server.log"
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            command,
            cwd=workdir,
            env={**os.environ, **SERVER_ENV},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        started = time.monotonic()
        deadline = started + STARTUP_TIMEOUT_S
        while not _healthy(url):
            if time.monotonic() > deadline:
                raise MlflowServerError(
                    f"mlflow server at {url} did not answer /health within "
                    f"{STARTUP_TIMEOUT_S:.0f} s; log tail:\n{_tail(log_path)}"
                )
            try:  # poll, returning at once if the server exits
                code = proc.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                continue
            raise MlflowServerError(
                f"mlflow server exited with code {code} before answering; "
                f"log tail:\n{_tail(log_path)}"
            )
        _log.info("mlflow server up at %s in %.1f s", url, time.monotonic() - started)
        yield url
    finally:
        _stop(proc)
