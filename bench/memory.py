"""Memory bounds: peak RSS of ingesting one huge series, and of training past the cache.

1. Ingest: the generator writes one CT series of about ``--gb`` GiB of pixel data (1024 x
   1024 pixels per slice), then ``medimg ingest`` runs on it in a child process, side by
   side with the same command on a tiny series (what the imports alone take). Prints the
   series size, both peak RSS values, and the peak above the baseline as a multiple of the
   series size: the memory bound to plan for.
2. Training: ``medimg train --task classify`` for one epoch on a cohort, once with a cache
   budget (``loader.cache_gib``) far below the cohort's decoded size and once with room for
   all of it, on a preprocessed grid of 128 x 112 x 112 (6.1 MiB a volume). Prints the
   cohort's decoded size, the volumes cached, and both peak RSS values: with the small
   budget the peak stays near the budget, not the cohort.

Run: ``python bench/memory.py [--gb G] [--patients N]`` (about 5 min with the defaults on 2
CPU cores; needs about 3 x G GiB of free disk).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import yaml
from cohort import BIN, scratch_params
from pydicom.uid import generate_uid

from medimg import stages
from medimg.config import LoaderParams, Params, SynthParams, TaskTrainParams, TrackingParams

GIB = 2**30


def peak_rss_of(args: list[str]) -> tuple[float, float]:
    """(peak RSS in GiB, seconds) of a child process running ``args``."""
    t0 = time.perf_counter()
    code = (
        "import resource, subprocess, sys; "
        "done = subprocess.run(sys.argv[1:]); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
        "sys.exit(done.returncode)"
    )
    # a fresh interpreter per measurement: RUSAGE_CHILDREN is the peak of all its children
    done = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, check=False
    )
    if done.returncode:
        sys.exit(f"{' '.join(args)} failed:\n{done.stderr[-3000:]}")
    kib = int(done.stdout.strip().splitlines()[-1])
    return kib * 1024 / GIB, time.perf_counter() - t0


def write_params(path: Path, params: Params) -> Path:
    path.write_text(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))
    return path


def one_series(root: Path, matrix: int, n_slices: int, spacing: float) -> Path:
    """A cohort of one axial CT series with a lesion mask; returns its params file."""
    params = scratch_params(root, 1)
    synth = SynthParams(
        n_patients=1,
        studies_per_patient=(1, 1),
        series_per_study=(1, 1),
        mr_fraction=0.0,
        positive_fraction=1.0,
        lesions_per_positive=(1, 1),
        lesion_radius_mm=(5.0, 8.0),
        centre_jitter_mm=2.0,
        matrix=matrix,
        n_slices=n_slices,
        slice_spacing_mm=(spacing, spacing),
        fov_mm=(350.0, 350.0),
        orientations=("axial",),
        shuffle_instance_fraction=0.0,
    )
    params = params.model_copy(update={"synth": synth})
    stages.synth(params)
    return write_params(root / "params.yaml", params)


def grow_series(root: Path, n_slices: int) -> None:
    """Make the one series under ``root`` ``n_slices`` long: its slices are repeated along
    the slice normal (new positions, instance numbers and SOP UIDs; pixels reused), and its
    mask is tiled to match. The generator draws a whole series in memory, so it cannot
    write a 2 GiB one on a small machine; this writes one file at a time."""
    files = sorted(p for p in (root / "raw").rglob("*") if p.is_file())
    (mask_path,) = (root / "masks").glob("*.nii.gz")
    mask = nib.load(mask_path)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ mask.affine  # the mask's grid in LPS
    origin, step = lps[:3, 3], lps[:3, 2]
    slices = {}
    for path in files:  # slice index along the mask's third axis -> its file's dataset
        ds = pydicom.dcmread(path)
        offset = np.asarray(ds.ImagePositionPatient, dtype=float) - origin
        slices[round(float(offset @ step / (step @ step)))] = ds
        path.unlink()
    assert sorted(slices) == list(range(len(files))), "slices not on the mask's grid"
    folder = files[0].parent
    for k in range(n_slices):
        ds = slices[k % len(files)]
        ds.ImagePositionPatient = [round(float(v), 4) for v in origin + k * step]
        ds.InstanceNumber = k + 1
        uid = generate_uid(entropy_srcs=[str(ds.SeriesInstanceUID), str(k)])
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
        if "SliceLocation" in ds:
            del ds.SliceLocation
        ds.save_as(folder / f"IM{k:05d}", enforce_file_format=True)
    reps = -(-n_slices // len(files))
    data = np.tile(np.asarray(mask.dataobj, dtype=np.uint8), (1, 1, reps))[..., :n_slices]
    img = nib.Nifti1Image(data, mask.affine)
    img.set_qform(mask.affine, code=1)
    img.set_sform(mask.affine, code=1)
    nib.save(img, mask_path)


def ingest_bound(gb: float) -> None:
    with tempfile.TemporaryDirectory(prefix="medimg-mem-") as tmp:
        n_slices = max(32, min(4096, round(gb * GIB / (1024 * 1024 * 2))))
        small = one_series(Path(tmp) / "small", 64, 16, 4.0)
        t0 = time.perf_counter()
        big = one_series(Path(tmp) / "big", 1024, 32, 1.0)
        grow_series(Path(tmp) / "big", n_slices)
        size = 1024 * 1024 * 2 * n_slices / GIB
        on_disk = sum(p.stat().st_size for p in (Path(tmp) / "big/raw").rglob("*")) / GIB
        print(
            f"series: {n_slices} slices of 1024 x 1024, {size:.2f} GiB of pixels and a mask "
            f"({on_disk:.2f} GiB of files, written in {time.perf_counter() - t0:.0f} s)"
        )
        medimg = str(BIN / "medimg")
        base, _ = peak_rss_of([medimg, "ingest", "--params", str(small)])
        peak, seconds = peak_rss_of([medimg, "ingest", "--params", str(big)])
        (row,) = pd.read_parquet(Path(tmp) / "big/interim/manifest.parquet").to_dict("records")
        assert row["shape"][2] == n_slices and isinstance(row["mask"], str), row
        print(f"ingest peak RSS: {peak:.2f} GiB ({seconds:.0f} s); tiny series: {base:.2f} GiB")
        print(
            f"peak above the imports: {(peak - base) / size:.2f} x the series' pixel data "
            f"(bound to plan for: ingest needs about that much RAM per series being written, "
            f"times ingest.workers)"
        )


def training_bound(patients: int) -> None:
    with tempfile.TemporaryDirectory(prefix="medimg-mem-") as tmp:
        root = Path(tmp)
        params = scratch_params(root, patients)
        # a finer, larger preprocessed grid than the demo's, so the cohort's decoded size
        # dwarfs what the imports and the model take
        pre = params.preprocess.model_copy(
            update={"spacing_mm": (3.0, 3.0, 3.0), "spatial_size": (128, 112, 112)}
        )
        params = params.model_copy(
            update={"tracking": TrackingParams(enabled=False), "preprocess": pre}
        )
        stages.synth(params)
        stages.ingest(params)
        stages.preprocess(params)
        table = pd.read_parquet(root / "processed" / "manifest.parquet")
        fold = str(params.train.fold)
        n_train = int(((table["split"] != "test") & (table["split"] != fold)).sum())
        item = 4 * int(np.prod(pre.spatial_size))  # float32 voxels of one cached volume
        print(
            f"cohort: {patients} patients, {n_train} training volumes of "
            f"{item / 2**20:.1f} MiB decoded: {n_train * item / GIB:.2f} GiB to cache in all"
        )
        task = TaskTrainParams(
            arch="resnet10", epochs=1, batch_size=2, pretrained="none", conv1_stride=2
        )
        medimg = str(BIN / "medimg")
        for gib in (0.1, 8.0):
            run = params.model_copy(
                update={
                    "loader": LoaderParams(cache_gib=gib),
                    "train": params.train.model_copy(update={"classify": task}),
                }
            )
            path = write_params(root / f"params-{gib}.yaml", run)
            peak, seconds = peak_rss_of(
                [medimg, "train", "--task", "classify", "--params", str(path)]
            )
            cached = min(n_train, int(gib * GIB // item))
            print(
                f"train, cache budget {gib:4.1f} GiB ({cached} of {n_train} volumes cached): "
                f"peak RSS {peak:.2f} GiB ({seconds:.0f} s)"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=2.0, help="GiB of pixel data in the series")
    parser.add_argument("--patients", type=int, default=100, help="training cohort size")
    args = parser.parse_args()
    ingest_bound(args.gb)
    training_bound(args.patients)


if __name__ == "__main__":
    main()
