"""Segmentation targets in params: a structure's name, its codes, its synonyms.

Kept beside :mod:`medimg.config` (which re-exports them) so that each file stays small.
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CodeParams(_Strict):
    """A coded concept, as a DICOM code sequence item holds it (SNOMED CT by default)."""

    value: str = Field(min_length=1, max_length=64)  # CodeValue, e.g. 10200004
    meaning: str = Field(min_length=1, max_length=64)  # CodeMeaning, e.g. Liver
    scheme: str = Field("SCT", min_length=1)  # CodingSchemeDesignator


class StructureParams(_Strict):
    """One segmentation target: its name, the codes a DICOM SEG needs, its synonyms."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")  # segment label and
    # the suffix of a per-structure NIfTI mask (<SeriesInstanceUID>_<name>.nii.gz)
    category: CodeParams  # SegmentedPropertyCategoryCode (SNOMED CT), e.g. Anatomical Structure
    type: CodeParams  # SegmentedPropertyTypeCode (SNOMED CT), e.g. Liver
    synonyms: tuple[str, ...] = ()  # other ROI / segment names in annotations that mean
    # this structure; matched ignoring case, spaces, '-' and '_' (Liver, LIVER_1, liver)


LESION = StructureParams(
    name="lesion",
    category=CodeParams(value="49755003", meaning="Morphologically Abnormal Structure"),
    type=CodeParams(value="52988006", meaning="Lesion"),
    synonyms=("tumor", "tumour", "mass", "gtv"),
)


def structure_key(name: str) -> str:
    """How structure names compare: case, spaces, '-', '_' and a trailing number ignored."""
    key = re.sub(r"[\s_\-]+", "", name.casefold())
    return re.sub(r"\d+$", "", key) or key


def check_structures(value: tuple[StructureParams, ...]) -> tuple[StructureParams, ...]:
    """``structures`` as params give them, or a ValueError: none, too many for a uint8
    label map, or one name (or synonym) meaning two structures."""
    if not value or len(value) > 254:
        raise ValueError("needs between 1 and 254 structures")
    seen: dict[str, str] = {}
    for s in value:
        for alias in (s.name, *s.synonyms):
            key = structure_key(alias)
            if key in seen and seen[key] != s.name:
                raise ValueError(f"{alias!r} would name both {seen[key]!r} and {s.name!r}")
            seen[key] = s.name
    return value


def structure_label(structures: tuple[StructureParams, ...], name: str) -> int | None:
    """The label-map value (1..K) of the structure an annotation's ``name`` means, or None
    when no structure or synonym matches."""
    key = structure_key(name)
    for i, s in enumerate(structures, start=1):
        if key in {structure_key(a) for a in (s.name, *s.synonyms)}:
            return i
    return None
