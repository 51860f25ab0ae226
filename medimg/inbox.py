"""A folder of new studies before prediction: ingested with training's rules, gated by QC.

:func:`ingest_inbox` ingests the folder into ``output/ingest`` (the same grouping,
geometry checks and de-identified volumes as training's ingest) and splits its series
into those to predict and those rejected, each rejection with its reason
(:class:`SeriesResult` rows of ``predictions.csv``).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medimg.config import IngestParams, PredictParams, PreprocessParams
from medimg.ingest import (
    IngestPaths,
    Job,
    Plan,
    StackResult,
    finalize_ingest,
    ingest_stack,
    plan_ingest,
)


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
