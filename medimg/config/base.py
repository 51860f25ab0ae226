"""The building blocks of every params section: the strict base model and the value types."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Orientation = Literal["axial", "coronal", "sagittal", "oblique"]
Range = tuple[float, float]
IntRange = tuple[int, int]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


class StrictModel(BaseModel):
    """Base: unknown keys are errors, values are immutable once loaded."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def ordered(rng: tuple[Any, Any], name: str) -> None:
    """Raise a ValueError naming ``name`` unless ``rng`` is [low, high]."""
    if rng[0] > rng[1]:
        raise ValueError(f"{name} must be [low, high] with low <= high, got {list(rng)}")
