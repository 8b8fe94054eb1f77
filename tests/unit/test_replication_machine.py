"""The replication machine, driven without asyncio: the causal gate, catch-up retries and
coalescing, batching, and a simulated network of 2-3 machines with loss, duplication and
reordering that must converge on the writers' values.

The simulator below is deliberately small: a list of envelopes in flight (encoded with the
real ``WireCodec``, so every state and delta round-trips), a clock advanced by steps, timers
fired when due, and catch-up requests answered (or failed) when a step says so.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

from broker.codec import WireCodec
from broker.crdt import Add, Assign, CausalContext, Create, Increment, ORMap
from broker.replication import (
    Action,
    Announce,
    AnnounceReceived,
    CatchupFailed,
    CatchupReplied,
    CatchupWanted,
    Committed,
    DeltaReceived,
    Event,
    Loaded,
    LogReceived,
    Publish,
    Published,
    PublishFailed,
    ReceivedLogged,
    ReplicationConfig,
    ReplicationMachine,
    Report,
    RequestCatchup,
    ScheduleTimer,
    SendState,
    Snapshot,
    SnapshotTaken,
    SyncRequested,
    SyncWanted,
    TimerFired,
    held_dots,
    unseen_claims,
)

CODEC = WireCodec()


def roundtrip(doc: ORMap) -> ORMap:
    out = CODEC.decode_document(CODEC.encode_document(doc), ORMap)
    assert isinstance(out, ORMap)
    return out


# -- the gate, on the issue's example --------------------------------------------------------


def test_the_issue_example_waits_for_the_lost_delta() -> None:
    a, b = ORMap(), ORMap()
    d1 = a.increment("r1", ("v",), 1)
    a.merge(d1)
    b.merge(d1)
    d2 = a.increment("r1", ("v",), 1)  # lost on its way to b
    a.merge(d2)
    d3 = a.increment("r1", ("v",), 1)
    a.merge(d3)
    assert unseen_claims(d3, b.context) == [("r1", 2)]
    assert unseen_claims(d2, b.context) == []
    assert ("r1", 3) in held_dots(d3)
    assert ("r1", 2) not in held_dots(d3)
    b.merge(d2)
    assert unseen_claims(d3, b.context) == []


def test_gate_names_the_first_missing_claims_of_a_receiver_far_behind() -> None:
    """A delta claiming ten million dots of a writer the receiver never heard of: the gate
    names the first ``limit`` missing ones (it stops there instead of listing them all)."""
    delta = ORMap(None, CausalContext({"w": 10_000_000}), is_delta=True)
    assert unseen_claims(delta, CausalContext(), limit=3) == [("w", 1), ("w", 2), ("w", 3)]
    assert unseen_claims(delta, CausalContext(), exempt="w") == []
    assert unseen_claims(delta, CausalContext({"w": 10_000_000})) == []


def _machine(name: str, **cfg: Any) -> ReplicationMachine:
    return ReplicationMachine(name, ReplicationConfig(**cfg), seed=7)


def _batch(m: ReplicationMachine, *ops: Any, now: float = 0.0) -> Publish:
    """Write ``ops`` on ``m``, commit, flush: the batch it publishes (reported published)."""
    w = m.write(list(ops), lambda: 1_000)
    m.handle(Committed(now, w.delta, w.ops, 10, m.last_record_seq + 1))
    (p,) = [a for a in m.handle(SyncWanted(now)) if isinstance(a, Publish)]
    m.handle(Published(now, p.sequence, 10))
    return p


def _deliver(m: ReplicationMachine, writer: str, p: Publish, now: float = 0.0) -> list[Action]:
    doc = roundtrip(p.document)
    return m.handle(DeltaReceived(now, writer, p.sequence, doc, 10))


def test_machine_holds_a_delta_after_a_lost_one_and_drains_it_when_it_arrives() -> None:
    a, b = _machine("a"), _machine("b")
    p1 = _batch(a, Create("k"), Increment("k", ("v",), 1))
    p2 = _batch(a, Increment("k", ("v",), 1))
    p3 = _batch(a, Increment("k", ("v",), 1))
    _deliver(b, "a", p1)
    out = _deliver(b, "a", p3)  # p2 lost so far
    assert b.held == 1
    assert Report("gated", ("held",)) in out
    assert Report("gap", ("a", 1)) in out
    assert any(isinstance(x, RequestCatchup) for x in out)
    assert b.tree.fields("k") == {"v": 1}  # what a showed after p1, not a count of 2 or 4
    out = _deliver(b, "a", p2)
    assert b.held == 0
    assert Report("gated", ("drained",)) in out
    assert b.tree.fields("k") == {"v": 3} == a.tree.fields("k")
    assert b.state.digest() == a.state.digest()


def test_a_catchup_state_drains_the_held_delta() -> None:
    a, b = _machine("a"), _machine("b")
    p1 = _batch(a, Create("k"), Increment("k", ("v",), 1))
    _batch(a, Increment("k", ("v",), 1))  # lost
    p3 = _batch(a, Increment("k", ("v",), 1))
    _deliver(b, "a", p1)
    out = _deliver(b, "a", p3)
    (req,) = [x for x in out if isinstance(x, RequestCatchup)]
    assert req.peer == "a"
    (send,) = a.handle(SyncRequested(1.0, b.state.context.copy(), "b"))
    assert isinstance(send, SendState)
    b.handle(CatchupReplied(1.0, "a", a.sequence, roundtrip(send.document)))
    assert b.held == 0
    assert b.tree.fields("k") == {"v": 3}
    assert b.state.digest() == a.state.digest()


def test_a_full_hold_evicts_the_oldest_and_counts_it() -> None:
    a, b = _machine("a"), _machine("b", max_held_deltas=2)
    _batch(a, Create("k"), Increment("k", ("v",), 1))  # lost: every later one is held
    ps = [_batch(a, Increment("k", ("v",), 1)) for _ in range(3)]
    outs = [_deliver(b, "a", p) for p in ps]
    assert b.held == 2
    assert Report("gated", ("evicted",)) in outs[2]


# -- catch-up: retried until a peer answers, coalesced, never dropped -------------------------


def test_failed_catchup_is_retried_with_growing_jittered_backoff_until_answered() -> None:
    m = _machine("a", catchup_min_interval=0.5, catchup_max_backoff=8.0)
    (_req,) = [x for x in m.handle(CatchupWanted(0.0)) if isinstance(x, RequestCatchup)]
    now, delays = 0.0, []
    for _ in range(6):
        out = m.handle(CatchupFailed(now, "no_peer"))
        assert Report("catchup", ("retry",)) in out
        (timer,) = [x for x in out if isinstance(x, ScheduleTimer)]
        assert not any(isinstance(x, RequestCatchup) for x in out)
        delays.append(timer.at - now)
        now = timer.at
        out = m.handle(TimerFired(now, timer.name))
        assert [x for x in out if isinstance(x, RequestCatchup)], "retried when due"
    assert all(0 < d <= 8.0 for d in delays)
    assert delays[-1] > delays[0]  # it backs off
    m.handle(CatchupReplied(now, "b", 0, ORMap(is_delta=True)))
    assert not m.catching_up


def test_wants_during_a_running_catchup_start_exactly_one_more() -> None:
    m = _machine("a", catchup_min_interval=0.0)
    assert [x for x in m.handle(CatchupWanted(0.0)) if isinstance(x, RequestCatchup)]
    for t in (0.1, 0.2, 0.3):  # while it runs: remembered, not started, not dropped
        assert not [x for x in m.handle(CatchupWanted(t)) if isinstance(x, RequestCatchup)]
    assert m.catching_up
    out = m.handle(CatchupReplied(0.4, "b", 0, ORMap(is_delta=True)))
    assert len([x for x in out if isinstance(x, RequestCatchup)]) == 1
    out = m.handle(CatchupReplied(0.5, "b", 0, ORMap(is_delta=True)))
    assert not [x for x in out if isinstance(x, RequestCatchup)]
    assert not m.catching_up


def test_a_failed_publish_is_retried_with_the_same_writes() -> None:
    m = _machine("a")
    w = m.write([Create("k"), Increment("k", ("v",), 2)], lambda: 1_000)
    m.handle(Committed(0.0, w.delta, w.ops, 10, 1))
    (p,) = [x for x in m.handle(SyncWanted(0.0)) if isinstance(x, Publish)]
    out = m.handle(PublishFailed(0.0, p.sequence))
    (timer,) = [x for x in out if isinstance(x, ScheduleTimer)]
    assert m.queued_ops == 2
    assert not m.idle
    (again,) = [x for x in m.handle(TimerFired(timer.at, timer.name)) if isinstance(x, Publish)]
    assert again.sequence == p.sequence
    assert again.document.digest() == p.document.digest()
    m.handle(Published(timer.at, again.sequence, 10))
    assert m.queued_ops == 0
    assert m.idle
    assert m.sequence == 1


def test_a_lost_removal_reaches_a_peer_that_asks_for_the_full_state() -> None:
    """A removal issues no dot: the asker's context cannot show it lacks it, so a catch-up
    that is not only for an announce asks for the full state (else the answer is empty)."""
    a, b = _machine("a"), _machine("b")
    _deliver(b, "a", _batch(a, Create("k"), Add("k", ("s",), 1)))
    _batch(a, lambda t, r, ts: t.discard(r, "k", ("s",), 1))  # lost on its way to b
    assert b.tree.fields("k") == {"s": frozenset({1})}
    (req,) = [x for x in b.handle(CatchupWanted(1.0, "a")) if isinstance(x, RequestCatchup)]
    assert req.full
    ctx = b.state.context.copy()
    (empty,) = a.handle(SyncRequested(1.0, ctx, "b", full=False))
    assert isinstance(empty, SendState)
    assert not empty.document.store, "by context alone, b lacks nothing"
    (send,) = a.handle(SyncRequested(1.0, ctx, "b", full=req.full))
    assert isinstance(send, SendState)
    b.handle(CatchupReplied(1.0, "a", a.sequence, roundtrip(send.document)))
    assert b.tree.fields("k") == a.tree.fields("k") == {}


def test_an_announce_from_a_peer_that_lacks_dots_is_answered_by_an_announce() -> None:
    """The peer then asks here: batches it missed while away are fetched even when no later
    batch reveals a gap. Rate-limited: a second one within the interval waits for a timer."""
    a, b = _machine("a", catchup_min_interval=0.5), _machine("b")
    _batch(a, Create("k"))  # b never got it
    out = a.handle(AnnounceReceived(1.0, "b", b.state.context.copy()))
    assert Announce() in out
    assert not [x for x in out if isinstance(x, RequestCatchup)], "a lacks nothing"
    out = a.handle(AnnounceReceived(1.1, "b", b.state.context.copy()))
    assert Announce() not in out
    (timer,) = [x for x in out if isinstance(x, ScheduleTimer)]
    assert Announce() in a.handle(TimerFired(timer.at, timer.name))
    # b, hearing a's announce, lacks a's dot: it wants a catch-up from a.
    out = b.handle(AnnounceReceived(1.2, "a", a.state.context.copy()))
    (req,) = [x for x in out if isinstance(x, RequestCatchup)]
    assert req.peer == "a"
    # Equal contexts: nothing to do either way.
    assert a.handle(AnnounceReceived(2.0, "c", a.state.context.copy())) == []


def test_an_empty_catchup_answer_does_not_mark_the_peers_batches_as_seen() -> None:
    """An empty answer only says "your context covers mine": a removal the peer published
    issues no dot, so its batches are not known to be here. Before the fix the answer raised
    the peer's sequence window, and after a restart the first batch seen from that writer no
    longer owed a catch-up: a lost removal stayed (simulator seed 244)."""
    a = _machine("a", catchup_min_interval=0.0)
    _batch(a, Create("k"), Add("k", ("s",), 1))
    held_state = roundtrip(a.state)  # what b had (its snapshot) before a lost removal
    _batch(a, lambda t, r, ts: t.discard(r, "k", ("s",), 1))  # never reaches b
    b = ReplicationMachine("b", ReplicationConfig(catchup_min_interval=0.0), seed=1,
                           loaded=Loaded(held_state))  # b restarted: no sequences known
    assert b.tree.fields("k") == {"s": frozenset({1})}
    # An announce-driven catch-up (not full) from a, answered empty: nothing lacking by context.
    ahead = b.state.context.copy()
    ahead.add(("c", 1))
    out = b.handle(AnnounceReceived(1.0, "a", ahead))
    (req,) = [x for x in out if isinstance(x, RequestCatchup)]
    assert not req.full
    (empty,) = a.handle(SyncRequested(1.0, b.state.context.copy(), "b", full=req.full))
    assert isinstance(empty, SendState)
    assert empty.document.is_delta
    b.handle(CatchupReplied(1.0, "a", a.sequence, roundtrip(empty.document)))
    # a's next batch is the first b sees from it: a full catch-up from a is owed.
    out = _deliver(b, "a", _batch(a, Create("z")), now=2.0)
    out += b.handle(TimerFired(3.0, "catchup"))
    reqs = [x for x in out if isinstance(x, RequestCatchup)]
    assert reqs, "a catch-up from a is owed"
    assert reqs[0].peer == "a"
    assert reqs[0].full
    (send,) = a.handle(SyncRequested(3.0, b.state.context.copy(), "b", full=True))
    assert isinstance(send, SendState)
    b.handle(CatchupReplied(3.0, "a", a.sequence, roundtrip(send.document)))
    assert b.tree.fields("k") == a.tree.fields("k") == {}


# -- a simulated network ------------------------------------------------------------------------

FIELDS = (("c",), ("r",), ("m",), ("s",), ("n", "c"))
REGISTER_LIKE = {0, 1, 2, 4}  # leaves written only by counter, LWW and MV writes


@dataclass
class Node:
    machine: ReplicationMachine
    name: str
    record_seq: int = 0
    publishing: Publish | None = None
    fail_next: bool = False
    catchup: RequestCatchup | None = None
    timers: dict[str, float] = field(default_factory=dict)


@dataclass
class Sim:
    nodes: list[Node]
    now: float = 0.0
    wire: list[tuple[int, str, int, bytes]] = field(default_factory=list)
    # history[writer][field index]: every value that leaf had at its writer.
    history: list[dict[int, list[Any]]] = field(default_factory=list)
    wall: int = 1_000
    auto_publish: bool = True

    def wall_ms(self) -> int:
        self.wall += 1
        return self.wall

    def feed(self, i: int, event: Event) -> None:
        self.run(i, self.nodes[i].machine.handle(event))

    def run(self, i: int, actions: list[Action]) -> None:
        node = self.nodes[i]
        todo = deque(actions)
        while todo:
            a = todo.popleft()
            if isinstance(a, Publish):
                assert node.publishing is None, "one publish in flight at a time"
                node.publishing = a
                if self.auto_publish:
                    self.publish_result(i, not node.fail_next)
                    node.fail_next = False
            elif isinstance(a, RequestCatchup):
                assert node.catchup is None, "one catch-up at a time"
                node.catchup = a
            elif isinstance(a, ScheduleTimer):
                node.timers[a.name] = a.at
            elif isinstance(a, Snapshot):
                upto = node.machine.snapshot_upto()
                todo.extend(node.machine.handle(SnapshotTaken(self.now, upto)))
            elif isinstance(a, Announce):
                ctx = node.machine.state.context.copy()
                for j, _other in enumerate(self.nodes):
                    if j != i:
                        self.feed(j, AnnounceReceived(self.now, node.name, ctx))

    def write(self, i: int, ops: list[Any], eventual: bool) -> None:
        m = self.nodes[i].machine
        try:
            w = m.write(ops, self.wall_ms)
        except Exception:  # a write the tree refuses (e.g. the worknode not created yet)
            return
        self.run(i, w.actions)
        node = self.nodes[i]
        node.record_seq += 1
        self.feed(i, Committed(self.now, w.delta, w.ops, 64, node.record_seq, eventual=eventual))
        fields = m.tree.fields(node.name) if node.name in m.tree else {}
        for f, path in enumerate(FIELDS):
            self.history[i].setdefault(f, [None]).append(leaf(fields, path))

    def publish_result(self, i: int, ok: bool) -> None:
        node = self.nodes[i]
        p = node.publishing
        if p is None:
            return
        node.publishing = None
        if not ok:
            self.feed(i, PublishFailed(self.now, p.sequence))
            return
        data = CODEC.encode_document(p.document)
        for j in range(len(self.nodes)):
            if j != i:
                self.wire.append((j, node.name, p.sequence, data))
        self.feed(i, Published(self.now, p.sequence, len(data)))

    def deliver(self, k: int, *, keep: bool = False) -> None:
        if not self.wire:
            return
        k %= len(self.wire)
        dest, writer, seq, data = self.wire[k] if keep else self.wire.pop(k)
        doc = CODEC.decode_document(data, ORMap)
        assert isinstance(doc, ORMap)
        self.feed(dest, DeltaReceived(self.now, writer, seq, doc, len(data)))

    def answer_catchup(self, i: int, j: int, ok: bool) -> None:
        node = self.nodes[i]
        request = node.catchup
        if request is None:
            return
        node.catchup = None
        if not ok or j == i:
            self.feed(i, CatchupFailed(self.now, "no_peer"))
            return
        peer = self.nodes[j]
        ctx = node.machine.state.context.copy()
        (send,) = peer.machine.handle(SyncRequested(self.now, ctx, i, full=request.full))
        assert isinstance(send, SendState)
        doc = roundtrip(send.document)
        self.feed(i, CatchupReplied(self.now, peer.name, peer.machine.sequence, doc))

    def tick(self, dt: float) -> None:
        self.now += dt
        while True:
            due = [
                (at, i, name)
                for i, n in enumerate(self.nodes)
                for name, at in n.timers.items()
                if at <= self.now
            ]
            if not due:
                return
            _at, i, name = min(due)
            del self.nodes[i].timers[name]
            self.feed(i, TimerFired(self.now, name))

    def check_shown_values(self) -> None:
        """Every register-like leaf a replica shows for a writer's worknode is a value that
        leaf had at its writer at some point."""
        for j, viewer in enumerate(self.nodes):
            tree = viewer.machine.tree
            for i, writer in enumerate(self.nodes):
                if i == j or writer.name not in tree:
                    continue
                fields = tree.fields(writer.name)
                for f in REGISTER_LIKE:
                    shown = leaf(fields, FIELDS[f])
                    assert shown in self.history[i].get(f, [None]), (
                        f"{viewer.name} shows {FIELDS[f]}={shown!r} of {writer.name}, "
                        f"which had {self.history[i].get(f)}"
                    )


def leaf(value: Any, path: tuple[str, ...]) -> Any:
    cur = value
    for k in path:
        if not isinstance(cur, dict) or k not in cur:
            return None
        cur = cur[k]
    if isinstance(cur, (set, frozenset)):
        return frozenset(cur)
    if isinstance(cur, list):
        return tuple(cur)
    return cur


def op_for(name: str, kind: int, arg: int) -> Any:
    if kind == 0:
        return Increment(name, ("c",), arg)
    if kind == 1:
        return Assign(name, ("r",), arg)
    if kind == 2:
        return lambda t, r, ts: t.assign_multi(r, name, ("m",), arg)
    if kind == 3:
        return Add(name, ("s",), arg % 3)
    if kind == 4:
        return Increment(name, ("n", "c"), arg)
    if kind == 5:
        return lambda t, r, ts: t.discard(r, name, ("s",), arg % 3)
    return lambda t, r, ts: t.remove_field(name, ("s",))


# One shape for every step: (what, node or index, kind, argument, flag); the weights favour
# writes and deliveries, so that losses fall between writes of one field.
steps = st.tuples(
    st.sampled_from(
        ["write"] * 6 + ["deliver"] * 4 + ["drop"] * 2
        + ["sync", "failpub", "catchup", "catchup", "tick", "tick"]
    ),
    st.integers(0, 50),
    st.sampled_from([0, 0, 0, 1, 1, 2, 3, 4, 5, 6]),
    st.integers(-3, 9),
    st.booleans(),
)


@settings(max_examples=300, deadline=None)
@given(st.integers(2, 3), st.integers(1, 4), st.lists(steps, min_size=10, max_size=80))
def test_machines_converge_on_the_writers_values_under_loss_duplication_and_reordering(
    n: int, batch_ops: int, history: list[tuple[str, int, int, int, bool]]
) -> None:
    """2-3 machines, each writing its own worknode (every kind of write), batches of up to
    ``batch_ops`` ops (or a flush window), envelopes lost, duplicated and reordered, publishes
    failing, catch-ups answered or failing. Along the way every register-like leaf shown
    is one its writer had; at the end every machine shows exactly the writers' values."""
    names = [f"w{i}" for i in range(n)]
    cfg = ReplicationConfig(max_batch_ops=max(batch_ops, 1))
    sim = Sim(
        [Node(ReplicationMachine(nm, cfg, seed=i), nm) for i, nm in enumerate(names)],
        history=[{} for _ in names],
    )
    for i in range(n):
        sim.write(i, [Create(names[i])], eventual=True)
    for step, x, kind, c, flag in history:
        a = x % n
        if step == "write":
            # Each writer writes only its own worknode's fields (single writer per key).
            sim.write(a, [op_for(names[a], kind, c)], eventual=flag or kind % 2 == 0)
        elif step == "sync":
            sim.feed(a, SyncWanted(sim.now))
        elif step == "failpub":
            sim.nodes[a].fail_next = True  # its next publish fails (and is retried)
        elif step == "deliver":
            # Mostly the oldest (in order); sometimes any (reordered); ``flag``: kept on
            # the wire to be delivered again (a duplicate).
            sim.deliver(0 if c < 4 else x, keep=flag and c > 6)
        elif step == "drop" and sim.wire:
            sim.wire.pop(0 if c < 4 else x % len(sim.wire))
        elif step == "catchup":
            sim.answer_catchup(a, kind % n, flag)
        elif step == "tick":
            sim.tick((0.001, 0.01, 0.5, 3.0)[kind % 4])
        sim.check_shown_values()

    # Quiesce: every write synced and published, every envelope in flight delivered, then
    # periodic catch-ups (answered) until nothing more changes.
    for i in range(n):
        sim.feed(i, SyncWanted(sim.now))
    for _ in range(4):
        for _ in range(5):
            sim.tick(3.0)
            for i in range(n):
                sim.publish_result(i, True)
        while sim.wire:
            sim.deliver(0)
            sim.check_shown_values()
        for i in range(n):
            for j in range(n):
                if i == j:
                    continue
                sim.tick(12.0)
                if sim.nodes[i].catchup is None:
                    sim.feed(i, CatchupWanted(sim.now, names[j], urgent=True))
                sim.answer_catchup(i, j, True)
                sim.check_shown_values()
    for node in sim.nodes:
        assert node.machine.idle
        assert node.machine.queued_ops == 0
        assert node.machine.held == 0
    writers_view = {nm: sim.nodes[i].machine.tree.fields(nm) for i, nm in enumerate(names)}
    for node in sim.nodes:
        shown = {nm: node.machine.tree.fields(nm) for nm in names}
        assert shown == writers_view, (node.name, shown, writers_view)
        assert node.machine.state.digest() == sim.nodes[0].machine.state.digest()
        again = roundtrip(node.machine.state)
        assert again.digest() == node.machine.state.digest()
        assert again.value() == node.machine.state.value()



def test_a_lost_last_batch_is_revealed_by_the_writers_idle_announce() -> None:
    """Simulator findings F7/F8: a writer's last batch (a removal: no dot) is lost and no
    later batch reveals a gap. The writer announces once after it goes idle; the announce
    carries its publish sequence, so the peer owes itself the writer's full state."""
    from broker.replication._machine import TIMER_IDLE_ANNOUNCE

    a, b = _machine("a", idle_announce=1.0, catchup_min_interval=0.0), _machine("b")
    _deliver(b, "a", _batch(a, Create("k"), Add("k", ("s",), 1)))
    p = _batch(a, lambda t, r, ts: t.discard(r, "k", ("s",), 1), now=2.0)  # lost
    assert p.sequence == a.sequence == 2
    assert Announce() in a.handle(TimerFired(3.0, TIMER_IDLE_ANNOUNCE))
    # b hears the announce: sequence 2 was never applied here -> a full catch-up from a.
    out = b.handle(AnnounceReceived(3.0, "a", a.state.context.copy(), a.sequence))
    (req,) = [x for x in out if isinstance(x, RequestCatchup)]
    assert req.full
    assert req.peer == "a"
    (send,) = a.handle(SyncRequested(3.0, b.state.context.copy(), "b", full=True))
    assert isinstance(send, SendState)
    b.handle(CatchupReplied(3.0, "a", a.sequence, roundtrip(send.document)))
    assert b.tree.fields("k") == a.tree.fields("k") == {}
    # Once caught up, the same announce asks for nothing.
    out = b.handle(AnnounceReceived(9.0, "a", a.state.context.copy(), a.sequence))
    assert not [x for x in out if isinstance(x, RequestCatchup)]


# -- a write's causal past is logged with it (simulation finding F9) -------------------------


def _raw_deliver(m: ReplicationMachine, writer: str, p: Publish, raw: bytes) -> list[Action]:
    return m.handle(DeltaReceived(0.0, writer, p.sequence, roundtrip(p.document), 10, raw=raw))


def test_a_write_returns_the_received_state_it_was_applied_over_once() -> None:
    a, b = _machine("a"), _machine("b")
    _batch(b, Create("k"))
    p1 = _batch(a, Create("x"))
    p2 = _batch(a, Create("y"))
    _raw_deliver(b, "a", p1, b"env1")
    _raw_deliver(b, "a", p2, b"env2")
    assert b.unlogged_bytes == 8
    w = b.write([Assign("k", ("f",), 1)], lambda: 2_000)
    assert w.received == [b"env1", b"env2"]  # in join order, to log before the write
    assert b.unlogged_bytes == 0
    assert b.write([Assign("k", ("f",), 2)], lambda: 2_000).received == []


def test_a_held_delta_is_kept_only_once_joined() -> None:
    a, b = _machine("a"), _machine("b")
    p1 = _batch(a, Create("k"), Increment("k", ("v",), 1))
    p2 = _batch(a, Increment("k", ("v",), 1))
    p3 = _batch(a, Increment("k", ("v",), 1))
    _raw_deliver(b, "a", p1, b"e1")
    _raw_deliver(b, "a", p3, b"e3")  # held: not joined, nothing to log yet
    assert b.write([Create("z")], lambda: 2_000).received == [b"e1"]
    _raw_deliver(b, "a", p2, b"e2")  # drains e3 after it
    assert b.write([Create("w")], lambda: 2_000).received == [b"e2", b"e3"]


def test_a_catchup_state_is_kept_and_an_empty_answer_is_not() -> None:
    a, b = _machine("a"), _machine("b")
    _batch(a, Create("k"))
    b.handle(CatchupWanted(0.0, urgent=True))
    b.handle(CatchupReplied(0.0, "a", a.sequence, roundtrip(a.state.copy()), raw=b"state"))
    b.handle(CatchupWanted(5.0, urgent=True))
    b.handle(CatchupReplied(5.0, "a", a.sequence, ORMap(is_delta=True), raw=b"empty"))
    assert b.write([Create("z")], lambda: 2_000).received == [b"state"]


def test_a_snapshot_covers_what_was_joined_before_its_mark_only() -> None:
    a, b = _machine("a"), _machine("b")
    p1, p2 = _batch(a, Create("x")), _batch(a, Create("y"))
    _raw_deliver(b, "a", p1, b"e1")
    mark = b.received_mark()  # the driver encodes the snapshot here ...
    _raw_deliver(b, "a", p2, b"e2")  # ... and a delta joins while it is written
    b.handle(SnapshotTaken(0.0, 0, mark))
    assert b.write([Create("z")], lambda: 2_000).received == [b"e2"]


def test_too_much_unlogged_state_is_handed_out_to_be_logged_on_its_own() -> None:
    """Bounded memory on a node that only receives, whether or not snapshots succeed."""
    a, b = _machine("a"), _machine("b", max_unlogged_bytes=10)
    p1, p2, p3 = _batch(a, Create("x")), _batch(a, Create("y")), _batch(a, Create("z"))
    assert not any(isinstance(x, LogReceived) for x in _raw_deliver(b, "a", p1, b"123456"))
    out = _raw_deliver(b, "a", p2, b"654321")
    assert [x for x in out if isinstance(x, LogReceived)] == [
        LogReceived((b"123456", b"654321"))]
    assert b.unlogged_bytes == 0
    assert not any(isinstance(x, LogReceived) for x in _raw_deliver(b, "a", p3, b"abc"))
    assert b.write([Create("w")], lambda: 2_000).received == [b"abc"]


def test_a_full_catchup_state_asks_for_a_snapshot() -> None:
    a, b = _machine("a"), _machine("b")
    _batch(a, Create("k"))
    b.handle(CatchupWanted(0.0, urgent=True))
    out = b.handle(CatchupReplied(0.0, "a", a.sequence, roundtrip(a.state.copy()), raw=b"st"))
    assert any(isinstance(x, Snapshot) for x in out)


def test_a_snapshot_covers_received_records_once_no_local_write_waits() -> None:
    """A node that only receives (or is idle) compacts received and repair records too."""
    b = _machine("b")
    _batch(b, Create("mine"))  # published: b's record 1
    b.handle(ReceivedLogged(0.0, 5))  # received records 2..5 logged on their own
    assert b.snapshot_upto() == 5
    b.write([Create("w")], lambda: 2_000)  # a write waits to be published: only up to 1
    assert b.snapshot_upto() == 1


# -- adaptive (Nagle-style) publishing ---------------------------------------------------------


def _commit(m: ReplicationMachine, now: float, i: int) -> list[Action]:
    w = m.write([Assign("k", ("x",), i)], lambda: 1_000 + int(now * 1000))
    return m.handle(Committed(now, w.delta, w.ops, 10, m.last_record_seq + 1))


def _publishes(out: list[Action]) -> list[Publish]:
    return [a for a in out if isinstance(a, Publish)]


def test_adaptive_flush_publishes_a_lone_write_at_once_and_batches_under_load() -> None:
    """After a quiet flush window a write goes out at once; writes within a window of the
    previous batch wait until that window ends and go out as one batch (the window caps the
    wait); after another quiet window the next write goes at once again."""
    m = ReplicationMachine("a", ReplicationConfig(flush_interval=0.005, adaptive_flush=True))
    (p0,) = _publishes(m.handle(Committed(0.0, m.write([Create("k")], lambda: 1).delta, 1, 10, 1)))
    m.handle(Published(0.0, p0.sequence, 10))  # the very first write: at once

    out = _commit(m, 1.0, 1)  # a quiet second since: at once
    (p1,) = _publishes(out)
    assert not any(isinstance(a, ScheduleTimer) and a.name == "flush" for a in out)
    m.handle(Published(1.0001, p1.sequence, 10))

    a = _commit(m, 1.001, 2)  # within the window of p1: waits until 1.005
    b = _commit(m, 1.002, 3)
    assert not _publishes(a)
    assert not _publishes(b)
    timers = [x for x in a if isinstance(x, ScheduleTimer) and x.name == "flush"]
    assert [t.at for t in timers] == [1.005]
    assert not _publishes(m.handle(TimerFired(1.004, "flush")))  # early: nothing yet
    (p2,) = _publishes(m.handle(TimerFired(1.005, "flush")))
    assert p2.ops == 2  # both writes, one batch
    m.handle(Published(1.005, p2.sequence, 10))

    (p3,) = _publishes(_commit(m, 2.0, 4))  # quiet again: at once
    assert p3.ops == 1


def test_the_fixed_window_holds_even_a_lone_write_for_a_window() -> None:
    """Without ``adaptive_flush`` (the machine's default) a lone write waits a whole window:
    the contrast that shows the test above tests the adaptive rule."""
    m = ReplicationMachine("a", ReplicationConfig(flush_interval=0.005))
    m.handle(Committed(0.0, m.write([Create("k")], lambda: 1).delta, 1, 10, 1))
    for p in _publishes(m.handle(SyncWanted(0.0))):
        m.handle(Published(0.0, p.sequence, 10))
    out = _commit(m, 1.0, 1)
    assert not _publishes(out)
    assert [x.at for x in out if isinstance(x, ScheduleTimer) and x.name == "flush"] == [1.005]
    (p,) = _publishes(m.handle(TimerFired(1.005, "flush")))
    assert p.ops == 1


def test_a_commit_large_enough_goes_alone_with_its_record() -> None:
    """Under load (within the window of the previous batch) a commit whose record reaches
    ``publish_alone_bytes`` is published at once, alone, with its record (not joined and
    encoded again); a smaller one waits for the window and joins the next, as before."""
    cfg = ReplicationConfig(flush_interval=0.005, adaptive_flush=True, publish_alone_bytes=1000)
    m = ReplicationMachine("a", cfg)
    (p0,) = _publishes(m.handle(Committed(0.0, m.write([Create("k")], lambda: 1).delta, 1, 10, 1)))
    m.handle(Published(0.0, p0.sequence, 10))

    def commit(now: float, i: int, nbytes: int) -> list[Action]:
        w = m.write([Assign("k", ("x",), i)], lambda: 1_000 + int(now * 1000))
        return m.handle(Committed(now, w.delta, w.ops, nbytes, m.last_record_seq + 1,
                                  record=b"r%d" % i))

    small = commit(0.001, 1, 10)  # within the window: waits
    assert not _publishes(small)
    big = commit(0.002, 2, 5000)  # joins the waiting one: no record, so not alone
    assert not _publishes(big)
    (p1,) = _publishes(m.handle(TimerFired(0.005, "flush")))
    assert (p1.ops, p1.record) == (2, None)
    m.handle(Published(0.005, p1.sequence, 10))
    (p2,) = _publishes(commit(0.006, 3, 5000))  # alone within the window: at once
    assert (p2.ops, p2.record) == (1, b"r3")
    m.handle(Published(0.006, p2.sequence, 10))
    assert not _publishes(commit(0.007, 4, 999))  # below the threshold: the window


def test_a_large_commit_behind_a_batch_in_flight_goes_when_it_is_published() -> None:
    cfg = ReplicationConfig(flush_interval=0.005, adaptive_flush=True, publish_alone_bytes=1000)
    m = ReplicationMachine("a", cfg)
    (p0,) = _publishes(m.handle(Committed(0.0, m.write([Create("k")], lambda: 1).delta, 1, 10, 1)))
    w = m.write([Assign("k", ("x",), 1)], lambda: 1_001)
    assert not _publishes(m.handle(Committed(0.001, w.delta, 1, 5000, 2, record=b"big")))
    (p1,) = _publishes(m.handle(Published(0.001, p0.sequence, 10)))  # not the window's end
    assert p1.record == b"big"


def test_publishes_at_once_names_the_batch_a_lone_commit_goes_out_as() -> None:
    """``publishes_at_once`` (the driver seals a commit's batch while the store commits it):
    idle and past the window, the next sequence; a batch in flight, one pending, inside the
    window (unless the commit goes alone or fills a batch), or a retry backoff: None."""
    cfg = ReplicationConfig(flush_interval=0.005, adaptive_flush=True, publish_alone_bytes=1000,
                            max_batch_ops=50)
    m = ReplicationMachine("a", cfg)
    assert m.publishes_at_once(0.0, 1, 10) == 1
    (p0,) = _publishes(m.handle(Committed(0.0, m.write([Create("k")], lambda: 1).delta, 1, 10, 1)))
    assert m.publishes_at_once(0.0, 1, 10) is None  # in flight
    m.handle(Published(0.0, p0.sequence, 10))
    assert m.publishes_at_once(0.001, 1, 10) is None  # inside the window
    assert m.publishes_at_once(0.001, 1, 1000) == 2  # alone
    assert m.publishes_at_once(0.001, 50, 10) == 2  # a full batch
    assert m.publishes_at_once(0.005, 1, 10) == 2  # the window passed
    w = m.write([Assign("k", ("x",), 1)], lambda: 1_001)
    assert not _publishes(m.handle(Committed(0.001, w.delta, 1, 10, 2)))  # waits: pending
    assert m.publishes_at_once(0.01, 1, 1000) is None
    fixed = ReplicationMachine("b", ReplicationConfig(flush_interval=0.005, adaptive_flush=False))
    assert fixed.publishes_at_once(0.0, 1, 10) is None  # a window after the first delta


@settings(max_examples=300, deadline=None)
@example([("published", 0, 10), ("commit", 1, 10), ("published", 0, 10), ("commit", 1, 10)])
@example([("commit", 0, 10), ("commit", 0, 10)])
@given(st.lists(st.tuples(st.sampled_from(["commit", "local", "sync", "published", "failed",
                                           "timer"]),
                          st.integers(0, 3), st.sampled_from([10, 2_000])),
                max_size=40))
def test_publishes_at_once_is_never_wrong(steps: list[tuple[str, int, int]]) -> None:
    """Whenever it names a sequence, committing then (or later) publishes exactly that batch
    at once: that sequence, that delta, that record (what a presealed envelope must match)."""
    cfg = ReplicationConfig(flush_interval=0.005, adaptive_flush=True, publish_alone_bytes=1000,
                            max_batch_ops=3)
    m = ReplicationMachine("a", cfg, seed=1)
    now = 0.0
    inflight: list[Publish] = []
    timers: list[ScheduleTimer] = []

    def run(out: list[Action]) -> list[Publish]:
        timers.extend(a for a in out if isinstance(a, ScheduleTimer))
        pubs = _publishes(out)
        inflight.extend(pubs)
        return pubs

    run(m.handle(Committed(0.0, m.write([Create("k")], lambda: 1).delta, 1, 10, 1)))

    for i, (kind, dt, nbytes) in enumerate(steps):
        now += dt * 0.002
        if kind in ("commit", "local"):
            stamp = 2_000 + i
            w = m.write([Assign("k", (f"f{i}",), i)] * (1 + dt % 2), lambda: stamp)  # noqa: B023
            guess = m.publishes_at_once(now, w.ops, nbytes) if kind == "commit" else None
            later = now + 0.001 * (i % 2)
            pubs = run(m.handle(Committed(later, w.delta, w.ops, nbytes, m.last_record_seq + 1,
                                          record=b"r%d" % i, eventual=kind == "commit")))
            if guess is not None:
                assert [(p.sequence, p.document, p.record) for p in pubs] == [
                    (guess, w.delta, b"r%d" % i)]
        elif kind == "sync":
            run(m.handle(SyncWanted(now)))
        elif kind in ("published", "failed") and inflight:
            p = inflight.pop(0)
            event: Event = (Published(now, p.sequence, 10) if kind == "published"
                            else PublishFailed(now, p.sequence))
            run(m.handle(event))
        elif kind == "timer" and timers:
            t = timers.pop(0)
            now = max(now, t.at)
            run(m.handle(TimerFired(now, t.name)))
