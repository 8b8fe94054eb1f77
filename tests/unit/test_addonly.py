"""``removes`` is exact: it answers None if and only if joining the document into the state
keeps every dot the state holds, at the same place (the join itself is the oracle).

Random histories of three OR-map replicas give realistic deltas, batches (deltas joined into
deltas: ``Whole`` markers) and full states; forged contexts (a Byzantine writer's claims of
dots it does not carry) give the rest. ``test_mutation_*`` shows the exactness tests fail
for a ``removes`` that never finds anything.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import broker.replication._addonly as addonly
from broker.crdt import Add, CausalContext, ORMap
from broker.crdt._stores import KindStore, LWWStore, MapStore, SetStore, Whole
from broker.errors import InvalidArgumentError
from broker.replication import (
    CatchupReplied,
    DeltaReceived,
    Removal,
    ReplicationConfig,
    ReplicationMachine,
    Report,
    Started,
    removes,
)
from tests.unit.strategies import REPLICAS, histories, run_history

Place = tuple[Any, ...]


def held(entry: Any, path: Place = ()) -> Iterator[tuple[Place, tuple[str, int]]]:
    """Every (place, dot) a state holds: place = keys, kind, and the set element."""
    t = type(entry)
    if entry is None:
        return
    if t is Whole:
        yield from held(entry.store, path)
    elif t is MapStore:
        for k, v in entry.items():
            yield from held(v, (*path, k))
    elif t is KindStore:
        for v in entry.values():
            yield from held(v, path)
    elif t is SetStore:
        for e, ds in entry.items():
            for i in range(0, len(ds), 2):
                yield (*path, "set", e), (ds[i], ds[i + 1])
    else:
        for i in range(0, len(entry), entry.STRIDE):
            yield (*path, int(entry.KIND)), (entry[i], entry[i + 1])


def removed_by_join(delta: ORMap, state: ORMap) -> set[tuple[Place, tuple[str, int]]]:
    before = set(held(state.store))
    after = state.copy()
    after.merge(delta)
    return before - set(held(after.store))


def check_exact(delta: ORMap, state: ORMap) -> None:
    digest = state.digest()
    lost = removed_by_join(delta, state)
    hit = removes(delta, state)
    assert state.digest() == digest  # the check changes nothing
    if not lost:
        assert hit is None
    else:
        assert hit is not None
        assert hit.dot in {dot for _, dot in lost}


def forge(doc: ORMap, claims: list[tuple[str, int]]) -> ORMap:
    """``doc`` with a context also claiming ``claims`` (what a Byzantine writer may send)."""
    out = doc.copy()
    out.context.merge(CausalContext.from_dots(claims))
    return out


dots = st.tuples(st.sampled_from(REPLICAS), st.integers(1, 12))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(histories(ORMap, max_size=25), st.data())
def test_removes_is_exact_on_histories(history: Any, data: st.DataObject) -> None:
    """Every delta, batch of deltas and full state of a random history, joined into every
    replica's state: ``removes`` finds a removal exactly when the join drops a dot."""
    states, deltas = run_history(ORMap, history)
    docs: list[ORMap] = [d for d in deltas if isinstance(d, ORMap)]
    if len(docs) >= 2:
        i = data.draw(st.integers(0, len(docs) - 2))
        docs.append(docs[i].join(docs[i + 1]))  # a batch: delta into delta keeps markers
    docs += [s for s in states if isinstance(s, ORMap)]
    for doc in docs:
        for state in states:
            assert isinstance(state, ORMap)
            check_exact(doc, state)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(histories(ORMap, max_size=20), st.lists(dots, max_size=4), st.data())
def test_removes_is_exact_on_forged_contexts(
    history: Any, claims: list[tuple[str, int]], data: st.DataObject
) -> None:
    """A document whose context claims arbitrary dots beyond what it carries (a delta, an
    empty delta, a full state): ``removes`` still matches the join."""
    states, deltas = run_history(ORMap, history)
    candidates: list[ORMap] = [d for d in deltas if isinstance(d, ORMap)]
    candidates += [ORMap(is_delta=True), ORMap(is_delta=False)]
    candidates += [s for s in states if isinstance(s, ORMap)]
    doc = forge(data.draw(st.sampled_from(candidates)), claims)
    for state in states:
        assert isinstance(state, ORMap)
        check_exact(doc, state)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(REPLICAS), st.integers(0, 9)), max_size=12),
       st.sampled_from(REPLICAS), st.integers(0, 12))
def test_adds_of_new_elements_pass(adds: list[tuple[str, int]], writer: str, e: int) -> None:
    """The add-only subject's own write: adding an element the writer does not hold yet
    never removes anything, on any replica that holds a subset of what the writer saw."""
    states = {r: ORMap() for r in REPLICAS}
    for r, x in adds:
        if x not in (states[r].get(("ids",)) or frozenset()):
            d = states[r].add(r, ("ids",), x)
            states[r].merge(d)
            for other in REPLICAS:  # others receive it (or not: a partition)
                if (hash((r, x, other)) & 1) == 0:
                    states[other].merge(d)
    if e in (states[writer].get(("ids",)) or frozenset()):
        return
    delta = states[writer].add(writer, ("ids",), e)
    for state in states.values():
        assert removes(delta, state) is None
        check_exact(delta, state)


def revoked(*ids: str) -> ORMap:
    """A state holding ``ids`` in the set under ``revoked``, written by two nodes."""
    s = ORMap()
    for i, token in enumerate(ids):
        s.merge(s.add(REPLICAS[i % 2], ("revoked",), token))
    return s


def test_set_remove_is_a_removal() -> None:
    s = revoked("aa", "bb")
    hit = removes(s.discard("r3", ("revoked",), "aa"), s)
    assert hit == Removal(("revoked", "aa"), ("r1", 1))


def test_full_state_without_an_element_is_a_removal() -> None:
    """A full state that saw ``aa`` and holds only ``bb`` (a peer that removed ``aa``)."""
    s = revoked("aa", "bb")
    peer = s.copy()
    peer.merge(peer.discard("r1", ("revoked",), "aa"))
    assert not peer.is_delta
    hit = removes(peer, s)
    assert hit is not None
    assert hit.dot == ("r1", 1)
    assert removes(s, peer) is None  # the other way round it only adds


def test_clear_and_key_remove_are_removals() -> None:
    s = revoked("aa")
    assert removes(s.clear(), s) is not None
    assert removes(s.remove(("revoked",)), s) is not None
    empty = ORMap(is_delta=True, context=CausalContext({"r1": 1}))  # the "wipe" shape
    assert removes(empty, s) == Removal(("revoked", "aa"), ("r1", 1))


def test_overwrite_and_re_add_are_removals() -> None:
    """Dot-level on purpose: overwriting a register and adding an element again both
    replace a dot (module doc)."""
    s = ORMap()
    s.merge(s.assign("r1", ("name",), "ada", 1))
    s.merge(s.add("r1", ("revoked",), "aa"))
    assert removes(s.assign("r2", ("name",), "bob", 2), s) is not None
    assert removes(s.add("r2", ("revoked",), "aa"), s) == Removal(("revoked", "aa"), ("r1", 2))
    assert removes(s.add("r2", ("revoked",), "bb"), s) is None


def test_own_later_dot_replaces_without_a_claim() -> None:
    """A writer's later dot at the same place drops its earlier one (one entry per writer),
    with no claim in the context: still a removal."""
    s = ORMap()
    s.merge(s.assign("r1", ("name",), "ada", 1))
    later = ORMap(MapStore({"name": LWWStore(("r1", 7, 5, "eve"))}),
                  CausalContext.from_dots([("r1", 7)]), is_delta=True)
    assert removes(later, s) == Removal(("name",), ("r1", 1))
    check_exact(later, s)


def test_cost_honest_add_does_not_walk_the_state(monkeypatch: pytest.MonkeyPatch) -> None:
    """A delta claiming only the dots it carries checks the places it touches, never the
    rest of the state (``filtered`` is never called)."""
    s = ORMap()
    for i in range(50):
        s.merge(s.add("r1", (f"k{i}",), "x"))
    calls = []
    real = addonly._Walk.filtered

    def spy(self: Any, a: Any, path: Any, depth: int) -> Any:
        calls.append(path)
        return real(self, a, path, depth)

    monkeypatch.setattr(addonly._Walk, "filtered", spy)
    assert removes(s.add("r2", ("k0",), "y"), s) is None
    assert calls == []
    assert removes(s.clear(), s) is not None
    assert calls


def _never(delta: ORMap, state: ORMap) -> Removal | None:
    return None


@pytest.mark.parametrize("case", [
    test_set_remove_is_a_removal,
    test_full_state_without_an_element_is_a_removal,
    test_clear_and_key_remove_are_removals,
    test_overwrite_and_re_add_are_removals,
])
def test_mutation_never_removes_fails_the_tests(
    case: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tests above can fail: with a ``removes`` that finds nothing, each one does."""
    monkeypatch.setattr(f"{__name__}.removes", _never)
    with pytest.raises(AssertionError):
        case()


def test_mutation_never_removes_fails_the_property(monkeypatch: pytest.MonkeyPatch) -> None:
    """The exactness check catches a ``removes`` that finds nothing on a plain remove."""
    monkeypatch.setattr(f"{__name__}.removes", _never)
    s = revoked("aa")
    with pytest.raises(AssertionError):
        check_exact(s.discard("r2", ("revoked",), "aa"), s)


# -- the replication machine on an add-only subject ------------------------------------------

ADD_ONLY = ReplicationConfig(add_only=True)


def _add(element: str) -> Any:
    def add(tree: Any, rid: str, ts: int) -> ORMap:
        return tree.state.add(rid, ("revoked",), element)  # type: ignore[no-any-return]
    return add


def _discard(element: str) -> Any:
    def discard(tree: Any, rid: str, ts: int) -> ORMap:
        return tree.state.discard(rid, ("revoked",), element)  # type: ignore[no-any-return]
    return discard


def _machine(config: ReplicationConfig = ADD_ONLY) -> ReplicationMachine:
    m = ReplicationMachine("node-c", config)
    honest = ORMap()
    honest.merge(honest.add("node-a", ("revoked",), "aa"))
    m.handle(DeltaReceived(0.0, "node-a", 1, honest, 10))
    assert m.state.get(("revoked",)) == frozenset({"aa"})
    return m


def _rejected(out: list[Any]) -> list[tuple[Any, ...]]:
    return [a.args for a in out if isinstance(a, Report) and a.event == "rejected"]


@pytest.mark.parametrize("config", [ADD_ONLY, ReplicationConfig()])
def test_machine_rejects_a_signed_remove(config: ReplicationConfig) -> None:
    """node-b (a roster key) removes node-a's element: refused on an add-only subject, as a
    delta (an OR-set remove) and as a full state without it; joined on an ordinary one."""
    m = _machine(config)
    state = m.state.copy()
    remove = state.discard("node-b", ("revoked",), "aa")
    full = state.copy()
    full.merge(remove)
    full.merge(full.add("node-b", ("revoked",), "bb"))  # its own new dot: passes ``forged``
    full_doc = ORMap(MapStore({"revoked": SetStore({"bb": ("node-b", 1)})}),
                     full.context, is_delta=False)
    out = m.handle(DeltaReceived(1.0, "node-b", 1, remove, 10))
    out += m.handle(DeltaReceived(1.0, "node-b", 2, full_doc, 10))
    if config.add_only:
        assert _rejected(out) == [("removal", "node-b"), ("removal", "node-b")]
        assert m.state.get(("revoked",)) == frozenset({"aa"})
    else:
        assert _rejected(out) == []
        assert "aa" not in m.state.get(("revoked",))


def test_machine_rejects_a_held_removal_when_its_claim_arrives() -> None:
    """A delta claiming a dot not seen here waits; once that dot arrives (an honest add),
    joining it would remove the add: rejected when it drains, the add kept."""
    m = _machine()
    later = ORMap()
    later.merge(later.add("node-a", ("revoked",), "aa"))
    add2 = later.add("node-a", ("revoked",), "cc")  # dot (node-a, 2), not yet sent
    sneaky = ORMap(MapStore({"revoked": Whole(None)}),
                   CausalContext.from_dots([("node-a", 2)]), is_delta=True)
    out = m.handle(DeltaReceived(1.0, "node-b", 1, sneaky, 10))
    assert m.held == 1
    out = m.handle(DeltaReceived(2.0, "node-a", 2, add2, 10))
    assert _rejected(out) == [("removal", "node-b")]
    assert m.held == 0
    assert m.state.get(("revoked",)) == frozenset({"aa", "cc"})


def test_a_fresh_replica_rejects_the_removal_once_the_id_arrives() -> None:
    """A replica that never saw the id: the attacker's full state claiming the id's dot
    without it is held by the causal gate; the honest catch-up brings the id, and the held
    state is then rejected as a removal instead of erasing the id."""
    honest = ORMap()
    honest.merge(honest.add("node-a", ("revoked",), "aa"))
    wipe = ORMap(None, honest.context.copy(), is_delta=False)
    m = ReplicationMachine("node-d", ADD_ONLY)
    m.handle(Started(0.0))
    out = m.handle(DeltaReceived(0.1, "node-b", 1, wipe, 10))
    assert m.held == 1
    out = m.handle(CatchupReplied(0.2, "node-a", 1, honest.copy()))
    assert _rejected(out) == [("removal", "node-b")]
    assert m.state.get(("revoked",)) == frozenset({"aa"})


def test_local_writes_that_remove_fail() -> None:
    m = _machine()
    with pytest.raises(InvalidArgumentError):
        m.write([_discard("aa")], lambda: 1_000)
    with pytest.raises(InvalidArgumentError):
        m.write([_add("aa")], lambda: 1_000)  # present already: the add replaces its dot
    with pytest.raises(InvalidArgumentError):
        m.write([Add("x", ("s",), 1)], lambda: 1_000)  # fused: cannot be checked first
    assert m.state.get(("revoked",)) == frozenset({"aa"})
    w = m.write([_add("bb")], lambda: 1_000)
    assert w.ops == 1
    assert m.state.get(("revoked",)) == frozenset({"aa", "bb"})
    ordinary = _machine(ReplicationConfig())
    ordinary.write([_discard("aa")], lambda: 1_000)
    assert not ordinary.state.get(("revoked",))


def test_settings_make_the_revocation_subject_add_only(tmp_path: Any) -> None:
    from services.worknode import WorknodeSettings

    base = {"node_id": "n1", "subjects": ["orders"], "state_dir": tmp_path}
    s = WorknodeSettings(**base)
    assert s.add_only("revocations")
    assert not s.add_only("orders")
    moved = WorknodeSettings(**base, rpc_revocation_subject="revoked-ids")
    assert moved.add_only("revoked-ids")
    assert not moved.add_only("revocations")
    assert not WorknodeSettings(**base, add_only_subjects=[]).add_only("revocations")
    assert WorknodeSettings(**base, add_only_subjects=["orders"]).add_only("orders")
