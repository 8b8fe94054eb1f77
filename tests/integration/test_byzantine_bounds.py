"""Bounds of the Byzantine-writer catch-up (issue 17), with real processes: a real nats-server,
real worknode services with SQLite stores, no healer.

- An evidence flood: a catch-up answered, ahead of the honest answer, by more than
  ``MAX_EVIDENCE_MESSAGES`` evidence messages (anyone who can publish to the asker's reply
  inbox). The asker counts ``too_much_evidence``, stays up, and converges on a later
  catch-up (the evidence the flood displaced arrives with it).
- ``Worknode-Cut`` end to end: node-b holds node-a's writes but keeps no evidence of them
  (``evidence_max_bytes=0``) and removed one of node-a's fields; node-c, which lacks them,
  catches up from node-b (node-a away): the answer is cut, names node-a in its signed
  ``Worknode-Cut`` header (a reply whose header is removed in transit fails verification and
  changes nothing), node-c asks node-a once it is back, and ends with node-b's state,
  node-b's removal included, without a healer.
- A stolen key's ``Worknode-Cut`` naming the asker, itself and writers no roster holds: the
  asker follows none of them (only roster writers are asked), stops, and writes on.

Settling is polled with a deadline (no timed assertion); every service is stopped on the way
out, a failing test included.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

from broker.codec import AUTH_HEADER, WireCodec, parse_auth
from broker.crdt import ORMap, Tree
from broker.errors import WorknodeError
from broker.replica import EVIDENCE_HEADER, MAX_EVIDENCE_MESSAGES, SYNC_HEADER, Replica
from broker.transport import (
    EmbeddedNatsServer,
    Msg,
    NatsTransport,
    RequestSigner,
    sync_subject,
)
from services.worknode import WorknodeService, load_or_create_signer
from tests.integration._nodes import SUBJECT, eventually, node_settings, roster_of

SYNC = sync_subject("default", SUBJECT)
CUT_HEADER = "Worknode-Cut"
FLOOD_EXTRA = 200
"""Evidence messages sent past ``MAX_EVIDENCE_MESSAGES`` (each must be counted)."""
SETTLE_S = 30.0


class HoldingTransport(NatsTransport):
    """A responder's transport: while ``hold`` is set, its answers on the sync subject wait
    until ``go`` is set (the flood went first); ``release`` lets every answer go."""

    def __init__(self, urls: list[str], **kw: Any) -> None:
        super().__init__(urls, **kw)
        self.hold = False
        self.go = asyncio.Event()

    async def respond(
        self, msg: Msg, data: bytes, *, headers: Mapping[str, str] | None = None
    ) -> None:
        if self.hold and msg.subject == SYNC:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(10):  # a safety net, not an assertion
                    await self.go.wait()
        await super().respond(msg, data, headers=headers)

    def release(self) -> None:
        self.hold = False
        self.go.set()


class TapTransport(NatsTransport):
    """node-c's transport: records each catch-up reply's ``Worknode-Cut`` header and signer;
    while ``strip_cut`` is set, removes the header in transit (as a man in the middle would
    hide the cut list) before the replica sees the reply."""

    def __init__(self, urls: list[str], **kw: Any) -> None:
        super().__init__(urls, **kw)
        self.cuts: list[tuple[str, str]] = []
        self.asked: list[str | None] = []
        """The peer each catch-up request named (``Worknode-To``; None: any)."""
        self.strip_cut = False
        self.stripped = 0

    async def request_many(
        self, subject: str, data: bytes, *, accept: Callable[[Msg], bool] | None = None,
        **kw: Any,
    ) -> list[Msg]:
        if accept is None or subject != SYNC:
            return await super().request_many(subject, data, accept=accept, **kw)
        self.asked.append((kw.get("headers") or {}).get("Worknode-To"))
        inner = accept

        def tap(reply: Msg) -> bool:
            headers = dict(reply.headers or {})
            if CUT_HEADER in headers:
                with contextlib.suppress(WorknodeError):
                    self.cuts.append(
                        (parse_auth(headers.get(AUTH_HEADER)).signer, headers[CUT_HEADER]))
                if self.strip_cut:
                    del headers[CUT_HEADER]
                    self.stripped += 1
                    reply = Msg(reply.subject, reply.data, reply.reply, headers)
            return inner(reply)

        return await super().request_many(subject, data, accept=tap, **kw)


class Nodes:
    """Worknode services of one test (started with ``start``, all stopped by ``stop_all``)."""

    def __init__(self, tmp: Path, url: str, names: tuple[str, ...], **per: dict[str, Any]):
        self.url = url
        self.settings = {n: node_settings(tmp, url, n, **per.get(n.replace("-", "_"), {}))
                         for n in names}
        self.roster = roster_of(list(self.settings.values()))
        self.svcs: dict[str, WorknodeService] = {}
        self.transports: dict[str, NatsTransport] = {}

    async def start(self, name: str, transport: NatsTransport | None = None) -> Replica:
        if transport is not None:
            self.transports[name] = transport
        svc = WorknodeService(self.settings[name], roster=self.roster,
                              transport=self.transports.get(name))
        self.svcs[name] = svc
        await svc.start()
        return svc.replica(SUBJECT)

    async def stop(self, name: str) -> None:
        await self.svcs.pop(name).stop()

    async def stop_all(self) -> None:
        for name in list(self.svcs):
            with contextlib.suppress(Exception):
                await self.stop(name)
        for transport in self.transports.values():
            with contextlib.suppress(Exception):
                await transport.stop()

    def r(self, name: str) -> Replica:
        return self.svcs[name].replica(SUBJECT)

    def rejected(self, name: str, reason: str) -> float:
        value: float = self.svcs[name].metrics.rejected_series(SUBJECT, reason)._value.get()
        return value

    def byzantine(self, name: str, signer: str) -> float:
        """``worknode_byzantine_rejected_total{signer=signer}`` on ``name``, every reason."""
        total = 0.0
        for metric in self.svcs[name].metrics.byzantine_envelopes.collect():
            for sample in metric.samples:
                if sample.name.endswith("_total") and sample.labels.get("signer") == signer:
                    total += sample.value
        return total


@contextlib.asynccontextmanager
async def _nodes(tmp: Path, server: EmbeddedNatsServer, names: tuple[str, ...],
                 **per: dict[str, Any]) -> AsyncIterator[Nodes]:
    nodes = Nodes(tmp, server.url, names, **per)
    try:
        yield nodes
    finally:
        await nodes.stop_all()


def _fields(r: Replica, key: str) -> dict[str, Any]:
    tree = Tree(r.state)
    return dict(tree.fields(key)) if key in tree else {}


async def _write_fields(r: Replica, key: str, fields: Mapping[str, int]) -> None:
    for name, value in fields.items():
        await r.set(key, (name,), value)
    await r.flush()


# -- an evidence flood -----------------------------------------------------------------------------


async def test_an_evidence_flood_is_counted_and_a_later_catch_up_converges(
    tmp_path: Path, nats_server: EmbeddedNatsServer
) -> None:
    """node-a writes and leaves; node-b kept its batches as evidence. node-c, which missed
    them, restarts: its catch-up request is answered first by ``MAX_EVIDENCE_MESSAGES`` + 200
    junk evidence messages (the flood), then by node-b (held until the flood is on the
    server): node-b's real evidence is among what the asker had to drop. node-c counts every
    message past the bound, stays up, takes no node-a write that node-a's own signature did
    not bring, and a later catch-up brings them all."""
    async with _nodes(tmp_path, nats_server, ("node-a", "node-b", "node-c")) as n:
        ra = await n.start("node-a")
        held = HoldingTransport([n.url], name="node-b", reconnect_time_wait=0.05)
        rb = await n.start("node-b", held)
        rc = await n.start("node-c")
        await ra.create("o")
        await _write_fields(ra, "o", {"x": 1})
        await eventually(lambda: _fields(rc, "o") == {"x": 1}, SETTLE_S, "node-c has x")
        await n.stop("node-c")
        await _write_fields(ra, "o", {f"f{i}": i for i in range(5)})
        want = _fields(ra, "o")
        await eventually(lambda: _fields(rb, "o") == want, SETTLE_S, "node-b has node-a's")
        assert rb.machine.evidence_bytes > 0
        await n.stop("node-a")  # only node-b's kept batches can bring node-a's writes now

        flooded: list[str] = []
        async with NatsTransport([n.url], name="flooder") as bus:

            async def flood(msg: Msg) -> None:
                headers = msg.headers or {}
                if headers.get(SYNC_HEADER) != "request" or not msg.reply or flooded:
                    return
                with contextlib.suppress(WorknodeError):
                    if parse_auth(headers.get(AUTH_HEADER)).signer != "node-c":
                        return
                flooded.append(msg.reply)
                for i in range(MAX_EVIDENCE_MESSAGES + FLOOD_EXTRA):
                    await bus.publish(msg.reply, b"junk-%d" % i, headers={EVIDENCE_HEADER: "1"})
                await bus.flush()
                held.go.set()

            sub = await bus.subscribe(SYNC, flood)
            await bus.flush()
            held.hold = True
            try:
                rc = await n.start("node-c")  # its first catch-up is the flooded one
                await eventually(lambda: bool(flooded) and held.go.is_set(), SETTLE_S,
                                 "the flood went out")
            finally:
                held.release()
                await sub.unsubscribe()
        await eventually(lambda: n.rejected("node-c", "too_much_evidence") >= FLOOD_EXTRA,
                         SETTLE_S, "node-c counted the evidence past its bound")
        # It stays up and gets node-a's writes from node-b's evidence on a later catch-up.
        await eventually(lambda: _fields(rc, "o") == want, SETTLE_S,
                         "node-c converged on a later catch-up")
        # The flood past the bound, and node-b's own evidence that came after it.
        dropped = n.rejected("node-c", "too_much_evidence")
        assert FLOOD_EXTRA < dropped <= FLOOD_EXTRA + len(rb.machine.evidence()), dropped
        assert n.byzantine("node-c", "node-b") == 0, "honest node-b was counted"
        await rc.create("after")
        await rc.flush()
        await eventually(lambda: "after" in Tree(rb.state), SETTLE_S, "node-c replicates")
        assert rc.content_digest() == rb.content_digest()


# -- the Worknode-Cut header -----------------------------------------------------------------------


async def test_a_cut_answer_names_its_writers_under_its_signature_and_converges(
    tmp_path: Path, nats_server: EmbeddedNatsServer
) -> None:
    """node-a writes y and z while node-c is away and leaves; node-b (keeping no evidence)
    removes y and writes w. node-c, back with node-b its only peer, gets node-b's answer cut
    to what node-b can vouch for to it, naming node-a in the signed ``Worknode-Cut`` header
    (removed in transit, the reply fails verification and nothing of it is joined); it holds
    neither z nor the removal of y until node-a is back, asks node-a, and ends with node-b's
    state (w, z, no y) with no healer running."""
    async with _nodes(tmp_path, nats_server, ("node-a", "node-b", "node-c"),
                      node_b={"evidence_max_bytes": 0}) as n:
        ra = await n.start("node-a")
        rb = await n.start("node-b")
        tap = TapTransport([n.url], name="node-c", reconnect_time_wait=0.05)
        rc = await n.start("node-c", tap)
        await ra.create("o")
        await _write_fields(ra, "o", {"x": 1})
        await eventually(lambda: _fields(rc, "o") == {"x": 1}, SETTLE_S, "node-c has x")
        await n.stop("node-c")
        await _write_fields(ra, "o", {"y": 2, "z": 3})  # node-c never sees these batches
        await eventually(lambda: _fields(rb, "o") == {"x": 1, "y": 2, "z": 3}, SETTLE_S,
                         "node-b has node-a's y and z")
        assert rb.machine.evidence_bytes == 0, "node-b keeps no evidence"
        await n.stop("node-a")
        # node-b removes node-a's field y (node-a, away, never hears of it) and writes its own.
        await rb.write(lambda t, r, ts: t.remove_field("o", ("y",)))
        await _write_fields(rb, "o", {"w": 4})
        final = {"x": 1, "z": 3, "w": 4}
        assert _fields(rb, "o") == final

        # node-c back, node-b its only peer: node-b's answer is cut (node-a's y, z and the
        # removal of y left out) and says so. Removed in transit, the header breaks the
        # reply's signature: node-c counts it and joins nothing of it.
        tap.strip_cut = True
        bad = 0.0
        try:
            rc = await n.start("node-c")
            await eventually(lambda: tap.stripped > 0, SETTLE_S, "a cut answer arrived")
            await eventually(lambda: n.rejected("node-c", "bad_signature") > 0, SETTLE_S,
                             "node-c refused the altered reply")
            assert "w" not in _fields(rc, "o"), "a reply with its cut list removed was joined"
            bad = n.rejected("node-c", "bad_signature")
        finally:
            tap.strip_cut = False
        assert ("node-b", "node-a") in tap.cuts
        # As sent: joined without what node-b cannot vouch for to node-c.
        await eventually(lambda: _fields(rc, "o").get("w") == 4, SETTLE_S,
                         "node-c joined node-b's cut answer")
        assert "z" not in _fields(rc, "o"), "node-c took node-a's write from node-b's relay"
        assert set(tap.cuts) == {("node-b", "node-a")}
        # node-a back: node-c asks it (the cut named it), then node-b again.
        ra = await n.start("node-a")
        await eventually(lambda: _fields(rc, "o") == final, SETTLE_S,
                         "node-c ends with node-b's state, node-b's removal of y included")
        await eventually(lambda: rc.content_digest() == rb.content_digest()
                         == ra.content_digest(), SETTLE_S, "all three agree")
        assert "node-a" in tap.asked, "node-c never asked the writer its answer was cut of"
        assert n.rejected("node-c", "bad_signature") == bad, "an unaltered reply was refused"
        assert n.byzantine("node-c", "node-b") == 0, "honest node-b was counted"
        assert not n.svcs["node-c"].replica(SUBJECT).machine.held


async def test_a_byzantine_cut_header_naming_no_writer_is_not_followed(
    tmp_path: Path, nats_server: EmbeddedNatsServer
) -> None:
    """node-b's key (stolen; node-b stopped) answers node-c's catch-up with a signed state and
    a signed ``Worknode-Cut`` naming node-c itself, node-b, and 30 names no roster holds.
    node-c joins the answer, asks none of those names (each would be owed, asked, and
    followed up on every later catch-up until given up), stops catching up, and writes on."""
    async with _nodes(tmp_path, nats_server, ("node-a", "node-b", "node-c")) as n:
        tap = TapTransport([n.url], name="node-c", reconnect_time_wait=0.05)
        rc = await n.start("node-c", tap)
        await rc.create("o")
        await _write_fields(rc, "o", {"x": 1})
        ghosts = [f"ghost-{i:02d}" for i in range(30)]
        key = load_or_create_signer("node-b", n.settings["node-b"].key_path())
        as_b = RequestSigner(key, n.roster)
        answered: list[str] = []
        async with NatsTransport([n.url], name="attacker") as bus:

            async def answer(msg: Msg) -> None:
                headers = msg.headers or {}
                if headers.get(SYNC_HEADER) != "request" or not msg.reply:
                    return
                with contextlib.suppress(WorknodeError):
                    if parse_auth(headers.get(AUTH_HEADER)).signer != "node-c":
                        return
                    data = WireCodec().seal(key, subject=SYNC, hlc=time.time_ns() // 10**6 << 16,
                                            sequence=0, document=ORMap(), is_state=True)
                    cut = ",".join(["node-c", "node-b", *ghosts])
                    await bus.respond(msg, data, headers=as_b.reply_headers(
                        msg, data, {CUT_HEADER: cut}))
                    await bus.flush()
                    answered.append(msg.reply)

            sub = await bus.subscribe(SYNC, answer)
            await bus.flush()
            try:
                # (A retry of its start's catch-up, asked before the attacker listened, may
                # be running: it fails, and the next one is answered.)
                await rc.catch_up()
                await eventually(
                    lambda: bool(answered) and (not rc.machine.catching_up
                                                or bool(set(tap.asked) - {None, "node-b"})),
                    SETTLE_S, "node-c done following the answer")
            finally:
                await sub.unsubscribe()
        assert answered
        assert any(cut.startswith("node-c,node-b,ghost-") for _, cut in tap.cuts)
        asked = {peer for peer in tap.asked if peer is not None}
        assert not asked, f"node-c followed a forged cut list: asked {sorted(asked)}"
        assert _fields(rc, "o") == {"x": 1}
        await _write_fields(rc, "o", {"y": 2})
        assert _fields(rc, "o") == {"x": 1, "y": 2}
