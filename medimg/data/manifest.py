"""The ingest stage's tables: manifest.parquet, quarantine.csv, qc.json and qc.html."""

from __future__ import annotations

import csv
import html
import io
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from medimg.dicom.discover import Rejection
from medimg.io import atomic_path, atomic_write_text

MANIFEST_COLUMNS = [
    "key",
    "patient",
    "study",
    "series",
    "modality",
    "vendor",
    "plane",
    "orientation",
    "shape",
    "spacing",
    "dtype",
    "n_slices",
    "flags",
    "status",
    "label",
    "volume",
    "mask",
    "lesion_voxels",
    "intensity_p01",
    "intensity_p99",
    "content_hash",
    "split_by",
    "split_value",
]


def write_manifest(records: list[dict[str, Any]], path: Path) -> None:
    """One row per volume, sorted by key; identifiers are keyed hashes only."""
    frame = pd.DataFrame(
        [{c: r.get(c) for c in MANIFEST_COLUMNS} for r in records], columns=MANIFEST_COLUMNS
    )
    frame["label"] = frame["label"].astype("Int8")
    frame["lesion_voxels"] = frame["lesion_voxels"].astype("Int64")
    with atomic_path(path, suffix=".tmp.parquet") as tmp:
        frame.to_parquet(tmp, index=False)


def write_quarantine(rejected: Iterable[Rejection], root: Path, path: Path) -> list[dict[str, str]]:
    """``file,reason,detail`` per set-aside file, paths relative to the input folder."""
    rows: dict[tuple[str, str], dict[str, str]] = {}
    for r in rejected:
        try:
            rel = str(r.path.relative_to(root))
        except ValueError:
            rel = str(r.path)
        rows.setdefault((rel, r.reason), {"file": rel, "reason": r.reason, "detail": r.detail})
    ordered = [rows[k] for k in sorted(rows)]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["file", "reason", "detail"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(ordered)
    atomic_write_text(path, buf.getvalue())
    return ordered


def split_series(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The series that gave several volumes: series key, volume keys, splitting attributes."""
    by_series: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        if r.get("split_by"):
            by_series.setdefault(str(r.get("series")), []).append(r)
    return [
        {
            "series": series,
            "keys": sorted(r["key"] for r in rows),
            "split_by": ", ".join(sorted({a for r in rows for a in r["split_by"].split(", ")})),
        }
        for series, rows in sorted(by_series.items())
    ]


def write_qc(summary: dict[str, Any], records: list[dict[str, Any]], out: Path) -> None:
    """``qc.json`` for machines and ``qc.html`` for people; neither names a source file."""
    series: list[dict[str, Any]] = [
        {
            k: r.get(k)
            for k in (
                "key",
                "series",
                "modality",
                "vendor",
                "plane",
                "n_slices",
                "status",
                "flags",
                "label",
                "lesion_voxels",
                "split_by",
                "split_value",
            )
        }
        for r in records
    ]
    split = split_series(records)
    atomic_write_text(
        out / "qc.json", json.dumps({**summary, "split_series": split, "series": series}, indent=1)
    )
    esc = html.escape

    def table(head: list[str], rows: Iterable[Iterable[Any]]) -> str:
        th = "".join(f"<th>{esc(h)}</th>" for h in head)
        body = "".join(
            "<tr>" + "".join(f"<td>{esc('' if v is None else str(v))}</td>" for v in row) + "</tr>"
            for row in rows
        )
        return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"

    counts = [(k, v) for k, v in summary.items() if not isinstance(v, dict)]
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>medimg ingest QC</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:left}}
tr.flagged td{{background:#fff4d6}}</style></head><body>
<h1>Ingest QC</h1>
<h2>Counts</h2>{table(["what", "number"], counts)}
<h2>QC flags</h2>{table(["flag", "volumes"], summary["flags"].items())}
<h2>Quarantined files by reason</h2>
<p>The files themselves are listed in <code>quarantine.csv</code>.</p>
{table(["reason", "files"], summary["quarantine_reasons"].items())}
<h2>Series split into several volumes</h2>
<p>Slices that differ in grid (PixelSpacing, matrix, ...) or that share positions but not
echo, time point, b-value or dimension index make one volume each.</p>
{
        table(
            ["series", "volumes", "split by"],
            ((s["series"], ", ".join(s["keys"]), s["split_by"]) for s in split),
        )
    }
<h2>Volumes</h2>{
        table(
            list(series[0]) if series else ["key"],
            ([s[k] if k != "flags" else ", ".join(s[k]) for k in s] for s in series),
        )
    }
</body></html>
"""
    atomic_write_text(out / "qc.html", page)


CLASSES = "classes.json"  # beside manifest.parquet: the label indices' class names


def write_classes(classes: tuple[str, ...] | None, out: Path) -> None:
    """``classes.json``: the class names the manifest's ``label`` indices stand for (none
    written, and an old one removed, when no labels were read)."""
    if classes is None:
        (out / CLASSES).unlink(missing_ok=True)
        return
    atomic_write_text(out / CLASSES, json.dumps({"classes": list(classes)}, indent=1) + "\n")


def read_classes(folder: Path) -> tuple[str, ...]:
    """The class names of ``folder``'s manifest; ``("0", "1")`` for data labelled before
    class names were recorded."""
    path = folder / CLASSES
    if not path.is_file():
        return ("0", "1")
    return tuple(str(c) for c in json.loads(path.read_text())["classes"])
