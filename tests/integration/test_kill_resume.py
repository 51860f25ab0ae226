"""kill -9 at random points, rerun, and the outputs are those of an uninterrupted run.

The commands run as a user runs them (``medimg ingest``, ``medimg train --resume``) in
child processes that are killed with SIGKILL: no handler, no ``finally``, no flush. The
kill points are random (a seeded generator, printed on failure) and fall inside the real
work: after a new output file has appeared (ingest) or a checkpoint was rewritten (training),
plus a random delay, which lands some kills in the middle of a write. After the last rerun every
output file is compared, byte for byte, with an uninterrupted run, and nothing partial,
temporary or extra may remain.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import random
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import torch
import yaml

from medimg.config import (
    DataParams,
    IngestParams,
    Params,
    SplitParams,
    TaskTrainParams,
    TrackingParams,
    TrainParams,
)
from tests.helpers import TINY_SYNTH, Processed, tool_path, write_cohort

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

KILLS = 10
SEED = 20261130


def _outputs(folder: Path) -> dict[str, str]:
    """md5 of every file under ``folder``, hidden and temporary ones included."""
    return {
        str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _settled(folder: Path) -> int:
    """Finished output files under ``folder`` (not hidden temporaries)."""
    if not folder.exists():
        return 0
    return sum(1 for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


class _Run:
    """``medimg args`` in a child process, its stderr kept in a file (a pipe that nobody
    reads until the end would block a chatty child)."""

    def __init__(self, args: list[str], cwd: Path) -> None:
        env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        env.pop("MLFLOW_TRACKING_URI", None)
        self.log = tempfile.TemporaryFile()  # noqa: SIM115  (lives as long as the run)
        self.proc = subprocess.Popen(
            [tool_path("medimg"), *args],
            cwd=cwd,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=self.log,
        )

    def stderr(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-3000:]


def _finish(args: list[str], cwd: Path) -> None:
    run = _Run(args, cwd)
    assert run.proc.wait(timeout=600) == 0, run.stderr()


def _kill_repeatedly(
    args: list[str], cwd: Path, watched: Path, rng: random.Random, step: tuple[int, int]
) -> list[int]:
    """Start the command KILLS times and kill -9 each run once ``step`` (a random count
    in that range) more output files appeared under ``watched``, after a random delay.
    Returns the number of finished files at each kill."""
    kills: list[int] = []
    while len(kills) < KILLS:
        run = _Run(args, cwd)
        proc = run.proc
        target = _settled(watched) + rng.randint(*step)
        while proc.poll() is None and _settled(watched) < target:
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.01))
        if proc.poll() is not None:
            pytest.fail(
                f"the run finished after {len(kills)} kills (seed {SEED}): the work is "
                f"too short for {KILLS} kill points; returncode {proc.returncode}\n{run.stderr()}"
            )
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills.append(_settled(watched))
    return kills


def _write_params(path: Path, params: Params) -> Path:
    path.write_text(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))
    return path


def test_ingest_killed_ten_times_ends_identical(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    # twice the tiny cohort: enough series that ten kills fall before the end
    cohort = write_cohort(tmp_path / "cohort", TINY_SYNTH.model_copy(update={"n_patients": 16}))
    salt = tmp_path / "salt"
    salt.write_text("medimg-test-salt-kill")
    salt.chmod(0o600)

    def params(out: Path) -> Params:
        data = DataParams(raw=cohort.raw, labels=cohort.labels, masks=cohort.masks, interim=out)
        # one worker: series are written one after another, so kills spread over the run
        return Params(data=data, ingest=IngestParams(salt_file=salt, workers=1))

    clean = _write_params(tmp_path / "clean.yaml", params(tmp_path / "clean"))
    _finish(["ingest", "--params", str(clean)], tmp_path)

    killed = _write_params(tmp_path / "killed.yaml", params(tmp_path / "killed"))
    kills = _kill_repeatedly(
        ["ingest", "--params", str(killed)], tmp_path, tmp_path / "killed", rng, (1, 1)
    )
    assert len(set(kills)) > 1, kills  # the kills fell at different points of the work
    _finish(["ingest", "--params", str(killed)], tmp_path)

    want, got = _outputs(tmp_path / "clean"), _outputs(tmp_path / "killed")
    assert sorted(got) == sorted(want), f"kills after files {kills}"
    assert [name for name in want if got[name] != want[name]] == [], f"kills {kills}"


def _mtime(path: Path) -> int | None:
    return path.stat().st_mtime_ns if path.exists() else None


def test_training_killed_ten_times_resumes_identical(
    tiny_processed: Processed, tmp_path: Path
) -> None:
    rng = random.Random(SEED + 1)
    epochs = 2 * KILLS + 2  # each start runs one or two epochs before its kill

    def params(out: Path) -> Params:
        data = tiny_processed.params.data.model_copy(
            update={"models": out / "models", "metrics": out / "metrics", "plots": out / "plots"}
        )
        task = TaskTrainParams(arch="resnet10", epochs=epochs, batch_size=4, patience=50)
        return Params(
            data=data,
            split=SplitParams(salt="medimg-split-v1", n_folds=2, test_fraction=0.25),
            train=TrainParams(fold=0, classify=task),
            tracking=TrackingParams(enabled=False),
        )

    # The uninterrupted run; the checkpoint's rewrites time its epochs.
    # Both runs write to the same folders (the model's config names them), one after the
    # other: the uninterrupted run's outputs are moved aside before the killed one starts.
    work = tmp_path / "run"
    params_file = _write_params(tmp_path / "params.yaml", params(work))
    run = _Run(["train", "--task", "classify", "--params", str(params_file)], tmp_path)
    proc = run.proc
    ckpt = work / "models" / "classify" / "checkpoint.pt"
    writes: list[float] = []
    last = None
    while proc.poll() is None:
        if _mtime(ckpt) != last:
            last = _mtime(ckpt)
            writes.append(time.monotonic())
        time.sleep(0.005)
    assert proc.returncode == 0, run.stderr()
    epoch_s = statistics.median(b - a for a, b in itertools.pairwise(writes))
    work.rename(tmp_path / "clean")

    # Each start resumes, finishes one more epoch (the checkpoint is rewritten), and is
    # killed at a random point of the next: in a forward or backward pass, validation, or
    # the writes of best weights and checkpoint.
    args = ["train", "--task", "classify", "--resume", "--params", str(params_file)]
    kills: list[int] = []
    for _ in range(KILLS):
        before = _mtime(ckpt)
        proc = _Run(args, tmp_path).proc
        while proc.poll() is None and _mtime(ckpt) == before:
            time.sleep(0.005)
        # a random point of the next epoch, at the latest when its checkpoint appears
        first, deadline = _mtime(ckpt), time.monotonic() + rng.uniform(0.0, 0.9 * epoch_s)
        while time.monotonic() < deadline and _mtime(ckpt) == first and proc.poll() is None:
            time.sleep(0.005)
        if proc.poll() is not None:
            pytest.fail(f"training finished after {len(kills)} kills (seed {SEED + 1})")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        # every checkpoint a kill leaves behind loads with weights_only
        kills.append(int(torch.load(ckpt, weights_only=True)["epoch"]))
    _finish(args, tmp_path)

    assert kills[-1] < epochs, kills  # the last kill fell before the end of training
    want, got = _outputs(tmp_path / "clean"), _outputs(work)
    assert sorted(got) == sorted(want), f"epochs at the kills: {kills}"
    assert [name for name in want if got[name] != want[name]] == [], f"epochs {kills}"
    payload = torch.load(ckpt, weights_only=True)
    assert payload["epoch"] == epochs
