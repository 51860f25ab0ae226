"""Synthetic patients for the demo cohort (:mod:`medimg.dicom.synth`): a continuous
phantom in LPS patient coordinates (air, fat, soft tissue, liver, lungs, spine), the
ellipsoidal lesions that positive patients carry, of one kind per patient (a textured,
enhancing solid mass or a homogeneous fluid-filled cyst), and the label maps of the
structures a segmenter learns (:func:`label_map`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from medimg.config import SynthParams
from medimg.errors import ConfigError

# Tissue codes of the phantom. LESION is a solid lesion (its name from before cysts).
AIR, FAT, SOFT, LUNG, BONE, LIVER, LESION, CYST, DISC = range(9)
LESIONS = (LESION, CYST)  # the codes of every lesion kind
# CT by tissue code, HU, as in the portal venous phase: muscle-like soft tissue 55, liver
# 100, cortical and cancellous bone 650 on average, intervertebral discs 80. A solid lesion
# gets SynthParams.lesion_contrast_hu on top of soft tissue (its 55 here) and a texture of
# +-25 HU; a simple cyst is water-like (0-20 HU), homogeneous and non-enhancing, 50 HU
# below soft tissue and 95 below liver (at 40 and 60 HU the CT cysts of the demo, 35 HU
# below soft tissue under 10 HU of noise, were what its models missed: docs/performance.md).
CT_HU = np.array([-1000.0, -100.0, 55.0, -820.0, 650.0, 100.0, 55.0, 5.0, 80.0])
# T1-weighted spin echo by tissue code, a.u.: fat brightest, liver below muscle-like soft
# tissue; solid lesions brighter than liver, cysts (free water, long T1) dark, well below
# liver yet above aerated lung; discs darker than the vertebrae's marrow.
MR_SIGNAL = np.array([0.0, 900.0, 420.0, 40.0, 520.0, 330.0, 700.0, 120.0, 380.0])
TEXTURE_HU = 25.0  # amplitude of a solid lesion's texture, HU (MR: four times, a.u.)
CYST_ROUNDNESS = 0.3  # a cyst's semi-axes keep this share of their spread about the mean

# What each segmentation target is, from the anatomy (tissue codes before lesions are
# painted in) and the final tissue codes: body is everything inside the skin, spine the
# vertebral column (vertebrae and the discs between them, as SNOMED CT's spine structure
# is), lesion every lesion of any kind.
STRUCTURES = ("body", "lung", "liver", "spine", "lesion")

LesionKind = Literal["cyst", "solid"]  # as SynthParams.lesion_kinds names them


@dataclass(frozen=True)
class Lesion:
    centre: npt.NDArray[np.float64]  # LPS, mm
    axes: npt.NDArray[np.float64]  # semi-axes, mm
    rotation: npt.NDArray[np.float64]  # columns are the ellipsoid's axes in LPS
    texture_freq: npt.NDArray[np.float64]  # spatial frequency of its texture, cycles/mm
    texture_phase: float
    kind: LesionKind = "solid"  # solid: textured, enhancing; cyst: homogeneous fluid


@dataclass(frozen=True)
class Phantom:
    """One patient's anatomy in LPS millimetres."""

    centre: npt.NDArray[np.float64]  # body axis position (x, y, 0), mm
    a: float  # body semi-axis, left-right, mm
    b: float  # body semi-axis, anterior-posterior, mm
    fat: float  # subcutaneous fat thickness, mm
    lesions: tuple[Lesion, ...] = ()
    lesion_kind: Literal["none", "cyst", "solid"] = "none"  # what every lesion is; none:
    # a negative patient

    def anatomy(self, p: npt.NDArray[np.float64]) -> npt.NDArray[np.int8]:
        """Tissue code without lesions at points ``p`` of shape (3, ...)."""
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
        # a lumbar vertebral body 36-46 mm across, its centre clear of the back's fat
        spine = (x / (0.2 * b)) ** 2 + ((y - 0.6 * b) / (0.2 * b)) ** 2 <= 1
        disc = np.mod(z, 32.0) < 6.0  # intervertebral discs every 32 mm
        code[spine & ~disc] = BONE
        code[spine & disc] = DISC
        return code

    def tissue(
        self, p: npt.NDArray[np.float64], anatomy: npt.NDArray[np.int8] | None = None
    ) -> tuple[npt.NDArray[np.int8], npt.NDArray]:
        """Tissue code and lesion texture (HU-like offsets) at points ``p`` of shape (3, ...).

        Args:
            p: LPS points, mm.
            anatomy: :meth:`anatomy` at ``p`` when the caller has it already (not changed).
        """
        code = self.anatomy(p) if anatomy is None else anatomy.copy()
        texture = np.zeros(code.shape)
        for les in self.lesions:
            d = np.tensordot(les.rotation.T, p - les.centre[:, None, None, None], axes=1)
            inside = ((d / les.axes[:, None, None, None]) ** 2).sum(axis=0) <= 1
            if les.kind == "cyst":  # fluid: no texture, its margin as sharp as the grid
                code[inside] = CYST
                continue
            code[inside] = LESION
            wave = np.sin(np.tensordot(les.texture_freq * 2 * np.pi, d, axes=1) + les.texture_phase)
            texture[inside] = TEXTURE_HU * wave[inside]
        return code, texture


def check_structures(names: Sequence[str]) -> None:
    """Raise :class:`ConfigError` unless ``names`` are known phantom structures, once each."""
    unknown = [n for n in names if n not in STRUCTURES]
    if unknown or not names or len(set(names)) != len(names):
        raise ConfigError(
            f"synth: structures {list(names)} must be distinct names among "
            f"{list(STRUCTURES)} (unknown: {unknown}); set `structures` in params.yaml to those"
        )


def label_map(
    anatomy: npt.NDArray[np.int8], code: npt.NDArray[np.int8], structures: Sequence[str]
) -> npt.NDArray[np.uint8]:
    """The label map of ``structures``: value i + 1 where structure i is, later structures
    overriding earlier ones where they overlap, 0 elsewhere.

    Args:
        anatomy: tissue codes without lesions (:meth:`Phantom.anatomy`).
        code: the same points' final tissue codes (:meth:`Phantom.tissue`).
        structures: names among :data:`STRUCTURES`, in label-map order.
    """
    check_structures(structures)
    regions = {
        "body": lambda: anatomy != AIR,
        "lung": lambda: anatomy == LUNG,
        "liver": lambda: anatomy == LIVER,
        "spine": lambda: (anatomy == BONE) | (anatomy == DISC),
        "lesion": lambda: (code == LESION) | (code == CYST),
    }
    out = np.zeros(code.shape, dtype=np.uint8)
    for value, name in enumerate(structures, start=1):
        out[regions[name]()] = value
    return out


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


def make_phantom(
    cfg: SynthParams, rng: np.random.Generator, positive: bool, kind: LesionKind = "solid"
) -> Phantom:
    """One patient: body size and position, and, when ``positive``, lesions of ``kind``.

    The random draws do not depend on ``kind`` (cysts are made rounder from the same
    draws), so a cohort's anatomy and lesion positions stay the same whatever its kinds.
    """
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
            axes = rng.uniform(*cfg.lesion_radius_mm, size=3)
            if kind == "cyst":  # simple cysts are near-spherical
                axes = axes.mean() + CYST_ROUNDNESS * (axes - axes.mean())
            lesions.append(
                Lesion(
                    centre=centre + offset,
                    axes=axes,
                    rotation=_random_rotation(rng),
                    texture_freq=rng.uniform(-1, 1, size=3) / 8.0,
                    texture_phase=float(rng.uniform(0, 2 * np.pi)),
                    kind=kind,
                )
            )
    return Phantom(
        centre=centre,
        a=a,
        b=b,
        fat=rng.uniform(8, 18),
        lesions=tuple(lesions),
        lesion_kind=kind if positive else "none",
    )
