"""Byzantine writers on every path a stolen key can use (issue 17), against a real
nats-server, three real worknode services with real SQLite stores and a real healer service
(its loop running). Each attack of the issue (forge attribution, silence node-a, wipe, brick
node-a) is played on each path:

- delta: node-b's key, stolen (node-b stopped), seals an envelope on the delta subject;
- catch-up: node-b's key answers node-c's un-targeted catch-up request (node-c restarting)
  with a signed full state bound to that request. The attacker must win the race against
  node-a's honest answer: node-a's transport holds its answer to a sync request until the
  attacker answered it (a real attacker near its victim wins it often);
- repair: the healer's key, stolen, pushes a repair to a replica's apply endpoint the way
  ``HealClient.apply`` does (node-b is honest then, all three are).

The model is every write an honest node acknowledged (node-b's before its key was stolen
included). After the attack node-a (and node-c) keep writing, a heal pass runs, and once
catch-up settles (polled, with a deadline: no timed assertion) every honest replica must
hold exactly the model (a replica equal to the others over a wrong value fails), hold no
claim of node-a's dots beyond the ones node-a issued, show equal content digests, and at
least one honest node must count the attacker in ``worknode_byzantine_rejected_total``
(``signer`` the attacker's id, any reason; read from the text ``/metrics`` serves). Then
every honest node restarts (its state loads) and writes again, and the model holds again.

One allowance, the README's Byzantine model ("Byzantine writers": a node's key may "write,
overwrite and delete, as that node, what it can read"): the wipe by node-b's key (empty,
claiming every dot + 1000) is, as far as node-b had seen, an ordinary removal, so the writes
node-b had seen may be gone (on every replica alike: contents must be equal) or intact,
never altered; every write it had not seen (all after the attack) must stay. The forgeries
only add (a new worknode, a new field), so they remove nothing node-b could remove. The
healer's key may remove nothing: its wipe must erase nothing.

The properties are black-box: they do not depend on how a replica refuses (gate, clipping,
vouched repairs), only on what it ends up holding and counting.

On dc837b9 (the delta path's first slice) the delta-path tests pass and every catch-up and
repair test fails: a forged or claiming catch-up state or repair is joined by node-c and
healed into node-a (node-a's later writes lost: a forgery's dots are node-a's next ones), a
catch-up wipe erases node-a's later writes, a repair wipe every earlier key, a brick repair
leaves node-a unable to write (``BoundsError``), and no honest node counts the attacker.
Before that slice (3bf2114^1) the four delta-path tests fail too (forged writes joined, keys
erased, the Merkle refresh in a ``struct.error`` loop, nothing counted).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from broker.codec import AUTH_HEADER, Signer, TrustRoster, WireCodec, parse_auth
from broker.crdt import CausalContext, ORMap, Tree
from broker.crdt._atoms import INT64_MAX
from broker.errors import WorknodeError
from broker.healing import HealClient
from broker.replica import SYNC_HEADER
from broker.transport import (
    EmbeddedNatsServer,
    Msg,
    NatsTransport,
    RequestSigner,
    delta_subject,
    sync_subject,
)
from services.healer import HealerService, HealerSettings
from services.worknode import WorknodeService, load_or_create_signer
from tests.integration._nodes import SUBJECT, node_settings

NS = "default"
DELTA = delta_subject(NS, SUBJECT)
SYNC = sync_subject(NS, SUBJECT)
NAMES = ("node-a", "node-b", "node-c")
ATTACKS = ("forge", "silence", "wipe", "brick")
FAKE = 666_666
"""The value of every fabricated write (no honest write uses it)."""
SILENCE = 10**6
"""Dots of node-a a silencing claim runs ahead of what node-a issued."""
SETTLE_S = 20.0
"""Deadline for catch-up and healing to settle after the attack (the checks follow it)."""


def _hlc() -> int:
    return time.time_ns() // 1_000_000 << 16


def _counted(svc: WorknodeService, signer: str) -> float:
    """``worknode_byzantine_rejected_total{signer=signer}`` summed over every reason and
    subject, as ``svc``'s ``/metrics`` serves it (0 where the metric does not exist)."""
    text = generate_latest(svc.metrics.registry).decode()
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if (sample.name == "worknode_byzantine_rejected_total"
                    and sample.labels.get("signer") == signer):
                total += sample.value
    return total


class HoldingTransport(NatsTransport):
    """node-a's transport: while ``hold`` is set, its answer to a sync request waits until
    the attacker answered that same request (``answered``), so the forged answer is the
    first; ``release`` lets every answer go."""

    def __init__(self, urls: list[str], **kw: Any) -> None:
        super().__init__(urls, **kw)
        self.hold = False
        self.answered: dict[str, asyncio.Event] = {}

    async def respond(
        self, msg: Msg, data: bytes, *, headers: Mapping[str, str] | None = None
    ) -> None:
        if self.hold and msg.subject == SYNC:
            event = self.answered.setdefault(msg.reply, asyncio.Event())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(10):  # a safety net, not an assertion
                    await event.wait()
        await super().respond(msg, data, headers=headers)

    def release(self) -> None:
        """Answer at once from now on (and whatever waits)."""
        self.hold = False
        for event in self.answered.values():
            event.set()


class Cluster:
    """node-a, node-b, node-c and a healer on one server. ``model``: worknode -> value, every
    write an honest node acknowledged; ``issued_a``: the dots node-a issued (one per op)."""

    def __init__(self, tmp: Path, url: str) -> None:
        self.url = url
        secret = tmp / "cluster.secret"
        secret.write_bytes(os.urandom(32))
        self.settings = {n: node_settings(tmp, url, n, cluster_secret_file=secret)
                         for n in NAMES}
        self.healer_settings = HealerSettings(
            nats_urls=[url], state_dir=tmp / "healer", cluster_secret_file=secret,
            subjects=[SUBJECT], metrics_port=None, interval_s=2.0, retry_s=0.5,
            membership_poll_s=0.5,
        )
        self.keys: dict[str, Signer] = {
            n: load_or_create_signer(n, s.key_path()) for n, s in self.settings.items()
        }
        self.healer_key = load_or_create_signer("healer", self.healer_settings.key_path())
        self.roster = TrustRoster({n: k.public_key for n, k in self.keys.items()})
        self.roster.add("healer", self.healer_key.public_key, "healer")
        self.svcs: dict[str, WorknodeService] = {}
        self.transports: dict[str, NatsTransport] = {}
        self.healer: HealerService | None = None
        self.model: dict[str, int] = {}
        self.issued_a = 0
        self.honest: tuple[str, ...] = NAMES
        self.removable: set[str] = set()
        """Acknowledged writes the attacker may have removed as any writer may: ones it had
        seen, removed by its own key's (node-b's) removal. Gone or intact, never altered."""

    async def start(self, name: str, transport: NatsTransport | None = None) -> None:
        if transport is not None:
            self.transports[name] = transport
        svc = WorknodeService(self.settings[name], roster=self.roster, transport=transport)
        await svc.start()
        self.svcs[name] = svc
        # A short causal hold, so that a claim never backed is rejected within the test's
        # deadline rather than the default 30 s.
        m = svc.replica(SUBJECT).machine
        if "max_hold" in {f.name for f in dataclasses.fields(m.config)}:
            m.config = dataclasses.replace(m.config, max_hold=1.0)

    async def stop(self, name: str) -> None:
        svc = self.svcs.pop(name)
        await svc.stop()
        transport = self.transports.pop(name, None)
        if transport is not None:
            await transport.stop()

    async def stop_all(self) -> None:
        if self.healer is not None:
            healer, self.healer = self.healer, None
            await healer.stop()
        for name in list(self.svcs):
            with contextlib.suppress(WorknodeError):
                await self.stop(name)

    async def write(self, name: str, prefix: str, n: int) -> None:
        r = self.svcs[name].replica(SUBJECT)
        for i in range(n):
            wid = f"{prefix}-{i}"
            try:
                await r.create(wid)
                await r.set(wid, ("v",), i)
            except WorknodeError as exc:
                pytest.fail(f"{name} cannot write {wid}: {exc!r}")
            self.model[wid] = i  # acknowledged: committed on node ``name``
            if name == "node-a":
                self.issued_a += 2

    def state(self, name: str) -> ORMap:
        return self.svcs[name].replica(SUBJECT).state

    def wrong(self, name: str) -> list[str]:
        """How ``name``'s value differs from the model (empty: exactly the model)."""
        state = self.state(name)
        tree = Tree(state)
        nodes = tree.nodes()
        out = [f"lost {w}" for w in sorted(set(self.model) - nodes - self.removable)]
        out += [f"extra {w}" for w in sorted(nodes - set(self.model))]
        out += [f"{w} holds {tree.fields(w)!r}, acknowledged {{'v': {v}}}"
                for w, v in sorted(self.model.items())
                if w in nodes and tree.fields(w) != {"v": v}]
        claimed = state.context.max_counter("node-a")
        if claimed > self.issued_a:
            out.append(f"claims node-a's dot {claimed}, node-a issued {self.issued_a}")
        return out

    def settled(self, attacker: str | None = None) -> bool:
        """The model everywhere, equal contents, and (``attacker``) the attacker counted."""
        digests = {self.svcs[n].replica(SUBJECT).content_digest() for n in self.honest}
        return (len(digests) == 1 and not any(self.wrong(n) for n in self.honest)
                and (attacker is None or any(self.counts(attacker).values())))

    async def settle(self, attacker: str | None = None, timeout: float = SETTLE_S) -> None:
        """Wait until ``settled`` or ``timeout`` s passed (the caller's checks say which)."""
        deadline = time.monotonic() + timeout
        while not self.settled(attacker) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)

    def counts(self, attacker: str) -> dict[str, float]:
        """``attacker``'s count on each honest node."""
        return {n: _counted(self.svcs[n], attacker) for n in self.honest}

    def check(self, when: str) -> None:
        """Every honest replica holds exactly the model; their contents are equal."""
        wrong = {n: w[:6] for n in self.honest if (w := self.wrong(n))}
        assert not wrong, f"{when}: replicas differ from the acknowledged writes: {wrong}"
        for name in self.honest:
            tree = Tree(self.state(name))
            assert "forged" not in tree, f"{when}: {name} holds node-a's fabricated worknode"
            assert all(FAKE not in tree.fields(w).values() for w in tree.nodes()), \
                f"{when}: {name} holds a fabricated value"
        digests = {n: self.svcs[n].replica(SUBJECT).content_digest().hex()[:12]
                   for n in self.honest}
        assert len(set(digests.values())) == 1, f"{when}: honest replicas differ: {digests}"


@contextlib.asynccontextmanager
async def _cluster(tmp: Path, server: EmbeddedNatsServer) -> AsyncIterator[Cluster]:
    """The three nodes (node-a on a ``HoldingTransport``) and the healer, started, with
    writes of each acknowledged and replicated everywhere; all stopped on the way out."""
    c = Cluster(tmp, server.url)
    try:
        await c.start("node-a", HoldingTransport([c.url], name="node-a",
                                                 reconnect_time_wait=0.05))
        await c.start("node-b")
        await c.start("node-c")
        c.healer = HealerService(c.healer_settings, roster=c.roster)
        await c.healer.start()
        await c.write("node-a", "a0", 5)
        await c.write("node-c", "c0", 5)
        await c.write("node-b", "b0", 3)  # node-b's own writes, before its key was stolen
        await c.settle()
        c.check("before the attack")
        yield c
    finally:
        await c.stop_all()


async def _after_attack(c: Cluster, attacker: str) -> None:
    """The properties every attack must leave: honest writes go on, a heal pass runs,
    catch-up settles; the model holds everywhere, the attacker is counted; every honest
    node restarts, writes, and the model holds again."""
    await c.write("node-a", "a1", 12)  # the silenced node's writes after the attack
    await c.write("node-c", "c1", 3)
    assert c.healer is not None
    await c.healer.heal_all()
    await c.settle(attacker)
    c.check("after the attack and a heal")
    counts = c.counts(attacker)
    assert any(v > 0 for v in counts.values()), \
        f"no honest node counted {attacker} in worknode_byzantine_rejected_total: {counts}"
    for name in c.honest:
        await c.stop(name)
        try:
            await c.start(name)  # its state loads
        except WorknodeError as exc:
            pytest.fail(f"{name} cannot restart after the attack: {exc!r}")
        await c.write(name, f"r-{name}", 2)
    await c.healer.heal_all()
    await c.settle()
    c.check("after every honest node restarted and wrote")


def _fabricated(state: ORMap) -> tuple[ORMap, ORMap]:
    """``state`` with node-a's next dots on fabricated writes (a worknode ``forged`` valued
    ``FAKE``, and a new field ``w`` of ``a0-1`` set to ``FAKE``): the full state, and the
    delta of those writes. Both only add: no write the attacker saw is overwritten (an
    overwrite removes the old value, which node-b's key may do as node-b, legitimately)."""
    full = state.copy()
    tree = Tree(full)
    ts = _hlc()
    delta = tree.apply_create("node-a", "forged", "root", ts)
    delta.merge(tree.apply_assign("node-a", "forged", ("v",), FAKE, ts))
    delta.merge(tree.apply_assign("node-a", "a0-1", ("w",), FAKE, ts))
    top = state.context.max_counter("node-a")
    assert all(r == "node-a" and n > top for r, n in delta.context.dots())
    return full, delta


def _claiming(state: ORMap, claim: Mapping[str, int]) -> ORMap:
    """``state`` (a full state) whose context also claims ``claim``."""
    full = state.copy()
    full.context.merge(CausalContext(dict(claim)))
    return full


def _plus_1000(state: ORMap) -> ORMap:
    """An empty full state claiming every dot of ``state`` and the next 1000 of each."""
    vv = state.context.version_vector
    return ORMap(None, CausalContext({r: n + 1000 for r, n in vv.items()}), is_delta=False)


# -- delta path: node-b's key, stolen, publishes on the delta subject ---------------------

@pytest.mark.parametrize("attack", ATTACKS)
async def test_delta_path(tmp_path: Path, nats_server: EmbeddedNatsServer, attack: str) -> None:
    """forge: a delta of node-a's next dots with fabricated values; silence: an empty delta
    claiming node-a's next 10**6 dots; wipe: an empty full state claiming every dot + 1000;
    brick: an empty full state claiming ``{node-a: 2**63 - 1}``."""
    async with _cluster(tmp_path, nats_server) as c:
        rb = c.svcs["node-b"].replica(SUBJECT)
        sequence, known = rb.machine.sequence, rb.state.copy()
        await c.stop("node-b")  # compromised: its key is the attacker's now
        c.honest = ("node-a", "node-c")
        n_a = known.context.max_counter("node-a")
        if attack == "wipe":
            c.removable = set(Tree(known).nodes())
        document = {
            "forge": lambda: _fabricated(known)[1],
            "silence": lambda: ORMap(None, CausalContext({"node-a": n_a + SILENCE}),
                                     is_delta=True),
            "wipe": lambda: _plus_1000(known),
            "brick": lambda: ORMap(None, CausalContext({"node-a": INT64_MAX}), is_delta=False),
        }[attack]()
        body = WireCodec().seal(c.keys["node-b"], subject=DELTA, hlc=_hlc(),
                                sequence=sequence + 1, document=document)
        async with NatsTransport([c.url], name="attacker") as bus:
            await bus.publish(DELTA, body)
            await bus.flush()  # on the server before node-a's next batch
        await _after_attack(c, "node-b")


# -- catch-up path: node-b's key answers node-c's catch-up request --------------------------

@pytest.mark.parametrize("attack", ATTACKS)
async def test_catchup_reply_path(
    tmp_path: Path, nats_server: EmbeddedNatsServer, attack: str
) -> None:
    """node-c restarts; its un-targeted catch-up request is answered first by node-b's key
    with a signed full state bound to it: forge: the state with node-a's next dots on
    fabricated values; silence: the state claiming node-a's next 10**6 dots; wipe: an empty
    store claiming every dot + 1000; brick: the state claiming ``{node-a: 2**63 - 1}``."""
    async with _cluster(tmp_path, nats_server) as c:
        rb = c.svcs["node-b"].replica(SUBJECT)
        sequence, known = rb.machine.sequence, rb.state.copy()
        await c.stop("node-b")  # compromised: its key is the attacker's now
        c.honest = ("node-a", "node-c")
        n_a = known.context.max_counter("node-a")
        if attack == "wipe":
            c.removable = set(Tree(known).nodes())
        document = {
            "forge": lambda: _fabricated(known)[0],
            "silence": lambda: _claiming(known, {"node-a": n_a + SILENCE}),
            "wipe": lambda: _plus_1000(known),
            "brick": lambda: _claiming(known, {"node-a": INT64_MAX}),
        }[attack]()
        assert not document.is_delta
        as_b = RequestSigner(c.keys["node-b"], c.roster)
        held = c.transports["node-a"]
        assert isinstance(held, HoldingTransport)
        answered: list[str] = []
        async with NatsTransport([c.url], name="attacker") as bus:

            async def answer(msg: Msg) -> None:
                headers = msg.headers or {}
                if (headers.get(SYNC_HEADER) != "request" or not msg.reply
                        or "Worknode-To" in headers):  # un-targeted requests only
                    return
                with contextlib.suppress(WorknodeError):
                    if parse_auth(headers.get(AUTH_HEADER)).signer != "node-c" or answered:
                        return
                    data = WireCodec().seal(c.keys["node-b"], subject=SYNC, hlc=_hlc(),
                                            sequence=sequence, document=document,
                                            is_state=True)
                    await bus.respond(msg, data, headers=as_b.reply_headers(msg, data))
                    await bus.flush()
                    answered.append(msg.reply)
                    held.answered.setdefault(msg.reply, asyncio.Event()).set()

            sub = await bus.subscribe(SYNC, answer)
            await bus.flush()
            await c.stop("node-c")
            held.hold = True
            try:
                await c.start("node-c")  # its first catch-up ends before start returns
            finally:
                held.release()
                await sub.unsubscribe()
        assert answered, "the attacker answered node-c's catch-up request"
        await _after_attack(c, "node-b")


# -- repair path: the healer's key, stolen, pushes repairs -----------------------------------

@pytest.mark.parametrize("attack", ATTACKS)
async def test_repair_path(tmp_path: Path, nats_server: EmbeddedNatsServer, attack: str) -> None:
    """A repair signed with the healer's key, pushed as ``HealClient.apply`` does: forge (to
    node-c): node-a's next dots on fabricated values; silence (to node-c): empty, claiming
    node-a's next 10**6 dots; wipe (to node-c): removing every key; brick (to node-a and
    node-c): empty, claiming ``{node-a: 2**63 - 1}``. A refused repair is no failure."""
    async with _cluster(tmp_path, nats_server) as c:
        known = c.state("node-c").copy()
        n_a = known.context.max_counter("node-a")
        targets = ("node-a", "node-c") if attack == "brick" else ("node-c",)
        if attack == "wipe":
            tree = Tree(known)
            delta = ORMap(None, CausalContext(), is_delta=True)
            for wid in sorted(tree.nodes()):
                delta.merge(tree.delete(wid))
        else:
            delta = {
                "forge": lambda: _fabricated(known)[1],
                "silence": lambda: ORMap(None, CausalContext({"node-a": n_a + SILENCE}),
                                         is_delta=True),
                "brick": lambda: ORMap(None, CausalContext({"node-a": INT64_MAX}),
                                       is_delta=True),
            }[attack]()
        async with NatsTransport([c.url], name="attacker") as bus:
            client = HealClient(bus, namespace=NS, codec=WireCodec(), signer=c.healer_key,
                                roster=c.roster)
            for target in targets:
                with contextlib.suppress(WorknodeError):  # refused: the point
                    await client.apply(SUBJECT, target, delta)
        await _after_attack(c, "healer")
