"""Digests depend on logical content only."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from broker.crdt import ORMap
from tests.unit.strategies import histories, run_history


@given(st.data())
def test_digest_is_independent_of_delivery_order(data: st.DataObject) -> None:
    _, deltas = run_history(ORMap, data.draw(histories(ORMap)))
    a, b = ORMap(), ORMap()
    for d in deltas:
        a.merge(d)
    for d in data.draw(st.permutations(deltas)):
        b.merge(d)
    assert a.digest() == b.digest()
    assert a.digest(key=b"cluster-secret") == b.digest(key=b"cluster-secret")


def test_digest_distinguishes_content_and_types() -> None:
    seen = set()
    for v in (1, "1", b"1", 1.0, True, None):
        m = ORMap()
        m.merge(m.assign("r1", ("k",), v, 1))
        seen.add(m.digest())
    assert len(seen) == 6


def test_digest_is_keyed() -> None:
    m = ORMap()
    m.merge(m.assign("r1", ("k",), 1, 1))
    assert m.digest() != m.digest(key=b"other")
    assert len(m.digest()) == 32


def test_digest_is_stable_across_releases() -> None:
    """Golden value: the digest function is part of the healing protocol; never change it
    silently (bump the personalisation and the wire version instead)."""
    m = ORMap()
    m.merge(m.assign("r1", ("profile", "name"), "ada", 42 << 16))
    m.merge(m.increment("r2", ("hits",), 3))
    m.merge(m.add("r1", ("tags",), "x"))
    assert m.digest().hex() == GOLDEN


GOLDEN = "65ddf745ab48fe6e087e1341af4632c36a94b2b22b9af08b74cf6c9f84cfaaf5"
