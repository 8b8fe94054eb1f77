"""Byzantine relays (issue 17): a catch-up answer is joined only as far as its relay vouches
for it — its own dots, and other writers' dots the receiver already saw — and other
writers' new dots arrive under their own signatures, as batches and states every replica
keeps as evidence and forwards ahead of its answer.

Without ``relayed`` (the state joined as it came), the machine tests below fail: node-b's
answer carrying node-a's next dot with a value node-a never wrote is joined as node-a's
write, a context claiming node-a's next 10**6 dots silences node-a, and a context of every
version vector + 1000 wipes the receiver.
"""

from __future__ import annotations

import contextlib
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from broker.codec import WireCodec
from broker.crdt import Assign, CausalContext, Create, Increment, ORMap
from broker.crdt._atoms import INT64_MAX
from broker.crdt._stores import dots_of
from broker.errors import WorknodeError
from broker.replication import (
    CatchupReplied,
    CatchupWanted,
    Committed,
    DeltaReceived,
    Loaded,
    Publish,
    Published,
    ReplicationConfig,
    ReplicationMachine,
    Report,
    RequestCatchup,
    SendState,
    StateEvidence,
    SyncRequested,
    SyncWanted,
    relayed,
)

CODEC = WireCodec()


def _rt(doc: ORMap) -> ORMap:
    out = CODEC.decode_document(CODEC.encode_document(doc), ORMap)
    assert isinstance(out, ORMap)
    return out


def _publish(m: ReplicationMachine, ops: list[Any], now: float = 0.0) -> Publish:
    w = m.write(ops, lambda: 1_000 + int(now * 1000))
    m.handle(Committed(now, w.delta, w.ops, 10, m.last_record_seq + 1))
    ps = [a for a in m.handle(SyncWanted(now)) if isinstance(a, Publish)]
    assert ps
    m.handle(Published(now, ps[0].sequence, 10))
    return ps[0]


def _deliver(m: ReplicationMachine, writer: str, p: Publish, now: float = 0.0) -> list[Any]:
    raw = b"batch:" + writer.encode() + b":" + str(p.sequence).encode()
    return m.handle(DeltaReceived(now, writer, p.sequence, _rt(p.document), 10, raw=raw))


def _rejections(out: list[Any]) -> list[tuple[Any, ...]]:
    return [a.args for a in out if isinstance(a, Report) and a.event == "rejected"]


def _catch_up(m: ReplicationMachine, peer: str, state: ORMap, now: float = 1.0,
              hlc: int | None = None) -> list[Any]:
    asked = m.handle(CatchupWanted(now, peer, urgent=True))
    assert [a for a in asked if isinstance(a, RequestCatchup)]
    return m.handle(CatchupReplied(now, peer, 0, _rt(state), raw=b"state:" + peer.encode(),
                                   hlc=hlc))


# -- the pure check ----------------------------------------------------------------------------


def test_a_relay_vouches_for_its_own_dots_and_what_the_receiver_saw() -> None:
    a = ORMap()
    a.apply_assign("node-a", ("k",), "va", 10)
    b = a.copy()
    b.apply_assign("node-b", ("j",), "vb", 20)
    # The receiver saw nothing: node-a's entry and claim are stripped, node-b's kept.
    kept = relayed(b, "node-b", CausalContext(), hlc=100)
    assert kept.reason is None
    assert kept.document is not None
    assert kept.document.value() == {"j": "vb"}
    assert kept.stripped == {"node-a": 1}
    assert not kept.document.context.covers("node-a", 1)
    # The receiver saw node-a's write: all of it is kept.
    kept = relayed(b, "node-b", a.context.copy(), hlc=100)
    assert kept.document is not None
    assert kept.document.value() == {"k": "va", "j": "vb"}
    assert kept.stripped == {}


def test_out_of_range_claims_and_clocks_refuse_the_whole_state() -> None:
    b = ORMap()
    b.apply_assign("node-b", ("j",), "vb", 20)
    assert relayed(b, "node-b", CausalContext(), hlc=15).reason == "clock_range"
    brick = ORMap(None, CausalContext({"node-a": INT64_MAX}))
    assert relayed(brick, "node-b", CausalContext()).reason == "dot_range"
    own = ORMap(None, CausalContext({"node-b": 2**62 + 1}))
    assert relayed(own, "node-b", CausalContext()).reason == "dot_range"


def test_silence_and_wipe_claims_prove_no_removal() -> None:
    """Claims past the newest dot the receiver has seen of a writer (node-a's next 10**6, or
    every vector + 1000) keep none of that writer's claims: the state removes nothing of it.
    Claims within what the receiver saw are kept (node-c's, where nothing is over-claimed)."""
    seen = CausalContext({"node-a": 5, "node-c": 3})
    silence = ORMap(None, CausalContext({"node-a": 10**6}))
    kept = relayed(silence, "node-b", seen)
    assert kept.document is not None
    assert kept.document.context.version_vector == {}
    assert kept.stripped == {"node-a": 10**6}
    wipe = ORMap(None, CausalContext({"node-a": 1005, "node-c": 1003}))
    kept = relayed(wipe, "node-b", seen)
    assert kept.document is not None
    assert kept.document.context.version_vector == {}
    exact = ORMap(None, CausalContext({"node-a": 1005, "node-c": 3}))
    kept = relayed(exact, "node-b", seen)
    assert kept.document is not None
    assert kept.document.context.version_vector == {"node-c": 3}


_NAMES = ("n1", "n2", "n3")
_writes = st.lists(
    st.tuples(st.sampled_from(("a", "b", "c")), st.integers(0, 3), st.integers(0, 5),
              st.sets(st.sampled_from(("a", "b", "c", "r")))),
    min_size=1, max_size=20,
)


def _write(doc: ORMap, who: str, kind: int, i: int, ts: int) -> ORMap:
    if kind == 0:
        return doc.assign(who, (_NAMES[i % 3],), i, ts)
    if kind == 1:
        return doc.increment(who, ("c", _NAMES[i % 3]), i + 1)
    if kind == 2:
        return doc.add(who, ("s",), i)
    return doc.remove(("s",)) if i % 2 else doc.remove((_NAMES[i % 3],))


@settings(max_examples=200, deadline=None)
@given(_writes, st.sampled_from(("a", "b", "c")))
def test_a_relayed_state_never_brings_another_writers_unseen_dot(
    writes: list[Any], relay: str
) -> None:
    """Writers a, b, c write; each write reaches some replicas (``r`` is the receiver). The
    relay's state, relayed to ``r``: every dot ``r`` holds afterwards is the relay's own or one
    ``r`` had seen; ``r``'s context gains no other writer's dot; and when ``r`` had seen every
    dot of the others, relaying is the plain join."""
    replicas = {n: ORMap() for n in ("a", "b", "c", "r")}
    ts = 0
    for who, kind, i, reach in writes:
        ts += 1
        with contextlib.suppress(WorknodeError):
            delta = _write(replicas[who], who, kind, i, ts)
            for other in reach | {who}:
                replicas[other].merge(delta)
    r, state = replicas["r"], replicas[relay]
    before = r.context.copy()
    kept = relayed(_rt(state), relay, before, hlc=ts + 1)
    assert kept.reason is None
    assert kept.document is not None
    joined = r.copy()
    joined.merge(kept.document)
    for w, n in dots_of(joined.store):
        assert w == relay or before.covers(w, n)
    for w, n in joined.context.dots():
        assert w == relay or before.covers(w, n)
    others_seen = all(
        w == relay or before.covers(w, n) for w, n in state.context.dots())
    if others_seen:
        plain = r.copy()
        plain.merge(state)
        assert joined.digest() == plain.digest()


# -- the machine: catch-up answers and evidence --------------------------------------------------


def test_a_relays_forged_attribution_is_stripped_and_the_owner_is_asked() -> None:
    a, b, c = (ReplicationMachine(n, seed=1) for n in ("node-a", "node-b", "node-c"))
    p = _publish(a, [Create("o")])
    _deliver(b, "node-a", p)
    _deliver(c, "node-a", p)
    # node-b's key: a state holding node-a's next dot with a value node-a never wrote.
    forged = b.state.copy()
    forged.apply_assign("node-a", ("o", "evil"), "x", 5)
    out = _catch_up(c, "node-b", forged)
    assert not c.state.context.covers("node-a", a.state.context.max_counter("node-a") + 1)
    assert "evil" not in str(c.state.value())
    # The owner is asked next (its own signed state, or a relay's kept batch of it).
    later = [a for a in out if isinstance(a, RequestCatchup)]
    assert c.catching_up or later


def test_a_relays_silence_and_wipe_remove_nothing_and_block_no_later_write() -> None:
    """A state claiming node-a's next 10**6 dots (silence), or every vector + 1000 (wipe),
    with no entry: it removes nothing (it over-claims: no claim of node-a's is kept), and
    node-a's later acknowledged writes are joined, not taken as already seen."""
    a, c = ReplicationMachine("node-a", seed=1), ReplicationMachine("node-c", seed=1)
    for i in range(5):
        _deliver(c, "node-a", _publish(a, [Create(f"k{i}")] if i == 0 else
                                       [Assign("k0", ("x", str(i)), i)]))
    before = c.state.value()
    silence = ORMap(None, CausalContext({"node-a": 10**6}), is_delta=False)
    _catch_up(c, "node-b", silence)
    assert c.state.value() == before
    wipe = ORMap(None, CausalContext({"node-a": 1005}))
    _catch_up(c, "node-b", wipe, now=2.0)
    assert c.state.value() == before
    assert c.state.context.max_counter("node-a") == a.state.context.max_counter("node-a")
    for i, now in ((1, 3.0), (2, 3.5)):
        out = _deliver(c, "node-a", _publish(a, [Create(f"after{i}")]), now=now)
        assert not _rejections(out)
    assert {"after1", "after2"} <= set(c.state.value())


def test_a_relay_can_remove_only_what_it_saw_and_the_receiver_holds() -> None:
    a, b, c = (ReplicationMachine(n, seed=1) for n in ("node-a", "node-b", "node-c"))
    p1 = _publish(a, [Create("o")])
    p2 = _publish(a, [Assign("o", ("x",), 1)])
    for m in (b, c):
        _deliver(m, "node-a", p1)
        _deliver(m, "node-a", p2)
    _publish(b, [lambda t, r, ts: t.remove_field("o", ("x",))])
    _catch_up(c, "node-b", b.state)
    assert "x" not in c.state.value()["o"]


def test_out_of_range_answers_are_rejected_and_name_the_relay() -> None:
    c = ReplicationMachine("node-c", seed=1)
    brick = ORMap(None, CausalContext({"node-a": INT64_MAX}))
    out = _catch_up(c, "node-b", brick)
    assert ("dot_range", "node-b") in _rejections(out)
    assert c.state.context.max_counter("node-a") == 0


def test_a_relay_forwards_the_owners_batches_a_fresh_node_lacks() -> None:
    """node-a writes and leaves; node-b kept its batches: a fresh node-d catching up from
    node-b gets them (to check as node-a's deltas) with node-b's answer, and holds every
    acknowledged write once it applied them."""
    a, b, d = (ReplicationMachine(n, seed=1) for n in ("node-a", "node-b", "node-d"))
    batches = [_publish(a, [Create("o")])]
    batches += [_publish(a, [Increment("o", ("n",), 1)]) for _ in range(4)]
    raws = {}
    for p in batches:
        out = _deliver(b, "node-a", p)
        assert not _rejections(out)
        raws[b"batch:node-a:" + str(p.sequence).encode()] = p
    sent = [x for x in b.handle(SyncRequested(1.0, d.state.context.copy(), "d"))
            if isinstance(x, SendState)]
    assert len(sent) == 1
    assert len(sent[0].evidence) == len(batches)
    for raw in sent[0].evidence:
        p = raws[raw]
        d.handle(DeltaReceived(1.0, "node-a", p.sequence, _rt(p.document), 10, raw=raw))
    _catch_up(d, "node-b", sent[0].document, now=1.1)
    assert d.state.value() == a.state.value()
    # A node that lacks nothing is sent no evidence.
    again = [x for x in b.handle(SyncRequested(2.0, d.state.context.copy(), "d"))
             if isinstance(x, SendState)]
    assert again[0].evidence == ()


def test_evidence_survives_a_restart_and_states_supersede_each_other() -> None:
    a, b = ReplicationMachine("node-a", seed=1), ReplicationMachine("node-b", seed=1)
    p = _publish(a, [Create("o")])
    _deliver(b, "node-a", p)
    _catch_up(b, "node-a", a.state)
    _publish(a, [Assign("o", ("x",), 1)])
    b.handle(StateEvidence(2.0, "node-a", _rt(a.state), b"state2:node-a", 10**15))
    kept = b.evidence()
    assert kept == [b"batch:node-a:1", b"state2:node-a"]  # the newer state replaced the older
    reloaded = ReplicationMachine("node-b", loaded=Loaded(b.state.copy(), evidence=(
        ("node-a", p.document.context, kept[0]), ("node-a", a.state.context, kept[1]))))
    assert reloaded.evidence() == kept


def test_an_add_only_subject_refuses_a_relayed_removal() -> None:
    """The revocation set is add-only on the catch-up path too: an answer whose join would
    remove an element held here is rejected whole and names its relay."""
    cfg = ReplicationConfig(add_only=True)
    a = ReplicationMachine("node-a", cfg, seed=1)
    c = ReplicationMachine("node-c", cfg, seed=1)
    _deliver(c, "node-a", _publish(a, [lambda t, r, ts: t.state.add(r, ("revoked",), "id1")]))
    wiped = ORMap(None, c.state.context.copy())  # every dot seen, no element: a removal
    out = _catch_up(c, "node-b", wiped)
    assert ("removal", "node-b") in _rejections(out)
    assert c.state.value() == {"revoked": {"id1"}}


def test_a_pre_claim_of_another_writers_next_write_never_removes_it() -> None:
    """node-b's key signs an empty batch claiming node-a's next dot before node-a issues it;
    the gate holds it, node-a's write arrives and lets it drain: the claim, unseen when the
    batch arrived, is cut, so the write stays; node-b is asked for its state (where an honest
    node-b would hold the write removed)."""
    a, c = ReplicationMachine("node-a", seed=1), ReplicationMachine("node-c", seed=1)
    _deliver(c, "node-a", _publish(a, [Create("o")]))
    nxt = a.state.context.max_counter("node-a") + 1
    pre = ORMap(None, CausalContext(cloud=[("node-a", nxt)]), is_delta=True)
    c.handle(DeltaReceived(1.0, "node-b", 1, _rt(pre), 10, raw=b"pre"))
    assert c.held == 1
    out = _deliver(c, "node-a", _publish(a, [Assign("o", ("x",), 7)]), now=2.0)
    assert c.held == 0
    assert ("cut",) in [x.args for x in out if isinstance(x, Report) and x.event == "gated"]
    assert c.state.value()["o"]["fields"] == {"x": 7}
    assert [x for x in out if isinstance(x, RequestCatchup) and x.peer == "node-b"] \
        or c.catching_up


def test_an_honest_removal_that_overtook_its_write_converges_by_the_removers_state() -> None:
    """node-b removed node-a's field; node-c gets node-b's batch first. The claim is cut when
    node-a's write lets the batch drain (node-c cannot tell it from a pre-claim), and node-b's
    state, asked for then, removes the field: node-c agrees with node-b without a healer."""
    a, b, c = (ReplicationMachine(n, seed=1) for n in ("node-a", "node-b", "node-c"))
    p1 = _publish(a, [Create("o")])
    for m in (b, c):
        _deliver(m, "node-a", p1)
    p2 = _publish(a, [Assign("o", ("x",), 1)])
    _deliver(b, "node-a", p2)
    pb = _publish(b, [lambda t, r, ts: t.remove_field("o", ("x",))])
    _deliver(c, "node-b", pb, now=1.0)
    assert c.held == 1
    _deliver(c, "node-a", p2, now=1.1)
    assert c.held == 0
    assert c.catching_up  # asked at the drain, running now
    c.handle(CatchupReplied(1.2, "node-b", pb.sequence, _rt(b.state), raw=b"state:node-b"))
    assert c.state.value() == b.state.value()


def test_a_claim_of_a_write_made_after_the_request_left_removes_nothing() -> None:
    """node-c asks for a catch-up, then writes; node-b's key answers first with a state
    claiming node-c's new dot (predictable: the next one) and holding it under a key of its
    own making. The answer is judged against the context the request carried: the claim is
    a pre-claim, cut, and node-b counted; judged against node-c's context now (``vouch``
    None, as before), the same answer removes node-c's write."""
    for vouch in (True, False):
        c = ReplicationMachine("node-c", seed=1)
        _publish(c, [Create("o")])
        asked = c.handle(CatchupWanted(1.0, None, urgent=True))
        assert [a for a in asked if isinstance(a, RequestCatchup)]
        request_context = c.state.context.copy()
        _publish(c, [Assign("o", ("x",), 7)], now=1.01)
        mine = c.state.context.max_counter("node-c")
        forged = ORMap(None, CausalContext({"node-c": mine - 1})).assign(
            "node-c", ("zforged", "fields", "x"), 666, 1_000)
        assert ("node-c", mine) in set(dots_of(forged.store))
        out = c.handle(CatchupReplied(
            1.02, "node-b", 1, _rt(ORMap(forged.store, forged.context, is_delta=False)),
            raw=b"state:node-b", vouch=request_context if vouch else None))
        if vouch:
            assert c.state.value()["o"]["fields"] == {"x": 7}
            assert "zforged" not in c.state.value()
            assert ("unvouched_state", "node-b") in _rejections(out)
        else:  # the defect the request's context closes
            assert c.state.value()["o"].get("fields", {}) == {}


def test_a_cut_answer_asks_the_cut_writer_then_the_peer_again() -> None:
    """node-b overwrote node-a's field; node-c has seen neither node-a's write nor, so,
    node-b's removal of it, and node-b kept no evidence of node-a's batch. node-b's answer
    leaves both out and names node-a as cut; node-c asks node-a (its state brings the field,
    not yet overwritten there), then node-b again, whose removal now joins: node-c agrees
    with node-b without a healer (sim seed 123)."""
    a, b, c = (ReplicationMachine(n, seed=1) for n in ("node-a", "node-b", "node-c"))
    p1 = _publish(a, [Create("o")])
    for m in (b, c):
        _deliver(m, "node-a", p1)
    p2 = _publish(a, [Assign("o", ("x",), 1)])
    b.handle(DeltaReceived(0.0, "node-a", p2.sequence, _rt(p2.document), 10))  # no raw kept
    _publish(b, [Assign("o", ("x",), 2)], now=0.5)
    state_of_a = a.state.copy()  # node-a's state before it hears of node-b's overwrite

    assert [x for x in c.handle(CatchupWanted(1.0, "node-b", urgent=True))
            if isinstance(x, RequestCatchup)]
    asked = c.state.context.copy()
    sent = [x for x in b.handle(SyncRequested(1.0, asked.copy(), "c"))
            if isinstance(x, SendState)]
    assert sent
    assert sent[0].cut == ("node-a",)
    out = c.handle(CatchupReplied(1.0, "node-b", 2, _rt(sent[0].document),
                                  raw=b"state:node-b", vouch=asked, cut=sent[0].cut))
    assert c.state.value()["o"]["fields"] == {"x": 2}
    nxt = [x for x in out if isinstance(x, RequestCatchup)]
    peer = nxt[0].peer if nxt else None
    for step in range(6):
        if peer is None:
            out = c.handle(CatchupWanted(2.0 + step, None))
            reqs = [x for x in out if isinstance(x, RequestCatchup)]
            if not reqs:
                out = c.handle(SyncWanted(2.0 + step))
                continue
            peer = reqs[0].peer
        src = {"node-a": a, "node-b": b}[peer]
        asked = c.state.context.copy()
        answer = next(x for x in src.handle(SyncRequested(2.0 + step, asked.copy(), "c"))
                      if isinstance(x, SendState))
        if peer == "node-a":  # node-a answers from its state before node-b's overwrite
            answer = SendState("c", state_of_a)
        out = c.handle(CatchupReplied(2.0 + step, peer, 2, _rt(answer.document),
                                      raw=b"state:" + peer.encode(), vouch=asked,
                                      cut=answer.cut))
        reqs = [x for x in out if isinstance(x, RequestCatchup)]
        peer = reqs[0].peer if reqs else None
        if c.state.value() == b.state.value():
            break
    assert c.state.value() == b.state.value()
    assert c.state.value()["o"]["fields"] == {"x": 2}
