"""Patient-level splits: property tests over random cohorts."""

from __future__ import annotations

import hypothesis.strategies as st
from hypothesis import given, settings

from medimg.config import SplitParams
from medimg.data.split import TEST, assign, assign_all

patients = st.dictionaries(
    st.text(alphabet="0123456789abcdef", min_size=4, max_size=16),
    st.integers(min_value=0, max_value=1),
    min_size=1,
    max_size=200,
)


@settings(max_examples=200, deadline=None)
@given(cohort=patients, more=patients, folds=st.integers(2, 10), test=st.floats(0.0, 0.5))
def test_splits_never_leak_and_are_stable(
    cohort: dict[str, int], more: dict[str, int], folds: int, test: float
) -> None:
    cfg = SplitParams(n_folds=folds, test_fraction=test)
    before = assign_all(cohort, cfg)
    # one split per patient, a valid name
    assert set(before) == set(cohort)
    assert set(before.values()) <= {TEST, *map(str, range(folds))}
    # series rows of one patient all get the patient's split
    rows = [(p, i) for p in cohort for i in range(3)]
    assert all(assign(p, cfg) == before[p] for p, _ in rows)
    # adding patients never moves an existing one
    after = assign_all({**more, **cohort}, cfg)
    assert all(after[p] == before[p] for p in cohort)


def test_proportions_and_salt() -> None:
    cohort = {f"{i:08x}": i % 2 for i in range(4000)}
    cfg = SplitParams(n_folds=5, test_fraction=0.2)
    splits = assign_all(cohort, cfg)
    counts = {s: sum(v == s for v in splits.values()) for s in {TEST, "0", "1", "2", "3", "4"}}
    assert abs(counts[TEST] / 4000 - 0.2) < 0.03
    assert all(abs(counts[str(f)] / 4000 - 0.16) < 0.03 for f in range(5))
    for label in (0, 1):  # stratified in expectation: each class spread alike
        share = sum(splits[p] == TEST for p, y in cohort.items() if y == label) / 2000
        assert abs(share - 0.2) < 0.04
    other = assign_all(cohort, SplitParams(salt="another"))
    assert sum(other[p] != splits[p] for p in cohort) > 2000
