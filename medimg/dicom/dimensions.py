"""What tells images at one position apart: echoes, temporal positions, diffusion, indices.

A series may hold several images at each slice position: the echoes of a multi-echo or
Dixon acquisition, the time points of a dynamic series, the b-values and gradient
directions of a diffusion series, the dimension indices of an enhanced multi-frame
object. The headers say which; :func:`split_by_dimension` reads them, in the order of
:data:`ATTRIBUTES`, and splits a stack with repeated positions into one group per value.

An attribute splits a group only when (1) positions repeat in the group, (2) its values are
at most half as many as the images (a value that marks a single image is a per-image
attribute, such as a cardiac trigger time that differs slice by slice, not a dimension),
and (3) the split
leaves fewer repeated positions than before (an attribute that only follows the position,
such as a per-slice AcquisitionNumber beside exact re-sent copies, explains nothing). So
TriggerTime and AcquisitionNumber, which vary slice by slice in many ordinary series,
split only where they really separate repeated positions; a series whose positions never
repeat is never split. What no attribute tells apart stays together, and
:mod:`medimg.dicom.series` flags it ``duplicate_positions``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from pydicom.datadict import keyword_for_tag
from pydicom.dataset import Dataset

Dims = tuple[tuple[str, str], ...]  # (attribute keyword, value) of one image

# Order of the splits, and the family each attribute belongs to (ingest.stacks selects
# stacks by family). Standard attributes before dimension indices, which only enhanced
# objects carry; TriggerTime and AcquisitionNumber last (see the module docstring).
ATTRIBUTES: dict[str, str] = {
    "EchoNumbers": "echo",
    "EchoTime": "echo",
    "EffectiveEchoTime": "echo",  # enhanced MR: MR Echo functional group
    "TemporalPositionIdentifier": "temporal",
    "TemporalPositionIndex": "temporal",  # enhanced: Frame Content functional group
    "DiffusionBValue": "diffusion",
    "DiffusionGradientOrientation": "diffusion",
    "DimensionIndexValues": "other",  # enhanced: the non-spatial dimension indices
    "TriggerTime": "temporal",
    "AcquisitionNumber": "temporal",
}
FAMILIES = ("echo", "temporal", "diffusion", "other")
SINGLE_FRAME = (
    "EchoNumbers",
    "EchoTime",
    "TemporalPositionIdentifier",
    "DiffusionBValue",
    "DiffusionGradientOrientation",
    "TriggerTime",
    "AcquisitionNumber",
)
# Dimension indices that say where a frame lies, not what it shows.
SPATIAL_POINTERS = {0x00209057, 0x00200032}  # InStackPositionNumber, ImagePositionPatient
SAME_POSITION_MM = 1e-3  # images closer than this along the normal share a position


def _text(value: Any) -> str | None:
    """A header value as a short canonical string (numbers as %g), or None when empty."""
    if value is None or value == "":
        return None
    values = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else [value]
    out = []
    for v in values:
        try:
            out.append(f"{float(v):g}")
        except (TypeError, ValueError):
            out.append(str(v).strip())
    text = "\\".join(out)
    return text or None


def single_frame_dims(get: Callable[[str], Any]) -> Dims:
    """The splitting attributes of a single-frame image, read through ``get(keyword)``."""
    found = ((k, _text(get(k))) for k in SINGLE_FRAME)
    return tuple((k, v) for k, v in found if v is not None)


def _item(ds: Dataset | None, keyword: str) -> Dataset | None:
    seq = ds.get(keyword) if ds is not None else None
    return seq[0] if seq else None


def frame_dims(ds: Dataset, groups: Sequence[Dataset | None]) -> Dims:
    """The splitting attributes of one frame of an enhanced object.

    Args:
        ds: the whole object (its DimensionIndexSequence names the indices).
        groups: the frame's per-frame, then the shared, functional groups item.
    """

    def first(seq: str, attr: str) -> Any:
        for g in groups:
            item = _item(g, seq)
            if item is not None and attr in item:
                return item.get(attr)
        return None

    found: dict[str, str | None] = {
        "EffectiveEchoTime": _text(first("MREchoSequence", "EffectiveEchoTime")),
        "TemporalPositionIndex": _text(first("FrameContentSequence", "TemporalPositionIndex")),
        "DiffusionBValue": _text(first("MRDiffusionSequence", "DiffusionBValue")),
    }
    diffusion = _item(groups[0], "MRDiffusionSequence") or _item(groups[-1], "MRDiffusionSequence")
    direction = _item(diffusion, "DiffusionGradientDirectionSequence")
    if direction is not None:
        found["DiffusionGradientOrientation"] = _text(direction.get("DiffusionGradientOrientation"))
    index = first("FrameContentSequence", "DimensionIndexValues")
    pointers = [
        item.get("DimensionIndexPointer") for item in ds.get("DimensionIndexSequence") or []
    ]
    if index is not None and pointers:
        values = list(index) if isinstance(index, Sequence) else [index]
        kept = [
            f"{keyword_for_tag(int(p)) or p}={v}"
            for p, v in zip(pointers, values, strict=False)
            if p is not None and int(p) not in SPATIAL_POINTERS
        ]
        found["DimensionIndexValues"] = ",".join(kept) or None
    return tuple((k, v) for k, v in found.items() if v is not None)


def _repeats(along: Sequence[float], ids: Sequence[object], members: Sequence[int]) -> int:
    """How many images of ``members`` share a position with another (copies count once)."""
    unique = {ids[i]: along[i] for i in members}
    positions = sorted(unique.values())
    return sum(1 for a, b in itertools.pairwise(positions) if b - a <= SAME_POSITION_MM)


def split_by_dimension(
    along: Sequence[float], ids: Sequence[object], dims: Sequence[Mapping[str, str]]
) -> list[tuple[Dims, list[int]]]:
    """Groups of images that form one stack each, with the values that set them apart.

    Args:
        along: each image's position along the slice normal, mm.
        ids: each image's identity; two images with the same id are copies of one
            instance (a file exported twice) and count once.
        dims: each image's splitting attributes (:func:`single_frame_dims`).

    Returns:
        (the (attribute, value) pairs of the splits that made the group, the indices of
        its images), groups ordered by those values; one group with no pairs when nothing
        was split.
    """
    groups: list[tuple[Dims, list[int]]] = [((), list(range(len(along))))]
    for attr in ATTRIBUTES:
        out: list[tuple[Dims, list[int]]] = []
        for made, members in groups:
            before = _repeats(along, ids, members)
            by_value: dict[str, list[int]] = {}
            for i in members:
                by_value.setdefault(dims[i].get(attr, ""), []).append(i)
            values = sorted(by_value, key=value_order)
            n_images = len({ids[i] for i in members})
            splits = (
                before > 0
                and 1 < len(values) <= n_images / 2
                and sum(_repeats(along, ids, by_value[v]) for v in values) < before
            )
            if splits:
                out.extend(((*made, (attr, v)), by_value[v]) for v in values)
            else:
                out.append((made, members))
        groups = out
    return groups


def value_order(value: str) -> tuple[int, tuple[float, ...], str]:
    """Sort key of a value: numbers numerically (``2`` before ``10``), absent first."""
    try:
        return (0, tuple(float(v) for v in value.split("\\")), value) if value else (-1, (), "")
    except ValueError:
        return (1, (), value)


def family_of(attribute: str) -> str:
    """The family (echo, temporal, diffusion, other) an attribute belongs to."""
    return ATTRIBUTES.get(attribute, "other")


def keep_first(splits: Sequence[Dims], families: Iterable[str]) -> list[bool]:
    """Which stacks of one series part to keep when ``families`` keep only their first.

    A stack is dropped when, among the stacks that share its values outside a family in
    ``families``, another has lower values in that family (a higher echo at the same time
    point, a later time point of the same echo).

    Args:
        splits: each stack's (attribute, value) pairs (:func:`split_by_dimension`).
        families: the families (:data:`FAMILIES`) set to ``first``.
    """
    chosen = set(families)

    def within(split: Dims, family: str) -> tuple[tuple[int, tuple[float, ...], str], ...]:
        return tuple(value_order(v) for a, v in split if family_of(a) == family)

    def outside(split: Dims, family: str) -> Dims:
        return tuple((a, v) for a, v in split if family_of(a) != family)

    keep = []
    for split in splits:
        ok = True
        for family in chosen:
            peers = [
                within(p, family) for p in splits if outside(p, family) == outside(split, family)
            ]
            ok = ok and within(split, family) == min(peers)
        keep.append(ok)
    return keep
