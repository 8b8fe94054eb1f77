"""Byzantine writers on the delta path (issue 17), against a real nats-server and three real
worknode services with real SQLite stores. The attacker holds node-b's roster key (stolen):
it seals envelopes with it (``WireCodec.seal``) and publishes them on the delta subject from
a plain NATS connection. node-a and node-c are honest; the model is the set of writes they
acknowledged, checked on every honest node after each attack.

- forge attribution: a delta signed by node-b carrying node-a's next dot is rejected by
  every honest node (``foreign_dot``, counted with signer node-b); no write appears as
  node-a's, and node-a's later writes all reach node-c;
- brick a node: a full state claiming ``{node-a: 2**63 - 1}``, the same as a delta, and a
  delta holding node-b's dot ``2**63 - 1`` are rejected (``dot_range``), a register stamped
  ``2**63 - 1`` too (``clock_range``); node-a keeps writing, node-c takes its writes, node-a
  restarts and writes again;
- wipe: a full state with an empty store and a context of every vector entry + 1000 erases
  nothing; held (its claims are backed by nothing), then rejected (``unbacked_context``).

On main (0d679de) each fails: the forged worknode is joined as node-a's write; the brick
state lands in every honest context, so node-c drops node-a's acknowledged writes and
node-a can neither write nor restart cleanly; the wipe erases every key at once.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from broker.codec import Signer, TrustRoster, WireCodec
from broker.crdt import CausalContext, ORMap, Tree
from broker.crdt._atoms import INT64_MAX
from broker.crdt._stores import LWWStore, MapStore
from broker.transport import EmbeddedNatsServer, NatsTransport, delta_subject
from services.worknode import WorknodeService, load_or_create_signer
from services.worknode._settings import WorknodeSettings
from tests.integration._nodes import SUBJECT, eventually, node_settings, roster_of

DELTA = delta_subject("default", SUBJECT)
HONEST = ("node-a", "node-c")


def _byzantine(svc: WorknodeService, reason: str, signer: str) -> float:
    """``worknode_byzantine_rejected_total{reason, signer}`` on ``svc`` (0 where it does not
    exist: on main, the checks and the metric are missing)."""
    metric = getattr(svc.metrics, "byzantine_envelopes", None)
    if metric is None:
        return 0.0
    value: float = metric.labels(SUBJECT, reason, signer)._value.get()
    return value


def _held(svc: WorknodeService) -> float:
    value: float = svc.metrics.gated_deltas.labels(SUBJECT, "held")._value.get()
    return value


class Cluster:
    """node-a, node-b, node-c on one server; ``model``: worknode -> value, every write an
    honest node acknowledged."""

    def __init__(self, tmp: Path, url: str) -> None:
        self.settings = {
            n: node_settings(tmp, url, n) for n in ("node-a", "node-b", "node-c")
        }
        self.roster: TrustRoster = roster_of(list(self.settings.values()))
        self.svcs: dict[str, WorknodeService] = {}
        self.model: dict[str, int] = {}
        self.stolen: Signer = load_or_create_signer(
            "node-b", self.settings["node-b"].key_path())
        self.url = url

    def settings_of(self, name: str) -> WorknodeSettings:
        return self.settings[name]

    async def start(self, name: str) -> WorknodeService:
        svc = WorknodeService(self.settings[name], roster=self.roster)
        await svc.__aenter__()
        self.svcs[name] = svc
        return svc

    async def stop(self, name: str) -> None:
        svc = self.svcs.pop(name)
        await svc.__aexit__(None, None, None)

    async def stop_all(self) -> None:
        for name in list(self.svcs):
            await self.stop(name)

    async def write(self, name: str, prefix: str, n: int) -> None:
        r = self.svcs[name].replica(SUBJECT)
        for i in range(n):
            wid = f"{prefix}-{i}"
            await r.create(wid)
            await r.set(wid, ("v",), i)
            self.model[wid] = i  # acknowledged: committed on node ``name``

    def missing(self, name: str) -> list[str]:
        tree = self.svcs[name].replica(SUBJECT).tree
        return [w for w, v in self.model.items()
                if w not in tree or tree.fields(w).get("v") != v]

    async def converged(self, timeout: float = 20) -> None:
        for name in self.svcs:
            await eventually(lambda name=name: not self.missing(name), timeout,  # type: ignore[misc]
                              f"{name} holds every acknowledged write")

    def seal(self, document: ORMap) -> bytes:
        """``document`` as node-b's key signs it (the attacker's forgery)."""
        return WireCodec().seal(
            self.stolen, subject=DELTA, hlc=time.time_ns() // 1_000_000 << 16,
            sequence=self.svcs["node-b"].replica(SUBJECT).machine.sequence + 1,
            document=document,
        )


async def _cluster(tmp: Path, server: EmbeddedNatsServer) -> Cluster:
    c = Cluster(tmp, server.url)
    for name in ("node-a", "node-b", "node-c"):
        await c.start(name)
    await c.write("node-a", "a0", 5)
    await c.write("node-c", "c0", 5)
    await c.write("node-b", "b0", 3)  # node-b's own writes before its key was stolen
    await c.converged()
    return c


async def test_a_delta_signed_by_b_carrying_a_dot_of_a_is_rejected(
    tmp_path: Path, nats_server: EmbeddedNatsServer
) -> None:
    c = await _cluster(tmp_path, nats_server)
    try:
        a_state = c.svcs["node-a"].replica(SUBJECT).state
        nxt = a_state.context.next_dot("node-a")
        forged = Tree(a_state.copy()).create("node-a", "forged", "root",
                                             time.time_ns() // 1_000_000 << 16)
        assert nxt in forged.context  # the write claims to be node-a's next one
        async with NatsTransport([c.url], name="attacker") as attacker:
            await attacker.publish(DELTA, c.seal(forged))
        for name in HONEST:
            svc = c.svcs[name]
            await eventually(
                lambda svc=svc: _byzantine(svc, "foreign_dot", "node-b") >= 1  # type: ignore[misc]
                or "forged" in svc.replica(SUBJECT).tree,
                20, f"{name} handled the forgery")
            assert "forged" not in svc.replica(SUBJECT).tree, f"{name} took a's forged write"
            assert _byzantine(svc, "foreign_dot", "node-b") == 1
        # node-a's next writes (one of them takes the dot the forgery claimed) all arrive.
        await c.write("node-a", "a1", 10)
        await c.write("node-c", "c1", 5)
        await c.converged()
    finally:
        await c.stop_all()


async def test_a_brick_context_is_rejected_and_node_a_keeps_writing_and_restarts(
    tmp_path: Path, nats_server: EmbeddedNatsServer
) -> None:
    c = await _cluster(tmp_path, nats_server)
    try:
        brick_state = ORMap(None, CausalContext({"node-a": INT64_MAX}), is_delta=False)
        brick_delta = ORMap(None, CausalContext({"node-a": INT64_MAX}), is_delta=True)
        # node-b's own write, numbered 2**63 - 1: its next dot would overflow every int64.
        hlc = time.time_ns() // 1_000_000 << 16
        huge_own = ORMap(MapStore({"huge": LWWStore(("node-b", INT64_MAX, hlc, 99))}),
                         CausalContext(cloud=[("node-b", INT64_MAX)]), is_delta=True)
        # node-b's next write, stamped 2**63 - 1: it would win every later write there, and
        # a replica restarting with it in its state could stamp nothing again.
        nb = c.svcs["node-c"].replica(SUBJECT).state.context.max_counter("node-b") + 1
        late = ORMap(MapStore({"late": LWWStore(("node-b", nb, INT64_MAX, 1))}),
                     CausalContext(cloud=[("node-b", nb)]), is_delta=True)
        async with NatsTransport([c.url], name="attacker") as attacker:
            for doc in (brick_state, brick_delta, huge_own, late):
                await attacker.publish(DELTA, c.seal(doc))
        for name in HONEST:
            svc = c.svcs[name]
            state = svc.replica(SUBJECT).state
            await eventually(
                lambda svc=svc, state=state: (  # type: ignore[misc]
                    (_byzantine(svc, "dot_range", "node-b") >= 3
                     and _byzantine(svc, "clock_range", "node-b") >= 1)
                    or svc.replica(SUBJECT).state.context.max_counter("node-a") >= 2**62
                    or "late" in svc.replica(SUBJECT).state),
                20, f"{name} handled the four envelopes")
            ctx = svc.replica(SUBJECT).state.context
            assert ctx.max_counter("node-a") < 2**62, f"{name} took the brick context"
            assert ctx.max_counter("node-b") < 2**62, f"{name} took b's huge dot"
            assert "late" not in svc.replica(SUBJECT).state, f"{name} took the 2**63-1 stamp"
            assert _byzantine(svc, "dot_range", "node-b") == 3
            assert _byzantine(svc, "clock_range", "node-b") == 1
        # node-a keeps writing, and its writes are accepted by the peers.
        await c.write("node-a", "a1", 10)
        await c.converged()
        # node-a restarts fine (its state loads) and writes again.
        await c.stop("node-a")
        await c.start("node-a")
        assert not c.missing("node-a")
        await c.write("node-a", "a2", 5)
        await c.write("node-c", "c2", 5)
        await c.converged()
    finally:
        await c.stop_all()


async def test_a_wipe_claiming_every_dot_plus_1000_erases_nothing(
    tmp_path: Path, nats_server: EmbeddedNatsServer
) -> None:
    c = await _cluster(tmp_path, nats_server)
    try:
        for name in HONEST:
            # A short hold so that the test need not wait the default 30 s for the rejection.
            # (On main the bound does not exist: the wipe then fails the test by erasing.)
            m = c.svcs[name].replica(SUBJECT).machine
            if "max_hold" in {f.name for f in dataclasses.fields(m.config)}:
                m.config = dataclasses.replace(m.config, max_hold=1.0)
        vv: dict[str, int] = {}
        for svc in c.svcs.values():
            for r, n in svc.replica(SUBJECT).state.context.version_vector.items():
                vv[r] = max(vv.get(r, 0), n)
        wipe = ORMap(None, CausalContext({r: n + 1000 for r, n in vv.items()}), is_delta=False)
        held_before = {n: _held(c.svcs[n]) for n in HONEST}
        async with NatsTransport([c.url], name="attacker") as attacker:
            await attacker.publish(DELTA, c.seal(wipe))
        for name in HONEST:
            svc = c.svcs[name]
            await eventually(
                lambda svc=svc, name=name: (  # type: ignore[misc]
                    _held(svc) > held_before[name] or bool(c.missing(name))),
                20, f"{name} handled the wipe")
            assert not c.missing(name), f"{name} lost acknowledged writes to the wipe"
            await eventually(
                lambda svc=svc: _byzantine(svc, "unbacked_context", "node-b") >= 1,  # type: ignore[misc]
                20, f"{name} rejects the held wipe")
            assert svc.replica(SUBJECT).machine.held == 0
            assert not c.missing(name)
        await c.write("node-a", "a1", 5)
        await c.write("node-c", "c1", 5)
        await c.converged()
    finally:
        await c.stop_all()
