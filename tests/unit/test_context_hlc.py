"""Causal contexts and the hybrid logical clock."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.crdt import CausalContext, HybridClock, hlc_logical, hlc_physical
from broker.errors import ClockSkewError

dots = st.tuples(st.sampled_from(["a", "b", "c"]), st.integers(1, 12))


@given(st.lists(dots), st.randoms())
def test_context_is_canonical_whatever_the_order(ds: list[tuple[str, int]], rnd) -> None:
    shuffled = list(ds)
    rnd.shuffle(shuffled)
    one, two = CausalContext(), CausalContext()
    for d in ds:
        one.add(d)
    for d in shuffled:
        two.add(d)
    assert one == two
    assert set(one.dots()) == set(ds)
    for r, n in ds:
        assert one.covers(r, n)
    # Compact: no cloud dot sits right after (or below) its vector entry.
    for r, n in one.cloud:
        assert n > one.version_vector.get(r, 0) + 1


@given(st.lists(dots), st.lists(dots))
def test_context_merge_is_union(xs: list[tuple[str, int]], ys: list[tuple[str, int]]) -> None:
    a, b = CausalContext.from_dots(xs), CausalContext.from_dots(ys)
    a.merge(b)
    assert set(a.dots()) == set(xs) | set(ys)
    assert a == CausalContext.from_dots(xs + ys)


@given(st.dictionaries(st.sampled_from(["a", "b", "c"]), st.integers(0, 6)), st.lists(dots))
def test_from_parts_builds_what_the_constructor_builds(
    vv: dict[str, int], ds: list[tuple[str, int]]
) -> None:
    # The decoders' grouped construction equals one add per dot (fails if from_parts skips
    # the compaction: a cloud dot next to or under the vector).
    cloud: dict[str, set[int]] = {}
    for r, n in ds:
        cloud.setdefault(r, set()).add(n)
    built = CausalContext.from_parts(dict(vv), cloud)
    expected = CausalContext(vv, ds)
    assert built == expected
    assert built._vv == expected._vv
    assert built._cloud == expected._cloud


def test_next_dot_follows_the_highest_seen() -> None:
    c = CausalContext({"a": 3}, [("a", 7)])
    assert c.next_dot("a") == ("a", 8)
    assert c.next_dot("b") == ("b", 1)


def test_hlc_is_monotonic_when_the_clock_goes_back() -> None:
    clock = HybridClock()
    t1 = clock.now(1_000)
    t2 = clock.now(900)  # wall clock stepped back
    t3 = clock.now(1_000)
    assert t1 < t2 < t3
    assert hlc_physical(t2) == 1_000
    assert hlc_logical(t3) == 2


def test_hlc_observe_moves_past_remote() -> None:
    clock = HybridClock()
    remote = (5_000 << 16) | 9
    t = clock.observe(remote, 4_990)
    assert t > remote
    assert clock.now(4_000) > t


def test_hlc_refuses_remote_too_far_ahead() -> None:
    clock = HybridClock(max_drift_ms=1_000)
    before = clock.now(10_000)
    with pytest.raises(ClockSkewError) as exc:
        clock.observe((20_000 << 16), 10_000)
    assert exc.value.retriable
    assert clock.last == before
