"""Edges of the replication machine: a key left out at load (its stored content was invalid)
comes back from a peer; a write the node's wire version cannot carry changes nothing.

The loaded state's context still claims the dots of the key it lost, so a plain join drops
every peer entry for it: without quarantine the key would stay lost on that node for good.
"""

from __future__ import annotations

import pytest

from broker.crdt import ORMap
from broker.crdt._stores import Kind
from broker.repair import repair_deltas
from broker.replication import DeltaReceived, Loaded, RepairApplied, ReplicationMachine


def _peer_and_loaded() -> tuple[ORMap, ORMap]:
    """A peer's state with keys a and c, and what a node that had the same state loaded
    after key c's stored content proved invalid (left out; context unchanged)."""
    peer = ORMap()
    peer.merge(peer.increment("p", ("a",), 2))
    peer.merge(peer.increment("p", ("c",), 5))
    # All of the peer's own writes: a full state arriving as a peer's batch may hold only its
    # signer's dots (issue 17); one relaying others' writes travels by catch-up or repair.
    peer.merge(peer.assign("p", ("c",), "x", 7))
    loaded = peer.copy()
    assert loaded.store is not None
    del loaded.store["c"]
    return peer, loaded


def _machine(loaded: ORMap, quarantined: frozenset[str]) -> ReplicationMachine:
    return ReplicationMachine("n", loaded=Loaded(loaded, quarantined=quarantined))


@pytest.mark.parametrize("via", ["full_state", "repair"])
def test_a_quarantined_key_is_adopted_from_a_peer(via: str) -> None:
    peer, loaded = _peer_and_loaded()
    m = _machine(loaded, frozenset({"c"}))
    # Written here since the load.
    m.write([lambda t, r, ts: t.state.increment(r, ("c",), 1)], lambda: 1)
    if via == "full_state":
        m.handle(DeltaReceived(1.0, "p", 1, peer.copy(), 0))
    else:
        to_m, _ = repair_deltas(m.state, peer, ["c"])
        m.handle(RepairApplied(1.0, to_m, 1))
    value = m.state.value()["c"]  # a counter and a register under one key: a KindConflict
    assert value[Kind.COUNTER] == 6  # the peer's 5 and this node's 1: nothing lost
    assert value[Kind.LWW] == "x"
    assert m.quarantined == set()
    # Once adopted, the key joins as usual: the peer's later write arrives and wins.
    d = peer.increment("p", ("c",), 10)
    peer.merge(d)
    m.handle(DeltaReceived(2.0, "p", 2, d, 0))
    assert m.state.value()["c"][Kind.COUNTER] == 16


def test_without_quarantine_the_key_never_comes_back() -> None:
    """Mutation check: the same run with nothing quarantined loses key c for good."""
    peer, loaded = _peer_and_loaded()
    m = _machine(loaded, frozenset())
    m.handle(DeltaReceived(1.0, "p", 1, peer.copy(), 0))
    assert "c" not in m.state.value()


def test_a_node_writing_wire_v1_refuses_a_flag_before_changing_anything() -> None:
    """A v1 node could neither log nor publish a flag (its codec lacks the kind): the write
    is refused before it touches the state; writes before it in the same call still apply."""
    from broker.codec import KINDS_BY_VERSION
    from broker.crdt import Assign, Create
    from broker.errors import UnsupportedContentError
    from broker.replication import ReplicationConfig

    m = ReplicationMachine("n", ReplicationConfig(writable_kinds=KINDS_BY_VERSION[1]))
    m.write([Create("o")], lambda: 1)
    before = m.state.digest()
    with pytest.raises(UnsupportedContentError, match="nothing was written"):
        m.write([lambda t, r, ts: t.state.enable(r, ("o", "f"))], lambda: 2)
    assert m.state.digest() == before
    w = m.write([Assign("o", ("x",), 1), lambda t, r, ts: t.state.enable(r, ("f",))], lambda: 3)
    assert w.ops == 1
    assert isinstance(w.error, UnsupportedContentError)
    assert "f" not in m.state.value()
    # The current wire version writes flags.
    m2 = ReplicationMachine("n", ReplicationConfig(writable_kinds=KINDS_BY_VERSION[3]))
    m2.write([lambda t, r, ts: t.state.enable(r, ("f",))], lambda: 1)
    assert m2.state.value()["f"] is True


def test_a_write_over_a_caught_up_register_carries_a_later_timestamp() -> None:
    """Simulator finding F6: a node whose wall clock is behind learns a register by catch-up
    and overwrites it: its write must carry a higher hybrid time than the one it replaced."""
    from broker.crdt import Assign, Create

    peer = ReplicationMachine("p")
    peer.write([Create("o"), Assign("o", ("x",), "old")], lambda: 1_000_000)
    m = ReplicationMachine("n")
    m.handle(DeltaReceived(1.0, "p", 1, peer.state.copy(), 0))
    w = m.write([Assign("o", ("x",), "new")], lambda: 5)  # a wall clock far behind
    assert m.state.value()["o"]["fields"]["x"] == "new"
    from broker.replication import max_hlc

    assert max_hlc(w.delta.store) > max_hlc(peer.state.store)
