"""The phantom's structures and lesion kinds, checked on the phantom itself (no files).

Pixels and masks of the written cohort are checked in test_synth.py; here: which label a
voxel gets where structures overlap, how positive patients are split across lesion kinds,
and that kinds and structures are settings that fail loudly when misspelt.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from medimg.config import SynthParams, parse_params
from medimg.dicom.acquisition import plan_cohort
from medimg.dicom.phantom import (
    AIR,
    BONE,
    CYST,
    DISC,
    LESION,
    LIVER,
    LUNG,
    STRUCTURES,
    Lesion,
    Phantom,
    check_structures,
    label_map,
    make_phantom,
)
from medimg.errors import ConfigError

# The demo's shape for a three-class diagnosis: 40 patients, two thirds with lesions.
KINDS = SynthParams(n_patients=40, positive_fraction=0.66, lesion_kinds=("cyst", "solid"))


def _grid(step_mm: float = 4.0) -> np.ndarray:
    """LPS points (3, z, y, x) every ``step_mm`` over a box holding the whole body."""
    z, y, x = np.meshgrid(
        np.arange(-120.0, 120.0, step_mm),
        np.arange(-130.0, 130.0, step_mm),
        np.arange(-180.0, 180.0, step_mm),
        indexing="ij",
    )
    return np.stack([x, y, z])


def _phantom_with_liver_lesion(kind: str) -> Phantom:
    """A phantom whose one lesion (radius 15 mm) lies well inside the liver."""
    a, b = 150.0, 100.0
    lesion = Lesion(
        centre=np.array([-0.35 * a, -0.05 * b, -45.0]),  # the liver's centre
        axes=np.full(3, 15.0),
        rotation=np.eye(3),
        texture_freq=np.array([0.1, 0.05, 0.02]),
        texture_phase=0.0,
        kind=kind,  # type: ignore[arg-type]
    )
    return Phantom(centre=np.zeros(3), a=a, b=b, fat=12.0, lesions=(lesion,))


def test_label_map_follows_the_anatomy_and_later_structures_win() -> None:
    """Each structure gets its value where its tissue is; a lesion inside the liver is
    lesion, the body label fills the skin around every organ."""
    phantom = _phantom_with_liver_lesion("solid")
    p = _grid()
    anatomy = phantom.anatomy(p)
    code, _ = phantom.tissue(p, anatomy)
    labels = label_map(anatomy, code, STRUCTURES)
    body, lung, liver, spine, lesion = range(1, 6)
    assert set(np.unique(labels)) == {0, body, lung, liver, spine, lesion}
    assert np.array_equal(labels > 0, anatomy != AIR)  # body is everything inside the skin
    assert np.array_equal(labels == lesion, code == LESION)
    assert np.array_equal(labels == liver, (anatomy == LIVER) & (code != LESION))
    assert np.array_equal(labels == lung, anatomy == LUNG)
    column = (anatomy == BONE) | (anatomy == DISC)  # the vertebrae and the discs between
    assert np.array_equal(labels == spine, column)
    assert (anatomy == DISC).any() and (anatomy == BONE).sum() > 3 * (anatomy == DISC).sum()
    inside = (anatomy == LIVER) & (code == LESION)
    assert inside.sum() > 100  # the lesion does lie in the liver
    assert (labels[inside] == lesion).all()


def test_the_order_of_structures_decides_overlaps() -> None:
    """Listed before the liver, the lesion is covered by it: liver includes its lesions."""
    phantom = _phantom_with_liver_lesion("cyst")
    p = _grid()
    anatomy = phantom.anatomy(p)
    code, _ = phantom.tissue(p, anatomy)
    labels = label_map(anatomy, code, ("lesion", "liver"))
    assert np.array_equal(labels == 2, anatomy == LIVER)
    assert not (labels == 1).any()  # the whole lesion lies in the liver
    only_lesion = label_map(anatomy, code, ("lesion",))
    assert np.array_equal(only_lesion, (code == CYST).astype(np.uint8))
    assert only_lesion.sum() > 100


def test_cysts_are_homogeneous_and_solid_lesions_textured() -> None:
    """The texture (HU offsets) is zero in a cyst and swings about +-25 HU in a solid
    lesion of the same place and size."""
    p = _grid(2.0)
    textures = {}
    for kind in ("cyst", "solid"):
        code, texture = _phantom_with_liver_lesion(kind).tissue(p)
        lesion = code == (CYST if kind == "cyst" else LESION)
        assert lesion.sum() > 1000
        textures[kind] = texture[lesion]
    assert np.abs(textures["cyst"]).max() == 0.0
    assert textures["solid"].std() > 10.0
    assert np.abs(textures["solid"]).max() <= 25.0


def test_unknown_structures_are_a_config_error_naming_them_and_the_known_ones() -> None:
    with pytest.raises(ConfigError) as e:
        check_structures(("body", "kidney"))
    assert "kidney" in str(e.value)
    assert all(name in str(e.value) for name in STRUCTURES)
    with pytest.raises(ConfigError, match="distinct"):
        check_structures(("lesion", "lesion"))
    check_structures(STRUCTURES)  # every known one, once each, is fine


def test_positive_patients_are_split_evenly_across_kinds() -> None:
    """The demo's 40 patients give none / cyst / solid as 14 / 13 / 13, one kind per
    patient, the same for the same seed and shuffled by another."""
    phantoms, positive, _ = plan_cohort(KINDS)
    kinds = [p.lesion_kind for p in phantoms]
    assert Counter(kinds) == {"none": 14, "cyst": 13, "solid": 13}
    assert [k != "none" for k in kinds] == positive
    for p in phantoms:
        assert len({les.kind for les in p.lesions}) <= 1
    again = [p.lesion_kind for p in plan_cohort(KINDS)[0]]
    assert again == kinds
    other = [p.lesion_kind for p in plan_cohort(KINDS.model_copy(update={"seed": 1}))[0]]
    assert Counter(other) == Counter(kinds)
    assert other != kinds


def test_kinds_leave_the_anatomy_and_lesion_positions_as_they_were() -> None:
    """Only what a lesion is changes with its kind, not where it is: the cohort planned
    with solid lesions only (the default) has the same bodies, series and lesion centres."""
    with_kinds, pos_kinds, plans_kinds = plan_cohort(KINDS)
    solid, pos_solid, plans_solid = plan_cohort(
        KINDS.model_copy(update={"lesion_kinds": ("solid",)})
    )
    assert pos_kinds == pos_solid
    assert [p.series_index for p in plans_kinds] == [p.series_index for p in plans_solid]
    for a, b in zip(with_kinds, solid, strict=True):
        assert (a.a, a.b, a.fat) == (b.a, b.b, b.fat)
        assert len(a.lesions) == len(b.lesions)
        for la, lb in zip(a.lesions, b.lesions, strict=True):
            np.testing.assert_array_equal(la.centre, lb.centre)
    assert {p.lesion_kind for p in solid} == {"none", "solid"}


def test_cysts_are_rounder_than_solid_lesions() -> None:
    """From the same draws a cyst keeps the mean size with less spread of its semi-axes."""
    cfg = KINDS.model_copy(update={"lesions_per_positive": (3, 3)})
    cyst = make_phantom(cfg, np.random.default_rng(3), True, "cyst")
    solid = make_phantom(cfg, np.random.default_rng(3), True, "solid")
    for c, s in zip(cyst.lesions, solid.lesions, strict=True):
        assert c.axes.mean() == pytest.approx(s.axes.mean())
        assert np.ptp(c.axes) == pytest.approx(0.3 * np.ptp(s.axes))
        assert np.ptp(s.axes) > 0


def test_lesion_kinds_and_labels_are_checked_settings() -> None:
    ok = parse_params({"synth": {"lesion_kinds": ["cyst", "solid"], "labels": "kind"}})
    assert ok.synth.lesion_kinds == ("cyst", "solid")
    for bad, key in (
        ({"lesion_kinds": ["cyst", "cyst"]}, "twice"),
        ({"lesion_kinds": ["benign"]}, "synth.lesion_kinds"),
        ({"lesion_kinds": []}, "synth.lesion_kinds"),
        ({"labels": "grade"}, "synth.labels"),
    ):
        with pytest.raises(ConfigError, match=key):
            parse_params({"synth": bad}, "params.yaml")
