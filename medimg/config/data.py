"""The data sections of params.yaml: where files are, the demo cohort, ingest,
preprocessing and splits."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from medimg.config.base import (
    Fraction,
    IntRange,
    Orientation,
    Range,
    StrictModel,
    ordered,
)


class DataParams(StrictModel):
    """Where each stage reads and writes, relative to the project root."""

    raw: Path = Path("data/raw")  # folder of DICOM files, any layout (a PACS export)
    labels: Path = Path("data/labels.csv")  # CSV with columns patient_id,label (0/1)
    masks: Path = Path("data/masks")  # NIfTI masks named <SeriesInstanceUID>.nii.gz
    synth_truth: Path = Path("data/synth_truth.csv")  # demo only: generator ground truth
    interim: Path = Path("data/interim")  # ingest output: volumes, manifest, QC
    processed: Path = Path("data/processed")  # preprocessing output and splits
    models: Path = Path("models")  # models/<task>/: weights, checkpoint, config, card
    metrics: Path = Path("metrics")  # metrics/<task>.json, metrics/<task>_train.json
    plots: Path = Path("plots")  # plots/<task>/: PNG and CSV


class SynthParams(StrictModel):
    """The built-in synthetic cohort (demo and tests only)."""

    seed: int = 0  # every file is a pure function of this seed and the settings below
    n_patients: int = Field(40, ge=1)  # patients in the cohort
    studies_per_patient: IntRange = (1, 2)  # [min, max] studies per patient
    series_per_study: IntRange = (1, 2)  # [min, max] image series per study
    mr_fraction: Fraction = 0.3  # share of studies that are MR (the rest are CT)
    positive_fraction: Fraction = 0.5  # share of patients carrying lesions (label 1)
    lesions_per_positive: IntRange = (1, 2)  # [min, max] lesions in a positive patient
    lesion_radius_mm: Range = (20.0, 30.0)  # [min, max] ellipsoid semi-axis, mm
    lesion_contrast_hu: float = 90.0  # solid lesion mean above soft tissue (55 HU), HU;
    # 45-90 puts enhancing masses at the 100-145 HU they show in portal venous phase
    lesion_kinds: tuple[Literal["cyst", "solid"], ...] = Field(
        ("solid",), min_length=1
    )  # kinds that
    # positive patients are split across, evenly and seeded, one kind per patient:
    # solid (textured, enhancing, T1 brighter than liver), cyst (homogeneous fluid,
    # 0-20 HU, T1 darker than liver)
    labels: Literal["binary", "kind"] = "binary"  # labels.csv label: 0/1, or the patient's
    # lesion kind as a class name (none, cyst, solid)
    matrix: int = Field(64, ge=8, le=1024)  # in-plane rows = columns, pixels
    n_slices: int = Field(40, ge=2, le=2048)  # slices per series
    fov_mm: Range = (340.0, 380.0)  # [min, max] in-plane field of view, mm
    slice_spacing_mm: Range = (4.0, 6.0)  # [min, max] distance between slice centres, mm
    orientations: tuple[Orientation, ...] = Field(
        ("axial", "coronal", "sagittal", "oblique"), min_length=1
    )  # slice planes, assigned to series in turn
    oblique_deg: Range = (12.0, 25.0)  # [min, max] tilt of oblique stacks off axial, degrees
    shuffle_instance_fraction: Fraction = 0.25  # series whose InstanceNumber ignores position
    descending_fraction: Fraction = 0.3  # series stacked against the slice normal
    noise_hu: float = Field(10.0, ge=0.0)  # Gaussian image noise (CT HU; MR scaled alike)
    centre_jitter_mm: float = Field(6.0, ge=0.0)  # random shift of each series' grid, mm
    seg_fraction: Fraction = 0.0  # share of series annotated as DICOM SEG (in data/masks)
    rtstruct_fraction: Fraction = 0.0  # share annotated as RTSTRUCT; the rest: NIfTI

    @model_validator(mode="after")
    def _check_ranges(self) -> SynthParams:
        for name in (
            "studies_per_patient",
            "series_per_study",
            "lesions_per_positive",
            "lesion_radius_mm",
            "fov_mm",
            "slice_spacing_mm",
            "oblique_deg",
        ):
            ordered(getattr(self, name), name)
        if self.studies_per_patient[0] < 1 or self.series_per_study[0] < 1:
            raise ValueError("studies_per_patient and series_per_study start at 1 or more")
        if self.seg_fraction + self.rtstruct_fraction > 1.0:
            raise ValueError("seg_fraction + rtstruct_fraction must not exceed 1")
        if len(set(self.lesion_kinds)) != len(self.lesion_kinds):
            raise ValueError(f"lesion_kinds names a kind twice: {list(self.lesion_kinds)}")
        return self


StackChoice = Literal["first", "all"]


class StacksParams(StrictModel):
    """Which stacks of a split series ingest keeps (one stack per echo, time point, ...).

    ``first`` keeps, of the stacks that differ in that family only, the one with the
    lowest value (echo 1, the first time point, the lowest b-value); the others are set
    aside as ``stack_not_kept``. Every kept stack carries its series' label.
    """

    echo: StackChoice = "all"  # EchoNumbers / EchoTime: multi-echo, dual-echo, Dixon
    temporal: StackChoice = "all"  # TemporalPositionIdentifier, TriggerTime, AcquisitionNumber
    diffusion: StackChoice = "all"  # DiffusionBValue and gradient direction


class IngestParams(StrictModel):
    """DICOM folder to de-identified volumes, masks, manifest and QC report."""

    label_key: Literal["PatientID", "StudyInstanceUID", "AccessionNumber", "SeriesInstanceUID"] = (
        "PatientID"  # the DICOM attribute labels.csv is keyed on (patient, study or series)
    )
    irregular: Literal["reject", "flag", "resample"] = (
        "reject"  # stacks with duplicate positions, missing slices, uneven gaps or tilt
    )
    on_invalid: Literal["raise", "warn", "skip"] = (
        "warn"  # a bad file: stop, or quarantine it with (warn) or without a log line
    )
    min_slices: int = Field(2, ge=2)  # fewer slices do not make a volume
    spacing_tolerance: float = Field(0.01, gt=0)  # max relative deviation of a slice gap
    tilt_tolerance_deg: float = Field(0.1, gt=0)  # max shear of a stack, degrees
    allow_burned_in: bool = False  # ingest images flagged BurnedInAnnotation = YES
    compress: bool = True  # write .nii.gz (gzip) rather than .nii
    compression_level: int = Field(6, ge=1, le=9)  # gzip level: 1 is fast, 9 is small
    workers: int = Field(0, ge=0)  # parallel header reads and series; 0: one per CPU core
    runner: Literal["threads", "processes", "dask"] = "threads"  # Prefect task runner of
    # the ingest flow; dask: prefect-dask on dask_address, or a local cluster of `workers`
    dask_address: str = ""  # tcp://host:8786 of a running Dask scheduler; "" = LocalCluster
    salt_file: Path = Path(".medimg-salt")  # secret key of the pseudonyms; never in git
    export_deid_dicom: bool = False  # also write de-identified DICOM copies
    stacks: StacksParams = StacksParams()  # which stacks of a series split by echo, time, ...


Triple = tuple[float, float, float]
IntTriple = tuple[int, int, int]


class PreprocessParams(StrictModel):
    """Deterministic transforms, run once; their output is cached under data/processed."""

    spacing_mm: Triple = (6.0, 6.0, 6.0)  # target voxel size along R, A, S, mm
    spatial_size: IntTriple = (64, 48, 48)  # output grid after crop/pad, voxels (R, A, S)
    anisotropy_ratio: float = Field(3.0, gt=1)  # coarsest/finest source spacing above which
    # the coarse axis is interpolated with nearest neighbour (nnU-Net's rule)
    ct_window_hu: Range = (-160.0, 240.0)  # CT clamp, HU, to [0, 1]: the abdominal window
    mr_normalization: Literal["percentile", "zscore"] = "percentile"  # MR has no fixed unit
    mr_percentiles: Range = (0.5, 99.5)  # MR percentiles mapped to [0, 1], non-zero voxels
    foreground_threshold: float = 0.05  # scaled intensity above which a voxel is body
    crop_margin: int = Field(2, ge=0)  # voxels kept around the body's bounding box
    include_flagged: bool = False  # also use stacks that ingest kept with a QC flag
    workers: int = Field(0, ge=0)  # volumes processed in parallel; 0: one per CPU core


class SplitParams(StrictModel):
    """Patient-level splits: k folds plus a held-out test set, stable under additions."""

    salt: str = "medimg-split-v0"  # hash salt of the assignment; change it to reshuffle
    test_fraction: Fraction = 0.2  # share of patients held out for the final test
    n_folds: int = Field(5, ge=2)  # cross-validation folds among the other patients
