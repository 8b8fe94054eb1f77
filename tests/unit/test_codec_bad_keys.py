"""A stored state with one bad key: the error names the key, and a lenient load keeps the rest."""

from __future__ import annotations

import pytest

from broker.codec import WireCodec
from broker.crdt import ORMap
from broker.crdt._stores import CounterStore, MapStore
from broker.errors import MalformedMessageError

CODEC = WireCodec()


def _state_with_bad_key(nested: bool = False) -> ORMap:
    a = ORMap()
    for k in "abc":
        a.merge(a.increment("r1", (k,), 1))
    a.merge(a.increment("r1", ("n", "x"), 1))
    # What the counter defect used to leave: two entries of one replica.
    bad = CounterStore(("r1", 2, 1, 0, "r1", 9, 5, 0))
    if nested:
        assert isinstance(a.store, MapStore)
        a.store["n"] = MapStore({"x": bad})
    else:
        a.store["b"] = bad
    return a


def test_the_error_names_the_key_at_fault() -> None:
    data = CODEC.encode_document(_state_with_bad_key())
    with pytest.raises(MalformedMessageError, match=r"under key 'b': a counter holds two"):
        CODEC.decode_document(data, ORMap)


def test_the_error_names_the_path_at_fault() -> None:
    data = CODEC.encode_document(_state_with_bad_key(nested=True))
    with pytest.raises(MalformedMessageError, match=r"under key 'n': under key 'x': "):
        CODEC.decode_document(data, ORMap)


@pytest.mark.parametrize("nested", [False, True])
def test_lenient_decode_skips_and_reports_only_the_bad_key(nested: bool) -> None:
    data = CODEC.encode_document(_state_with_bad_key(nested))
    bad: list[tuple[str, str]] = []
    doc = CODEC.decode_document(data, ORMap, bad_keys=bad)
    assert [k for k, _ in bad] == (["n"] if nested else ["b"])
    expect = {"a": 1, "b": 1, "c": 1, "n": {"x": 1}}
    del expect[bad[0][0]]
    assert doc.value() == expect


def test_lenient_decode_of_a_good_state_reports_nothing() -> None:
    a = ORMap()
    a.merge(a.increment("r1", ("a",), 2))
    bad: list[tuple[str, str]] = []
    assert CODEC.decode_document(CODEC.encode_document(a), ORMap, bad_keys=bad) == a
    assert bad == []
