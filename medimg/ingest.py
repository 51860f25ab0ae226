"""The ingest stage: any folder of DICOM files to de-identified volumes and a manifest.

Three steps, so that an orchestrator can map the middle one over series:

1. :func:`plan_ingest` walks the folder (headers only), assembles and checks stacks, and
   decides which need work (new or changed since the last run).
2. :func:`~medimg.conversion.ingest_stack` turns one stack into a volume (and mask) plus
   a record; each file is written atomically, the record last, so a killed run leaves
   nothing half-done.
3. :func:`finalize_ingest` joins labels, writes ``manifest.parquet``, ``qc.json``,
   ``qc.html`` and ``quarantine.csv``, and removes outputs of series no longer present.

Annotations: DICOM SEG and RTSTRUCT objects found in the input folder or in the masks
folder are matched to their stack (:func:`match_annotations`) by the source images they
reference (else the series) and the frame of reference, and become its label map beside
NIfTI masks named by SeriesInstanceUID; one that matches no stack is quarantined.

Only ``quarantine.csv`` names source files (the user must fix them); nothing else carries
a path, name, ID, date or UID of the source.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medimg.config import LESION, IngestParams, StructureParams

# one stack's conversion lives in medimg.conversion; its names stay importable from here
from medimg.conversion import (
    IngestPaths,
    Job,
    StackResult,
    annotated_job,
    annotation_files,
    ingest_stack,
    match_annotations,
    read_fingerprint,
)
from medimg.conversion import pseudonymizer as _pseudonymizer
from medimg.data import manifest as manifest_io
from medimg.data.labels import class_counts, read_labels
from medimg.dicom.deid import Pseudonymizer, refuse_real_files
from medimg.dicom.dimensions import FAMILIES, family_of, keep_first
from medimg.dicom.discover import Discovery, Instance, Rejection, discover
from medimg.dicom.series import GeometryTolerance, Stack, assemble
from medimg.errors import DicomError
from medimg.typing import Progress

log = logging.getLogger(__name__)

INGEST_VERSION = 1  # bump when outputs change for the same inputs and params
DAMAGE = {"unreadable", "missing_tag", "missing_geometry", "pixel_decode", "unsupported_pixels"}


@dataclass
class Plan:
    jobs: list[Job] = field(default_factory=list)  # stacks that need work
    reused: list[dict[str, Any]] = field(default_factory=list)  # records still valid
    rejected: list[Rejection] = field(default_factory=list)
    n_files: int = 0
    n_instances: int = 0

    @property
    def keys(self) -> set[str]:
        return {j.key for j in self.jobs} | {r["key"] for r in self.reused}


def _label_value(inst: Instance, label_key: str) -> str:
    return {
        "PatientID": inst.patient_id,
        "StudyInstanceUID": inst.study_uid,
        "AccessionNumber": inst.accession,
        "SeriesInstanceUID": inst.series_uid,
    }[label_key]


def _stat(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return (path.name, st.st_size, st.st_mtime_ns)


def _fingerprint(job: Job, cfg: IngestParams, pseudo: Pseudonymizer) -> str:
    files = sorted(
        {(s.instance.sop_uid, s.instance.size, s.instance.mtime_ns) for s in job.stack.slices}
    )
    mask_stat = _stat(job.mask)[1:] if job.mask else None
    annotations = [_stat(p) for p, _ in job.structure_masks] + [_stat(p) for p in job.annotations]
    structures = [[s.name, *s.synonyms] for s in job.structures]
    settings = cfg.model_dump(
        mode="json",
        include={
            "irregular",
            "export_deid_dicom",
            "allow_burned_in",
            "min_slices",
            "spacing_tolerance",
            "tilt_tolerance_deg",
            "compress",
            "compression_level",
        },
    )
    blob = [INGEST_VERSION, files, mask_stat, settings]
    if job.structure_masks or job.annotations or len(structures) > 1:
        blob += [sorted(annotations), structures]  # one-lesion NIfTI jobs keep their prints
    return pseudo.key("fingerprint", json.dumps(blob, sort_keys=True), n=32)


def stack_key(pseudo: Pseudonymizer, stack: Stack) -> str:
    """The pseudonymous key of a stack, stable across runs.

    A series of one stack keeps its series key. Parts of a series whose slices differ in
    grid (orientation, matrix, ImageType, spacing, pixel type) add ``-<part>``; stacks
    split by echo, time point, b-value or dimension index add a keyed hash of the series
    key and the splitting attributes and values (no UID, no raw value in a file name).
    """
    key = pseudo.key("series", stack.series_uid)
    if stack.n_parts > 1:
        key = f"{key}-{stack.part}"
    if stack.split:
        what = "|".join(f"{a}={v}" for a, v in stack.split)
        key = f"{key}-{pseudo.key('stack', f'{key}|{what}', n=8)}"
    return key


def select_stacks(stacks: list[Stack], cfg: IngestParams) -> tuple[list[Stack], list[Stack]]:
    """The stacks ``ingest.stacks`` keeps, and those it sets aside (``first`` of a family)."""
    first = [f for f in FAMILIES if getattr(cfg.stacks, f, "all") == "first"]
    if not first:
        return list(stacks), []
    by_part: dict[tuple[str, int], list[Stack]] = {}
    for stack in stacks:
        by_part.setdefault((stack.series_uid, stack.part), []).append(stack)
    kept: list[Stack] = []
    dropped: list[Stack] = []
    for group in by_part.values():
        for stack, keep in zip(group, keep_first([s.split for s in group], first), strict=True):
            (kept if keep else dropped).append(stack)
    return kept, dropped


def _not_kept(stack: Stack, key: str, cfg: IngestParams) -> list[Rejection]:
    which = ", ".join(
        f"{a} {v} (ingest.stacks.{family_of(a)}: first)"
        for a, v in stack.split
        if getattr(cfg.stacks, family_of(a), "all") == "first"
    )
    detail = f"series {key}: stack {which} not kept"
    return [Rejection(s.path, "stack_not_kept", detail, key=key) for s in stack.slices]


def _read_record(path: Path) -> dict[str, Any] | None:
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return None


def plan_ingest(
    cfg: IngestParams, paths: IngestPaths, structures: tuple[StructureParams, ...] = (LESION,)
) -> Plan:
    """Discover, assemble and check stacks, match annotations to them; keep the records
    of unchanged ones. ``structures`` (``Params.structures``) name the label values.

    Raises:
        DicomError: with ``on_invalid: raise``, for the first damaged file.
    """
    if not paths.input.is_dir():
        raise DicomError(f"{paths.input}: input folder not found (set data.raw or pass INPUT_DIR)")
    pseudo = _pseudonymizer(cfg)
    found: Discovery = discover(paths.input, workers(cfg))
    plan = Plan(rejected=list(found.rejected), n_files=found.n_files)
    if pseudo.public:  # the synthetic cohort's public salt: for the generator's files only
        refuse_real_files([(i.path, i.synthetic) for i in found.instances], cfg, paths.input)
    usable: list[Instance] = []
    for inst in found.instances:
        if inst.burned_in and not cfg.allow_burned_in:
            plan.rejected.append(
                Rejection(
                    inst.path,
                    "burned_in_annotation",
                    "BurnedInAnnotation YES (set ingest.allow_burned_in after review)",
                )
            )
        else:
            usable.append(inst)
    plan.n_instances = len(found.instances)
    tol = GeometryTolerance(
        spacing_rel=cfg.spacing_tolerance,
        tilt_deg=cfg.tilt_tolerance_deg,
        min_slices=cfg.min_slices,
    )
    damaged = {r.series_uid for r in plan.rejected if r.series_uid}
    stacks, rejected = assemble(usable, tol, damaged)
    plan.rejected.extend(rejected)
    _check_strictness(cfg, plan.rejected, paths.input)
    stacks, dropped = select_stacks(stacks, cfg)
    for stack in dropped:
        plan.rejected.extend(_not_kept(stack, stack_key(pseudo, stack), cfg))
    matched, unmatched = match_annotations(annotation_files(found, paths.masks), stacks)
    plan.rejected.extend(unmatched)
    for n, stack in enumerate(stacks):
        first = stack.first
        key = stack_key(pseudo, stack)
        job = annotated_job(key, stack, paths.masks, matched.get(n, []), structures)
        fingerprint = _fingerprint(job, cfg, pseudo)
        old = _read_record(paths.records / f"{key}.json")
        if (
            old is not None
            and read_fingerprint(paths, key) == fingerprint
            and (paths.out / str(old.get("volume", "-"))).is_file()
        ):
            plan.reused.append(old)  # with the annotations it set aside then
            plan.rejected += [
                Rejection(Path(p), r, d, key=key) for p, r, d in old.get(_SET_ASIDE, [])
            ]
            continue
        meta = {
            "patient": pseudo.key("patient", first.patient_id),
            "study": pseudo.key("study", first.study_uid),
            "series": pseudo.key("series", stack.series_uid),
            "label_ref": pseudo.key("label", _label_value(first, cfg.label_key)),
            "modality": first.modality,
            "vendor": first.manufacturer,
            "sop_class": first.sop_class,
            # why the series gave several stacks, and this one's values (no PHI: header
            # values such as EchoNumbers 2 or PixelSpacing 0.9\0.9)
            "split_by": ", ".join(a for a, _ in stack.split_by) or None,
            "split_value": ", ".join(v for _, v in stack.split_by) or None,
        }
        plan.jobs.append(dataclasses.replace(job, fingerprint=fingerprint, meta=meta))
    log.info(
        "ingest plan: %d stacks to process, %d unchanged, %d files set aside",
        len(plan.jobs),
        len(plan.reused),
        len({r.path for r in plan.rejected}),
    )
    return plan


_SET_ASIDE = "annotation_rejections"  # a record's annotations that did not fit its grid


def _check_strictness(cfg: IngestParams, rejected: Iterable[Rejection], root: Path) -> None:
    bad = [r for r in rejected if r.reason in DAMAGE]
    if cfg.on_invalid == "raise" and bad:
        r = bad[0]
        raise DicomError(
            f"{r.path.relative_to(root)}: {r.reason}: {r.detail} "
            "(fix or remove the file, or set ingest.on_invalid: warn)"
        )
    if cfg.on_invalid == "warn":
        for n, r in enumerate(bad, start=1):
            log.warning(
                "damaged file #%d set aside: %s (%s); see quarantine.csv", n, r.reason, r.detail
            )


def workers(cfg: IngestParams) -> int:
    """Worker count: ``cfg.workers``, or one per CPU core when it is 0."""
    return cfg.workers or os.cpu_count() or 1


def finalize_ingest(
    cfg: IngestParams, paths: IngestPaths, plan: Plan, results: Iterable[StackResult]
) -> dict[str, Any]:
    """Join labels, write manifest, QC report and quarantine list; drop stale outputs."""
    records = list(plan.reused)
    rejected = list(plan.rejected)
    for r in results:
        if r.record is not None:
            records.append(r.record)
        rejected.extend(r.rejected)
    pseudo = _pseudonymizer(cfg)
    labels: dict[str, int] = {}
    classes = paths.classes
    if paths.labels is not None and paths.labels.is_file():
        read = read_labels(
            paths.labels, cfg.label_key, lambda v: pseudo.key("label", v), paths.classes
        )
        labels, classes = read.values, read.classes
    elif paths.labels is not None:
        log.warning("no labels file at %s: every label is left empty", paths.labels)
    for rec in records:
        rec["label"] = labels.get(rec["label_ref"])
    records.sort(key=lambda r: r["key"])
    keep = {r["key"] for r in records}
    _remove_stale(paths, keep, cfg.export_deid_dicom)
    manifest_io.write_manifest(records, paths.out / "manifest.parquet")
    manifest_io.write_classes(classes, paths.out)
    quarantine = manifest_io.write_quarantine(rejected, paths.input, paths.out / "quarantine.csv")
    summary = {
        "n_files": plan.n_files,
        "n_instances": plan.n_instances,
        "n_stacks": len(records),
        "n_ok": sum(r["status"] == "ok" for r in records),
        "n_flagged": sum(r["status"] == "flagged" for r in records),
        "n_processed": len(records) - len(plan.reused),
        "n_reused": len(plan.reused),
        "n_quarantined_files": len(quarantine),
        "n_labelled": sum(r["label"] is not None for r in records),
        "classes": list(classes) if classes else None,
        "n_by_class": class_counts(records, classes),
        "flags": dict(sorted(Counter(f for r in records for f in r["flags"]).items())),
        "quarantine_reasons": dict(sorted(Counter(q["reason"] for q in quarantine).items())),
        "unmatched_structures": _unmatched_structures(records),
    }
    # qc.json and qc.html describe the data; what this run redid or reused is in the
    # returned summary and the log only, so an interrupted and resumed ingest writes the
    # same files as an uninterrupted one.
    run_only = ("n_processed", "n_reused")
    manifest_io.write_qc(
        {k: v for k, v in summary.items() if k not in run_only}, records, paths.out
    )
    log.info(
        "ingest: %d volumes (%d new, %d unchanged), %d files quarantined",
        summary["n_stacks"],
        summary["n_processed"],
        summary["n_reused"],
        summary["n_quarantined_files"],
    )
    return summary


def _unmatched_structures(records: list[dict[str, Any]]) -> dict[str, int]:
    """Annotation names that match no configured structure: name -> series with it; one
    warning per name."""
    counts: Counter[str] = Counter()
    for rec in records:
        counts.update(rec.get("unmatched_structures") or {})
    for name, n in sorted(counts.items()):
        log.warning(
            "annotation structure %r in %d series matches no structure: left out of the "
            "masks (add it to a structure's synonyms in params.yaml to keep it)",
            name,
            n,
        )
    return dict(sorted(counts.items()))


def _remove_stale(paths: IngestPaths, keep: set[str], export: bool) -> None:
    """Delete outputs of series no longer present, and temporaries of a killed run."""
    for folder in (paths.volumes, paths.out_masks, paths.records, paths.deid_dicom):
        if not folder.is_dir():
            continue
        for f in folder.iterdir():
            key = f.name.split(".")[0]
            stale = f.name.startswith(".") or key not in keep
            if f.is_dir():
                if stale or not export:
                    shutil.rmtree(f)
                else:
                    for tmp in f.glob(".*"):
                        tmp.unlink()
            elif stale:
                f.unlink()


def ingest(
    cfg: IngestParams,
    paths: IngestPaths,
    progress: Progress | None = None,
    structures: tuple[StructureParams, ...] = (LESION,),
) -> dict[str, Any]:
    """Run the whole stage in this process: series in threads, the cores shared out.
    ``structures`` (``Params.structures``) name the label values of the masks."""
    plan = plan_ingest(cfg, paths, structures)
    total = len(plan.jobs)
    n = min(workers(cfg), max(total, 1))
    threads = max(1, workers(cfg) // n)  # cores left over read and compress each volume

    def one(job: Job) -> StackResult:
        return ingest_stack(job, cfg, paths, threads)

    results: list[StackResult] = []
    if n > 1:
        with ThreadPoolExecutor(n) as pool:
            for res in pool.map(one, plan.jobs):
                results.append(res)
                if progress:
                    progress(len(results), total)
    else:
        for job in plan.jobs:
            results.append(one(job))
            if progress:
                progress(len(results), total)
    return finalize_ingest(cfg, paths, plan, results)
