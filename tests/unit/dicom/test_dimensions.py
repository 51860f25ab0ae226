"""The rules that split a stack with repeated positions, on plain values."""

from __future__ import annotations

from medimg.dicom.dimensions import keep_first, split_by_dimension, value_order


def _groups(along: list[float], dims: list[dict[str, str]], ids: list[object] | None = None):
    ids = ids if ids is not None else list(range(len(along)))
    return [(split, idx) for split, idx in split_by_dimension(along, ids, dims)]


def test_positions_that_never_repeat_are_never_split() -> None:
    along = [0.0, 4.0, 8.0, 12.0]
    dims = [{"EchoNumbers": "1"}, {"EchoNumbers": "2"}, {"EchoNumbers": "1"}, {"EchoNumbers": "2"}]
    assert _groups(along, dims) == [((), [0, 1, 2, 3])]


def test_echoes_at_the_same_positions_split_in_value_order() -> None:
    along = [0.0, 4.0] * 3
    dims = [{"EchoNumbers": str(e), "EchoTime": str(5 * e)} for e in (10, 10, 2, 2, 1, 1)]
    assert _groups(along, dims) == [
        ((("EchoNumbers", "1"),), [4, 5]),
        ((("EchoNumbers", "2"),), [2, 3]),
        ((("EchoNumbers", "10"),), [0, 1]),  # numerically, not as text
    ]


def test_copies_of_one_instance_are_no_repeated_position() -> None:
    along = [0.0, 0.0, 4.0]
    dims = [{"AcquisitionNumber": "1"}, {"AcquisitionNumber": "1"}, {"AcquisitionNumber": "2"}]
    assert _groups(along, dims, ids=["a", "a", "b"]) == [((), [0, 1, 2])]


def test_values_unique_to_each_image_or_following_the_position_do_not_split() -> None:
    along = [0.0, 4.0, 8.0] * 2
    per_image = [{"TriggerTime": str(10 * n)} for n in range(6)]
    assert _groups(along, per_image) == [((), list(range(6)))]
    per_position = [{"AcquisitionNumber": str(n % 3)} for n in range(6)]  # re-sent copies
    assert _groups(along, per_position) == [((), list(range(6)))]


def test_a_later_attribute_splits_what_an_earlier_one_left_repeated() -> None:
    along = [0.0, 4.0] * 4
    dims = [
        {"EchoNumbers": str(e), "TriggerTime": str(t)}
        for e, t in ((1, 0), (1, 0), (2, 0), (2, 0), (1, 50), (1, 50), (2, 50), (2, 50))
    ]
    assert [split for split, _ in _groups(along, dims)] == [
        (("EchoNumbers", "1"), ("TriggerTime", "0")),
        (("EchoNumbers", "1"), ("TriggerTime", "50")),
        (("EchoNumbers", "2"), ("TriggerTime", "0")),
        (("EchoNumbers", "2"), ("TriggerTime", "50")),
    ]


def test_keep_first_within_one_family_only() -> None:
    splits = [
        (("EchoNumbers", e), ("TemporalPositionIdentifier", t))
        for e in ("1", "2")
        for t in ("1", "2", "3")
    ]
    echo = keep_first(splits, ["echo"])
    assert [s for s, k in zip(splits, echo, strict=True) if k] == splits[:3]
    both = keep_first(splits, ["echo", "temporal"])
    assert [s for s, k in zip(splits, both, strict=True) if k] == splits[:1]
    assert keep_first([()], ["echo"]) == [True]  # a stack that was never split


def test_value_order_puts_absent_first_and_numbers_numerically() -> None:
    assert sorted(["10", "", "2", "b"], key=value_order) == ["", "2", "10", "b"]
