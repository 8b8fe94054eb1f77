"""No tombstones: metadata is bounded by the number of replicas, not of operations."""

from __future__ import annotations

from broker.crdt import ORMap, ORSet


def _cycle_counts(cycles: int) -> tuple[int, int]:
    """Three replicas add and remove the same key and element ``cycles`` times each."""
    reps = [ORMap() for _ in range(3)]
    sets = [ORSet() for _ in range(3)]
    for c in range(cycles):
        i = c % 3
        rid = f"r{i}"
        ts = c + 1
        for d in (
            reps[i].assign(rid, ("k", "v"), c, ts),
            reps[i].increment(rid, ("k", "n"), 1),
        ):
            reps[i].merge(d)
            for r in reps:
                r.merge(d)
        d = reps[i].remove(("k",))
        for r in reps:
            r.merge(d)
        for d2 in (sets[i].add(rid, "e"), ):
            for s in sets:
                s.merge(d2)
        d3 = sets[i].remove("e")
        for s in sets:
            s.merge(d3)
    return reps[0].metadata_size(), sets[0].metadata_size()


def test_metadata_does_not_grow_with_add_remove_cycles() -> None:
    small = _cycle_counts(30)
    large = _cycle_counts(3_000)
    # After removal nothing is held but one version-vector entry per replica.
    assert small == large == (3, 3)


def test_metadata_with_live_key_is_bounded_by_replicas() -> None:
    reps = [ORMap() for _ in range(3)]
    for c in range(2_000):
        i = c % 3
        d = reps[i].assign(f"r{i}", ("k",), c, c + 1)
        for r in reps:
            r.merge(d)
    # One live dot for the register + one vector entry per replica.
    assert reps[0].metadata_size() == 1 + 3
    assert reps[0].context.cloud == frozenset()


def test_out_of_order_dots_compact_into_the_vector() -> None:
    src = ORMap()
    deltas = []
    for c in range(50):
        d = src.assign("r1", (f"k{c}",), c, c + 1)
        src.merge(d)
        deltas.append(d)
    dst = ORMap()
    for d in reversed(deltas):
        dst.merge(d)
    assert dst.context.cloud == frozenset()
    assert dst.context.version_vector == {"r1": 50}
    assert dst == src
