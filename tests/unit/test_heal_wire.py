"""The packed forms of the healing protocol: prefixes as node indices, leaf items with and
without keys; malformed input is refused."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.errors import InvalidArgumentError, MalformedMessageError
from broker.healing import pack_leaf_items, pack_prefixes, unpack_leaf_items, unpack_prefixes


@given(st.sampled_from([(16, 4), (4, 3), (2, 5), (256, 2)]), st.data())
def test_prefixes_round_trip(shape: tuple[int, int], data: st.DataObject) -> None:
    fanout, depth = shape
    bits = fanout.bit_length() - 1
    level = data.draw(st.integers(1, depth))
    digits = st.tuples(*[st.integers(0, fanout - 1)] * level)
    prefixes = data.draw(st.lists(digits, max_size=30))
    got_level, raw = pack_prefixes(prefixes, bits)
    if prefixes:
        assert got_level == level
        assert len(raw) == len(prefixes) * max(1, (level * bits + 7) // 8)
        assert unpack_prefixes(level, raw, bits, depth) == prefixes
    else:
        assert (got_level, raw) == (0, b"")


def test_bad_packed_prefixes_are_refused() -> None:
    with pytest.raises(InvalidArgumentError):
        pack_prefixes([(1,), (1, 2)], 4)
    for level, raw in ((0, b"\x00"), (5, b"\x00\x00\x00"), (4, b"\x00"), (1, b"\x10")):
        with pytest.raises(MalformedMessageError):
            unpack_prefixes(level, raw, 4, 4)


@given(
    st.lists(
        st.lists(st.tuples(st.text(max_size=8), st.binary(min_size=32, max_size=32)), max_size=5),
        max_size=6,
    ),
    st.sampled_from([4, 6, 32]),
)
def test_leaf_items_round_trip(leaves: list[list[tuple[str, bytes]]], width: int) -> None:
    raw = pack_leaf_items(leaves, width)
    assert unpack_leaf_items(raw, len(leaves), width) == [
        [(k, d[-width:]) for k, d in items] for items in leaves
    ]


def test_bad_leaf_items_are_refused() -> None:
    good = pack_leaf_items([[("a", b"x" * 32)], []], 4)
    for raw, leaves in (
        (good[:-1], 2),
        (good + b"\x00", 2),
        (good, 3),
        (b"\x00\x00\x00\x01\x00\x01\xff" + b"d" * 4, 1),  # a key that is not UTF-8
    ):
        with pytest.raises(MalformedMessageError):
            unpack_leaf_items(raw, leaves, 4)
    assert list(itertools.chain(*unpack_leaf_items(good, 2, 4))) == [("a", b"x" * 4)]
