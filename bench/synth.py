"""Synthetic-cohort throughput against the I/O floor, measured side by side.

The reference writes the same number of DICOM files of the same size with a bare
``pydicom.dcmwrite`` loop (no phantom, no masks): the ratio says how much of the
generator's time is its own work.

Run: ``python bench/synth.py`` (or ``make bench``). Prints files/s for both and the ratio.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from medimg.config import SynthParams
from medimg.dicom.synth import synth_cohort


def plain_write(folder: Path, n_files: int, matrix: int) -> None:
    pixels = np.zeros((matrix, matrix), dtype=np.int16)
    for i in range(n_files):
        ds = Dataset()
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.Rows = ds.Columns = matrix
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.PixelData = pixels.tobytes()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        pydicom.dcmwrite(folder / f"IM{i:06d}", ds, enforce_file_format=True)


def main() -> None:
    cfg = SynthParams(n_patients=20)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        counts = synth_cohort(
            cfg, root / "raw", root / "masks", root / "labels.csv", root / "truth.csv"
        )
        t_synth = time.perf_counter() - t0
        (root / "plain").mkdir()
        t0 = time.perf_counter()
        plain_write(root / "plain", counts["files"], cfg.matrix)
        t_plain = time.perf_counter() - t0
    n = counts["files"]
    print(f"files: {n} ({cfg.matrix}x{cfg.matrix}, {counts['series']} series)")
    print(f"medimg synth:        {n / t_synth:8.0f} files/s  ({t_synth:.2f} s)")
    print(f"plain dcmwrite loop: {n / t_plain:8.0f} files/s  ({t_plain:.2f} s)")
    print(f"ratio synth/plain:   {t_plain / t_synth:.2f}x")


if __name__ == "__main__":
    main()
