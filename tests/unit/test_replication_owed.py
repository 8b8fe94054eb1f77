"""Catch-up that the simulator showed was missing: losses no sequence gap or context shows.

- The first batch seen from a writer (after a start, or having missed all of its earlier
  ones) follows batches never seen here; one may have been a removal, which issues no dot, so
  no context can show it: a catch-up from that writer is owed.
- A catch-up answered by a peer that lacked the same thing (a hole in the context below a
  writer's dot, an owed writer) asks that writer next, after a backoff; peers that keep
  answering without it make the machine give up on that writer after ``MAX_OWED_ATTEMPTS``
  (left to the healer) instead of transferring states forever.
"""

from __future__ import annotations

from broker.codec import WireCodec
from broker.crdt import Add, Assign, Create, ORMap
from broker.replication import (
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
    SyncRequested,
    TimerFired,
)
from broker.replication._machine import MAX_OWED_ATTEMPTS

CODEC = WireCodec()


def wire(doc: ORMap) -> ORMap:
    out = CODEC.decode_document(CODEC.encode_document(doc), ORMap)
    assert isinstance(out, ORMap)
    return out


def batch(m: ReplicationMachine, ops: list[object], now: float, seq: int) -> Publish:
    w = m.write(ops, lambda: 1_000 + seq)  # type: ignore[arg-type]
    m.handle(Committed(now, w.delta, w.ops, 10, seq))
    (p,) = [a for a in m.handle(TimerFired(now + 1, "flush")) if isinstance(a, Publish)]
    m.handle(Published(now + 1, p.sequence))
    return p


def requests(actions: list[Action]) -> list[RequestCatchup]:
    return [a for a in actions if isinstance(a, RequestCatchup)]


def state_of(m: ReplicationMachine, asker: ReplicationMachine) -> ORMap:
    (s,) = [a for a in m.handle(SyncRequested(0.0, asker.state.context, "t", full=True))
            if isinstance(a, SendState)]
    return wire(s.document)


def test_a_lost_removal_before_the_first_batch_seen_is_caught_up_from_its_writer() -> None:
    a = ReplicationMachine("a")
    b1 = batch(a, [Create("n"), Add("n", ("s",), 1)], 0.0, 1)
    c = ReplicationMachine("c")  # c saw batch 1, then lost batch 2 (a removal)
    c.handle(DeltaReceived(2.0, "a", 1, wire(b1.document), 10))
    c2 = ReplicationMachine("c", loaded=Loaded(c.state.copy()))  # restarted: no sequence known
    batch(a, [lambda t, r, ts: t.discard(r, "n", ("s",), 1)], 3.0, 2)  # lost
    b3 = batch(a, [Create("z")], 5.0, 3)
    out = c2.handle(DeltaReceived(7.0, "a", 3, wire(b3.document), 10))
    assert requests(out) == [RequestCatchup("a", 2.0, True)]  # not seen: only a knows
    assert c2.state.value()["n"]["fields"] == {"s": frozenset({1})}  # still shows the add
    c2.handle(CatchupReplied(7.5, "a", a.sequence, state_of(a, c2)))
    assert c2.state.value() == a.state.value()
    assert not c2.catching_up


def test_an_answer_that_leaves_a_hole_asks_the_writer_after_a_backoff() -> None:
    a, p, b = ReplicationMachine("a"), ReplicationMachine("p"), ReplicationMachine("b")
    batch(a, [Create("n")], 0.0, 1)  # lost on its way to p and b
    b2 = batch(a, [Create("m")], 1.0, 2)
    # p holds a's dot 2, not 1 (and keeps a's signed batch as evidence).
    p.handle(DeltaReceived(2.0, "a", 2, wire(b2.document), 10, raw=b"a2"))
    assert p.state.context.cloud
    # b asks any peer (after a slow consumer, say); p answers with a state that has the hole,
    # a's batch sent ahead of it (a relay vouches for its own dots only).
    assert requests(b.handle(CatchupWanted(3.0, urgent=True)))
    (s,) = [x for x in p.handle(SyncRequested(0.0, b.state.context, "t", full=True))
            if isinstance(x, SendState)]
    assert s.evidence == (b"a2",)
    b.handle(DeltaReceived(3.05, "a", 2, wire(b2.document), 10, raw=b"a2"))
    out = b.handle(CatchupReplied(3.1, "p", p.sequence, wire(s.document)))
    assert Report("catchup", ("ok",)) in out
    (t,) = [x for x in out if isinstance(x, ScheduleTimer)]
    assert t.at > 3.1 + 0.5 * ReplicationConfig().catchup_min_interval
    (again,) = requests(b.handle(TimerFired(t.at, "catchup")))
    assert again.peer == "a"


def test_a_writers_batch_held_after_a_peers_answer_asks_the_writer_at_once() -> None:
    """A replica restarts and catches up from a peer (nothing missing that it can tell),
    then a batch of the writer's arrives that claims a dot never seen here (its batch
    before was lost): held until the writer itself answers. The writer is asked at once,
    not after the rate limit the peer's answer set (half a second of held writes, seen at
    every start of the replication benchmark); a writer asked lately is not asked again
    before ``catchup_min_interval``; after a failed catch-up, the backoff applies."""
    cfg = ReplicationConfig()
    a, p, b = ReplicationMachine("a"), ReplicationMachine("p"), ReplicationMachine("b")
    b1 = batch(a, [Create("n")], 0.0, 1)
    for m in (p, b):
        m.handle(DeltaReceived(0.5, "a", 1, wire(b1.document), 10))
    b = ReplicationMachine("b", loaded=Loaded(b.state.copy()))  # restarted
    assert [r.peer for r in requests(b.handle(CatchupWanted(1.0, urgent=True)))] == [None]
    out = b.handle(CatchupReplied(1.1, "p", p.sequence, state_of(p, b)))
    assert Report("catchup", ("ok",)) in out
    assert not requests(out)
    batch(a, [Assign("n", ("x",), 1)], 1.12, 2)  # lost everywhere
    b3 = batch(a, [Assign("n", ("x",), 2)], 1.15, 3)  # overwrites dot 2: claims it
    out = b.handle(DeltaReceived(1.2, "a", 3, wire(b3.document), 10))
    assert Report("gated", ("held",)) in out
    # At once, though p answered at 1.1 (the old rule: not before 1.1 + min interval).
    assert [r.peer for r in requests(out)] == ["a"]
    b.handle(CatchupReplied(1.3, "a", a.sequence, state_of(a, b)))
    assert b.state.value() == a.state.value()
    assert b.held == 0
    # Held again (one more batch lost): a was asked at 1.2, so not before 1.2 + interval.
    batch(a, [Assign("n", ("x",), 4)], 1.35, 4)  # lost
    b5 = batch(a, [Assign("n", ("x",), 5)], 1.4, 5)
    out = b.handle(DeltaReceived(1.45, "a", 5, wire(b5.document), 10))
    assert Report("gated", ("held",)) in out
    assert not requests(out)
    (t,) = [x for x in out if isinstance(x, ScheduleTimer) and x.name == "catchup"]
    assert t.at >= 1.2 + cfg.catchup_min_interval
    (asked,) = requests(b.handle(TimerFired(t.at, "catchup")))
    assert asked.peer == "a"
    # That one fails (a is away): the backoff applies to every start, held batch or not.
    out = b.handle(CatchupFailed(t.at + 2.0, "timeout"))
    assert not requests(out)
    later = b.handle(DeltaReceived(t.at + 2.1, "a", 6, wire(b5.document), 10))
    assert not requests(later)


def test_peers_answering_without_an_owed_writer_end_in_giving_it_up() -> None:
    cfg = ReplicationConfig(catchup_min_interval=0.5, catchup_max_backoff=4.0)
    a, p = ReplicationMachine("a"), ReplicationMachine("p")
    b = ReplicationMachine("b", cfg, seed=3)
    batch(a, [Create("n")], 0.0, 1)  # lost everywhere
    b2 = batch(a, [Create("m")], 1.0, 2)
    out = b.handle(DeltaReceived(2.0, "a", 2, wire(b2.document), 10))  # first seen: owed
    now, delays, gave_up = 2.0, [], False
    for _ in range(3 * MAX_OWED_ATTEMPTS):
        reqs = requests(out)
        if not reqs:
            timers = [x for x in out if isinstance(x, ScheduleTimer) and x.name == "catchup"]
            if not timers:
                break
            delays.append(timers[0].at - now)
            now = timers[0].at
            out = b.handle(TimerFired(now, "catchup"))
            continue
        out = b.handle(CatchupReplied(now + 0.01, "p", 0, state_of(p, b)))  # never a's state
        gave_up = gave_up or Report("catchup", ("gave_up",)) in out
        now += 0.01
    assert gave_up
    assert all(d <= 4.0 for d in delays)
    assert len(delays) <= MAX_OWED_ATTEMPTS + 1
    assert not b.catching_up


def test_a_window_known_from_an_early_answer_does_not_hide_a_lost_first_batch() -> None:
    """Seed 68 of the simulator: w answered a catch-up before it had published anything
    (window at 0); its batch 1 (a removal) was lost; batch 2 is the first seen from it."""
    a, c = ReplicationMachine("a"), ReplicationMachine("c")
    b1 = batch(a, [Create("n"), Add("n", ("s",), 1)], 0.0, 1)
    c.handle(DeltaReceived(0.5, "a", 1, wire(b1.document), 10))
    c2 = ReplicationMachine("c", loaded=Loaded(c.state.copy()))  # restarted
    assert requests(c2.handle(CatchupWanted(1.0, urgent=True)))
    fresh = ReplicationMachine("a")  # as a's answer would be before a published: sequence 0
    c2.handle(CatchupReplied(1.1, "a", 0, state_of(fresh, c2)))
    batch(a, [lambda t, r, ts: t.discard(r, "n", ("s",), 1)], 3.0, 2)  # lost
    b3 = batch(a, [Create("z")], 5.0, 3)
    out = c2.handle(DeltaReceived(7.0, "a", 3, wire(b3.document), 10))
    assert c2.catching_up
    assert requests(out) or any(isinstance(x, ScheduleTimer) for x in out)
