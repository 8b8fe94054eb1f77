"""Byzantine writers on the delta path (issue 17): a batch signed by ``r`` may hold only dots
of ``r``, and no dot or claim far beyond what its receiver has seen; a claim never backed is
held a bounded time, then rejected. Honest batches never trip the checks (property below).

Without the checks (``forged`` always None, no hold bound) the machine tests fail: the forged
attribution is joined as node a's write, the ``{a: 2**63 - 1}`` context lands in the
receiver's context (a's next dot would be 2**63: no codec, digest or Merkle leaf packs it), a
full state claiming every dot + 1000 wipes the receiver, and a held delta stays held forever.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.codec import WireCodec
from broker.crdt import Add, Assign, CausalContext, Create, Increment, Move, ORMap
from broker.crdt._atoms import INT64_MAX
from broker.errors import BoundsError, WorknodeError
from broker.replication import (
    MAX_COUNTER,
    MAX_DOT_GAP,
    Committed,
    DeltaReceived,
    Loaded,
    Publish,
    Published,
    ReplicationConfig,
    ReplicationMachine,
    Report,
    ScheduleTimer,
    SyncWanted,
    TimerFired,
    forged,
)

CODEC = WireCodec()


def _roundtrip(doc: ORMap) -> ORMap:
    out = CODEC.decode_document(CODEC.encode_document(doc), ORMap)
    assert isinstance(out, ORMap)
    return out


def _batch(m: ReplicationMachine, ops: list[Any], now: float = 0.0) -> Publish | None:
    w = m.write(ops, lambda: 1_000 + int(now * 1000))
    m.handle(Committed(now, w.delta, w.ops, 10, m.last_record_seq + 1))
    ps = [a for a in m.handle(SyncWanted(now)) if isinstance(a, Publish)]
    if not ps:
        return None
    m.handle(Published(now, ps[0].sequence, 10))
    return ps[0]


def _rejections(out: list[Any]) -> list[tuple[Any, ...]]:
    return [a.args for a in out if isinstance(a, Report) and a.event == "rejected"]


# -- the pure check ----------------------------------------------------------------------------

_NODES = ("n1", "n2", "n3")


def _op(kind: int, i: int) -> Any:
    nid = _NODES[i % 3]
    if kind == 0:
        return Create(nid)
    if kind == 1:
        return Assign(nid, ("x",), i)
    if kind == 2:
        return Increment(nid, ("c",), i - 3)
    if kind == 3:
        return Add(nid, ("s",), i % 4)
    if kind == 4:
        return Move(nid, _NODES[(i + 1) % 3])
    if kind == 5:
        return lambda t, r, ts: t.discard(r, nid, ("s",), i % 4)
    if kind == 6:
        return lambda t, r, ts: t.delete(nid)
    if kind == 7:
        return lambda t, r, ts: t.remove_field(nid, ("x",))
    return lambda t, r, ts: t.state.clear()  # a full state: removes every key seen


_steps = st.lists(
    st.tuples(st.sampled_from("abc"), st.lists(st.tuples(st.integers(0, 8), st.integers(0, 9)),
                                               min_size=1, max_size=4), st.booleans()),
    min_size=1, max_size=25,
)


@settings(max_examples=150, deadline=None)
@given(_steps)
def test_honest_batches_never_trip_the_checks(steps: list[Any]) -> None:
    """Three writers, every kind of write (removes, tree moves, a clear), each batch delivered
    to the others or lost: every batch is accepted (never ``forged``), whatever each receiver
    has seen."""
    ms = {n: ReplicationMachine(n, seed=1) for n in "abc"}
    now = 0.0
    for writer, ops, deliver in steps:
        now += 1.0
        m = ms[writer]
        for kind, i in ops:
            # A tree op on a missing node raises: that write is simply not part of the run.
            with contextlib.suppress(WorknodeError):
                w = m.write([_op(kind, i)], lambda: 1)
                m.handle(Committed(now, w.delta, w.ops, 10, m.last_record_seq + 1))
        p = _batch(m, [Create(f"k{int(now)}")], now)
        assert p is not None
        doc = _roundtrip(p.document)
        hlc = m.clock.now(1_000 + int(now * 1000))  # the envelope's, stamped as the driver seals
        for name, other in ms.items():
            if name == writer:
                continue
            assert forged(doc, writer, other.state.context, hlc=hlc) is None
            if deliver:
                out = other.handle(DeltaReceived(now, writer, p.sequence, doc, 10, hlc=hlc))
                assert not _rejections(out)


def test_a_dot_of_another_replica_is_a_forged_attribution() -> None:
    a, b = ORMap(), ORMap()
    da = a.assign("node-a", ("k",), "mine", 1)
    db = b.assign("node-b", ("j",), "theirs", 1)
    assert forged(da, "node-a", CausalContext()) is None
    assert forged(da, "node-b", CausalContext()) == "foreign_dot"  # a's dot signed by b
    batch = db.join(da)
    assert forged(batch, "node-b", CausalContext()) == "foreign_dot"
    # At any depth and in any kind: a nested set element, a counter.
    deep = ORMap().add("node-a", ("p", "q", "r"), "e")
    assert forged(deep, "node-b", CausalContext()) == "foreign_dot"
    assert forged(ORMap().increment("node-a", ("c",), 5), "node-b", CausalContext()) \
        == "foreign_dot"


@given(st.sampled_from(["node-a", "node-b", "node-c"]), st.integers(1, 2**63 - 1))
def test_a_counter_far_beyond_what_is_seen_is_out_of_range(replica: str, n: int) -> None:
    seen = CausalContext({"node-a": 10, "node-b": 10})
    claim = ORMap(None, CausalContext(cloud=[(replica, n)]), is_delta=True)
    bad = n > min(seen.max_counter(replica) + MAX_DOT_GAP, MAX_COUNTER)
    assert (forged(claim, "node-b", seen) == "dot_range") is bad


def test_the_brick_context_and_a_huge_own_dot_are_out_of_range() -> None:
    seen = CausalContext({"node-a": 5})
    brick = ORMap(None, CausalContext({"node-a": INT64_MAX}), is_delta=False)
    assert forged(brick, "node-b", seen) == "dot_range"
    own = ORMap(None, CausalContext(), is_delta=True)
    own.context.add(("node-b", 1))
    own = own.join(ORMap(None, CausalContext(cloud=[("node-b", MAX_DOT_GAP + 5)]),
                         is_delta=True))
    assert forged(own, "node-b", seen) == "dot_range"


def test_a_register_stamped_after_its_envelope_is_out_of_clock_range() -> None:
    d = ORMap().assign("node-b", ("k",), 1, 5_000)
    assert forged(d, "node-b", CausalContext(), hlc=5_001) is None
    assert forged(d, "node-b", CausalContext(), hlc=4_999) == "clock_range"
    nested = ORMap().assign("node-b", ("p", "q"), 1, INT64_MAX)
    assert forged(nested, "node-b", CausalContext(), hlc=10**12) == "clock_range"


# -- the machine -------------------------------------------------------------------------------


def _written(name: str, n: int) -> ReplicationMachine:
    m = ReplicationMachine(name, seed=1)
    for i in range(n):
        _batch(m, [Assign("o", ("k", str(i)), i)] if i else [Create("o")])
    return m


def test_a_forged_attribution_changes_nothing_and_names_its_signer() -> None:
    a, c = _written("node-a", 3), ReplicationMachine("node-c", seed=1)
    c.tree.merge(a.state.copy())
    before = c.state.digest()
    # node-a's next dot, claimed by node-b's key.
    forged_doc = a.state.assign("node-a", ("evil",), "x", 5)
    assert ("node-a", 4) in forged_doc.context
    out = c.handle(DeltaReceived(1.0, "node-b", 1, _roundtrip(forged_doc), 10))
    assert _rejections(out) == [("foreign_dot", "node-b")]
    assert c.state.digest() == before
    assert not c.held


def test_the_brick_context_never_reaches_the_receivers_context() -> None:
    c = _written("node-c", 2)
    brick = ORMap(None, CausalContext({"node-a": INT64_MAX}), is_delta=False)
    out = c.handle(DeltaReceived(1.0, "node-b", 1, _roundtrip(brick), 10))
    assert _rejections(out) == [("dot_range", "node-b")]
    assert c.state.context.max_counter("node-a") == 0
    # node-c's own writes still encode and publish.
    p = _batch(c, [Assign("o", ("after",), 1)], 2.0)
    assert p is not None
    _roundtrip(p.document)


def test_a_wipe_claiming_unseen_dots_is_held_then_rejected_not_applied() -> None:
    """A signed full state, empty store, context = every vector entry + 1000: held (its
    claims are backed by nothing), then rejected after ``max_hold``; nothing erased."""
    a = _written("node-a", 5)
    c = ReplicationMachine("node-c", ReplicationConfig(max_hold=5.0), seed=1)
    c.tree.merge(a.state.copy())
    before = c.state.value()
    vv = {r: n + 1000 for r, n in c.state.context.version_vector.items()}
    wipe = ORMap(None, CausalContext(vv), is_delta=False)
    out = c.handle(DeltaReceived(1.0, "node-b", 1, _roundtrip(wipe), 10))
    assert not _rejections(out)
    assert c.held == 1
    (timer,) = [a for a in out if isinstance(a, ScheduleTimer) and a.name == "hold"]
    assert timer.at == 6.0
    assert c.state.value() == before
    assert not _rejections(c.handle(TimerFired(5.5, "hold")))  # early: still held
    out = c.handle(TimerFired(6.0, "hold"))
    assert _rejections(out) == [("unbacked_context", "node-b")]
    assert c.held == 0
    assert c.state.value() == before


def test_a_held_honest_delta_drains_before_its_hold_ends() -> None:
    """The bound only ends holds that stay unbacked: a lost batch that arrives in time lets
    the later one drain, and the timer then finds nothing to reject."""
    a, c = ReplicationMachine("a", seed=1), ReplicationMachine("c", ReplicationConfig(
        max_hold=5.0), seed=1)
    p1 = _batch(a, [Create("k"), Increment("k", ("v",), 1)])
    p2 = _batch(a, [Increment("k", ("v",), 1)])
    p3 = _batch(a, [Increment("k", ("v",), 1)])
    assert p1 is not None
    assert p2 is not None
    assert p3 is not None
    for p in (p1, p3):
        c.handle(DeltaReceived(1.0, "a", p.sequence, _roundtrip(p.document), 10))
    assert c.held == 1
    c.handle(DeltaReceived(2.0, "a", p2.sequence, _roundtrip(p2.document), 10))
    assert c.held == 0
    assert not _rejections(c.handle(TimerFired(6.0, "hold")))
    assert c.state.value() == a.state.value()


def test_a_replica_whose_own_counter_reached_the_bound_refuses_writes_unchanged() -> None:
    """Defence in depth (a forged context that came by another path): a write refuses before
    issuing a dot past ``MAX_COUNTER``, instead of logging a record no load could read."""
    state = ORMap(None, CausalContext({"n": MAX_COUNTER}))
    m = ReplicationMachine("n", loaded=Loaded(state), seed=1)
    before = m.state.digest()
    with pytest.raises(BoundsError, match="nothing was written"):
        m.write([Create("o")], lambda: 1)
    assert m.state.digest() == before


def test_check_cost_per_batch_is_reported() -> None:
    """Not an assertion on time: prints the cost of ``forged`` on a 5,000-op batch (for the
    report; run with -s)."""
    m = ReplicationMachine("w", seed=1)
    ops: list[Any] = [Create("o")] + [Assign("o", ("k", str(i % 500)), i) for i in range(4999)]
    w = m.write(ops, lambda: 1)
    doc = _roundtrip(w.delta)
    seen = CausalContext({"w": 1})
    t0 = time.perf_counter()
    for _ in range(20):
        assert forged(doc, "w", seen) is None
    per = (time.perf_counter() - t0) / 20
    t0 = time.perf_counter()
    for _ in range(20):
        _roundtrip(doc)
    codec = (time.perf_counter() - t0) / 20
    print(f"forged() on a 5000-op batch: {per * 1e3:.2f} ms; encode+decode: {codec * 1e3:.2f} ms")
