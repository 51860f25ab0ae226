"""Prediction latency on CPU: seconds per volume, broken into ingest, preprocessing,
inference and writing (NIfTI mask, DICOM SEG, montage).

On a demo-size synthetic cohort (64 x 64 pixels, 40 slices per series) written into a
temporary folder, a ResNet-18-encoder U-Net with the default segmentation config (random
weights: latency does not depend on them) is logged, registered and loaded through the
same MLflow path as a trained one (``models:/medimg-segmenter@champion`` in a scratch
SQLite store), then ``medimg.predict`` runs on the whole folder. As a reference measured
in the same run, it reads every DICOM file of the folder with pydicom (pixels decoded):
the floor no prediction can go below.
Run: ``python bench/predict.py [--patients N] [--threads T]``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import pydicom
import torch
from cohort import scratch_params

from medimg import stages, tracking
from medimg.config import TrackingParams
from medimg.models.build import build_model


def register_random_segmenter(params, root: Path) -> str:  # type: ignore[no-untyped-def]
    """A default U-Net with random weights, logged and registered as champion."""
    client = tracking.configure(params, root)
    exp = tracking.experiment_id(client, params, "segment", root)
    run_id = client.create_run(exp, run_name="bench-predict").info.run_id
    model_dir = root / "models" / "segment"
    model_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    module = build_model("segment", params.train.segment)
    torch.save({"model": module.state_dict()}, model_dir / "model.pt")
    uri = tracking.log_model(params, "segment", model_dir, run_id)
    (model_dir / tracking.RUN_FILE).write_text(json.dumps({"run_id": run_id, "model_uri": uri}))
    client.set_tag(run_id, "medimg.evaluated", "true")
    tracking.register(params, "segment", root, model_dir)
    return "models:/medimg-segmenter@champion"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=4)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    with tempfile.TemporaryDirectory(prefix="medimg-bench-predict-") as tmp:
        root = Path(tmp)
        params = scratch_params(root, args.patients)
        tracking_cfg = TrackingParams(uri=f"sqlite:///{root / 'mlflow.db'}")
        params = params.model_copy(update={"tracking": tracking_cfg})
        stages.synth(params, root)
        uri = register_random_segmenter(params, root)

        t = time.perf_counter()
        files = [p for p in params.data.raw.rglob("*") if p.is_file()]
        for p in files:
            _ = pydicom.dcmread(p).pixel_array
        read_s = time.perf_counter() - t

        summary = stages.predict(params, root, params.data.raw, root / "out", uri)
    n = summary["n_predicted"]
    s = summary["seconds"]
    per = {k: s[k] / n for k in ("ingest", "preprocess", "inference", "writing", "total")}
    print(
        f"{n} volumes ({len(files)} DICOM files, {params.synth.matrix}x{params.synth.matrix}"
        f"x{params.synth.n_slices}), {summary['n_rejected']} rejected, {args.threads} threads"
    )
    print("seconds per volume:")
    for step in ("ingest", "preprocess", "inference", "writing", "total"):
        share = per[step] / per["total"] if step != "total" else 1.0
        print(f"  {step:<11}{per[step]:8.3f}  ({share:5.1%} of total)")
    print(
        f"reference: reading the DICOM files alone {read_s / n:.3f} s per volume; "
        f"prediction takes {per['total'] / (read_s / n):.1f}x that"
    )


if __name__ == "__main__":
    main()
