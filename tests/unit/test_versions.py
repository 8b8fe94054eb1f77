"""Rolling upgrades: a v1 node (reading with the frozen v1 schema files) and a v2 node exchange
real bytes; what the v1 node cannot interpret (the v2 flag kind) is kept and passed on, so a
v2 -> v1 -> v2 path loses nothing."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.codec import Signer, TrustRoster, WireCodec
from broker.crdt import EWFlag, OpaqueValue, ORMap
from broker.crdt._stores import FlagStore, OpaqueStore
from broker.errors import UnsupportedContentError

V1, V2 = WireCodec(1), WireCodec(2)
T0 = 1_700_000_000_000 << 16
KEYS = ("a", "b", "c")
paths = st.lists(st.sampled_from(KEYS), min_size=1, max_size=3).map(tuple)
v2_ops = st.one_of(
    st.tuples(st.just("enable"), paths),
    st.tuples(st.just("disable"), paths),
    st.tuples(st.just("assign"), paths),
    st.tuples(st.just("remove"), paths),
    st.tuples(st.just("sync"), st.just(())),
)
v1_ops = st.one_of(
    st.tuples(st.just("assign"), paths),
    st.tuples(st.just("increment"), paths),
    st.tuples(st.just("remove"), paths),
    st.tuples(st.just("sync"), st.just(())),
)


def _apply(state: ORMap, rid: str, op: str, path: tuple[str, ...], n: int) -> ORMap | None:
    if op == "enable":
        return state.enable(rid, path)
    if op == "disable":
        return state.disable(path)
    if op == "assign":
        return state.assign(rid, path, n, T0 + n)
    if op == "increment":
        return state.increment(rid, path, 1)
    if op == "remove":
        return state.remove(path)
    return None


def _flags_in(entry: Any, cls: type) -> int:
    if isinstance(entry, cls):
        return 1
    if isinstance(entry, dict):
        return sum(_flags_in(v, cls) for v in entry.values())
    return 0


@settings(max_examples=120, deadline=None)
@given(st.lists(st.tuples(st.booleans(), v2_ops, v1_ops), max_size=30))
def test_v2_to_v1_to_v2_loses_nothing(steps: list[tuple[bool, Any, Any]]) -> None:
    new = ORMap()  # a v2 node
    old = ORMap()  # a v1 node: only ever fed bytes decoded with the v1 schema files
    for n, (new_moves, (op2, p2), (op1, p1)) in enumerate(steps, start=1):
        if new_moves:
            if op2 == "sync":  # v2 hands its whole state to v1
                old.merge(V1.decode_document(V2.encode_document(new), ORMap))
                continue
            d = _apply(new, "v2node", op2, p2, n)
            assert d is not None
            new.merge(d)
            old.merge(V1.decode_document(V2.encode_document(d), ORMap))
        else:
            if op1 == "sync":  # v1 hands its whole state (with opaque parts) to v2
                new.merge(V2.decode_document(V1.encode_document(old), ORMap))
                continue
            try:
                d = _apply(old, "v1node", op1, p1, n)
            except Exception:  # a path through a non-map kind: not a wire question
                continue
            assert d is not None
            old.merge(d)
            new.merge(V2.decode_document(V1.encode_document(d), ORMap))
    # Final exchange both ways, through bytes.
    back = V2.decode_document(V1.encode_document(old), ORMap)
    new.merge(back)
    old.merge(V1.decode_document(V2.encode_document(new), ORMap))
    # The v1 node's state, read by v2, is exactly the v2 node's state: nothing lost.
    seen_by_v2 = V2.decode_document(V1.encode_document(old), ORMap)
    assert seen_by_v2.digest() == new.digest()
    assert seen_by_v2.value() == new.value()
    # The v1 node never holds a FlagStore, only opaque stores, one per flag the v2 node has.
    assert _flags_in(old.store, FlagStore) == 0
    assert _flags_in(old.store, OpaqueStore) == _flags_in(new.store, FlagStore)


def test_old_reader_shows_unknown_kinds_opaquely_and_keeps_their_bytes() -> None:
    new = ORMap()
    new.merge(new.enable("n2", ("feature",)))
    new.merge(new.assign("n2", ("name",), "x", T0))
    raw = V2.encode_document(new)
    old = V1.decode_document(raw, ORMap)
    assert old.value() == {"feature": OpaqueValue((6, 1)), "name": "x"}
    # Passed on by the old node, the payload bytes are the ones the new node wrote.
    again = V1.encode_document(old)
    schema = V2.schema.crdt.Document
    item_new = schema.from_bytes_packed(raw).root.entries[0].items[0]
    item_fwd = schema.from_bytes_packed(again).root.entries[0].items[0]
    assert item_new.payload.which() == item_fwd.payload.which() == "flag"
    assert V2.decode_document(again, ORMap).value() == {"feature": True, "name": "x"}


def test_standalone_flag_round_trips_and_needs_v2() -> None:
    f = EWFlag()
    f.merge(f.enable("n1"))
    back = V2.decode_document(V2.encode_document(f), EWFlag)
    assert back.value() is True
    assert back.digest() == f.digest()
    with pytest.raises(UnsupportedContentError):
        V1.encode_document(f)
    with pytest.raises(UnsupportedContentError):
        V1.decode_document(V2.encode_document(f))


def test_v1_node_forwards_state_transfer_envelopes_with_opaque_parts() -> None:
    n1, n2 = Signer("old", b"o" * 32), Signer("new", b"n" * 32)
    roster = TrustRoster({"old": n1.public_key, "new": n2.public_key})
    new = ORMap()
    new.merge(new.enable("new", ("x", "flag")))
    env = V1.open(V2.seal(n2, subject="s", hlc=1, sequence=1, document=new), roster)
    old = ORMap()
    old.merge(env.document)
    old.merge(old.assign("old", ("y",), 1, T0))
    fwd = V2.open(V1.seal(n1, subject="s", hlc=2, sequence=1, document=old, is_state=True), roster)
    assert fwd.version == 1
    assert fwd.is_state
    assert fwd.document.value() == {"x": {"flag": True}, "y": 1}
