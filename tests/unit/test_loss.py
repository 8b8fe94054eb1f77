"""Lost deltas: what a replica shows when some deltas never arrive.

A lost delta is the normal case worknode exists for. Deltas carry exact causal contexts (the
dots they touch), not version vectors, so a delta that follows a lost one cannot say what the
lost one removed. What the core guarantees without any help (no catch-up, no healer):

- registers and counters: a replica shows the value its writer had after the last delta it
  received from that writer (never a value no replica had: a counter never counts its writer
  twice);
- every state, whatever was lost, is one the codec round-trips and the join's laws still
  hold on (so catch-up and healing can repair it);
- replicas that received the same deltas, in any order and with duplicates, are equal when
  none was lost; after a loss, deltas joined out of causal order may leave them different;
- once a full state arrives (catch-up, heal), every kind shows exactly the writer's value.

Removals (set remove, flag disable, map remove) issue no dot, so a lost removal is repaired by
catch-up (sequence gaps) or the healer, not by the join; the replication machine also holds
back deltas whose context claims dots the receiver never saw.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from broker.codec import WireCodec
from broker.crdt import ORMap

CODEC = WireCodec()


def roundtrip(doc: ORMap) -> ORMap:
    out = CODEC.decode_document(CODEC.encode_document(doc), ORMap)
    assert isinstance(out, ORMap)
    return out


def test_the_issue_snippet_counts_three_and_round_trips() -> None:
    a, b = ORMap(), ORMap()
    d1 = a.increment("r1", ("v",), 1)
    a.merge(d1)
    b.merge(d1)
    a.merge(a.increment("r1", ("v",), 1))  # lost on its way to b
    d3 = a.increment("r1", ("v",), 1)
    a.merge(d3)
    b.merge(d3)
    assert b.value() == {"v": 3}
    again = roundtrip(b)
    assert again.value() == {"v": 3}
    assert again.digest() == b.digest()


def test_late_delta_after_the_newer_one_changes_nothing() -> None:
    a, b = ORMap(), ORMap()
    ds = []
    for _ in range(3):
        d = a.increment("r1", ("v",), 5)
        a.merge(d)
        ds.append(d)
    b.merge(ds[0])
    b.merge(ds[2])
    b.merge(ds[1])  # late
    assert b.value() == a.value() == {"v": 15}
    assert b.digest() == a.digest()


# -- one writer, random loss -----------------------------------------------------------------

PATHS = (("c",), ("r",), ("m",), ("s",), ("f",), ("n", "c"), ("n", "r"))

# Each op: (name, path index, argument). Kinds: c = counter, r = LWW, m = MV, s = set,
# f = flag; ("n", ...) nests a counter and a register one level down.
ops = st.one_of(
    st.tuples(st.just("inc"), st.sampled_from([0, 5]), st.integers(-3, 3)),
    st.tuples(st.just("assign"), st.sampled_from([1, 6]), st.integers(0, 9)),
    st.tuples(st.just("mv"), st.just(2), st.integers(0, 9)),
    st.tuples(st.just("add"), st.just(3), st.integers(0, 3)),
    st.tuples(st.just("discard"), st.just(3), st.integers(0, 3)),
    st.tuples(st.just("enable"), st.just(4), st.just(0)),
    st.tuples(st.just("disable"), st.just(4), st.just(0)),
    st.tuples(st.just("remove"), st.sampled_from([0, 1, 3]), st.just(0)),
)


def apply_op(doc: ORMap, rid: str, op: tuple[str, int, int], ts: int) -> ORMap:
    name, i, arg = op
    path = PATHS[i]
    if name == "inc":
        return doc.increment(rid, path, arg)
    if name == "assign":
        return doc.assign(rid, path, arg, ts)
    if name == "mv":
        return doc.assign_multi(rid, path, arg)
    if name == "add":
        return doc.add(rid, path, arg)
    if name == "discard":
        return doc.discard(rid, path, arg)
    if name == "enable":
        return doc.enable(rid, path)
    if name == "disable":
        return doc.disable(path)
    return doc.remove(path)


REGISTER_LIKE = ("inc", "assign", "mv")


def leaf(value: dict[str, Any], path: tuple[str, ...]) -> Any:
    cur: Any = value
    for k in path:
        if not isinstance(cur, dict) or k not in cur:
            return None
        cur = cur[k]
    return cur


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(ops, st.booleans()), max_size=40),
    st.randoms(use_true_random=False),
)
def test_single_writer_with_loss(history: list[tuple[Any, bool]], rnd: Any) -> None:
    """One writer, each delta lost or not; receivers in and out of order, with duplicates."""
    a = ORMap()
    delivered: list[ORMap] = []
    # Per path: the writer's value after each of its deltas that touched it was delivered,
    # for paths only ever touched by register-like ops.
    expect: dict[tuple[str, ...], Any] = {}
    touched_by_other: set[tuple[str, ...]] = set()
    b = ORMap()
    for ts, (op, lost) in enumerate(history, start=1):
        d = apply_op(a, "w", op, ts)
        a.merge(d)
        path = PATHS[op[1]]
        if op[0] not in REGISTER_LIKE:
            touched_by_other.add(path)
        if lost:
            continue
        delivered.append(d)
        b.merge(d)
        if op[0] in REGISTER_LIKE:
            expect[path] = leaf(a.value(), path)
        # Every state a receiver passes through round-trips through the codec.
        assert roundtrip(b).digest() == b.digest()
    shown = b.value()
    for path, value in expect.items():
        if path not in touched_by_other and path[:1] not in {p[:1] for p in touched_by_other}:
            assert leaf(shown, path) == value, (path, shown, a.value())
    # Another receiver of the same deltas in another order, with duplicates.
    c = ORMap()
    shuffled = delivered + delivered[: len(delivered) // 2]
    rnd.shuffle(shuffled)
    for d in shuffled:
        c.merge(d)
        assert roundtrip(c).digest() == c.digest()
    if len(delivered) == len(history):  # nothing lost: order and duplicates do not matter
        assert c.digest() == b.digest()
        assert c.value() == b.value()
    # A full state repairs everything: every receiver then shows exactly the writer's value.
    for r in (b, c):
        r.merge(roundtrip(a))
        assert r.value() == a.value()
        assert r.digest() == a.digest()


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 2), st.integers(-4, 4), st.lists(st.booleans(), min_size=3,
                                                                  max_size=3)),
        max_size=40,
    ),
    st.randoms(use_true_random=False),
)
def test_counter_with_loss_matches_a_model(
    history: list[tuple[int, int, list[bool]]], rnd: Any
) -> None:
    """Three writers increment one counter; each delta reaches each replica or is lost.

    Model (independent of the join): a counter shows the sum, over writers, of each writer's
    own running total at the last of its deltas the replica received (or wrote itself).
    """
    rids = ("w0", "w1", "w2")
    docs = [ORMap() for _ in rids]
    totals = [0, 0, 0]  # each writer's own running total
    seen: list[list[int]] = [[0, 0, 0] for _ in rids]  # seen[replica][writer]
    for who, amount, reach in history:
        d = docs[who].increment(rids[who], ("v",), amount)
        docs[who].merge(d)
        totals[who] += amount
        seen[who][who] = totals[who]
        for r in range(3):
            if r != who and reach[r]:
                docs[r].merge(d)
                seen[r][who] = totals[who]
    for r in range(3):
        assert docs[r].value().get("v", 0) == sum(seen[r]), (r, docs[r].value(), seen[r])
        assert roundtrip(docs[r]).value() == docs[r].value()
    # Full-state exchange in a random order converges on the sum of every increment.
    order = [0, 1, 2] * 2
    rnd.shuffle(order)
    for r in order:
        for other in range(3):
            docs[other].merge(docs[r])
    for r in range(3):
        for other in range(3):
            docs[r].merge(docs[other])
    for r in range(3):
        assert docs[r].value().get("v", 0) == sum(totals)


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_laws_hold_on_states_left_by_loss(data: st.DataObject) -> None:
    """Join stays commutative, associative and idempotent on states built from arbitrary
    subsets of two writers' deltas (the states loss leaves behind)."""
    docs = [ORMap(), ORMap()]
    deltas: list[ORMap] = []
    for ts in range(1, data.draw(st.integers(0, 25)) + 1):
        w = data.draw(st.integers(0, 1))
        op = data.draw(ops)
        d = apply_op(docs[w], f"w{w}", op, ts)
        docs[w].merge(d)
        deltas.append(d)
        if data.draw(st.booleans()):
            docs[1 - w].merge(d)

    def partial() -> ORMap:
        s = ORMap()
        for d in deltas:
            if data.draw(st.booleans()):
                s.merge(d)
        return s

    x, y, z = partial(), partial(), partial()
    assert x.join(y) == y.join(x)
    assert x.join(y).join(z) == x.join(y.join(z))
    assert x.join(x) == x
    assert x.join(y).join(y) == x.join(y)


def test_out_of_causal_order_after_a_loss_converges_once_a_full_state_arrives() -> None:
    """The limit of the one-entry-per-writer rule, stated as a test: it prunes a writer's
    earlier entry only while the later one is held. Deltas joined out of causal order after a
    loss (here: the later entry's removal before the earlier entry) can leave two receivers of
    the same deltas different until a full state arrives (catch-up, heal). The replication
    machine's causal gate never joins deltas out of causal order, so the rule never fires
    there; without the rule the same receivers would show a value their writer never had."""
    a = ORMap()
    ds = []
    for op in (("add", 3, 3), ("add", 3, 3), ("add", 3, 3), ("discard", 3, 3)):
        d = apply_op(a, "w", op, len(ds) + 1)
        a.merge(d)
        ds.append(d)
    first, _lost, third, discard = ds
    b, c = ORMap(), ORMap()
    for d in (first, third, discard):
        b.merge(d)
    for d in (discard, first, third):
        c.merge(d)
    assert b.value() == a.value() == {}
    assert c.value() == {"s": frozenset({3})}  # the writer's first add, not yet known dead
    for r in (b, c):
        r.merge(roundtrip(a))
        assert r.value() == a.value()
        assert r.digest() == a.digest()


def test_the_snippet_fails_without_the_rule(monkeypatch: Any) -> None:
    """Mutation check: with the one-entry-per-writer rule off, the defect is back and the
    tests above would catch it (so they cannot pass vacuously)."""
    from broker.crdt import _stores

    monkeypatch.setattr(_stores, "ONE_ENTRY_PER_WRITER", False)
    a, b = ORMap(), ORMap()
    d1 = a.increment("r1", ("v",), 1)
    a.merge(d1)
    b.merge(d1)
    a.merge(a.increment("r1", ("v",), 1))
    d3 = a.increment("r1", ("v",), 1)
    a.merge(d3)
    b.merge(d3)
    assert b.value() == {"v": 4}


def test_an_opaque_kind_and_the_known_kind_never_join_into_garbage() -> None:
    """A v1 reader keeps a flag as an opaque store; a flag written locally on such a node
    meets it at the same path: a clear error, and the state is left as it was."""
    from broker.errors import KindMismatchError

    s = ORMap()
    s.merge(s.enable("new", ("feature", "dark")))
    old = WireCodec(1).decode_document(WireCodec().encode_document(s))
    assert isinstance(old, ORMap)
    t = ORMap()
    t.merge(t.enable("x", ("feature", "dark")))
    for into, other in ((t.copy(), old), (old.copy(), t)):
        before = into.digest()
        try:
            into.merge(other)
        except KindMismatchError:
            pass
        else:
            raise AssertionError("joined a flag with an opaque kind-6 store")
        assert into.digest() == before
