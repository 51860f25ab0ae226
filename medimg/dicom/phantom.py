"""Synthetic patients for the demo cohort (:mod:`medimg.dicom.synth`): a continuous
phantom in LPS patient coordinates (air, fat, soft tissue, liver, lungs, spine), and the
ellipsoidal lesions, each with its own texture, that positive patients carry.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from medimg.config import SynthParams
from medimg.errors import ConfigError

# Tissue codes of the phantom.
AIR, FAT, SOFT, LUNG, BONE, LIVER, LESION = range(7)
CT_HU = np.array([-1000.0, -100.0, 40.0, -820.0, 650.0, 60.0, 40.0])  # by tissue code
MR_SIGNAL = np.array([0.0, 900.0, 420.0, 40.0, 520.0, 330.0, 700.0])  # T1-like, a.u.


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
