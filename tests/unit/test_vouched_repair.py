"""Vouched repairs (issue 17): a replica computes its repair from another replica's signed
fetch reply and keeps only what that replica vouches for; a healer-sealed repair is refused.

- ``repair_for`` is the "delta for B" half of the repair formula (checked against the formula
  as ``repair_deltas`` computed it before, with hypothesis), reads a self-describing fetch
  reply (absent keys as ``Whole(None)``) like one that omits them, and joined into the
  receiver's whole state equals a full join on the repaired keys;
- the apply endpoint refuses a repair sealed by a healer or a writer-only key
  (``unvouched_repair``, counted against that signer), another node's envelope for another
  subject or purpose (``wrong_subject``), a stale voucher (``expired``), one stamped ahead of
  the clock (``clock_skew``), one sealed by the replica itself, and one whose source claims
  dots out of range (``dot_range``, counted against the source); a genuine voucher is joined,
  less the other writers' dots the receiver never saw, whose writer is then owed a catch-up.
"""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.codec import Signer, TrustRoster, WireCodec
from broker.crdt import CausalContext, ORMap
from broker.crdt._stores import MapStore, Whole, dots_of
from broker.errors import (
    BadSignatureError,
    ClockSkewError,
    ExpiredRequestError,
    MalformedMessageError,
)
from broker.healing import HealEndpoints, VoucherRefusedError
from broker.healing._endpoints import VOUCHER_MAX_AGE_S
from broker.repair import key_digests, repair_deltas, repair_for, subset
from broker.replica import NullReplicaObserver, Replica, ReplicaConfig
from broker.replication import (
    BYZANTINE_REASONS,
    RepairApplied,
    ReplicationConfig,
    ReplicationMachine,
    RequestCatchup,
)
from broker.store import DurableStore
from broker.transport import MemoryNetwork, Msg, merkle_subject
from tests.unit.strategies import histories, run_history

NS, SUBJECT = "vr", "orders"
NOW_MS = 1_700_000_000_000
T0 = NOW_MS << 16
SIGNERS = {n: Signer(n, bytes([i + 1]) * 32) for i, n in enumerate(["a", "b", "c", "healer", "w"])}
ROSTER = TrustRoster()
for _n, _s in SIGNERS.items():
    ROSTER.add(_n, _s.public_key, {"healer": "healer", "w": "writer"}.get(_n, "node"))
CODEC = WireCodec()


# -- repair_for --------------------------------------------------------------------------------


def _old_delta_for_right(left: ORMap, right: ORMap, keys: Iterable[str]) -> ORMap:
    """The "delta for right" of ``repair_deltas`` as it was before ``repair_for`` (the oracle)."""
    ls, rs = left.store or {}, right.store or {}
    out = MapStore()
    dots: list[tuple[str, int]] = []
    for k in sorted(set(keys)):
        a, b = ls.get(k), rs.get(k)
        if a is None and b is None:
            continue
        d = list(dots_of(a, 2)) + [x for x in dots_of(b, 2) if left.context.covers(*x)]
        if a is not None or d:
            out[k] = Whole(a)
            dots += d
    return ORMap(out or None, CausalContext.from_dots(dots), is_delta=True)


@st.composite
def two_states(draw: st.DrawFn) -> tuple[ORMap, ORMap]:
    states, _ = run_history(ORMap, draw(histories(ORMap, max_size=40)))
    a, b = states[0], states[1]
    assert isinstance(a, ORMap)
    assert isinstance(b, ORMap)
    return a, b


@settings(max_examples=300, deadline=None)
@given(two_states(), st.data())
def test_repair_for_is_the_repair_formula_and_reads_self_describing_replies(
    ab: tuple[ORMap, ORMap], data: st.DataObject
) -> None:
    a, b = ab
    every = sorted(set(a.store or ()) | set(b.store or ()) | {"never"})
    keys = data.draw(st.lists(st.sampled_from(every), unique=True))
    old = _old_delta_for_right(subset(a, keys), subset(b, keys), keys)
    assert repair_for(subset(a, keys), subset(b, keys), keys) == old
    assert repair_deltas(subset(a, keys), subset(b, keys), keys)[1] == old
    # A fetch reply naming absent keys (Whole(None)) reads as one omitting them, and the
    # receiver may compute against its whole state.
    voucher = subset(a, keys, absent=True)
    assert set(voucher.store or ()) == set(keys)
    assert repair_for(voucher, b, keys) == old
    assert repair_deltas(voucher, subset(b, keys, absent=True), keys)[1] == old
    # Joined, the receiver holds the full join's entries of those keys.
    joined = b.join(repair_for(voucher, b, list(voucher.store or ())))
    full, got = key_digests(a.join(b)), key_digests(joined)
    for k in keys:
        assert got.get(k) == full.get(k)


def test_a_self_describing_reply_survives_the_wire() -> None:
    m = ORMap().assign("a", ("x", "v"), 1, T0)
    reply = subset(m, ["x", "gone"], absent=True)
    sealed = CODEC.seal(SIGNERS["a"], subject="s", hlc=T0, sequence=0, document=reply)
    opened = CODEC.open(sealed, ROSTER).document
    assert isinstance(opened, ORMap)
    assert opened.store is not None
    assert opened.store["gone"] == Whole(None)
    assert opened == reply


# -- the apply endpoint ------------------------------------------------------------------------


class _Observer(NullReplicaObserver):
    def __init__(self) -> None:
        self.rejects: list[tuple[str, str | None]] = []

    def rejected(self, subject: str, reason: str, writer: str | None = None) -> None:
        self.rejects.append((reason, writer))


class _Node:
    def __init__(self, replica: Replica, endpoints: HealEndpoints, observer: _Observer) -> None:
        self.replica, self.endpoints, self.observer = replica, endpoints, observer
        self.now_ms = NOW_MS

    async def apply(self, body: bytes) -> bytes:
        handler = self.endpoints._handler(SUBJECT, "apply")
        return await handler(Msg(merkle_subject(NS, SUBJECT, "b", "apply"), body))  # type: ignore[no-any-return]


@pytest.fixture
async def node_b() -> AsyncIterator[_Node]:
    """Replica b with its heal endpoints (not started: the handler is called directly), on a
    clock stopped at ``NOW_MS`` unless a test moves it."""
    with tempfile.TemporaryDirectory(prefix="wn-vr-") as tmp:
        net = MemoryNetwork()
        transport = net.transport("b")
        transport._open()
        store = DurableStore(Path(tmp) / "b.db", synchronous="normal")
        store.open()
        observer = _Observer()
        holder: list[_Node] = []
        replica = Replica(
            signer=SIGNERS["b"], roster=ROSTER, codec=CODEC, transport=transport, store=store,
            config=ReplicaConfig(namespace=NS, subject=SUBJECT, catchup_timeout=0.05),
            observer=observer, now_ms=lambda: holder[0].now_ms if holder else NOW_MS,
        )
        await replica.start()
        endpoints = HealEndpoints(
            transport=transport, namespace=NS, replicas={SUBJECT: replica},
            signer=SIGNERS["b"], roster=ROSTER, codec=CODEC, secret=b"s" * 32,
            healers=("healer",),
        )
        node = _Node(replica, endpoints, observer)
        holder.append(node)
        try:
            yield node
        finally:
            await replica.stop(flush_timeout=0.5)
            await transport.stop()
            store.close()


def _writes(writer: str, n: int, m: ORMap | None = None) -> ORMap:
    m = m if m is not None else ORMap()
    for i in range(n):
        m.merge(m.assign(writer, (f"{writer}{i}", "v"), i, T0 + i))
    return m


def _voucher(source: str, state: ORMap, keys: list[str], *, hlc: int = T0 + 1000,
             subject: str = SUBJECT, verb: str = "fetch") -> bytes:
    return CODEC.seal(SIGNERS[source], subject=merkle_subject(NS, subject, source, verb),
                      hlc=hlc, sequence=0, document=subset(state, keys, absent=True))


async def test_a_vouched_repair_is_joined(node_b: _Node) -> None:
    a = _writes("a", 5)
    keys = sorted(a.store or ())
    await node_b.apply(_voucher("a", a, keys))
    assert key_digests(node_b.replica.state) == key_digests(a)
    assert node_b.observer.rejects == []


def _silencing_repair(claimed: int = 10**6) -> ORMap:
    """Empty, with a context claiming a's next ``claimed`` dots: joined, every later write of
    a up to that counter would be taken as already seen (silenced)."""
    return ORMap(None, CausalContext({"a": claimed}), is_delta=True)


def _wipe_repair(state: ORMap) -> ORMap:
    """Every key of ``state`` as absent, with a context covering every dot: a wipe."""
    store = MapStore({k: Whole(None) for k in state.store or ()})
    return ORMap(store, state.context.copy(), is_delta=True)


@pytest.mark.parametrize("form", ["silence", "wipe"])
@pytest.mark.parametrize("sealer", ["healer", "w"])
@pytest.mark.parametrize("verb", ["apply", "fetch"])
async def test_a_repair_not_sealed_by_a_node_is_refused_as_unvouched(
    node_b: _Node, form: str, sealer: str, verb: str
) -> None:
    await node_b.apply(_voucher("a", _writes("a", 3), ["a0", "a1", "a2"]))
    before = node_b.replica.state.copy()
    doc = _silencing_repair() if form == "silence" else _wipe_repair(before)
    body = CODEC.seal(SIGNERS[sealer], subject=merkle_subject(NS, SUBJECT, sealer if verb ==
                      "fetch" else "b", verb), hlc=T0 + 1000, sequence=0, document=doc)
    with pytest.raises(VoucherRefusedError) as err:
        await node_b.apply(body)
    assert err.value.reason == "unvouched_repair"
    assert "unvouched_repair" in BYZANTINE_REASONS
    assert node_b.observer.rejects == [("unvouched_repair", sealer)]
    assert node_b.endpoints.rejected[(SUBJECT, "apply", "unvouched_repair")] == 1
    assert node_b.replica.state == before


async def test_another_envelope_of_a_node_is_no_voucher(node_b: _Node) -> None:
    a = _writes("a", 3)
    keys = sorted(a.store or ())
    for body in (
        _voucher("a", a, keys, subject="other"),  # a's fetch reply for another subject
        _voucher("a", a, keys, verb="root"),  # a's envelope for another purpose
        CODEC.seal(SIGNERS["a"], subject=f"wn.{NS}.delta.{SUBJECT}", hlc=T0, sequence=1,
                   document=subset(a, keys)),  # one of a's delta batches
    ):
        with pytest.raises(BadSignatureError):
            await node_b.apply(body)
    assert node_b.observer.rejects == [("wrong_subject", "a")] * 3
    assert node_b.replica.state.store is None


async def test_its_own_fetch_reply_is_no_voucher(node_b: _Node) -> None:
    with pytest.raises(MalformedMessageError):
        await node_b.apply(_voucher("b", _writes("b", 2), ["b0", "b1"]))


async def test_a_stale_or_future_voucher_is_refused(node_b: _Node) -> None:
    a = _writes("a", 3)
    keys = sorted(a.store or ())
    stale = _voucher("a", a, keys)
    node_b.now_ms = NOW_MS + int(VOUCHER_MAX_AGE_S * 1000) + 1_000  # replayed 10 min later
    with pytest.raises(ExpiredRequestError):
        await node_b.apply(stale)
    node_b.now_ms = NOW_MS
    with pytest.raises(ClockSkewError):
        await node_b.apply(_voucher("a", a, keys, hlc=(NOW_MS + 3_600_000) << 16))
    assert node_b.observer.rejects == [("expired", "a"), ("clock_skew", "a")]
    assert node_b.replica.state.store is None
    # the same, fresh, is joined
    await node_b.apply(_voucher("a", a, keys))
    assert key_digests(node_b.replica.state) == key_digests(a)


@pytest.mark.parametrize("fault", ["dot_range", "clock_range"])
async def test_a_source_vouching_for_impossible_entries_is_refused_and_named(
    node_b: _Node, fault: str
) -> None:
    # c's own entry under a dot 2**40 ahead of anything b saw, or stamped after c sealed.
    c = ORMap(None, CausalContext({"c": 2**40} if fault == "dot_range" else {}))
    ts = T0 + (10**9 if fault == "clock_range" else 0)
    c.merge(c.assign("c", ("x", "v"), 1, ts))
    with pytest.raises(VoucherRefusedError) as err:
        await node_b.apply(_voucher("c", c, ["x"]))
    assert (err.value.reason, err.value.source) == (fault, "c")
    assert node_b.observer.rejects == [(fault, "c")]
    assert node_b.endpoints.rejected[(SUBJECT, "apply", fault)] == 1
    assert node_b.replica.state.store is None


async def test_a_vouchers_claims_speak_only_for_its_keys(node_b: _Node) -> None:
    """A node's fetch reply whose context claims a's next 10**6 dots (a stolen healer key
    cannot forge one, but a Byzantine node could seal it): the repair b computes claims only
    dots of the keys named, so a is not silenced on b."""
    c = _writes("c", 1)
    forged = subset(c, ["c0", "a0"], absent=True)
    forged.context.merge(CausalContext({"a": 10**6}))
    body = CODEC.seal(SIGNERS["c"], subject=merkle_subject(NS, SUBJECT, "c", "fetch"),
                      hlc=T0 + 1000, sequence=0, document=forged)
    await node_b.apply(body)
    assert node_b.replica.state.context.max_counter("a") == 0
    await node_b.apply(_voucher("a", _writes("a", 3), ["a0", "a1", "a2"]))
    assert {"a0", "a1", "a2", "c0"} == set(node_b.replica.state.store or ())


async def test_other_writers_unseen_dots_are_dropped_and_their_writer_owed(
    node_b: _Node
) -> None:
    # c holds a's writes (b never saw them) and its own: c vouches for its own only.
    c = _writes("c", 2, _writes("a", 3))
    keys = sorted(c.store or ())
    await node_b.apply(_voucher("c", c, keys))
    held = set(node_b.replica.state.store or ())
    assert held == {"c0", "c1"}
    assert node_b.replica.state.context.max_counter("a") == 0
    # a's own signed state brings the rest: a is owed a catch-up (asked as soon as the
    # catch-up the start began has ended; see the machine test below).
    assert "a" in node_b.replica.machine._owed


def test_a_repair_that_stripped_a_writer_owes_a_catch_up() -> None:
    m = ReplicationMachine("b", ReplicationConfig())
    out = m.handle(RepairApplied(0.0, ORMap(is_delta=True), 0, ("a", "b")))
    assert [x.peer for x in out if isinstance(x, RequestCatchup)] == ["a"]
    assert "a" in m._owed
    assert "b" not in m._owed
