"""What the scanner writes for the demo cohort (:mod:`medimg.dicom.synth`): one series as
real DICOM files, pixels encoded as its vendor would, headers carrying fake but realistic
PHI so that de-identification can be tested, and deterministic UIDs and file names.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
)

from medimg.config import SynthParams
from medimg.dicom.acquisition import SeriesPlan, render_series, series_grid
from medimg.dicom.deid import SYNTHETIC_CREATOR
from medimg.dicom.phantom import Phantom

FIRST_NAMES = [
    "Anna",
    "Bram",
    "Chloe",
    "Dario",
    "Elif",
    "Farid",
    "Greta",
    "Hugo",
    "Ines",
    "Jonas",
    "Kaori",
    "Lena",
    "Mateo",
    "Nora",
    "Oskar",
    "Priya",
    "Quinn",
    "Rosa",
    "Sven",
    "Talia",
    "Umar",
    "Vera",
    "Wim",
    "Ximena",
    "Yusuf",
    "Zoe",
]
LAST_NAMES = [
    "Andersen",
    "Bakker",
    "Castillo",
    "Dubois",
    "Eriksen",
    "Fischer",
    "Garcia",
    "Hansen",
    "Ivanova",
    "Jansen",
    "Kowalski",
    "Lindqvist",
    "Moreau",
    "Novak",
    "Okafor",
    "Petrov",
    "Quispe",
    "Rossi",
    "Schmidt",
    "Tanaka",
    "Ueda",
    "Visser",
    "Weber",
    "Xu",
    "Yilmaz",
    "Zimmermann",
]
INSTITUTIONS = [
    ("Northfield General Hospital", "12 Harbour Road, Northfield"),
    ("St. Elsewhere Medical Centre", "400 Elm Street, Riverton"),
    ("Lakeside University Clinic", "1 Campus Drive, Lakeside"),
]


def make_uid(seed: int, *parts: object) -> str:
    """A deterministic UID in the 2.25 (UUID-derived) form: 128 bits from a hash."""
    digest = hashlib.sha256("/".join(map(str, ("medimg-synth-uid", seed, *parts))).encode())
    return f"2.25.{int(digest.hexdigest()[:32], 16)}"


def _token(seed: int, *parts: object, n: int = 8) -> str:
    digest = hashlib.sha256("/".join(map(str, ("medimg-synth", seed, *parts))).encode()).hexdigest()
    return digest[:n].upper()


def make_identity(seed: int, p: int) -> dict[str, str]:
    """Fake but realistic PHI of patient ``p``: name, ID, birth date, sex, other IDs, address."""
    rng = np.random.default_rng([seed, 2, p])
    birth = dt.date(1940, 1, 1) + dt.timedelta(days=int(rng.integers(0, 365 * 60)))
    first, last = FIRST_NAMES[rng.integers(len(FIRST_NAMES))], LAST_NAMES[rng.integers(26)]
    return {
        "PatientName": f"{last}^{first}",
        "PatientID": f"MRN{rng.integers(10**6, 10**7)}{p:03d}",
        "PatientBirthDate": birth.strftime("%Y%m%d"),
        "PatientSex": str(rng.choice(["F", "M"])),
        "OtherPatientIDs": f"INS-{rng.integers(10**8, 10**9)}",
        "PatientAddress": f"{rng.integers(1, 200)} {LAST_NAMES[rng.integers(26)]} Lane",
    }


def _series_dataset(plan: SeriesPlan, cfg: SynthParams, ident: dict[str, str]) -> Dataset:
    """Header attributes shared by every slice of a series."""
    seed, v = cfg.seed, plan.vendor
    rng = np.random.default_rng([seed, 3, plan.series_index])
    study_rng = np.random.default_rng([seed, 4, plan.patient_index, plan.study_index])
    study_date = dt.date(2022, 1, 1) + dt.timedelta(days=int(study_rng.integers(0, 900)))
    institution, address = INSTITUTIONS[study_rng.integers(len(INSTITUTIONS))]
    birth = dt.datetime.strptime(ident["PatientBirthDate"], "%Y%m%d").date()
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ct = plan.modality == "CT"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL" if ct else "M", *([] if ct else ["ND"])]
    ds.SOPClassUID = CTImageStorage if ct else MRImageStorage
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = study_date.strftime(
        "%Y%m%d"
    )
    ds.StudyTime = f"{8 + int(study_rng.integers(0, 9)):02d}{int(study_rng.integers(0, 60)):02d}00"
    ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = ds.StudyTime
    ds.AccessionNumber = f"ACC{_token(seed, 'acc', plan.patient_index, plan.study_index, n=10)}"
    ds.Modality = plan.modality
    ds.Manufacturer = v.name
    ds.InstitutionName = institution
    ds.InstitutionAddress = address
    ds.ReferringPhysicianName = f"{LAST_NAMES[study_rng.integers(26)]}^Dr"
    ds.StationName = f"STN{_token(seed, 'stn', v.name, n=4)}"
    ds.StudyDescription = "CT CHEST ABDOMEN" if ct else "MR ABDOMEN"
    ds.SeriesDescription = f"{plan.orientation} {'3mm' if ct else 'T1 SE'}"
    ds.PerformingPhysicianName = f"{LAST_NAMES[rng.integers(26)]}^{FIRST_NAMES[rng.integers(26)]}"
    ds.OperatorsName = f"{LAST_NAMES[rng.integers(26)]}^Tech"
    ds.ManufacturerModelName = v.ct_model if ct else v.mr_model
    for key, value in ident.items():
        setattr(ds, key, value)
    ds.PatientAge = f"{(study_date - birth).days // 365:03d}Y"
    ds.BodyPartExamined = "ABDOMEN"
    ds.DeviceSerialNumber = _token(seed, "sn", v.name, n=6)
    ds.SoftwareVersions = "VB20" if ct else "R5.7"
    ds.ProtocolName = ds.SeriesDescription
    ds.PatientPosition = "HFS"
    ds.SliceThickness = plan.slice_spacing
    if ct:
        ds.KVP = 120
        ds.ConvolutionKernel = "B30f"
    else:
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.RepetitionTime = 500.0
        ds.EchoTime = 12.0
        ds.EchoTrainLength = 1  # Type 2 in the MR Image module: one echo per excitation (SE)
        ds.MagneticFieldStrength = 1.5
        ds.SpacingBetweenSlices = plan.slice_spacing
    ds.StudyInstanceUID = make_uid(seed, "study", plan.patient_index, plan.study_index)
    ds.SeriesInstanceUID = make_uid(seed, "series", plan.series_index)
    ds.FrameOfReferenceUID = make_uid(seed, "for", plan.patient_index, plan.study_index)
    ds.StudyID = _token(seed, "sid", plan.patient_index, plan.study_index, n=6)
    ds.SeriesNumber = 2 + plan.series_index % 7
    ds.AcquisitionNumber = 1
    ds.PositionReferenceIndicator = ""
    ds.ImageOrientationPatient = [round(float(c), 8) for c in (*plan.row_dir, *plan.col_dir)]
    _describe_pixels(ds, plan, cfg)
    # A vendor-private block that echoes identifiers, as real scanners do.
    block = ds.private_block(0x0019, SYNTHETIC_CREATOR, create=True)
    block.add_new(0x10, "LO", f"{ident['PatientID']} {ds.StationName}")
    return ds


def _describe_pixels(ds: Dataset, plan: SeriesPlan, cfg: SynthParams) -> None:
    """The Image Pixel attributes of a series: size, bit depth, sign and rescale."""
    v, ct = plan.vendor, plan.modality == "CT"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = cfg.matrix
    ds.PixelSpacing = [plan.pixel_spacing, plan.pixel_spacing]
    ds.BitsAllocated = 16
    if ct:
        ds.BitsStored = v.bits_stored
        ds.HighBit = v.bits_stored - 1
        ds.PixelRepresentation = int(v.ct_signed)
        ds.RescaleIntercept = v.ct_intercept
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.WindowCenter, ds.WindowWidth = 40, 400
    else:
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 15, 0
        if v.mr_slope != 1.0:  # some MR vendors write a rescale, most do not
            ds.RescaleIntercept, ds.RescaleSlope = 0, v.mr_slope


def _encode(image: npt.NDArray[np.float64], plan: SeriesPlan) -> npt.NDArray:
    """Real values to stored pixel values, as the vendor would."""
    v = plan.vendor
    if plan.modality == "CT":
        stored = np.rint(image - v.ct_intercept)
        lo, hi = (
            (-(2 ** (v.bits_stored - 1)), 2 ** (v.bits_stored - 1) - 1)
            if v.ct_signed
            else (
                0,
                2**v.bits_stored - 1,
            )
        )
        return np.clip(stored, lo, hi).astype(np.int16 if v.ct_signed else np.uint16)
    return np.clip(np.rint(image / v.mr_slope), 0, 65535).astype(np.uint16)


def write_series(
    plan: SeriesPlan,
    phantom: Phantom,
    cfg: SynthParams,
    ident: dict[str, str],
    raw: Path,
    structures: Sequence[str] = ("lesion",),
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.float64], str]:
    """Render series ``plan`` of ``phantom`` and write its DICOM files under ``raw``.

    Returns:
        The label map of ``structures`` (slices, rows, cols; value i + 1 for structure i,
        see :func:`~medimg.dicom.phantom.label_map`), the series' LPS affine and its
        folder relative to ``raw``.
    """
    image, mask = render_series(plan, phantom, cfg, structures)
    pixels = _encode(image, plan)
    affine, step = series_grid(plan, cfg)
    ds = _series_dataset(plan, cfg, ident)
    seed = cfg.seed
    folder = (
        raw
        / f"PAT_{_token(seed, 'pat', plan.patient_index)}"
        / f"STU_{_token(seed, 'stu', plan.patient_index, plan.study_index)}"
    )
    if not plan.flat_folder:
        folder = folder / f"SER_{_token(seed, 'ser', plan.series_index)}"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 5, plan.series_index])
    n = cfg.n_slices
    instance = rng.permutation(n) + 1 if plan.shuffled else np.arange(1, n + 1)
    normal = np.cross(plan.row_dir, plan.col_dir)
    for k in range(n):
        position = affine[:3, 3] + k * step
        ds.SOPInstanceUID = make_uid(seed, "sop", plan.series_index, k)
        ds.InstanceNumber = int(instance[k])
        ds.ImagePositionPatient = [round(float(c), 6) for c in position]
        ds.SliceLocation = round(float(position @ normal), 6)
        ds.PixelData = pixels[k].tobytes()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        meta.ImplementationVersionName = "MEDIMG_SYNTH"
        ds.file_meta = meta
        name = f"IM{_token(seed, 'im', plan.series_index, k, n=6)}"  # no extension, no order
        pydicom.dcmwrite(folder / name, ds, enforce_file_format=True)
    return mask, affine, str(folder.relative_to(raw))
