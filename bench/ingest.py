"""Ingest throughput against dcm2niix, and header scanning against full reads, side by side.

One axial CT series (300 slices of 512x512 by default) is generated into a temporary
folder with :func:`medimg.dicom.synth.synth_cohort`. After the page cache is warmed, each
comparison runs its two contenders alternately, three times each, every run into a fresh
output folder (so neither skips work already done), and reports the median:

1. uncompressed ``.nii``: ``medimg.ingest.ingest`` versus ``dcm2niix -b n -z n``;
2. gzip ``.nii.gz`` at the same level (6, both tools' default): medimg versus dcm2niix
   (``-z y`` when pigz is installed, else its internal zlib, ``-z i``), plus medimg at
   level 1. The level is the same number, not the same deflate code (medimg uses zlib-ng,
   dcm2niix its bundled one), so the output size is printed next to each speed;
3. header scan: ``medimg.dicom.discover.discover`` (header-only reads) versus a loop of
   ``pydicom.dcmread(path).pixel_array`` over the same files.

Run: ``python bench/ingest.py`` (``--slices 60 --matrix 256`` for a quick run). Prints
slices/s or files/s for every contender and the ratios (above 1: medimg is faster).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pydicom

from medimg.config import IngestParams, SynthParams
from medimg.dicom.discover import discover, walk
from medimg.dicom.synth import synth_cohort
from medimg.ingest import IngestPaths, ingest

REPEATS = 5


def dcm2niix_binary() -> str:
    local = Path(sys.executable).parent / "dcm2niix"
    found = str(local) if local.is_file() else shutil.which("dcm2niix")
    if found is None:
        sys.exit("dcm2niix not found (pip install dcm2niix)")
    return found


def warm_cache(files: list[Path]) -> int:
    return sum(len(f.read_bytes()) for f in files)


def alternate(runs: dict[str, Callable[[], None]], repeats: int = REPEATS) -> dict[str, float]:
    """Median wall time of each contender, run in turn ``repeats`` times."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


class Outputs:
    """A fresh, empty output folder per call, under one scratch root."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.n = 0
        self.previous: dict[str, Path] = {}

    def fresh(self, tag: str) -> Path:
        """A new folder for ``tag``; the tag's previous one is deleted (memory is scarce)."""
        if tag in self.previous:
            shutil.rmtree(self.previous[tag], ignore_errors=True)
        self.n += 1
        folder = self.root / f"{self.n:03d}-{tag}"
        folder.mkdir(parents=True)
        self.previous[tag] = folder
        return folder


def volume_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*.nii*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300, help="slices in the series")
    parser.add_argument("--matrix", type=int, default=512, help="rows = columns per slice")
    args = parser.parse_args()
    synth = SynthParams(
        n_patients=1, studies_per_patient=(1, 1), series_per_study=(1, 1),
        mr_fraction=0.0, positive_fraction=0.0, matrix=args.matrix, n_slices=args.slices,
        orientations=("axial",), shuffle_instance_fraction=0.0, descending_fraction=0.0,
        slice_spacing_mm=(1.0, 1.0), fov_mm=(350.0, 350.0), lesion_radius_mm=(5.0, 6.0),
    )  # fmt: skip
    dcm2niix = dcm2niix_binary()
    gz_mode = "y" if shutil.which("pigz") else "i"
    gz_flags = ["-b", "n", "-z", gz_mode, "-6"]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        raw = root / "raw"
        t0 = time.perf_counter()
        synth_cohort(synth, raw, root / "masks", root / "labels.csv", root / "truth.csv")
        t_synth = time.perf_counter() - t0
        files = list(walk(raw))
        n = len(files)
        size = warm_cache(files)
        # Outputs go to memory (/dev/shm) when there is one: disk write-back stalls hit
        # either tool at random and made the uncompressed ratio swing from 0.46x to 0.97x.
        shm = Path("/dev/shm")
        scratch = tempfile.TemporaryDirectory(dir=shm if shm.is_dir() else None)
        outs = Outputs(Path(scratch.name))
        last: dict[str, Path] = {}

        def medimg(cfg: IngestParams, tag: str) -> Callable[[], None]:
            def run() -> None:
                out = outs.fresh(tag)
                summary = ingest(cfg, IngestPaths(input=raw, out=out))
                if summary["n_ok"] != 1 or summary["n_quarantined_files"]:
                    sys.exit(f"medimg ingest did not make one clean volume: {summary}")
                last[tag] = out

            return run

        def niix(flags: list[str], tag: str) -> Callable[[], None]:
            def run() -> None:
                out = outs.fresh(tag)
                cmd = [dcm2niix, *flags, "-o", str(out), str(raw)]
                subprocess.run(cmd, check=True, capture_output=True)
                if not any(out.glob("*.nii*")):
                    sys.exit(f"dcm2niix wrote no volume: {' '.join(cmd)}")
                last[tag] = out

            return run

        salt = root / "salt"
        plain = alternate(
            {
                "medimg": medimg(IngestParams(compress=False, salt_file=salt), "medimg-nii"),
                "dcm2niix": niix(["-b", "n", "-z", "n"], "dcm2niix-nii"),
            }
        )
        gz = alternate(
            {
                "medimg": medimg(
                    IngestParams(compress=True, compression_level=6, salt_file=salt), "medimg-gz6"
                ),
                "dcm2niix": niix(gz_flags, "dcm2niix-gz6"),
                "medimg-1": medimg(
                    IngestParams(compress=True, compression_level=1, salt_file=salt), "medimg-gz1"
                ),
            }
        )
        sizes = {tag: volume_bytes(folder) for tag, folder in last.items()}
        scan = alternate(
            {
                "discover": lambda: discover(raw),
                "dcmread": lambda: [pydicom.dcmread(f).pixel_array for f in files],
            }
        )

    scratch.cleanup()
    mb = 1024 * 1024

    def row(label: str, seconds: float, tag: str | None = None) -> None:
        out = f"  {label:<34}{n / seconds:8.1f}/s  ({seconds:6.2f} s)"
        print(out + (f"  {sizes[tag] / mb:6.1f} MiB" if tag else ""))

    def ratio(label: str, value: float) -> None:
        print(f"  {label:<34}{value:8.2f}x")

    r_plain = plain["dcm2niix"] / plain["medimg"]
    r_gz = gz["dcm2niix"] / gz["medimg"]
    r_scan = scan["dcmread"] / scan["discover"]
    print(
        f"series: {n} slices of {args.matrix}x{args.matrix} ({size / mb:.0f} MiB of DICOM, "
        f"generated in {t_synth:.1f} s); median of {REPEATS} alternating runs, page cache warm, "
        f"outputs under {outs.root.parent}"
    )
    print("uncompressed .nii (slices/s):")
    row("medimg ingest", plain["medimg"], "medimg-nii")
    row("dcm2niix -b n -z n", plain["dcm2niix"], "dcm2niix-nii")
    ratio("ratio medimg/dcm2niix", r_plain)
    print("gzip .nii.gz (slices/s):")
    row("medimg ingest, level 6 (default)", gz["medimg"], "medimg-gz6")
    row(f"dcm2niix {' '.join(gz_flags)}", gz["dcm2niix"], "dcm2niix-gz6")
    row("medimg ingest, level 1", gz["medimg-1"], "medimg-gz1")
    ratio("ratio medimg/dcm2niix, level 6", r_gz)
    ratio("ratio medimg level 1/dcm2niix 6", gz["dcm2niix"] / gz["medimg-1"])
    print("header scan (files/s):")
    row("discover (headers only)", scan["discover"])
    row("dcmread + pixel_array", scan["dcmread"])
    ratio("ratio discover/full read", r_scan)
    print("summary (throughput ratios; above 1: the first is faster):")
    ratio("uncompressed: medimg/dcm2niix", r_plain)
    ratio("gzip level 6: medimg/dcm2niix", r_gz)
    ratio("header scan: discover/full read", r_scan)


if __name__ == "__main__":
    main()
