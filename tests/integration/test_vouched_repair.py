"""Vouched repairs (issue 17, "the healer cannot launder"), over a real nats-server with three
real worknode services (real SQLite stores) and the real healer.

The healer signs no state: it forwards a source replica's own signed fetch reply, and the
receiving replica computes its repair and keeps what that source vouches for.

- a lost delta is still healed end to end by the real healer (every replica converges, no
  repair refused);
- with the healer's key stolen, a healer-sealed empty repair claiming node-a's next 10**6
  dots is refused by every replica and counted against the healer's id
  (``worknode_byzantine_rejected_total{reason="unvouched_repair", signer="healer"}``), and
  node-a's 12 later acknowledged writes reach every replica;
- a wipe (a healer-sealed repair naming every key absent, with a context covering every
  dot) erases nothing;
- a genuine voucher of node-a replayed by the stolen key after node-a removed a key and
  node-c wrote one it names as absent resurrects nothing and erases nothing;
- a replica serving state it cannot vouch for (an entry under a dot far beyond anything its
  peers saw) is named by the healer: the repair is refused, the heal does not converge
  (``unbacked``), ``worknode_heal_unbacked_sources_total{source}`` counts it.

On main (1dcee47) the healer pushed repairs it computed and sealed itself, joined with no
check: the silencing repair put node-a's next 10**6 dots in node-b's and node-c's contexts
(node-a's later writes were dropped there as already seen), the wipe erased every key, and
the unbacked entry was joined everywhere.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from broker.codec import TrustRoster, WireCodec
from broker.crdt import CausalContext, ORMap
from broker.crdt._stores import MapStore, Whole
from broker.errors import StatusCode
from broker.healing import HealClient
from broker.repair import key_digests
from broker.replica import Consistency
from broker.transport import EmbeddedNatsServer, NatsTransport, ServiceCallError
from services.healer import HealerService, HealerSettings
from services.worknode import WorknodeService, load_or_create_signer
from tests.integration._nodes import (
    SUBJECT,
    eventually,
    heal_until_converged,
    node_settings,
    roster_of,
)

NAMES = ("node-a", "node-b", "node-c")


class Cluster:
    """Three nodes and a healer identity (its key in the roster, as a deployment has it)."""

    def __init__(self, tmp: Path, url: str) -> None:
        secret = tmp / "cluster.secret"
        secret.write_bytes(os.urandom(32))
        self.settings = [node_settings(tmp, url, n, cluster_secret_file=secret) for n in NAMES]
        self.healer_settings = HealerSettings(
            nats_urls=[url], state_dir=tmp / "healer", cluster_secret_file=secret,
            subjects=[SUBJECT], metrics_port=None, interval_s=3600)
        self.roster: TrustRoster = roster_of(self.settings)
        self.healer_key = load_or_create_signer("healer", self.healer_settings.key_path())
        self.roster.add("healer", self.healer_key.public_key, "healer")
        self.svcs: dict[str, WorknodeService] = {}
        self.url = url
        self.model: dict[str, int] = {}

    async def write(self, name: str, prefix: str, n: int,
                    consistency: Consistency = Consistency.EVENTUAL) -> None:
        """``n`` acknowledged writes on ``name`` (LOCAL: never published, a lost delta)."""
        r = self.svcs[name].replica(SUBJECT)
        for i in range(n):
            key = f"{prefix}{i}"
            await r.write(lambda t, rid, ts, k=key, i=i: t.state.assign(rid, (k, "v"), i, ts),
                          consistency)
            self.model[key] = i

    def missing(self, name: str) -> list[str]:
        value = self.svcs[name].replica(SUBJECT).state.value()
        return [k for k, v in self.model.items() if value.get(k) != {"v": v}]

    def digests(self) -> list[dict[str, bytes]]:
        return [key_digests(self.svcs[n].replica(SUBJECT).state) for n in NAMES]

    def byzantine(self, name: str, reason: str, signer: str) -> float:
        metric = self.svcs[name].metrics.byzantine_envelopes
        value: float = metric.labels(SUBJECT, reason, signer)._value.get()
        return value


@pytest.fixture
async def cluster(tmp_path: Path, nats_server: EmbeddedNatsServer) -> AsyncIterator[Cluster]:
    c = Cluster(tmp_path, nats_server.url)
    try:
        for s in c.settings:
            svc = WorknodeService(s, roster=c.roster)
            c.svcs[s.node_id] = svc
            await svc.start()
        yield c
    finally:
        for svc in c.svcs.values():
            await svc.stop()


async def _healer(c: Cluster) -> HealerService:
    """A started real healer whose loop never heals on its own: the test's heals are the
    only ones (counts stay exact)."""
    healer = HealerService(c.healer_settings, roster=c.roster)

    async def idle() -> None:
        await asyncio.Event().wait()

    healer._loop = idle  # type: ignore[method-assign]
    await healer.start()
    return healer


async def test_a_lost_delta_is_healed_by_the_real_healer(cluster: Cluster) -> None:
    c = cluster
    await c.write("node-c", "c", 3)  # published: everyone has them
    for name in NAMES:
        await eventually(lambda name=name: not c.missing(name), 20,  # type: ignore[misc]
                         f"{name} holds c's writes")
    await c.write("node-a", "a", 10, Consistency.LOCAL)  # lost on the way
    await c.write("node-b", "b", 4, Consistency.LOCAL)
    # a removal seen by node-a only: carried by node-a's voucher, not undone
    ra = c.svcs["node-a"].replica(SUBJECT)
    await ra.write(lambda t, r, ts: t.state.remove(("c0",)), Consistency.LOCAL)
    del c.model["c0"]
    assert len({tuple(sorted(d.items())) for d in c.digests()}) == 3
    healer = await _healer(c)
    try:
        out = await heal_until_converged(healer, SUBJECT, list(NAMES))
    finally:
        await healer.stop()
    assert out.unbacked == []
    digests = c.digests()
    assert digests[0] == digests[1] == digests[2]
    assert set(digests[0]) == set(c.model)
    for name in NAMES:
        assert c.missing(name) == []
        assert c.byzantine(name, "unvouched_repair", "healer") == 0


def _client(c: Cluster, transport: NatsTransport) -> HealClient:
    """A healer client holding the stolen healer key."""
    return HealClient(transport, namespace="default", codec=WireCodec(), signer=c.healer_key,
                      roster=c.roster)


async def test_a_stolen_healer_key_cannot_silence_a_writer(cluster: Cluster) -> None:
    c = cluster
    await c.write("node-a", "a", 3)
    for name in NAMES:
        await eventually(lambda name=name: not c.missing(name), 20,  # type: ignore[misc]
                         f"{name} holds a's first writes")
    top = c.svcs["node-a"].replica(SUBJECT).state.context.max_counter("node-a")
    silence = ORMap(None, CausalContext({"node-a": top + 10**6}), is_delta=True)
    async with NatsTransport([c.url], name="thief") as t:
        client = _client(c, t)
        for target in ("node-b", "node-c"):
            with pytest.raises(ServiceCallError) as err:
                await client.apply(SUBJECT, target, silence)
            assert err.value.code is StatusCode.PERMISSION_DENIED
            assert c.byzantine(target, "unvouched_repair", "healer") == 1
            ctx = c.svcs[target].replica(SUBJECT).state.context
            assert ctx.max_counter("node-a") == top
    await c.write("node-a", "later", 12)  # acknowledged by node-a, published
    for name in NAMES:
        await eventually(lambda name=name: not c.missing(name), 20,  # type: ignore[misc]
                         f"{name} holds node-a's 12 later writes")


async def test_a_wipe_repair_erases_nothing(cluster: Cluster) -> None:
    c = cluster
    await c.write("node-a", "a", 4)
    await c.write("node-c", "c", 4)
    for name in NAMES:
        await eventually(lambda name=name: not c.missing(name), 20,  # type: ignore[misc]
                         f"{name} holds every write")
    before = c.digests()
    async with NatsTransport([c.url], name="thief") as t:
        client = _client(c, t)
        for target in NAMES:
            state = c.svcs[target].replica(SUBJECT).state
            vv = {r: n + 1000 for r, n in state.context.version_vector.items()}
            wipe = ORMap(MapStore({k: Whole(None) for k in state.store or ()}),
                         CausalContext(vv), is_delta=True)
            with pytest.raises(ServiceCallError) as err:
                await client.apply(SUBJECT, target, wipe)
            assert err.value.code is StatusCode.PERMISSION_DENIED
            assert c.byzantine(target, "unvouched_repair", "healer") == 1
    assert c.digests() == before
    for name in NAMES:
        assert c.missing(name) == []


async def test_the_healer_names_a_replica_serving_unbacked_state(cluster: Cluster) -> None:
    c = cluster
    await c.write("node-a", "a", 3)
    for name in NAMES:
        await eventually(lambda name=name: not c.missing(name), 20,  # type: ignore[misc]
                         f"{name} holds a's writes")
    # node-c's state gains an entry under node-c's dot 2**40 (never issued: no peer saw
    # anything near it), as a Byzantine node-c would serve it.
    rc = c.svcs["node-c"].replica(SUBJECT)
    evil = ORMap(None, CausalContext({"node-c": 2**40}))
    evil.merge(evil.assign("node-c", ("evil", "v"), 1, rc.hlc()))
    rc.state.merge(evil)
    rc._changed(["evil"])  # its Merkle tree follows
    healer = await _healer(c)
    try:
        out = await healer.heal_subject(SUBJECT, list(NAMES))
        assert not out.converged
        assert out.reason == "unbacked"
        assert out.unbacked == ["node-c"]
        assert healer.metrics.unbacked.labels(SUBJECT, "node-c")._value.get() >= 1
        assert healer.metrics.heals.labels(SUBJECT, "unbacked")._value.get() == 1
    finally:
        await healer.stop()
    for name in ("node-a", "node-b"):
        assert "evil" not in c.svcs[name].replica(SUBJECT).state
        assert c.byzantine(name, "dot_range", "node-c") >= 1


async def test_a_replayed_old_voucher_undoes_nothing(cluster: Cluster) -> None:
    """The stolen healer key replays node-a's genuine fetch reply taken before a removal
    (by node-a) and a write (by node-c): still fresh, it is joined, but it resurrects
    nothing and erases nothing (a receiver removes only dots its source had seen, and keeps
    out what it has seen removed)."""
    c = cluster
    await c.write("node-a", "a", 2)
    for name in NAMES:
        await eventually(lambda name=name: not c.missing(name), 20,  # type: ignore[misc]
                         f"{name} holds a's writes")
    async with NatsTransport([c.url], name="thief") as t:
        client = _client(c, t)
        old = await client.fetch_voucher(SUBJECT, "node-a", ["a0", "x0"])
        assert old.document.store is not None
        assert old.document.store["x0"] == Whole(None)  # absent at node-a, and said so
        ra = c.svcs["node-a"].replica(SUBJECT)
        await ra.write(lambda tr, r, ts: tr.state.remove(("a0",)))
        del c.model["a0"]
        await c.write("node-c", "x", 1)
        for name in NAMES:
            await eventually(
                lambda name=name: not c.missing(name)  # type: ignore[misc]
                and "a0" not in c.svcs[name].replica(SUBJECT).state,
                20, f"{name} saw the removal and the write")
        before = c.digests()
        for target in ("node-b", "node-c"):
            await client.push(SUBJECT, target, old)
    assert c.digests() == before
    for name in NAMES:
        assert c.missing(name) == []
        assert "a0" not in c.svcs[name].replica(SUBJECT).state
