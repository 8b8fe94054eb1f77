"""The bounds of the Byzantine-writer machinery (issue 17), attacked at the machine level (pure,
no I/O): bad input is bounded, loses nothing, and is counted.

- The evidence log (other writers' signed batches kept as they arrived) stays within
  ``max_evidence_bytes``: the oldest is dropped, the newest kept, ``evidence_bytes`` exact after
  many additions and evictions and after a reload (``Loaded.evidence``); one item larger than
  the bound is not kept (and evicts nothing).
- One catch-up answer forwards at most ``max_evidence_reply_bytes`` of evidence; the answer is
  then cut to what that evidence vouches for, names the rest (``SendState.cut``), and the
  asker's next catch-ups bring the rest: a fresh replica far behind converges in several
  rounds and never holds a dot its writer's own signature did not bring.
- ``RECENT_BATCHES``: a writer with more batches than a replica remembers the write times of
  still has a pre-claim of a write in its newest batches dropped, and an honest claim kept.
- A Byzantine replier's ``CatchupReplied.cut`` (longer than ``MAX_CUT_WRITERS``, naming the
  asker, the replier, unknown names): a bounded follow-up, nothing lost, the machine goes on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from broker.codec import WireCodec
from broker.crdt import Assign, CausalContext, Create, Increment, ORMap
from broker.crdt._stores import dots_of
from broker.replication import (
    MAX_CUT_WRITERS,
    Action,
    CatchupFailed,
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
    ScheduleTimer,
    SendState,
    Started,
    StateEvidence,
    SyncRequested,
    SyncWanted,
    TimerFired,
)
from broker.replication._gate import own_claims
from broker.replication._machine import MAX_OWED_ATTEMPTS, RECENT_BATCHES, TIMER_CATCHUP

CODEC = WireCodec()
MS = 1 << 16
"""One millisecond in hybrid-clock units (the logical counter's bits below it)."""


def _rt(doc: ORMap) -> ORMap:
    out = CODEC.decode_document(CODEC.encode_document(doc), ORMap)
    assert isinstance(out, ORMap)
    return out


def _publish(m: ReplicationMachine, ops: list[Any], wall_ms: int = 1_000) -> Publish:
    w = m.write(ops, lambda: wall_ms)
    m.handle(Committed(0.0, w.delta, w.ops, 10, m.last_record_seq + 1))
    (p,) = [a for a in m.handle(SyncWanted(0.0)) if isinstance(a, Publish)]
    m.handle(Published(0.0, p.sequence, 10))
    return p


def _raw(writer: str, seq: int, size: int) -> bytes:
    """A stand-in for a signed envelope of ``size`` bytes (the machine keeps it opaque)."""
    head = f"batch:{writer}:{seq}:".encode()
    return head + b"." * max(0, size - len(head))


def _rejections(out: list[Action]) -> list[tuple[Any, ...]]:
    return [a.args for a in out if isinstance(a, Report) and a.event == "rejected"]


# -- the evidence log ---------------------------------------------------------------------------


def _sizes(n: int) -> list[int]:
    """Varied envelope sizes (so that an accounting off by any item shows)."""
    return [60 + (i * 37) % 113 for i in range(n)]


def test_the_evidence_log_keeps_the_newest_within_its_bound_and_counts_exactly() -> None:
    bound = 1_000
    a = ReplicationMachine("node-a", seed=1)
    b = ReplicationMachine("node-b", ReplicationConfig(max_evidence_bytes=bound), seed=1)
    kept: list[tuple[str, CausalContext, bytes]] = []
    sizes = _sizes(60)
    for i, size in enumerate(sizes):
        p = _publish(a, [Create("o")] if i == 0 else [Increment("o", ("n",), 1)])
        raw = _raw("node-a", p.sequence, size)
        out = b.handle(DeltaReceived(0.0, "node-a", p.sequence, _rt(p.document), 10, raw=raw))
        assert not _rejections(out)
        kept.append(("node-a", p.document.context, raw))
        evidence = b.evidence()
        # Exact accounting, within the bound, the newest kept: the longest suffix that fits.
        assert b.evidence_bytes == sum(map(len, evidence)) <= bound
        assert evidence == [r for _, _, r in kept[len(kept) - len(evidence):]]
        assert evidence[-1] == raw
        if len(evidence) < len(kept):
            assert b.evidence_bytes + len(kept[-len(evidence) - 1][2]) > bound
    assert len(b.evidence()) < len(kept) // 3, "many were evicted"
    # This replica's own batches, and a batch claiming no dot of its writer, are no evidence.
    before = b.evidence()
    _publish(b, [Assign("o", ("x",), 1)])
    empty = ORMap(None, CausalContext({"node-a": 1}), is_delta=True)
    b.handle(DeltaReceived(0.0, "node-c", 1, _rt(empty), 10, raw=_raw("node-c", 1, 80)))
    assert b.evidence() == before

    # A reload with the evidence stored at the snapshot: the same log, the same count; with a
    # smaller bound, the newest that fit.
    loaded = tuple(kept[-len(before):])
    again = ReplicationMachine("node-b", ReplicationConfig(max_evidence_bytes=bound), loaded=Loaded(
        b.state.copy(), evidence=loaded))
    assert again.evidence() == before
    assert again.evidence_bytes == b.evidence_bytes
    small = ReplicationMachine("node-b", ReplicationConfig(max_evidence_bytes=300), loaded=Loaded(
        b.state.copy(), evidence=loaded))
    assert small.evidence_bytes == sum(map(len, small.evidence())) <= 300
    assert small.evidence() == before[len(before) - len(small.evidence()):]
    assert small.evidence_bytes + len(before[-len(small.evidence()) - 1]) > 300
    # A later batch after the reload evicts by the same count.
    p = _publish(a, [Increment("o", ("n",), 1)])
    raw = _raw("node-a", p.sequence, 150)
    small.handle(DeltaReceived(0.0, "node-a", p.sequence, _rt(p.document), 10, raw=raw))
    assert small.evidence()[-1] == raw
    assert small.evidence_bytes == sum(map(len, small.evidence())) <= 300


def test_a_writers_newer_state_replaces_its_older_one_in_the_count() -> None:
    a = ReplicationMachine("node-a", seed=1)
    b = ReplicationMachine("node-b", ReplicationConfig(max_evidence_bytes=1_000), seed=1)
    p = _publish(a, [Create("o")])
    first = _raw("node-a", p.sequence, 200)
    b.handle(DeltaReceived(0.0, "node-a", p.sequence, _rt(p.document), 10, raw=first))
    for i, size in enumerate((300, 120, 450, 90)):
        _publish(a, [Increment("o", ("n",), 1)])
        state = _raw("state-a", i, size)
        out = b.handle(StateEvidence(0.0, "node-a", _rt(a.state), state, 10**15))
        assert not _rejections(out)
        assert b.evidence() == [first, state]
        assert b.evidence_bytes == 200 + size


def test_evidence_larger_than_the_bound_is_not_kept_and_evicts_nothing() -> None:
    bound = 500
    a = ReplicationMachine("node-a", seed=1)
    b = ReplicationMachine("node-b", ReplicationConfig(max_evidence_bytes=bound), seed=1)
    for i in range(3):
        p = _publish(a, [Create("o")] if i == 0 else [Increment("o", ("n",), 1)])
        b.handle(DeltaReceived(0.0, "node-a", p.sequence, _rt(p.document), 10,
                               raw=_raw("node-a", p.sequence, 100)))
    before, count = b.evidence(), b.evidence_bytes
    assert count == 300
    p = _publish(a, [Increment("o", ("n",), 5)])
    huge = _raw("node-a", p.sequence, bound + 1)
    out = b.handle(DeltaReceived(0.0, "node-a", p.sequence, _rt(p.document), 10, raw=huge))
    assert not _rejections(out)
    assert b.state.value() == a.state.value(), "the batch itself is joined"
    assert b.evidence() == before
    assert b.evidence_bytes == count
    # A reload handed such an item (a bound lowered since) leaves it out the same way.
    again = ReplicationMachine("node-b", ReplicationConfig(max_evidence_bytes=bound), loaded=Loaded(
        b.state.copy(), evidence=(("node-a", p.document.context, huge),)))
    assert again.evidence() == []
    assert again.evidence_bytes == 0


# -- the per-answer evidence budget -------------------------------------------------------------


class _Sim:
    """Drives an asker's catch-ups by hand: every request is answered by ``answer(peer,
    context)`` (a ``SendState``, or None: nobody answered), its evidence delivered first as
    the driver does (each its writer's own batch; its writer's dots join the context the
    answer is judged against), catch-up timers fired at their times."""

    def __init__(self, m: ReplicationMachine,
                 answer: Callable[[str | None, CausalContext], tuple[str, SendState] | None],
                 batches: dict[bytes, tuple[str, Publish]]) -> None:
        self.m, self.answer, self.batches = m, answer, batches
        self.now = 10.0
        self.timer: float | None = None
        self.asked: list[str | None] = []
        self.answers: list[SendState] = []
        self.signed: set[tuple[str, int]] = set()
        """Dots of writers other than the repliers that arrived under their own signature."""
        self.out: list[Action] = []

    def run(self, actions: list[Action], steps: int, done: Callable[[], bool]) -> int:
        """Execute ``actions`` and what follows, for at most ``steps`` catch-ups or until
        ``done()``; the catch-ups run."""
        todo = list(actions)
        n = 0
        while n < steps and not done():
            self.out += todo
            req = next((a for a in todo if isinstance(a, RequestCatchup)), None)
            for a in todo:
                if isinstance(a, ScheduleTimer) and a.name == TIMER_CATCHUP:
                    self.timer = a.at
            if req is None:
                if self.timer is None:
                    break  # nothing more wanted
                self.now, self.timer = max(self.now, self.timer), None
                todo = self.m.handle(TimerFired(self.now, TIMER_CATCHUP))
                continue
            n += 1
            self.asked.append(req.peer)
            self.now += 0.01
            asked = self.m.state.context.copy()
            got = self.answer(req.peer, asked.copy())
            if got is None:
                todo = self.m.handle(CatchupFailed(self.now, "no_peer"))
                continue
            replier, sent = got
            self.answers.append(sent)
            vouch = asked
            for raw in sent.evidence:
                writer, p = self.batches[raw]
                vouch.merge(own_claims(p.document.context, writer))
                self.signed |= set(p.document.context.dots())
                out = self.m.handle(DeltaReceived(self.now, writer, p.sequence,
                                                  _rt(p.document), 10, raw=raw))
                assert not _rejections(out), out
            todo = self.m.handle(CatchupReplied(
                self.now, replier, 1, _rt(sent.document), raw=b"state:" + replier.encode(),
                vouch=vouch, cut=sent.cut))
            assert not _rejections(todo), f"an honest answer was counted: {todo}"
        return n


def _kept_batches(rounds: int, size: int) -> tuple[ReplicationMachine,
                                                   dict[bytes, tuple[str, Publish]]]:
    """node-a's ``rounds`` batches (each ``size`` bytes as sent), kept by node-b; node-b
    overwrote one of node-a's fields and wrote its own."""
    a = ReplicationMachine("node-a", seed=1)
    b = ReplicationMachine("node-b", seed=1)
    batches: dict[bytes, tuple[str, Publish]] = {}
    for i in range(rounds):
        p = _publish(a, [Create("o")] if i == 0 else [Assign("o", (f"f{i}",), i)])
        raw = _raw("node-a", p.sequence, size)
        batches[raw] = ("node-a", p)
        out = b.handle(DeltaReceived(0.0, "node-a", p.sequence, _rt(p.document), 10, raw=raw))
        assert not _rejections(out)
    _publish(b, [Assign("o", ("f1",), "b"), Create("mine")])
    assert len(b.evidence()) == rounds
    return b, batches


def test_one_answer_forwards_at_most_its_evidence_budget_and_is_cut_to_it() -> None:
    per, size = 3, 100
    b, batches = _kept_batches(12, size)
    b.config = ReplicationConfig(max_evidence_reply_bytes=per * size + size // 2)
    d = ReplicationMachine("node-d", seed=1)
    (sent,) = [x for x in b.handle(SyncRequested(1.0, d.state.context.copy(), "d", full=True))
               if isinstance(x, SendState)]
    assert sum(map(len, sent.evidence)) <= b.config.max_evidence_reply_bytes
    assert sent.evidence == tuple(b.evidence()[:per]), "the oldest lacked first"
    assert sent.cut == ("node-a",)
    # The answer holds node-a's dots only as far as the evidence sent with it vouches for.
    vouched = CausalContext()
    for raw in sent.evidence:
        vouched.merge(batches[raw][1].document.context)
    for w, n in [*dots_of(sent.document.store), *sent.document.context.dots()]:
        assert w == "node-b" or vouched.covers(w, n), (w, n)
    assert "mine" in sent.document.value()


def test_one_answer_forwards_at_most_its_evidence_message_count() -> None:
    """Each kept batch is one message ahead of the answer, and NATS lets a node send only
    so many replies to one request (``EVIDENCE_REPLIES``): the count is bounded as the bytes
    are, and the answer cut to what the batches sent vouch for."""
    b, batches = _kept_batches(12, 100)
    b.config = ReplicationConfig(max_evidence_reply_messages=4)
    d = ReplicationMachine("node-d", seed=1)
    (sent,) = [x for x in b.handle(SyncRequested(1.0, d.state.context.copy(), "d", full=True))
               if isinstance(x, SendState)]
    assert sent.evidence == tuple(b.evidence()[:4]), "the oldest lacked first, four of them"
    assert sent.cut == ("node-a",)
    vouched = CausalContext()
    for raw in sent.evidence:
        vouched.merge(batches[raw][1].document.context)
    for w, n in [*dots_of(sent.document.store), *sent.document.context.dots()]:
        assert w == "node-b" or vouched.covers(w, n), (w, n)


def test_a_fresh_replica_far_behind_converges_over_several_budgeted_answers() -> None:
    """node-a wrote 60 batches and left; node-b kept them and overwrote one of node-a's
    fields. A fresh node-d catches up from node-b, three batches of evidence per answer: it
    never holds a node-a dot that node-a's own batch did not bring, and ends with node-b's
    state (node-b's overwrite included) after several answers, with no one counted."""
    per, size, rounds = 3, 100, 60
    b, batches = _kept_batches(rounds, size)
    b.config = ReplicationConfig(max_evidence_reply_bytes=per * size)
    d = ReplicationMachine("node-d", seed=1)

    def answer(peer: str | None, context: CausalContext) -> tuple[str, SendState] | None:
        if peer not in (None, "node-b"):
            return None  # node-a is away
        (s,) = [x for x in b.handle(SyncRequested(sim.now, context, "d", full=True))
                if isinstance(x, SendState)]
        assert sum(map(len, s.evidence)) <= per * size
        return "node-b", s

    sim = _Sim(d, answer, batches)

    def unvouched() -> list[tuple[str, int]]:
        held = [*(dots_of(d.state.store) if d.state.store else ()), *d.state.context.dots()]
        return [(w, n) for w, n in held if w == "node-a" and (w, n) not in sim.signed]

    def done() -> bool:
        assert not unvouched(), "node-d holds a node-a dot no node-a batch brought"
        return d.state.value() == b.state.value()

    steps = sim.run(d.handle(Started(10.0)), 4 * rounds, done)
    assert not unvouched()
    assert d.state.value() == b.state.value(), (
        f"not converged after {steps} catch-ups: node-d holds "
        f"{d.state.context.max_counter('node-a')} of node-a's {rounds} batches' dots")
    assert d.state.value()["o"]["fields"]["f1"] == "b"
    assert sum(1 for s in sim.answers if s.evidence) >= rounds // per


# -- RECENT_BATCHES -----------------------------------------------------------------------------


def test_more_batches_than_remembered_still_drop_a_pre_claim_of_the_newest() -> None:
    """node-a publishes ``RECENT_BATCHES`` + 100 batches, 3 s apart; node-c joins them all.
    node-b's key signs, at the time of node-a's batch N-3, a claim of the dot of node-a's
    newest write (predictable), delivered after it: the claim is dropped, the write stays.
    Claims node-b really made after seeing them are kept: an honest removal of node-a's
    newest field (signed after it) removes it, and a claim signed at batch N-500's time of
    what node-a had written by then is left whole."""
    total = RECENT_BATCHES + 100
    a = ReplicationMachine("node-a", seed=1)
    c = ReplicationMachine("node-c", seed=1)
    written: list[int] = []  # envelope timestamp of each batch
    tops: list[int] = []  # node-a's newest dot after each batch
    for i in range(total):
        wall = 1_000_000 + 3_000 * i
        p = _publish(a, [Create("o")] if i == 0 else [Assign("o", (f"f{i % 7}",), i)],
                     wall_ms=wall)
        hlc = a.clock.last
        out = c.handle(DeltaReceived(0.0, "node-a", p.sequence, p.document, 10, hlc=hlc))
        assert not _rejections(out)
        written.append(hlc)
        tops.append(a.state.context.max_counter("node-a"))
    newest = f"f{(total - 1) % 7}"
    assert c.state.value()["o"]["fields"][newest] == total - 1

    # The pre-claim: an empty batch of node-b's claiming the dot of node-a's newest write.
    pre = ORMap(None, CausalContext(cloud=[("node-a", tops[-1])]), is_delta=True)
    assert c.without_later_claims(pre, "node-b", written[-4]) is not pre
    out = c.handle(DeltaReceived(1.0, "node-b", 1, _rt(pre), 10, hlc=written[-4]))
    assert ("cut",) in [x.args for x in out if isinstance(x, Report) and x.event == "gated"]
    assert c.state.value()["o"]["fields"][newest] == total - 1, "the pre-claim removed it"

    # Honest claims are never dropped: one of what node-a had written by batch N-500 ...
    old = ORMap(None, CausalContext({"node-a": tops[-500]}), is_delta=True)
    assert c.without_later_claims(old, "node-b", written[-500]) is old
    # ... and a removal of node-a's newest field signed after it was written.
    removal = ORMap(None, CausalContext(cloud=[("node-a", tops[-1])]), is_delta=True)
    assert c.without_later_claims(removal, "node-b", written[-1] + MS) is removal
    out = c.handle(DeltaReceived(2.0, "node-b", 2, _rt(removal), 10, hlc=written[-1] + MS))
    assert not _rejections(out)
    assert newest not in c.state.value()["o"]["fields"]


# -- a Byzantine replier's cut list -------------------------------------------------------------


def test_a_byzantine_cut_list_gets_a_bounded_follow_up_and_loses_nothing() -> None:
    """node-b's key answers every catch-up of node-c's with its honest state and a cut list
    naming node-c itself, node-b, and 40 names nobody answers for (more than
    ``MAX_CUT_WRITERS``). node-c asks no more than the first ``MAX_CUT_WRITERS`` names (never
    itself, never past the list's bound), follows no more than ``MAX_OWED_ATTEMPTS`` such
    answers in a row, stops asking, holds every write, and goes on replicating."""
    a, b, c = (ReplicationMachine(n, seed=1) for n in ("node-a", "node-b", "node-c"))
    batches: dict[bytes, tuple[str, Publish]] = {}
    pa = _publish(a, [Create("o"), Assign("o", ("x",), 1)])
    for m in (b, c):
        m.handle(DeltaReceived(0.0, "node-a", pa.sequence, _rt(pa.document), 10,
                               raw=b"batch:node-a:1"))
    _publish(b, [Assign("o", ("y",), 2)])
    _publish(c, [Assign("o", ("z",), 3)])
    # Named so that what the machine would ask first (the least owed name) is node-b, then
    # node-c, then the names past the list's bound: each must be filtered out to be skipped.
    names = tuple(f"zz-ghost-{i:02d}" for i in reversed(range(40)))
    cut = ("node-c", "node-b", *names)

    def answer(peer: str | None, context: CausalContext) -> tuple[str, SendState] | None:
        if peer not in (None, "node-b"):
            return None  # nobody answers for the names it made up
        (s,) = [x for x in b.handle(SyncRequested(sim.now, context, "c", full=True))
                if isinstance(x, SendState)]
        return "node-b", SendState(s.reply_to, s.document, s.evidence, cut)

    sim = _Sim(c, answer, batches)
    steps = sim.run(c.handle(CatchupWanted(1.0, None, urgent=True)), 2_000, lambda: False)
    assert steps < 2_000, "node-c never stopped following the cut list"
    assert not c.catching_up
    allowed = {None, "node-b", *cut[:MAX_CUT_WRITERS]} - {"node-c"}
    assert set(sim.asked) <= allowed, set(sim.asked) - allowed
    assert "node-c" not in sim.asked
    # At most MAX_OWED_ATTEMPTS cut answers of node-b's in a row are followed: the one after
    # them gives up (counted) and nothing more is asked.
    gave_up = [x for x in sim.out if isinstance(x, Report) and x.args == ("gave_up",)]
    assert gave_up
    assert len(sim.answers) <= MAX_OWED_ATTEMPTS + 1, len(sim.answers)
    # Nothing lost, nothing counted against an honest peer, and the machine goes on.
    assert c.state.value()["o"]["fields"] == {"x": 1, "y": 2, "z": 3}
    pa2 = _publish(a, [Assign("o", ("w",), 4)])
    out = c.handle(DeltaReceived(sim.now + 1, "node-a", pa2.sequence, _rt(pa2.document), 10))
    assert not _rejections(out)
    pc = _publish(c, [Assign("o", ("v",), 5)])
    assert pc.sequence == 2
    assert c.state.value()["o"]["fields"] == {"x": 1, "y": 2, "z": 3, "w": 4, "v": 5}


def test_an_answer_whose_evidence_was_dropped_is_cut_but_its_signer_not_counted() -> None:
    """The driver dropped evidence sent with an answer (past its bound: an inbox flood anyone
    may send): what the answer carries beyond the request's context may be backed by that
    evidence, so its signer is not counted; it is still joined without it, and the writer
    cut out is owed. With nothing dropped, the same answer counts its signer."""
    b, _ = _kept_batches(3, 100)
    for dropped in (True, False):
        c = ReplicationMachine("node-c", seed=1)
        assert [x for x in c.handle(CatchupWanted(1.0, "node-b", urgent=True))
                if isinstance(x, RequestCatchup)]
        asked = c.state.context.copy()
        (sent,) = [x for x in b.handle(SyncRequested(1.0, asked.copy(), "c", full=True))
                   if isinstance(x, SendState)]
        assert sent.evidence  # the honest answer relies on it; here it never arrived
        out = c.handle(CatchupReplied(1.0, "node-b", 1, _rt(sent.document), raw=b"state:b",
                                      vouch=asked, cut=sent.cut, evidence_dropped=dropped))
        assert not [w for w, _n in dots_of(c.state.store) if w == "node-a"]
        assert "mine" in c.state.value()
        assert (("unvouched_state", "node-b") in _rejections(out)) is not dropped
        assert c.catching_up, "node-a, cut out, is asked"
