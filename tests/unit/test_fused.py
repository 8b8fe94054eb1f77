"""The fused local writes (``ORMap.apply_assign``, ``apply_increment``, ``apply_add``) and
the fast paths of delta joins.

Each must be indistinguishable from its mutator then merge (``d = s.assign(...);
s.merge(d)``): the same state (store, context, digest) and the same delta, on random
histories that include kind conflicts, concurrent register values, missing maps and delta
states. The one-path delta join (``join_store``) is checked against full-state joins by the
laws in ``test_laws.py``; here, its rare branches: emptied maps and nesting bounds.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.crdt import MAX_NESTING_DEPTH, Batch, CausalContext, ORMap
from broker.crdt._stores import LWWStore, MapStore, SetStore
from broker.errors import (
    InvalidArgumentError,
    InvalidKeyError,
    InvalidReplicaIdError,
    InvalidValueError,
    NestingDepthError,
    ValueTooLargeError,
)
from tests.unit.strategies import REPLICAS, atoms, elements, histories, paths, run_history


def assert_same(got: ORMap, want: ORMap) -> None:
    """Equal field by field, not only by digest."""
    assert got.store == want.store
    assert got.context == want.context
    assert got.is_delta == want.is_delta
    assert got.digest() == want.digest()
    assert got.value() == want.value()


@st.composite
def ormap_states(draw: st.DrawFn) -> ORMap:
    """A replica's state after a random history, or a batch of its deltas (a delta state)."""
    states, deltas = run_history(ORMap, draw(histories(ORMap)))
    if deltas and draw(st.integers(0, 3)) == 0:
        batch = ORMap(is_delta=True)
        for d in draw(st.lists(st.sampled_from(deltas), max_size=4)):
            batch.merge(d)  # type: ignore[arg-type]
        return batch
    return states[draw(st.integers(0, len(states) - 1))]  # type: ignore[return-value]


timestamps = st.integers(0, 2**63 - 1)


@settings(max_examples=300)
@given(
    ormap_states(),
    st.sampled_from(REPLICAS),
    paths,
    atoms,
    timestamps,
    ormap_states(),
    st.booleans(),
)
def test_apply_assign_is_assign_then_merge(
    state: ORMap,
    rid: str,
    path: tuple[str, ...],
    value: Any,
    ts: int,
    peer: ORMap,
    under_existing_maps: bool,
) -> None:
    """``apply_assign`` leaves ``state.join(state.assign(...))`` and returns that delta."""
    if under_existing_maps and not state.is_delta:
        # Most random states lack some map on the path; write a sibling first so that the
        # fused route (every map on the path present) is taken often.
        state.merge(state.assign("r3", (*path[:-1], "z"), None, 1))
    _check_fused(state, peer, "assign", "apply_assign", rid, path, value, ts)


def _check_fused(state: ORMap, peer: ORMap, name: str, fused: str, *args: Any) -> None:
    """``state.<fused>(*args)`` leaves ``state.join(state.<name>(*args))``, returns that delta,
    and a peer (even one that has not seen the writer's state) ends the same whichever delta
    it receives."""
    want_delta = getattr(state, name)(*args)
    want_state = state.join(want_delta)
    got_state = state.copy()
    got_delta = getattr(got_state, fused)(*args)
    assert_same(got_state, want_state)
    assert_same(got_delta, want_delta)
    via_got, via_want = peer.copy(), peer.copy()
    via_got.merge(got_delta)
    via_want.merge(want_delta)
    assert_same(via_got, via_want)


@settings(max_examples=300)
@given(
    ormap_states(), st.sampled_from(REPLICAS), paths, st.integers(-5, 5), ormap_states(),
    st.booleans(),
)
def test_apply_increment_is_increment_then_merge(
    state: ORMap, rid: str, path: tuple[str, ...], amount: int, peer: ORMap, prime: bool
) -> None:
    if prime and not state.is_delta:
        # Other replicas' contributions and existing maps on the path: the fused route.
        state.merge(state.increment("r3", path, 2))
        state.merge(state.increment("r2", path, -1))
    _check_fused(state, peer, "increment", "apply_increment", rid, path, amount)


@settings(max_examples=300)
@given(
    ormap_states(), st.sampled_from(REPLICAS), paths, elements, ormap_states(), st.booleans(),
)
def test_apply_add_is_add_then_merge(
    state: ORMap, rid: str, path: tuple[str, ...], element: Any, peer: ORMap, prime: bool
) -> None:
    if prime and not state.is_delta:
        state.merge(state.add("r3", path, element))  # concurrent dots of the same element
        state.merge(state.add("r2", path, "other"))
    _check_fused(state, peer, "add", "apply_add", rid, path, element)


def test_apply_increment_refuses_overflow_and_leaves_the_state() -> None:
    doc = ORMap()
    doc.merge(doc.increment("r1", ("a", "n"), 2**63 - 1))
    before = doc.copy()
    for fn in (doc.increment, doc.apply_increment):
        with pytest.raises(ValueTooLargeError):
            fn("r1", ("a", "n"), 1)
    with pytest.raises(InvalidArgumentError):
        doc.apply_increment("r1", ("a", "n"), True)
    with pytest.raises(InvalidArgumentError):
        doc.apply_increment("r1", ("a", "n"), 1.0)  # type: ignore[arg-type]
    with pytest.raises(InvalidValueError):
        doc.apply_add("r1", ("a", "s"), 1.5)  # type: ignore[arg-type]
    assert_same(doc, before)


def test_fused_add_does_not_alias_the_delta_and_the_state() -> None:
    doc = ORMap()
    doc.merge(doc.assign("r1", ("a", "k"), 1, 1))
    first = doc.apply_add("r1", ("a", "s"), "x")
    doc.apply_add("r1", ("a", "s"), "y")
    assert first.value() == {"a": {"s": {"x"}}}  # the first delta kept its own set
    assert doc.get(("a", "s")) == {"x", "y"}


@settings(max_examples=200)
@given(histories(ORMap, max_size=40))
def test_fused_writes_replay_a_history_exactly(history: list[Any]) -> None:
    """Every state and every delta of a history is the same with fused local writes."""
    states, deltas = run_history(ORMap, history)
    fused_states, fused_deltas = run_history(ORMap, history, fused=True)
    for got, want in zip(fused_states, states, strict=True):
        assert_same(got, want)  # type: ignore[arg-type]
    for got, want in zip(fused_deltas, deltas, strict=True):
        assert_same(got, want)  # type: ignore[arg-type]


def test_fused_write_under_existing_maps_touches_only_the_leaf() -> None:
    doc = ORMap()
    doc.merge(doc.assign("r1", ("a", "b", "k"), 1, 1))
    inner = doc.store["a"]["b"]
    delta = doc.apply_assign("r1", ("a", "b", "k"), 2, 2)
    assert doc.store["a"]["b"] is inner
    assert inner["k"] == LWWStore(("r1", 2, 2, 2))
    assert delta.store == MapStore({"a": MapStore({"b": MapStore({"k": inner["k"]})})})
    assert delta.context == CausalContext.from_dots([("r1", 1), ("r1", 2)])
    assert doc.context.version_vector == {"r1": 2}


_DEEP = tuple(f"k{i}" for i in range(MAX_NESTING_DEPTH + 1))


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (("bad id", ("a", "b", "c"), 1, 2), InvalidReplicaIdError),
        ((7, ("a", "b", "c"), 1, 2), InvalidReplicaIdError),
        (("r1", ("a", "", "c"), 1, 2), InvalidKeyError),
        (("r1", ("a", "b", 3), 1, 2), InvalidKeyError),
        (("r1", ("a", "b", "\ud800"), 1, 2), InvalidKeyError),
        (("r1", ("a", "b", "x" * 300), 1, 2), InvalidKeyError),
        (("r1", "abc", 1, 2), InvalidKeyError),
        (("r1", (), 1, 2), InvalidKeyError),
        (("r1", _DEEP, 1, 2), NestingDepthError),
        (("r1", ("a", "b", "c"), 1, -1), InvalidArgumentError),
        (("r1", ("a", "b", "c"), 1, 2**63), InvalidArgumentError),
        (("r1", ("a", "b", "c"), 1, True), InvalidArgumentError),
        (("r1", ("a", "b", "c"), 1, 1.5), InvalidArgumentError),
        (("r1", ("a", "b", "c"), float("nan"), 2), InvalidValueError),
        (("r1", ("a", "b", "c"), [1], 2), InvalidValueError),
        (("r1", ("a", "b", "c"), 2**63, 2), ValueTooLargeError),
        # Several bad arguments: the same one is reported (value, id, path, then timestamp).
        (("bad id", ("a", "", "c"), float("nan"), -1), InvalidValueError),
        (("bad id", ("a", "", "c"), 1, -1), InvalidReplicaIdError),
        (("r1", ("a", "", "c"), 1, -1), InvalidKeyError),
        (("r1", ("a", "b", ""), 1, -1), InvalidKeyError),
    ],
)
def test_apply_assign_refuses_what_assign_refuses(args: tuple[Any, ...], error: type) -> None:
    doc = ORMap()
    doc.merge(doc.assign("r1", ("a", "b", "c"), 1, 1))  # the maps exist: the fused route
    before = doc.copy()
    with pytest.raises(error):
        doc.assign(*args)
    with pytest.raises(error):
        doc.apply_assign(*args)
    with pytest.raises(error):
        doc.apply_assign(*args, into=Batch())  # the batch's route (Batch.locate)
    assert_same(doc, before)


def test_a_key_the_state_holds_skips_the_check_and_a_new_one_is_checked() -> None:
    """A key already in the state map was checked when it was written: the fused routes
    skip its check (keys past the memo's bound, as with 10,000 distinct fields), and still
    check every key the state lacks."""
    doc = ORMap()
    doc.merge(doc.assign("r1", ("a", "k0"), 0, 1))
    for i in range(5000):  # more keys than the memo holds: early ones are forgotten
        doc.apply_assign("r1", ("a", f"k{i}"), i, 2, into=Batch())
    for into in (None, Batch()):
        doc.apply_assign("r1", ("a", "k0"), 7, 3, into=into)
        assert doc.get(("a", "k0")) == 7
        with pytest.raises(InvalidKeyError):
            doc.apply_assign("r1", ("a", "x" * 300), 1, 3, into=into)
        with pytest.raises(InvalidKeyError):
            doc.apply_assign("r1", ("a", ""), 1, 3, into=into)
    assert len(doc.get(("a",))) == 5000  # nothing else was written


def test_validated_keys_do_not_admit_str_subclasses() -> None:
    class Key(str):
        __slots__ = ()

    doc = ORMap()
    doc.merge(doc.assign("r1", ("a",), 1, 1))
    doc.apply_assign("r1", ("a",), 2, 2)  # "a" is now a known-valid key
    with pytest.raises(InvalidKeyError):
        doc.apply_assign("r1", (Key("a"),), 3, 3)
    with pytest.raises(InvalidKeyError):
        doc.assign("r1", (Key("a"),), 3, 3)
    assert doc.get(("a",)) == 2


dots = st.tuples(st.sampled_from(["a", "b", "c"]), st.integers(1, 12))


@given(st.lists(dots), st.sampled_from(["a", "b", "c"]), st.lists(dots, max_size=3))
def test_issue_delta_is_next_dot_add_and_from_dots(
    seen: list[tuple[str, int]], rid: str, replaced: list[tuple[str, int]]
) -> None:
    ctx = CausalContext.from_dots(seen)
    ref = ctx.copy()
    dot, delta_ctx = ctx.issue_delta(rid, replaced)
    want = ref.next_dot(rid)
    ref.add(want)
    assert dot == want
    assert ctx == ref
    assert delta_ctx == CausalContext.from_dots([*replaced, want])


def test_one_path_delta_that_empties_maps_drops_them() -> None:
    doc = ORMap()
    doc.merge(doc.assign("r1", ("x", "y", "z"), 1, 1))
    doc.merge(doc.assign("r1", ("x", "w"), 2, 2))
    peer = doc.copy()
    rm = doc.remove(("x", "y", "z"))
    doc.merge(rm)
    assert doc.value() == {"x": {"w": 2}}
    assert "y" not in doc.store["x"]  # the emptied map is gone, not left empty
    assert doc == peer.join(doc)
    doc.merge(doc.remove(("x", "w")))
    assert doc.store is None
    assert doc.value() == {}


def test_one_path_deltas_with_markers_batch_and_apply() -> None:
    """Two removes of one key batched: both leaves are ``Whole`` markers (delta into delta)."""
    doc = ORMap()
    doc.merge(doc.assign("r1", ("x", "y"), 1, 1))
    peer = doc.copy()
    first = doc.remove(("x", "y"))
    doc.merge(first)
    rewrite = doc.apply_assign("r1", ("x", "y"), 2, 2)
    second = doc.remove(("x", "y"))
    doc.merge(second)
    batch = ORMap(is_delta=True)
    batch.merge(first)
    batch.merge(second)
    assert batch.is_delta
    peer.merge(rewrite)
    peer.merge(batch)
    assert_same(peer, doc)
    assert doc.value() == {}


def _chain(keys: tuple[str, ...], dot: int) -> MapStore:
    """Maps along ``keys`` down to a register written with ``dot``, built without checks."""
    store: Any = LWWStore(("r9", dot, dot, "x"))
    for k in reversed(keys):
        store = MapStore({k: store})
    assert isinstance(store, MapStore)
    return store


_TOO_DEEP = tuple(f"k{i}" for i in range(MAX_NESTING_DEPTH + 1))


@pytest.mark.parametrize("state_keys", [0, MAX_NESTING_DEPTH, MAX_NESTING_DEPTH + 1])
def test_one_path_delta_nested_too_deep_is_refused(state_keys: int) -> None:
    """Refused whether the state lacks the path, holds maps along it, or is itself too deep
    (a hostile state loaded without checks); the state is left unchanged."""
    target = ORMap()
    if state_keys:
        target = ORMap(_chain(_TOO_DEEP[:state_keys], 1), CausalContext({"r9": 1}))
    before = target.copy()
    hostile = ORMap(_chain(_TOO_DEEP, 2), CausalContext.from_dots([("r9", 2)]), is_delta=True)
    with pytest.raises(NestingDepthError):
        target.merge(hostile)
    assert target.store == before.store
    assert target.context == before.context


# -- writes joined into a batch in place (``Batch``, ``ReplicationMachine.write``) -----------

# Keys the random states rarely hold (no kind conflicts there: the in-place route is taken),
# mixed with the states' own keys (conflicts, other kinds: the joining route).
_batch_paths = st.one_of(
    paths,
    st.tuples(
        st.lists(st.sampled_from(["c", "d"]), max_size=2), st.sampled_from(["e", "f", "g"])
    ).map(lambda t: (*t[0], t[1])),
)
_batch_ops = st.one_of(
    st.tuples(st.just("assign"), _batch_paths, atoms),
    st.tuples(st.just("increment"), _batch_paths, st.integers(-5, 5)),
    st.tuples(st.just("add"), _batch_paths, elements),
    # Mutators that take the joining route: their deltas are joined, never written into.
    st.tuples(st.just("remove"), _batch_paths, st.none()),
    st.tuples(st.just("discard"), _batch_paths, elements),
    st.tuples(st.just("assign_multi"), _batch_paths, atoms),
)


def _write_batch(state: ORMap, rid: str, ops: list[Any], in_place: bool) -> tuple[ORMap, list[Any]]:
    """Apply ``ops`` to ``state`` as ``ReplicationMachine.write`` does: fused writes joined
    into a ``Batch`` in place (``in_place``) or each delta joined (the reference)."""
    batch = Batch()
    errors: list[Any] = []
    for ts, (name, path, arg) in enumerate(ops, start=1):
        try:
            if name in ("assign", "increment", "add"):
                fused = getattr(state, f"apply_{name}")
                args = (rid, path, arg, ts) if name == "assign" else (rid, path, arg)
                d = fused(*args, into=batch) if in_place else fused(*args)
            else:
                args = (rid, path, arg) if name != "remove" else (path,)
                d = getattr(state, name)(*args)
                state.merge(d)
        except (ValueError, TypeError) as exc:
            errors.append(type(exc))
            continue
        errors.append(None)
        if d is not None:
            batch.join(d)
    return batch.delta, errors


@settings(max_examples=400)
@given(
    ormap_states(), st.sampled_from(REPLICAS), st.lists(_batch_ops, max_size=24), ormap_states(),
    st.booleans(),
)
def test_batch_in_place_is_the_join_of_the_deltas(
    state: ORMap, rid: str, ops: list[Any], peer: ORMap, prime: bool
) -> None:
    """Writes joined into a ``Batch`` in place leave the same state and the same batch delta
    as joining each write's delta (repeated paths, kind conflicts, removals and mutator
    deltas in between), and a peer ends the same whichever batch it receives."""
    if prime and not state.is_delta:
        # Every map on the paths present (a sibling "z" written under each), other writers'
        # entries: the batch's first write takes the in-place route, so later ones can too.
        for name, path, arg in ops:
            for i in range(1, len(path)):
                state.merge(state.assign("r3", (*path[:i], "z"), 1, 1))
            # Entries the batch's writes replace: its own and other writers'.
            if name == "assign":
                state.merge(state.assign("r3", path, 0, 1))
            elif name == "increment":
                state.merge(state.increment(rid, path, 1))
                state.merge(state.increment("r2", path, 1))
            elif name == "add":
                state.merge(state.add("r3", path, arg))
    want_state = state.copy()
    want, want_errors = _write_batch(want_state, rid, ops, in_place=False)
    got_state = state.copy()
    got, got_errors = _write_batch(got_state, rid, ops, in_place=True)
    assert got_errors == want_errors
    assert_same(got_state, want_state)
    assert_same(got, want)
    via_got, via_want = peer.copy(), peer.copy()
    via_got.merge(got)
    via_want.merge(want)
    assert_same(via_got, via_want)


def test_batch_never_writes_into_a_joined_delta() -> None:
    """A delta joined in (a mutator's) is copied: a later write under its maps is written in
    place in the batch's copy, the mutator's delta is left as it was; its entries are not
    replaced in place (the write is returned to be joined)."""
    state = ORMap()
    state.merge(state.assign("r1", ("n", "x"), 1, 1))
    batch = Batch()
    d = state.assign("r1", ("n", "y"), 2, 2)
    state.merge(d)
    batch.join(d)
    before = d.copy()
    assert state.apply_assign("r1", ("n", "z"), 3, 3, into=batch) is None  # in place
    back = state.apply_assign("r1", ("n", "y"), 4, 4, into=batch)
    assert back is not None  # the joined entry: returned to be joined
    batch.join(back)
    assert_same(d, before)
    assert batch.delta.value() == {"n": {"y": 4, "z": 3}}


def test_batch_in_place_does_not_share_stores_with_the_state() -> None:
    state = ORMap()
    state.merge(state.add("r1", ("s",), "x"))
    batch = Batch()
    assert state.apply_add("r1", ("s",), "y", into=batch) is None
    assert state.apply_add("r1", ("s",), "z", into=batch) is None
    assert batch.delta.value() == {"s": {"y", "z"}}
    assert state.value() == {"s": {"x", "y", "z"}}
    assert batch.delta.store["s"] is not state.store["s"]


def _batch_reference(state: ORMap, ops: list[Any]) -> None:
    """``ops`` written in place and by joining leave the same state and batch."""
    want_state, got_state = state.copy(), state.copy()
    want, want_errors = _write_batch(want_state, "r1", ops, in_place=False)
    got, got_errors = _write_batch(got_state, "r1", ops, in_place=True)
    assert got_errors == want_errors
    assert_same(got_state, want_state)
    assert_same(got, want)


def test_batch_forgets_the_maps_it_remembered_when_a_write_joins() -> None:
    """A removal joined in drops the maps of the remembered prefix from the state: the next
    write under that prefix must not go into the detached map."""
    state = ORMap()
    state.merge(state.assign("r3", ("n", "z"), 1, 1))
    _batch_reference(state, [
        ("assign", ("n", "e"), 1),  # remembers the maps of ("n",)
        ("remove", ("n",), None),  # drops ("n",) from the state
        ("assign", ("n", "f"), 2),  # a map missing on the path: the general route
        ("assign", ("n", "g"), 3),
    ])


def test_batch_keeps_dots_a_joined_delta_put_beside_its_own_entry() -> None:
    """An entry a join changed is not the batch's own any more: a mutator's dot that the
    state does not hold (a stale one, re-added after a discard) stays in the batch, as the
    join of the next add of that element keeps it."""
    state = ORMap()
    state.merge(state.add("r1", ("s",), "x"))
    state.merge(state.discard("r1", ("s",), "x"))  # (r1, 1) removed; the context keeps it
    results = []
    for in_place in (False, True):
        s = state.copy()
        batch = Batch()
        for element in ("y", "x"):
            d = (s.apply_add("r1", ("s",), element, into=batch) if in_place
                 else s.apply_add("r1", ("s",), element))
            if d is not None:
                batch.join(d)
            if element == "y":  # then a mutator's delta re-adding the removed dot
                relay = ORMap(is_delta=True)
                relay.store = MapStore({"s": SetStore({"x": ("r1", 1)})})
                relay.context = CausalContext.from_dots([("r1", 1)])
                s.merge(relay)
                batch.join(relay)
        results.append((s, batch.delta))
    assert_same(results[1][0], results[0][0])
    assert_same(results[1][1], results[0][1])
    assert ("r1", 1) in results[1][1].context


def test_a_joined_set_is_never_written_in_place() -> None:
    state = ORMap()
    state.merge(state.add("r1", ("s",), "x"))
    batch = Batch()
    d = state.add("r1", ("s",), "y")
    state.merge(d)
    batch.join(d)
    before = d.copy()
    back = state.apply_add("r1", ("s",), "z", into=batch)
    assert back is not None  # the joined set: returned to be joined
    batch.join(back)
    assert_same(d, before)
    assert batch.delta.value() == {"s": {"y", "z"}}
