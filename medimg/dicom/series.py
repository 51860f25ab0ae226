"""Assemble image instances into geometrically valid stacks, with named QC flags.

A DICOM series is grouped by SeriesInstanceUID, then split into stacks that share
orientation, matrix size, ImageType, pixel spacing and pixel type (localizers are set
aside), and where its positions repeat, into one stack per echo, time point, b-value or
dimension index (:mod:`medimg.dicom.dimensions`). Slices are sorted by
ImagePositionPatient projected on the slice normal, never by InstanceNumber alone, and the
spacing between them is checked: duplicate positions, missing slices, non-uniform
spacing and gantry tilt each raise a named flag.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from medimg.dicom.dimensions import Dims, split_by_dimension
from medimg.dicom.discover import Frame, Instance, Rejection
from medimg.dicom.geometry import direction_cosines, lps_affine

log = logging.getLogger(__name__)

# Geometry flags; what happens to a stack that carries one is the `irregular` policy.
DUPLICATE_POSITIONS = "duplicate_positions"
MISSING_SLICES = "missing_slices"
NONUNIFORM_SPACING = "nonuniform_spacing"
GANTRY_TILT = "gantry_tilt"
INCOMPLETE_SERIES = "incomplete_series"  # some of the series' images lack geometry
IRREGULAR_FLAGS = (
    DUPLICATE_POSITIONS,
    MISSING_SLICES,
    NONUNIFORM_SPACING,
    GANTRY_TILT,
    INCOMPLETE_SERIES,
)
# Informational flags: the stack is still used as it is.
DUPLICATE_INSTANCES = "duplicate_instances"  # the same SOP instance twice (copied files)
SPLIT_SERIES = "split_series"  # the series held several stacks
RESAMPLED = "resampled"  # slices were interpolated onto a uniform grid


@dataclass(frozen=True)
class Slice:
    """One 2D image of a stack: a file, or one frame of a multi-frame file."""

    instance: Instance
    frame: Frame

    @property
    def path(self) -> Path:
        return self.instance.path


@dataclass
class Stack:
    """Slices of one series that can form a volume, sorted along the slice normal."""

    series_uid: str
    part: int  # 0 unless the series was split into several stacks
    n_parts: int
    slices: list[Slice]
    flags: list[str] = field(default_factory=list)
    detail: str = ""  # why the flags were raised, without PHI
    grid: Dims = ()  # GRID_ATTRIBUTES in which this part differs from the series' others
    split: Dims = ()  # what sets it apart from the series' other stacks at its positions

    @property
    def split_by(self) -> Dims:
        """Every (attribute, value) that made this stack one of several of its series."""
        return (*self.grid, *self.split)

    @property
    def first(self) -> Instance:
        return self.slices[0].instance

    @property
    def orientation(self) -> tuple[float, ...]:
        o = self.slices[0].frame.orientation
        assert o is not None  # stacks are built only from slices with geometry
        return o

    @property
    def pixel_spacing(self) -> tuple[float, float]:
        s = self.slices[0].frame.spacing
        assert s is not None
        return s

    @property
    def normal(self) -> npt.NDArray[np.float64]:
        return direction_cosines(self.orientation)[2]

    @property
    def positions(self) -> npt.NDArray[np.float64]:
        return np.array([s.frame.position for s in self.slices], dtype=np.float64)

    @property
    def irregular(self) -> list[str]:
        return [f for f in self.flags if f in IRREGULAR_FLAGS]

    def slice_step(self) -> npt.NDArray[np.float64]:
        """Mean vector between consecutive slices, mm."""
        p = self.positions
        if len(p) < 2:  # a single slice has no step: use the unit normal
            return self.normal
        return np.asarray((p[-1] - p[0]) / (len(p) - 1), dtype=np.float64)

    def lps_affine(self) -> npt.NDArray[np.float64]:
        """Voxel (column, row, slice) to LPS mm, with the mean slice step."""
        return lps_affine(
            self.orientation, self.pixel_spacing, self.positions[0], self.slice_step()
        )


@dataclass(frozen=True)
class GeometryTolerance:
    """How strict the geometry checks are."""

    orientation: float = 1e-4  # max difference of direction cosines within one stack
    spacing_rel: float = 0.01  # max relative deviation of a gap from the median gap
    tilt_deg: float = 0.1  # max angle between slice step and slice normal, degrees
    min_slices: int = 2  # fewer slices do not make a volume


def _orientation_key(o: tuple[float, ...], tol: float) -> tuple[int, ...]:
    return tuple(round(v / (tol * 10)) for v in o)


# What every slice of one volume must share: its plane, and everything that defines the
# voxel grid and type. A series whose slices disagree on one of these is split into
# parts, and a part too small for a volume is set aside (``no_stack``). PixelSpacing and
# the pixel type must be named here because nothing downstream checks them: a volume has
# one spacing, taken from its first slice, and dcm2niix, our reference converter, stacks
# a slice of another PixelSpacing silently, so a volume that looks fine would be wrong.
GRID_ATTRIBUTES = (
    "ImageOrientationPatient",
    "Rows",
    "Columns",
    "ImageType",
    "PixelSpacing",
    "BitsAllocated",
    "PixelRepresentation",
)
SPACING_DIGITS = 3  # PixelSpacing compared to a micrometre


def _grid_key(s: Slice, tol: GeometryTolerance) -> tuple[object, ...]:
    """The values of :data:`GRID_ATTRIBUTES` of a slice, as compared (rounded)."""
    assert s.frame.orientation is not None and s.frame.spacing is not None
    inst = s.instance
    return (
        _orientation_key(s.frame.orientation, tol.orientation),
        inst.rows,
        inst.columns,
        inst.image_type[:3],
        tuple(round(v, SPACING_DIGITS) for v in s.frame.spacing),
        inst.bits_allocated,
        inst.pixel_representation,
    )


def _grid_values(s: Slice) -> tuple[str, ...]:
    """The values of :data:`GRID_ATTRIBUTES` of a slice, as the header writes them."""
    inst, f = s.instance, s.frame
    numbers = (f.orientation or (), f.spacing or ())
    o, sp = ("\\".join(f"{v:.4g}" for v in seq) for seq in numbers)
    kind = (inst.rows, inst.columns, "\\".join(inst.image_type[:3]), sp, inst.bits_allocated)
    return (o, *map(str, kind), str(inst.pixel_representation))


def _unusable(inst: Instance) -> Rejection | None:
    """Why an instance cannot be a slice of any stack, or None."""
    if "LOCALIZER" in inst.image_type:
        return Rejection(inst.path, "localizer", "ImageType LOCALIZER")
    if inst.samples != 1 or not inst.photometric.startswith("MONOCHROME"):
        what = f"{inst.photometric} image, {inst.samples} samples per pixel"
        return Rejection(inst.path, "unsupported_pixels", what)
    if (
        inst.bits_allocated not in (8, 16, 32)
        or not 1 <= inst.bits_stored <= inst.bits_allocated
        or inst.pixel_representation not in (0, 1)
    ):  # a damaged header; these values size every buffer and range computed later
        return Rejection(
            inst.path,
            "unsupported_pixels",
            f"BitsAllocated {inst.bits_allocated}, BitsStored {inst.bits_stored}, "
            f"PixelRepresentation {inst.pixel_representation}",
        )
    tags = {
        "position": "ImagePositionPatient",
        "orientation": "ImageOrientationPatient",
        "spacing": "PixelSpacing",
    }
    missing = [tags[n] for n in tags if any(getattr(f, n) is None for f in inst.frames)]
    if missing or not inst.frames:
        what = ", ".join(missing) or "frames"
        return Rejection(inst.path, "missing_geometry", f"{what} missing or invalid")
    return None


def group_stacks(
    instances: Iterable[Instance], tol: GeometryTolerance, damaged: Iterable[str] = ()
) -> tuple[list[Stack], list[Rejection]]:
    """Group instances into candidate stacks; set aside localizers and slices without geometry.

    A series is split into parts that differ in :data:`GRID_ATTRIBUTES`, and each part
    into one stack per echo, time point, b-value, ... where its positions repeat
    (:func:`~medimg.dicom.dimensions.split_by_dimension`). Stacks of a series in
    ``damaged`` (series UIDs of files set aside as damaged) and of a series some of whose
    images lack geometry are flagged ``incomplete_series``.

    Returns:
        Stacks (unsorted, unchecked) and rejections with typed reasons.
    """
    rejected: list[Rejection] = []
    by_series: dict[str, list[Slice]] = defaultdict(list)
    incomplete: set[str] = set(damaged)
    for inst in instances:
        why = _unusable(inst)
        if why is not None:
            rejected.append(why)
            if why.reason == "missing_geometry":
                incomplete.add(inst.series_uid)
            continue
        by_series[inst.series_uid].extend(Slice(inst, f) for f in inst.frames)
    stacks: list[Stack] = []
    for series_uid in sorted(by_series):
        found = _series_stacks(series_uid, by_series[series_uid], tol)
        for stack in found:
            if len(found) > 1:
                stack.flags.append(SPLIT_SERIES)
            if series_uid in incomplete:
                stack.flags.append(INCOMPLETE_SERIES)
                stack.detail = "images of this series without usable geometry were set aside"
        stacks.extend(found)
    return stacks, rejected


def _series_stacks(series_uid: str, slices: list[Slice], tol: GeometryTolerance) -> list[Stack]:
    """One series' slices split into parts of one grid, each split by its dimensions."""
    parts: dict[tuple[object, ...], list[Slice]] = defaultdict(list)
    for s in slices:
        parts[_grid_key(s, tol)].append(s)
    order = sorted(parts, key=lambda k: (-len(parts[k]), repr(k)))
    # the grid attributes in which the parts differ: what the manifest says of the split
    differ = [a for n, a in enumerate(GRID_ATTRIBUTES) if len({k[n] for k in order}) > 1]
    out = []
    for part, signature in enumerate(order):
        members = parts[signature]
        values = dict(zip(GRID_ATTRIBUTES, _grid_values(members[0]), strict=True))
        grid = tuple((a, values[a]) for a in differ)
        normal = direction_cosines(members[0].frame.orientation)[2]  # type: ignore[arg-type]
        along = [float(np.dot(s.frame.position, normal)) for s in members]  # type: ignore[arg-type]
        ids = [(s.instance.sop_uid, s.frame.index) for s in members]
        dims = [dict(s.frame.dims) for s in members]
        for split, idx in split_by_dimension(along, ids, dims):
            stack = Stack(series_uid, part, len(order), [members[i] for i in idx])
            stack.grid, stack.split = grid, split
            out.append(stack)
    return out


def check_stack(stack: Stack, tol: GeometryTolerance) -> None:
    """Sort ``stack`` along its normal and record geometry flags (in place)."""
    normal = stack.normal
    # Exact copies of one SOP instance (a file exported twice) are dropped, not flagged bad.
    seen: dict[tuple[str, int], Slice] = {}
    for s in stack.slices:
        seen.setdefault((s.instance.sop_uid, s.frame.index), s)
    if len(seen) < len(stack.slices):
        stack.flags.append(DUPLICATE_INSTANCES)
        stack.slices = list(seen.values())
    stack.slices.sort(
        key=lambda s: (float(np.dot(s.frame.position, normal)), s.instance.instance_number or 0)  # type: ignore[arg-type]
    )
    if len(stack.slices) < 2:
        return
    p = stack.positions
    along = p @ normal
    gaps = np.diff(along)
    details = []
    real = gaps[gaps > 1e-3]
    if len(real) < len(gaps):
        stack.flags.append(DUPLICATE_POSITIONS)
        details.append(f"{len(gaps) - len(real)} slices share a position with another")
    if len(real):
        # The regular spacing: the median gap, or else the smallest (a missing slice in a
        # short stack pulls the median off).
        for spacing in (float(np.median(real)), float(real.min())):
            ratio = real / spacing
            if np.all(np.abs(ratio - np.round(ratio)) <= tol.spacing_rel * np.round(ratio)):
                break
        else:
            spacing = float(np.median(real))
            ratio = real / spacing
        off_grid = np.abs(ratio - np.round(ratio)) > tol.spacing_rel * np.maximum(
            np.round(ratio), 1
        )
        skipped = ~off_grid & (np.round(ratio) >= 2)
        if np.any(skipped):
            stack.flags.append(MISSING_SLICES)
            details.append(f"{int(np.sum(np.round(ratio[skipped]) - 1))} slices missing")
        if np.any(off_grid):
            stack.flags.append(NONUNIFORM_SPACING)
            details.append(
                f"gaps from {real.min():.3g} to {real.max():.3g} mm (regular {spacing:.3g})"
            )
    step = p[-1] - p[0]
    norm = float(np.linalg.norm(step))
    if norm > 0:
        angle = float(np.degrees(np.arccos(min(1.0, abs(float(step @ normal)) / norm))))
        if angle > tol.tilt_deg:
            stack.flags.append(GANTRY_TILT)
            details.append(f"slices sheared by {angle:.2f} degrees")
    stack.detail = "; ".join(filter(None, [stack.detail, *details]))


def assemble(
    instances: Iterable[Instance], tol: GeometryTolerance, damaged: Iterable[str] = ()
) -> tuple[list[Stack], list[Rejection]]:
    """Group, sort and check stacks. Groups too small to form a volume are rejected."""
    stacks, rejected = group_stacks(instances, tol, damaged)
    kept: list[Stack] = []
    for stack in stacks:
        check_stack(stack, tol)
        if len(stack.slices) < tol.min_slices:
            split = "".join(f", {a} {v}" for a, v in stack.split_by)
            why = (
                f"{len(stack.slices)} slice(s) of this plane, grid and pixel type{split}; "
                f"at least {tol.min_slices} make a volume"
            )
            rejected.extend(Rejection(s.path, "no_stack", why) for s in stack.slices)
            continue
        kept.append(stack)
    return kept, rejected
