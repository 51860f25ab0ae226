"""Synthetic acquisitions for the demo cohort (:mod:`medimg.dicom.synth`): which studies
and series each patient gets (modality, vendor, plane, spacing, slice order) and what each
series sees of its patient's phantom, on its own grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from medimg.config import SynthParams
from medimg.dicom.geometry import lps_affine
from medimg.dicom.phantom import (
    CT_HU,
    LESION,
    MR_SIGNAL,
    LesionKind,
    Phantom,
    label_map,
    make_phantom,
)


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


def _every(index: int, fraction: float) -> bool:
    """True for a share ``fraction`` of consecutive indices, evenly spread and deterministic."""
    return int((index + 1) * fraction) > int(index * fraction)


def _rotation(deg_x: float, deg_z: float) -> npt.NDArray[np.float64]:
    ax, az = np.deg2rad(deg_x), np.deg2rad(deg_z)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ rx


def lesion_kinds(cfg: SynthParams, positive: Sequence[bool]) -> list[LesionKind]:
    """The lesion kind of each positive patient, in patient order: ``cfg.lesion_kinds`` in
    turn (so their counts differ by one at most), shuffled by a generator of their own so
    that the rest of the cohort does not depend on them."""
    n_pos = int(sum(positive))
    kinds = [cfg.lesion_kinds[i % len(cfg.lesion_kinds)] for i in range(n_pos)]
    order = np.random.default_rng([cfg.seed, 6]).permutation(n_pos)
    return [kinds[i] for i in order]


def plan_cohort(cfg: SynthParams) -> tuple[list[Phantom], list[bool], list[SeriesPlan]]:
    """Decide patients, labels (a patient's lesion kind is its phantom's) and series (no
    pixels yet)."""
    rng = np.random.default_rng(cfg.seed)
    n_pos = round(cfg.n_patients * cfg.positive_fraction)
    positive = np.zeros(cfg.n_patients, dtype=bool)
    positive[rng.permutation(cfg.n_patients)[:n_pos]] = True
    kinds = iter(lesion_kinds(cfg, positive.tolist()))
    phantoms = [
        make_phantom(cfg, rng, True, next(kinds)) if p else make_phantom(cfg, rng, False)
        for p in positive
    ]
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
    plan: SeriesPlan,
    phantom: Phantom,
    cfg: SynthParams,
    structures: Sequence[str] = ("lesion",),
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.uint8]]:
    """Real-valued image (HU or MR a.u.) and the label map of ``structures``
    (:func:`~medimg.dicom.phantom.label_map`), both shaped (slices, rows, cols) and
    sampled at the same voxel centres. The default is the binary lesion mask."""
    affine, _ = series_grid(plan, cfg)
    k, j, i = np.meshgrid(
        np.arange(cfg.n_slices), np.arange(cfg.matrix), np.arange(cfg.matrix), indexing="ij"
    )
    ijk1 = np.stack([i, j, k, np.ones_like(i)]).reshape(4, -1).astype(np.float64)
    pts = (affine @ ijk1)[:3].reshape(3, *i.shape)
    anatomy = phantom.anatomy(pts)
    code, texture = phantom.tissue(pts, anatomy)
    rng = np.random.default_rng([cfg.seed, 1, plan.series_index])
    noise = rng.normal(0.0, cfg.noise_hu, size=code.shape)
    if plan.modality == "CT":
        image = CT_HU[code] + texture + noise
        image[code == LESION] += cfg.lesion_contrast_hu
    else:
        image = MR_SIGNAL[code] + 4.0 * texture
        bias = 1 + 0.15 * np.sin(pts[0] / 120.0) * np.cos(pts[1] / 150.0)  # coil shading
        image = np.abs(image * bias + 1.5 * noise) * MR_GAIN[plan.vendor.name]
    return image, label_map(anatomy, code, structures)
