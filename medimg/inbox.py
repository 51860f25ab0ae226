"""A folder of new studies before prediction: ingested with training's rules, gated by QC.

:func:`ingest_inbox` ingests the folder into ``output/ingest`` (the same grouping,
geometry checks and de-identified volumes as training's ingest) and splits its series
into those to predict and those rejected, each rejection with its reason
(:class:`SeriesResult` rows of ``predictions.csv``).

:func:`ready_studies` and :class:`InboxRecord` let the ``predict-inbox`` deployment take
the inbox a study at a time: the complete ones it has not predicted yet.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medimg.config import IngestParams, PredictParams, PreprocessParams
from medimg.dicom.deid import Pseudonymizer
from medimg.errors import ConfigError
from medimg.ingest import (
    IngestPaths,
    Job,
    Plan,
    StackResult,
    finalize_ingest,
    ingest_stack,
    plan_ingest,
)
from medimg.io import atomic_write_text
from medimg.pacs.local import COMPLETE

log = logging.getLogger(__name__)


@dataclass
class SeriesResult:
    """One series' outcome: a row of predictions.csv and of the report."""

    key: str
    study: str = ""
    modality: str = ""
    plane: str = ""
    status: str = "predicted"  # predicted | rejected | failed
    reason: str = ""
    probability: float | None = None
    label: int | None = None
    predicted: str | None = None  # the predicted class's name (diagnosis)
    lesion_voxels: int | None = None
    lesion_ml: float | None = None
    extra: dict[str, float] = field(default_factory=dict)  # probability_<class>,
    # volume_ml_<structure>: the columns of predictions.csv a model's outputs add
    outputs: dict[str, str] = field(default_factory=dict)  # kind -> path within output
    seconds: dict[str, float] = field(default_factory=dict)  # step -> seconds
    n_files: int = 0


@dataclass(frozen=True)
class PredictPaths:
    input: Path  # the folder of new DICOM studies
    out: Path  # results

    @property
    def ingest(self) -> IngestPaths:
        return IngestPaths(input=self.input, out=self.out / "ingest")


def ingest_rules(cfg: IngestParams, deid: str) -> IngestParams:
    """Training's ingest rules, for a folder of new studies: a damaged file is set aside
    and reported (``raise`` would stop every other study), and in de-identified mode the
    de-identified copies the SEG references are exported."""
    update: dict[str, Any] = {"export_deid_dicom": deid == "deidentified"}
    if cfg.on_invalid == "raise":
        update["on_invalid"] = "warn"
    return cfg.model_copy(update=update)


def source_files(job: Job, paths: IngestPaths, deid: str) -> list[Path]:
    """The files a series' SEG references: its de-identified copies, or the originals."""
    if deid == "deidentified":
        return sorted((paths.deid_dicom / job.key).glob("*.dcm"))
    return list(dict.fromkeys(s.path for s in job.stack.slices))


@dataclass
class Inbox:
    """A folder of new studies after ingest: what to predict and what was rejected."""

    paths: PredictPaths
    items: list[tuple[dict[str, Any], list[Path]]]  # (ingest record, SEG source files)
    rejected: list[SeriesResult]  # failed ingest or the QC gate: reported, not predicted
    seconds: float  # ingest time of the whole folder


def ingest_inbox(
    cfg: PredictParams, ingest_cfg: IngestParams, preprocess: PreprocessParams, paths: PredictPaths
) -> Inbox:
    """Ingest the folder with training's rules (:func:`ingest_rules`) into
    ``output/ingest`` and apply the QC gate (:func:`qc_gate`).

    Raises:
        DicomError: the input folder does not exist.
    """
    t0 = time.perf_counter()
    ingest_cfg = ingest_rules(ingest_cfg, cfg.deid)
    ipaths = paths.ingest
    shutil.rmtree(ipaths.records, ignore_errors=True)  # every series afresh: new studies
    plan = plan_ingest(ingest_cfg, ipaths)
    stacks = [ingest_stack(job, ingest_cfg, ipaths) for job in plan.jobs]
    finalize_ingest(ingest_cfg, ipaths, plan, stacks)
    rejected = rejected_series(plan, stacks)
    items = []
    for job, stack in zip(plan.jobs, stacks, strict=True):
        if stack.record is None:
            continue
        gate = qc_gate(stack.record, preprocess)
        if gate:
            rejected.append(_result(stack.record, "rejected", gate))
        else:
            items.append((stack.record, source_files(job, ipaths, cfg.deid)))
    return Inbox(paths, items, rejected, time.perf_counter() - t0)


def _result(record: dict[str, Any], status: str, reason: str) -> SeriesResult:
    return SeriesResult(
        key=record["key"],
        study=str(record.get("study", "")),
        modality=str(record.get("modality", "")),
        plane=str(record.get("plane", "")),
        status=status,
        reason=reason,
        n_files=int(record.get("n_slices", 0)),
    )


def qc_gate(record: dict[str, Any], cfg: PreprocessParams) -> str:
    """Why an ingested series is not predicted ("" when it is): a stack kept with a QC
    flag is predicted only if the model was trained on such stacks too."""
    if record.get("status") == "ok":
        return ""
    if record.get("status") == "flagged" and cfg.include_flagged:
        return ""
    flags = ", ".join(record.get("flags") or []) or str(record.get("status"))
    return f"QC: {flags} (the model was trained without such stacks)"


def rejected_series(plan: Plan, stacks: list[StackResult]) -> list[SeriesResult]:
    """Rejections of ingest, one row per series (or per reason, for files of no known
    series), with the reason and detail ingest gave: no path, name or UID (the files are
    listed in ``ingest/quarantine.csv``)."""
    by: dict[tuple[str, str], SeriesResult] = {}
    job_keys = {j.stack.series_uid: j.key for j in plan.jobs}
    all_rejected = list(plan.rejected) + [r for s in stacks for r in s.rejected]
    for r in all_rejected:
        if r.reason in {"not_dicom", "dicomdir", "non_image"}:
            continue  # not an image: nothing was asked of it
        key = (job_keys.get(r.series_uid, "") if r.series_uid else "") or r.key
        slot = (key, r.reason) if key else ("", r.reason + r.detail)
        if slot not in by:
            detail = r.detail.removeprefix(f"series {r.key}: ") if r.key else r.detail
            by[slot] = SeriesResult(
                key=key or "(files)", status="rejected", reason=f"{r.reason}: {detail}"
            )
        by[slot].n_files += 1
    return list(by.values())


# ----------------------------------------------------------------------------- study by study
# The ``predict-inbox`` deployment takes the inbox one study folder at a time (the storage
# node and ``medimg pacs pull`` write one folder per study): only the folders that are
# complete and new since the last run, with a record of what it has done.


@dataclass(frozen=True)
class Study:
    """A study folder of the inbox, ready to predict."""

    folder: Path
    key: str  # keyed hash of the folder's name (a name given by hand may hold PHI)
    fingerprint: str  # its files' names, sizes and times: a change means predict again


def _fingerprint(folder: Path, files: list[Path]) -> str:
    import hashlib

    h = hashlib.sha256()
    for path in sorted(files):
        st = path.stat()
        h.update(f"{path.relative_to(folder)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def ready_studies(
    inbox: Path, keys: Pseudonymizer, quiet_s: float, now: float | None = None
) -> tuple[list[Study], int]:
    """The study folders of ``inbox`` that are complete, and how many are still arriving.

    A folder is complete when the storage node has marked it (its ``COMPLETE`` file) or,
    for one filled another way, when none of its files changed (time of writing or of
    copying in) for ``quiet_s`` seconds. Files at the top of the inbox, outside any
    folder, are not a study: they are logged and left alone.
    """
    now = time.time() if now is None else now
    ready, waiting, loose = [], 0, 0
    for entry in sorted(inbox.iterdir()) if inbox.is_dir() else []:
        if entry.name.startswith("."):
            continue
        if not entry.is_dir():
            loose += 1
            continue
        files = [f for f in entry.rglob("*") if f.is_file() and f.name != COMPLETE]
        if not files:
            continue
        partial = any(f.name.startswith(".") and ".tmp" in f.name for f in files)
        newest = max(max((st := f.stat()).st_mtime, st.st_ctime) for f in files)
        if (entry / COMPLETE).is_file() or (not partial and now - newest >= quiet_s):
            files = [f for f in files if not f.name.startswith(".")]
            ready.append(Study(entry, keys.key("inbox", entry.name), _fingerprint(entry, files)))
        else:
            waiting += 1
    if loose:
        log.warning(
            "%d files at the top of the inbox %s are in no study folder and are not "
            "predicted: put each study in a folder of its own",
            loose,
            inbox,
        )
    return ready, waiting


class InboxRecord:
    """``processed.json`` in the output folder: for each study key what was predicted,
    when, and whether its results reached the PACS. Written atomically after each study,
    so a run that stops keeps what it finished."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.studies: dict[str, dict[str, Any]] = {}
        if path.is_file():
            try:
                self.studies = dict(json.loads(path.read_text())["studies"])
            except (ValueError, KeyError, TypeError) as e:
                raise ConfigError(
                    f"{path}: not a record of processed studies ({type(e).__name__}); move "
                    "it aside to predict every study of the inbox again"
                ) from None

    def is_new(self, study: Study) -> bool:
        return self.studies.get(study.key, {}).get("fingerprint") != study.fingerprint

    def undelivered(self) -> list[str]:
        """Keys of the studies whose results the PACS has not taken yet."""
        return [k for k, v in sorted(self.studies.items()) if v.get("delivered") is False]

    def put(self, key: str, entry: dict[str, Any]) -> None:
        self.studies[key] = entry
        text = json.dumps({"studies": self.studies}, indent=1, sort_keys=True)
        atomic_write_text(self.path, text + "\n")
        write_index(self.studies, self.path.with_name("index.html"))


def write_index(studies: dict[str, dict[str, Any]], path: Path) -> None:
    """``index.html``: one row per study with its counts, its delivery and its report."""
    import html

    e = html.escape
    delivery = {True: "delivered", False: "NOT DELIVERED (kept on disk)", None: "not pushed"}
    rows = "".join(
        f"<tr><td><a href='{e(k)}/report.html'>{e(k)}</a></td><td>{e(str(v.get('when')))}</td>"
        f"<td>{v.get('n_predicted', 0)}</td><td>{v.get('n_rejected', 0)}</td>"
        f"<td>{v.get('n_failed', 0)}</td><td>{delivery[v.get('delivered')]}</td>"
        f"<td>{e(str(v.get('error', '')))}</td></tr>"
        for k, v in sorted(studies.items())
    )
    head = "".join(
        f"<th>{c}</th>"
        for c in ("study", "predicted at", "predicted", "rejected", "failed", "PACS", "error")
    )
    atomic_write_text(
        path,
        "<!doctype html><meta charset='utf-8'><title>medimg inbox</title>"
        f"<h1>medimg inbox</h1><table><tr>{head}</tr>{rows}</table>\n",
    )
