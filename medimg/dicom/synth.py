"""A synthetic cohort that looks like a PACS export: real DICOM files written with pydicom.

Each patient is a continuous phantom in LPS patient coordinates (air, fat, soft tissue,
liver, lungs, spine); about half carry ellipsoidal lesions with their own contrast and
texture. Every series samples the phantom on its own grid (axial, coronal, sagittal or
oblique, ascending or descending, with InstanceNumber sometimes unrelated to position),
so pixels, headers and lesion masks agree by construction. Headers carry fake but
realistic PHI so that de-identification can be tested.

Everything is a pure function of :class:`~medimg.config.SynthParams`: the same seed gives
byte-identical files.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
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
from medimg.dicom.geometry import lps_affine, ras_affine
from medimg.errors import ConfigError
from medimg.io import atomic_dir, atomic_path, atomic_write_text

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]  # (series done, series total)

# Tissue codes of the phantom.
AIR, FAT, SOFT, LUNG, BONE, LIVER, LESION = range(7)
CT_HU = np.array([-1000.0, -100.0, 40.0, -820.0, 650.0, 60.0, 40.0])  # by tissue code
MR_SIGNAL = np.array([0.0, 900.0, 420.0, 40.0, 520.0, 330.0, 700.0])  # T1-like, a.u.

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


@dataclass(frozen=True)
class Vendor:
    """How one manufacturer encodes pixels (what ingest must undo)."""

    name: str
    ct_model: str
    mr_model: str
    ct_signed: bool  # PixelRepresentation 1 (int16) or 0 (uint16)
    ct_intercept: float  # RescaleIntercept of CT, HU
    bits_stored: int  # BitsStored of CT
    mr_slope: float  # MR: real value = stored * slope (1.0 means no rescale tags)


VENDORS = (
    Vendor("SIEMENS", "SOMATOM Definition AS", "MAGNETOM Skyra", True, -1024.0, 12, 1.0),
    Vendor("GE MEDICAL SYSTEMS", "Revolution CT", "SIGNA Premier", True, -1024.0, 16, 1.0),
    Vendor("Philips", "Ingenuity CT", "Ingenia", False, -1024.0, 12, 1.5),
    Vendor("TOSHIBA", "Aquilion ONE", "Vantage Titan", True, 0.0, 16, 1.0),
)
MR_GAIN = {"SIEMENS": 1.0, "GE MEDICAL SYSTEMS": 2.0, "Philips": 1.0, "TOSHIBA": 0.8}

# Row and column direction cosines (LPS) of each plane.
PLANES: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "axial": ((1, 0, 0), (0, 1, 0)),
    "coronal": ((1, 0, 0), (0, 0, -1)),
    "sagittal": ((0, 1, 0), (0, 0, -1)),
}


@dataclass(frozen=True)
class Lesion:
    centre: npt.NDArray[np.float64]  # LPS, mm
    axes: npt.NDArray[np.float64]  # semi-axes, mm
    rotation: npt.NDArray[np.float64]  # columns are the ellipsoid's axes in LPS
    texture_freq: npt.NDArray[np.float64]  # spatial frequency of its texture, cycles/mm
    texture_phase: float


@dataclass(frozen=True)
class Phantom:
    """One patient's anatomy in LPS millimetres."""

    centre: npt.NDArray[np.float64]  # body axis position (x, y, 0), mm
    a: float  # body semi-axis, left-right, mm
    b: float  # body semi-axis, anterior-posterior, mm
    fat: float  # subcutaneous fat thickness, mm
    lesions: tuple[Lesion, ...] = ()

    def tissue(self, p: npt.NDArray[np.float64]) -> tuple[npt.NDArray[np.int8], npt.NDArray]:
        """Tissue code and lesion texture (HU-like offsets) at points ``p`` of shape (3, ...)."""
        x, y, z = p[0] - self.centre[0], p[1] - self.centre[1], p[2]
        a, b = self.a, self.b
        code = np.full(x.shape, AIR, dtype=np.int8)
        code[(x / a) ** 2 + (y / b) ** 2 <= 1] = FAT
        code[(x / (a - self.fat)) ** 2 + (y / (b - self.fat)) ** 2 <= 1] = SOFT
        liver = (
            ((x + 0.35 * a) / (0.35 * a)) ** 2
            + ((y + 0.05 * b) / (0.55 * b)) ** 2
            + ((z + 45) / 60) ** 2
        )
        code[liver <= 1] = LIVER
        for side in (-1, 1):
            lung = ((x - side * 0.45 * a) / (0.3 * a)) ** 2 + ((y + 0.05 * b) / (0.55 * b)) ** 2
            code[lung + ((z - 50) / 80) ** 2 <= 1] = LUNG
        spine = (x / (0.16 * b)) ** 2 + ((y - 0.62 * b) / (0.16 * b)) ** 2 <= 1
        disc = np.mod(z, 32.0) < 6.0  # intervertebral discs every 32 mm
        code[spine & ~disc] = BONE
        code[spine & disc] = SOFT
        texture = np.zeros(x.shape)
        for les in self.lesions:
            d = np.tensordot(les.rotation.T, p - les.centre[:, None, None, None], axes=1)
            inside = ((d / les.axes[:, None, None, None]) ** 2).sum(axis=0) <= 1
            code[inside] = LESION
            wave = np.sin(np.tensordot(les.texture_freq * 2 * np.pi, d, axes=1) + les.texture_phase)
            texture[inside] = 25.0 * wave[inside]
        return code, texture


@dataclass(frozen=True)
class SeriesPlan:
    """Everything needed to write one series."""

    patient_index: int
    study_index: int
    series_index: int  # global, 0-based
    modality: str  # "CT" or "MR"
    vendor: Vendor
    orientation: str
    row_dir: npt.NDArray[np.float64]
    col_dir: npt.NDArray[np.float64]
    pixel_spacing: float  # mm, isotropic in-plane
    slice_spacing: float  # mm
    descending: bool  # slices stacked against the normal
    shuffled: bool  # InstanceNumber unrelated to position
    centre: npt.NDArray[np.float64]  # grid centre, LPS mm
    flat_folder: bool  # files share the study folder with other series
    uids: dict[str, str] = field(default_factory=dict)


def _uid(seed: int, *parts: object) -> str:
    """A deterministic UID in the 2.25 (UUID-derived) form: 128 bits from a hash."""
    digest = hashlib.sha256("/".join(map(str, ("medimg-synth-uid", seed, *parts))).encode())
    return f"2.25.{int(digest.hexdigest()[:32], 16)}"


def _token(seed: int, *parts: object, n: int = 8) -> str:
    digest = hashlib.sha256("/".join(map(str, ("medimg-synth", seed, *parts))).encode()).hexdigest()
    return digest[:n].upper()


def _every(index: int, fraction: float) -> bool:
    """True for a share ``fraction`` of consecutive indices, evenly spread and deterministic."""
    return int((index + 1) * fraction) > int(index * fraction)


def _rotation(deg_x: float, deg_z: float) -> npt.NDArray[np.float64]:
    ax, az = np.deg2rad(deg_x), np.deg2rad(deg_z)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ rx


def _random_rotation(rng: np.random.Generator) -> npt.NDArray[np.float64]:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def lesion_core_mm(cfg: SynthParams) -> float:
    """Radius around the body centre inside which lesions lie fully in every series' grid."""
    through = cfg.n_slices * cfg.slice_spacing_mm[0] / 2
    in_plane = cfg.matrix * (cfg.fov_mm[0] / cfg.matrix) / 2
    return min(through, in_plane) - cfg.lesion_radius_mm[1] - cfg.centre_jitter_mm * np.sqrt(3)


def make_phantom(cfg: SynthParams, rng: np.random.Generator, positive: bool) -> Phantom:
    a, b = rng.uniform(130, 165), rng.uniform(90, 115)
    centre = np.array([rng.uniform(-8, 8), rng.uniform(-8, 8), 0.0])
    lesions: list[Lesion] = []
    if positive:
        core = lesion_core_mm(cfg)
        if core <= 0:
            raise ConfigError(
                "synth: lesions cannot fit every series' grid; raise n_slices or "
                "slice_spacing_mm, or lower lesion_radius_mm or centre_jitter_mm"
            )
        core = min(core, 0.45 * b)  # keep lesions inside the body, clear of the spine
        for _ in range(rng.integers(cfg.lesions_per_positive[0], cfg.lesions_per_positive[1] + 1)):
            direction = rng.normal(size=3)
            offset = direction / np.linalg.norm(direction) * core * rng.uniform(0, 1) ** (1 / 3)
            lesions.append(
                Lesion(
                    centre=centre + offset,
                    axes=rng.uniform(*cfg.lesion_radius_mm, size=3),
                    rotation=_random_rotation(rng),
                    texture_freq=rng.uniform(-1, 1, size=3) / 8.0,
                    texture_phase=float(rng.uniform(0, 2 * np.pi)),
                )
            )
    return Phantom(centre=centre, a=a, b=b, fat=rng.uniform(8, 18), lesions=tuple(lesions))


def plan_cohort(cfg: SynthParams) -> tuple[list[Phantom], list[bool], list[SeriesPlan]]:
    """Decide patients, labels and series (no pixels yet)."""
    rng = np.random.default_rng(cfg.seed)
    n_pos = round(cfg.n_patients * cfg.positive_fraction)
    positive = np.zeros(cfg.n_patients, dtype=bool)
    positive[rng.permutation(cfg.n_patients)[:n_pos]] = True
    phantoms = [make_phantom(cfg, rng, bool(p)) for p in positive]
    plans: list[SeriesPlan] = []
    study_counter = 0
    for p in range(cfg.n_patients):
        for s in range(rng.integers(cfg.studies_per_patient[0], cfg.studies_per_patient[1] + 1)):
            modality = "MR" if _every(study_counter, cfg.mr_fraction) else "CT"
            vendor = VENDORS[rng.integers(len(VENDORS))]
            flat = bool(rng.random() < 0.5)
            study_counter += 1
            for _ in range(rng.integers(cfg.series_per_study[0], cfg.series_per_study[1] + 1)):
                g = len(plans)
                orientation = cfg.orientations[g % len(cfg.orientations)]
                if orientation == "oblique":
                    tilt = rng.uniform(*cfg.oblique_deg) * rng.choice([-1, 1])
                    rot = _rotation(tilt, rng.uniform(-6, 6))
                    row, col = rot[:, 0], rot[:, 1]
                else:
                    row, col = (np.array(v, dtype=np.float64) for v in PLANES[orientation])
                fov = rng.uniform(*cfg.fov_mm)
                plans.append(
                    SeriesPlan(
                        patient_index=p,
                        study_index=s,
                        series_index=g,
                        modality=modality,
                        vendor=vendor,
                        orientation=orientation,
                        row_dir=row,
                        col_dir=col,
                        pixel_spacing=round(fov / cfg.matrix, 4),
                        slice_spacing=round(rng.uniform(*cfg.slice_spacing_mm), 2),
                        # spread within each orientation, so every plane gets both kinds
                        descending=_every(g // len(cfg.orientations) + 1, cfg.descending_fraction),
                        # dcm2niix (our test oracle) trusts Siemens InstanceNumber order and
                        # drops slices when it is not spatial, so Siemens series keep it.
                        shuffled=_every(g // len(cfg.orientations), cfg.shuffle_instance_fraction)
                        and vendor.name != "SIEMENS",
                        centre=phantoms[p].centre
                        + rng.uniform(-1, 1, size=3) * cfg.centre_jitter_mm,
                        flat_folder=flat,
                    )
                )
    return phantoms, [bool(x) for x in positive], plans


def series_grid(plan: SeriesPlan, cfg: SynthParams) -> tuple[npt.NDArray[np.float64], np.ndarray]:
    """LPS affine of the series (voxel (i, j, k) in file order) and its slice step."""
    normal = np.cross(plan.row_dir, plan.col_dir)
    step = normal * plan.slice_spacing * (-1 if plan.descending else 1)
    half = (cfg.matrix - 1) / 2 * plan.pixel_spacing
    origin = plan.centre - plan.row_dir * half - plan.col_dir * half - step * (cfg.n_slices - 1) / 2
    iop = [*plan.row_dir, *plan.col_dir]
    ps = [plan.pixel_spacing, plan.pixel_spacing]
    return lps_affine(iop, ps, origin, step), step


def render_series(
    plan: SeriesPlan, phantom: Phantom, cfg: SynthParams
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.uint8]]:
    """Real-valued image (HU or MR a.u.) and lesion mask, both shaped (slices, rows, cols)."""
    affine, _ = series_grid(plan, cfg)
    k, j, i = np.meshgrid(
        np.arange(cfg.n_slices), np.arange(cfg.matrix), np.arange(cfg.matrix), indexing="ij"
    )
    ijk1 = np.stack([i, j, k, np.ones_like(i)]).reshape(4, -1).astype(np.float64)
    pts = (affine @ ijk1)[:3].reshape(3, *i.shape)
    code, texture = phantom.tissue(pts)
    rng = np.random.default_rng([cfg.seed, 1, plan.series_index])
    noise = rng.normal(0.0, cfg.noise_hu, size=code.shape)
    if plan.modality == "CT":
        image = CT_HU[code] + texture + noise
        image[code == LESION] += cfg.lesion_contrast_hu
    else:
        image = MR_SIGNAL[code] + 4.0 * texture
        bias = 1 + 0.15 * np.sin(pts[0] / 120.0) * np.cos(pts[1] / 150.0)  # coil shading
        image = np.abs(image * bias + 1.5 * noise) * MR_GAIN[plan.vendor.name]
    return image, (code == LESION).astype(np.uint8)


def _patient_identity(seed: int, p: int) -> dict[str, str]:
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
        ds.MagneticFieldStrength = 1.5
        ds.SpacingBetweenSlices = plan.slice_spacing
    ds.StudyInstanceUID = _uid(seed, "study", plan.patient_index, plan.study_index)
    ds.SeriesInstanceUID = _uid(seed, "series", plan.series_index)
    ds.FrameOfReferenceUID = _uid(seed, "for", plan.patient_index, plan.study_index)
    ds.StudyID = _token(seed, "sid", plan.patient_index, plan.study_index, n=6)
    ds.SeriesNumber = 2 + plan.series_index % 7
    ds.AcquisitionNumber = 1
    ds.PositionReferenceIndicator = ""
    ds.ImageOrientationPatient = [round(float(c), 8) for c in (*plan.row_dir, *plan.col_dir)]
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
    # A vendor-private block that echoes identifiers, as real scanners do.
    block = ds.private_block(0x0019, "MEDIMG SYNTH", create=True)
    block.add_new(0x10, "LO", f"{ident['PatientID']} {ds.StationName}")
    return ds


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


def _write_series(
    plan: SeriesPlan, phantom: Phantom, cfg: SynthParams, ident: dict[str, str], raw: Path
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.float64], str]:
    image, mask = render_series(plan, phantom, cfg)
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
        ds.SOPInstanceUID = _uid(seed, "sop", plan.series_index, k)
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


def _save_mask(mask: npt.NDArray[np.uint8], lps: npt.NDArray[np.float64], path: Path) -> None:
    # (slices, rows, cols) -> (i, j, k) = (cols, rows, slices)
    img = nib.Nifti1Image(np.ascontiguousarray(mask.transpose(2, 1, 0)), ras_affine(lps))
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    nib.save(img, path)


TRUTH_COLUMNS = [
    "series_uid",
    "study_uid",
    "patient_id",
    "modality",
    "vendor",
    "orientation",
    "descending",
    "shuffled",
    "n_slices",
    "label",
    "lesion_voxels",
    "folder",
]


def synth_cohort(
    cfg: SynthParams,
    raw_dir: Path,
    masks_dir: Path,
    labels_csv: Path,
    truth_csv: Path,
    progress: Progress | None = None,
    force: bool = False,
) -> dict[str, int]:
    """Write the cohort: DICOM under ``raw_dir``, one NIfTI mask per series (named by its
    SeriesInstanceUID) under ``masks_dir``, ``labels_csv`` (patient_id,label) and
    ``truth_csv`` (per-series ground truth for tests).

    Each output is staged and swapped in atomically, so an interrupted run leaves the
    previous cohort intact. A cohort already written with the same settings is left as it
    is (its files keep their timestamps, so ingest sees nothing new) unless ``force``.

    Returns:
        Counts: patients, positives, series and files.
    """
    stamp = truth_csv.with_name(truth_csv.stem + ".params.json")
    settings = cfg.model_dump_json()
    outputs = (raw_dir, masks_dir, labels_csv, truth_csv, stamp)
    if not force and all(p.exists() for p in outputs) and stamp.read_text() == settings:
        with truth_csv.open() as f:
            n_series = sum(1 for _ in csv.DictReader(f))
        log.info("synthetic cohort in %s is up to date", raw_dir)
        n_pos = round(cfg.n_patients * cfg.positive_fraction)
        return {"patients": cfg.n_patients, "positives": n_pos, "series": n_series,
                "files": n_series * cfg.n_slices}  # fmt: skip
    stamp.unlink(missing_ok=True)
    phantoms, positive, plans = plan_cohort(cfg)
    idents = [_patient_identity(cfg.seed, p) for p in range(cfg.n_patients)]
    truth: list[dict[str, object]] = []
    with atomic_dir(raw_dir) as raw, atomic_dir(masks_dir) as masks:
        for done, plan in enumerate(plans):
            ident = idents[plan.patient_index]
            mask, affine, folder = _write_series(
                plan, phantoms[plan.patient_index], cfg, ident, raw
            )
            series_uid = _uid(cfg.seed, "series", plan.series_index)
            _save_mask(mask, affine, masks / f"{series_uid}.nii.gz")
            truth.append(
                {
                    "series_uid": series_uid,
                    "study_uid": _uid(cfg.seed, "study", plan.patient_index, plan.study_index),
                    "patient_id": ident["PatientID"],
                    "modality": plan.modality,
                    "vendor": plan.vendor.name,
                    "orientation": plan.orientation,
                    "descending": int(plan.descending),
                    "shuffled": int(plan.shuffled),
                    "n_slices": cfg.n_slices,
                    "label": int(positive[plan.patient_index]),
                    "lesion_voxels": int(mask.sum()),
                    "folder": folder,
                }
            )
            if progress is not None:
                progress(done + 1, len(plans))
    with atomic_path(labels_csv) as tmp, tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["patient_id", "label"])
        for ident, pos in sorted(
            zip(idents, positive, strict=True), key=lambda t: t[0]["PatientID"]
        ):
            writer.writerow([ident["PatientID"], int(pos)])
    with atomic_path(truth_csv) as tmp, tmp.open("w", newline="") as f:
        dict_writer = csv.DictWriter(f, fieldnames=TRUTH_COLUMNS)
        dict_writer.writeheader()
        dict_writer.writerows(truth)
    counts = {
        "patients": cfg.n_patients,
        "positives": int(sum(positive)),
        "series": len(plans),
        "files": len(plans) * cfg.n_slices,
    }
    atomic_write_text(stamp, settings)  # last: marks the cohort complete
    log.info("synthetic cohort written to %s: %s", raw_dir, counts)
    return counts
