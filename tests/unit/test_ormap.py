"""Observed-remove semantics, kind conflicts and delta markers of the nested OR-map."""

from __future__ import annotations

import pytest

from broker.crdt import Kind, KindConflict, ORMap, ORSet, PNCounter


def sync(*replicas: ORMap) -> None:
    """Full-state exchange: every replica ends with the join of all."""
    total = replicas[0].copy()
    for r in replicas[1:]:
        total.merge(r)
    for r in replicas:
        r.merge(total)


def test_remove_keeps_concurrent_update_in_nested_map() -> None:
    a, b = ORMap(), ORMap()
    d = a.assign("r1", ("user", "name"), "ada", 1)
    a.merge(d)
    b.merge(d)
    rm = a.remove(("user",))
    up = b.assign("r2", ("user", "email"), "ada@example.org", 2)
    a.merge(rm)
    b.merge(up)
    a.merge(up)
    b.merge(rm)
    assert a == b
    assert a.value() == {"user": {"email": "ada@example.org"}}


def test_remove_then_write_batch_removes_unwritten_siblings() -> None:
    """A batch of (remove m, write m.q) must still remove m.p on the receiver."""
    a = ORMap()
    a.merge(a.assign("r1", ("m", "p"), 1, 1))
    receiver = a.copy()
    batch = ORMap(is_delta=True)
    for d in (a.remove(("m",)),):
        a.merge(d)
        batch.merge(d)
    d = a.assign("r1", ("m", "q"), 2, 2)
    a.merge(d)
    batch.merge(d)
    receiver.merge(batch)
    assert receiver.value() == {"m": {"q": 2}} == a.value()
    assert receiver == a


def test_kind_conflict_keeps_both_kinds() -> None:
    a, b = ORMap(), ORMap()
    a.merge(a.assign("r1", ("x",), "text", 1))
    b.merge(b.increment("r2", ("x",), 3))
    sync(a, b)
    assert a.value() == {"x": KindConflict({Kind.LWW: "text", Kind.COUNTER: 3})}
    assert a.get(("x",), Kind.COUNTER) == 3
    assert a.get(("x",), Kind.LWW) == "text"
    assert a == b


def test_full_join_filters_a_kind_the_other_side_removed() -> None:
    """b saw {LWW, COUNTER} at x, removed x, then wrote LWW at x; a still holds both."""
    a, b = ORMap(), ORMap()
    a.merge(a.assign("r1", ("x",), "text", 1))
    a.merge(a.increment("r1", ("x",), 3))
    b.merge(a)
    b.merge(b.remove(("x",)))
    b.merge(b.assign("r2", ("x",), "new", 5))
    joined = a.join(b)
    assert joined.value() == {"x": "new"}
    assert joined == b.join(a)


def test_counter_reset_by_remove_keeps_concurrent_increment() -> None:
    a, b = ORMap(), ORMap()
    a.merge(a.increment("r1", ("hits",), 5))
    b.merge(a)
    rm = a.remove(("hits",))
    inc = b.increment("r2", ("hits",), 2)
    a.merge(rm)
    b.merge(inc)
    sync(a, b)
    assert a.value() == {"hits": 2}


def test_set_remove_is_observed_remove_and_add_wins() -> None:
    a, b = ORSet(), ORSet()
    a.merge(a.add("r1", "x"))
    b.merge(a)
    rm = b.remove("x")
    add = a.add("r1", "x")  # concurrent re-add
    b.merge(rm)
    a.merge(add)
    a.merge(rm)
    b.merge(add)
    assert "x" in a
    assert a == b


def test_clear_removes_observed_only() -> None:
    a, b = ORMap(), ORMap()
    a.merge(a.assign("r1", ("k",), 1, 1))
    b.merge(a)
    clear = a.clear()
    late = b.assign("r2", ("j",), 2, 2)
    a.merge(clear)
    b.merge(late)
    a.merge(late)
    b.merge(clear)
    assert a.value() == b.value() == {"j": 2}


def test_nested_kinds_at_depth() -> None:
    m = ORMap()
    m.merge(m.add("r1", ("a", "b", "tags"), "red"))
    m.merge(m.add("r1", ("a", "b", "tags"), 7))
    m.merge(m.discard("r1", ("a", "b", "tags"), "red"))
    m.merge(m.assign_multi("r1", ("a", "mv"), b"\x00"))
    m.merge(m.increment("r1", ("a", "b", "n"), -4))
    assert m.value() == {"a": {"b": {"tags": frozenset({7}), "n": -4}, "mv": (b"\x00",)}}


def test_multi_value_register_keeps_concurrent_values() -> None:
    a, b = ORMap(), ORMap()
    da = a.assign_multi("r1", ("v",), "x")
    db = b.assign_multi("r2", ("v",), "y")
    a.merge(da)
    b.merge(db)
    sync(a, b)
    assert a.get(("v",)) == ("x", "y")
    a.merge(a.assign_multi("r1", ("v",), "z"))
    sync(a, b)
    assert b.get(("v",)) == ("z",)


def test_lww_ties_broken_by_replica_id() -> None:
    a, b = ORMap(), ORMap()
    da = a.assign("r1", ("k",), "from-r1", 100)
    db = b.assign("r2", ("k",), "from-r2", 100)
    a.merge(da)
    b.merge(db)
    sync(a, b)
    assert a.get(("k",)) == b.get(("k",)) == "from-r2"


def test_merge_of_a_different_kind_is_refused() -> None:
    from broker.errors import KindMismatchError

    with pytest.raises(KindMismatchError):
        ORMap().merge(PNCounter())  # type: ignore[arg-type]
