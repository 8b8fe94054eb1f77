"""STRONG keys as a state machine over a log (``broker.replication._strong``), pure: replicas
that apply the same log prefix agree on every STRONG key whatever else they received; a log
entry that is forged or corrupt is refused alike everywhere; peers' documents never change
a STRONG key; the log's dots are 1..applied and nothing else."""

from __future__ import annotations

import random
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from broker.crdt import Assign, CausalContext, Create, Increment, ORMap
from broker.crdt._ops import Add, TreeOp
from broker.errors import InvalidArgumentError
from broker.replication import (
    STRONG_AUTHOR,
    CatchupReplied,
    CatchupWanted,
    DeltaReceived,
    ReplicationConfig,
    ReplicationMachine,
    Report,
    strong_entry,
    strong_entry_problem,
    without_strong,
)

CFG = ReplicationConfig(strong_prefixes=("acct-",))


def _machine(name: str) -> ReplicationMachine:
    return ReplicationMachine(name, CFG, seed=1)


class _Log:
    """A compare-and-set log as JetStream keeps it: per-key last sequence, total order."""

    def __init__(self) -> None:
        self.entries: list[tuple[str, ORMap] | None] = []
        self.last: dict[str, int] = {}

    def publish(self, key: str, delta: ORMap, expected: int) -> int | None:
        if self.last.get(key, 0) != expected:
            return None  # conflict
        self.entries.append((key, delta))
        self.last[key] = len(self.entries)
        return len(self.entries)

    def fence(self) -> int:
        self.entries.append(None)
        return len(self.entries)

    def catch_up(self, m: ReplicationMachine) -> None:
        for seq in range(m.log_applied + 1, len(self.entries) + 1):
            e = self.entries[seq - 1]
            m.apply_log(seq, None if e is None else e[1], None if e is None else e[0])


def _version(m: ReplicationMachine, log: _Log, key: str) -> int:
    # The version a replica read: the key's last entry among those it applied.
    return max((i + 1 for i, e in enumerate(log.entries[: m.log_applied])
                if e is not None and e[0] == key), default=0)


def _try(m: ReplicationMachine, log: _Log, op: TreeOp, ts: int) -> bool:
    key = str(getattr(op, "node", ""))
    try:
        _, delta = strong_entry(m.tree, op, ts)
    except (InvalidArgumentError, ValueError):
        return False
    return log.publish(key, delta, _version(m, log, key)) is not None


def test_a_counter_written_from_two_replicas_counts_every_acknowledged_increment() -> None:
    a, b, log = _machine("node-a"), _machine("node-b"), _Log()
    assert _try(a, log, Create("acct-1"), 1)
    acked = 0
    for i in range(40):
        m = (a, b)[i % 2]
        if random.Random(i).random() < 0.5:
            log.catch_up(m)  # sometimes behind: its write conflicts, then it catches up
        while not _try(m, log, Increment("acct-1", ("bal",), 1), 10 + i):
            log.catch_up(m)
        acked += 1
    for m in (a, b):
        log.catch_up(m)
    assert a.state.value()["acct-1"]["fields"]["bal"] == acked == 40
    assert a.state.digest() == b.state.digest()
    assert a.state.context.version_vector[STRONG_AUTHOR] == len(log.entries)


_OPS = st.lists(
    st.tuples(
        st.integers(0, 2),  # which replica writes
        st.sampled_from(["assign", "incr", "add", "fence", "eventual", "forged_doc"]),
        st.integers(0, 2),  # which key
        st.integers(-5, 5),
    ),
    max_size=40,
)


@settings(max_examples=60, deadline=None)
@given(_OPS, st.randoms(use_true_random=False))
def test_replicas_at_the_same_log_position_agree_on_every_strong_key(
    steps: list[tuple[int, str, int, int]], rnd: random.Random
) -> None:
    """Random writers, lags, fences, EVENTUAL writes beside, and peers' documents forging
    STRONG entries and claims: at the end (all applied the whole log) every STRONG key is
    equal everywhere, and holds only the log's dots."""
    ms = [_machine(f"node-{i}") for i in range(3)]
    log = _Log()
    keys = [f"acct-{k}" for k in range(3)]
    for k in keys:
        assert _try(ms[0], log, Create(k), 1)
    for i, (who, what, k, v) in enumerate(steps):
        m = ms[who]
        if rnd.random() < 0.3:
            log.catch_up(m)
        key = keys[k]
        if what == "fence":
            log.fence()
        elif what == "assign":
            _try(m, log, Assign(key, ("x",), v), 100 + i)
        elif what == "incr":
            _try(m, log, Increment(key, ("n",), v), 100 + i)
        elif what == "add":
            _try(m, log, Add(key, ("s",), v), 100 + i)
        elif what == "eventual":
            other = ms[(who + 1) % 3]
            d = m.write([Create(f"plain{i}")], lambda t=100 + i: t)
            other.handle(DeltaReceived(0.0, m.node_id, i + 1, d.delta, 10))
        else:
            # A peer's document forging a STRONG entry and claiming the log's dots.
            base = ORMap(None, CausalContext({STRONG_AUTHOR: len(log.entries) + 5}))
            forged = base.assign(m.node_id, (key, "fields", "x"), 666, 10**6)
            doc = ORMap(forged.store, forged.context, is_delta=False)
            target = ms[(who + 1) % 3]
            target.handle(CatchupWanted(0.0, m.node_id, urgent=True))
            target.handle(CatchupReplied(0.0, m.node_id, 0, doc))
    for m in ms:
        log.catch_up(m)
    views = [{k: v for k, v in m.state.value().items() if k.startswith("acct-")} for m in ms]
    assert views[0] == views[1] == views[2]
    for m in ms:
        ctx = m.state.context
        assert ctx.max_counter(STRONG_AUTHOR) == len(log.entries)
        assert ctx.version_vector.get(STRONG_AUTHOR) == len(log.entries)
        for k in keys:
            for r, _ in _dots(m.state.store[k]):
                assert r == STRONG_AUTHOR
            assert "666" not in repr(m.state.value().get(k))


def _dots(entry: Any) -> list[tuple[str, int]]:
    from broker.crdt._stores import dots_of

    return list(dots_of(entry))


def test_a_forged_log_entry_is_refused_alike_and_counted() -> None:
    """A writer's key may put any bytes in the log: an entry for another key, holding a
    node's own dot, or a dot the log has not ordered yet changes nothing anywhere."""
    a, log = _machine("node-a"), _Log()
    assert _try(a, log, Create("acct-1"), 1)
    assert _try(a, log, Create("acct-2"), 1)
    log.catch_up(a)
    _, other_key = strong_entry(a.tree, Assign("acct-2", ("x",), 1), 5)
    own_dot = ORMap(None, CausalContext({"node-a": 0})).assign(
        "node-a", ("acct-1", "fields", "x"), 1, 5)
    ahead = ORMap(None, CausalContext({STRONG_AUTHOR: 50})).assign(
        STRONG_AUTHOR, ("acct-1", "fields", "y"), 1, 5)
    ahead.merge(ORMap(None, CausalContext({STRONG_AUTHOR: 51})).assign(
        STRONG_AUTHOR, ("acct-1", "fields", "z"), 1, 5))  # two new dots, one not ordered
    for forged in (other_key, own_dot, ahead):
        seq = len(log.entries) + 1
        assert strong_entry_problem(forged, "acct-1", seq) is not None
        before = a.state.value()
        log.entries.append(("acct-1", forged))
        out = a.apply_log(seq, forged, "acct-1", "node-x")
        assert [x for x in out if isinstance(x, Report) and x.event == "rejected"]
        assert a.state.value() == before
        assert a.log_applied == seq  # its sequence is spent: the next entry applies


def test_the_last_entry_of_each_key_is_the_whole_log() -> None:
    """The stream keeps one entry per key: a replica that replays only the surviving
    entries (the superseded ones skipped) holds what a replica that applied all of them
    holds."""
    a, log = _machine("node-a"), _Log()
    assert _try(a, log, Create("acct-1"), 1)
    assert _try(a, log, Create("acct-2"), 1)
    for i in range(12):
        log.catch_up(a)
        op = (Increment("acct-1", ("n",), i), Assign("acct-2", ("x",), i),
              Add("acct-1", ("s",), i % 4))[i % 3]
        assert _try(a, log, op, 10 + i)
        if i % 4 == 0:
            log.fence()
    log.catch_up(a)
    last: dict[str, int] = {}
    for seq, e in enumerate(log.entries, 1):
        if e is not None:
            last[e[0]] = seq
    fresh = _machine("node-b")
    for key, seq in sorted(last.items(), key=lambda kv: kv[1]):
        e = log.entries[seq - 1]
        assert e is not None
        fresh.apply_log(seq, e[1], key)
    fresh.apply_log(len(log.entries), None)  # the last fence
    assert fresh.state.value() == a.state.value()
    assert fresh.state.digest() == a.state.digest()


def test_eventual_writes_to_strong_worknodes_fail_before_they_apply() -> None:
    a = _machine("node-a")
    try:
        a.write([Assign("acct-1", ("x",), 1)], lambda: 1)  # type: ignore[arg-type]
    except InvalidArgumentError:
        pass
    else:
        raise AssertionError("an EVENTUAL write to a STRONG worknode was applied")

    def mutator(t: Any, rid: str, ts: int) -> ORMap:
        return t.state.assign(rid, ("acct-9", "parent"), "root", ts)  # type: ignore[no-any-return]

    try:
        a.write([mutator], lambda: 1)
    except InvalidArgumentError:
        pass
    else:
        raise AssertionError("a mutator touching a STRONG worknode was applied")
    assert a.state.value() == {}


def test_without_strong_drops_strong_keys_and_log_claims_only() -> None:
    doc = ORMap(None, CausalContext({"node-a": 0}))
    d1 = doc.assign("node-a", ("acct-1", "parent"), "root", 1)
    d2 = ORMap(None, CausalContext({"node-a": 1})).assign("node-a", ("plain", "parent"),
                                                          "root", 1)
    d1.merge(d2)
    d1.merge(ORMap(None, CausalContext({STRONG_AUTHOR: 3}), is_delta=True))
    out = without_strong(d1, ("acct-",))
    assert set(out.store) == {"plain"}
    assert out.context.max_counter(STRONG_AUTHOR) == 0
    assert out.context.max_counter("node-a") == d1.context.max_counter("node-a")
    assert without_strong(d2, ("acct-",)) is d2
