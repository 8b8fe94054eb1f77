"""Catch-up and announce bound and bounded (issue 16), over a real nats-server between real
worknode services with real SQLite stores; the attacker is a plain NATS client on the same bus
replaying what it captured there:

- a captured, validly signed "nothing new" catch-up reply, replayed to every request of a
  restarting node ahead of the real answer, is rejected (counted) and the node still gets
  every write acknowledged while it was away;
- an announce replayed as a request is refused before its envelope is opened: no state sent,
  the refusal counted;
- a captured catch-up request replayed 20 times gets no answer, each replay counted;
- unsigned requests and requests signed by a key outside the roster are refused and counted;
  a replica serves only the peers ``serve_to`` names;
- one peer flooding catch-up requests hits its rate limit while another peer is still served.

Without the binding each of these fails: the replayed reply is accepted and the writes are
missed, the announce is answered with the full state, every replay is answered, nothing is
counted (``worknode_catchup_*`` do not exist).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from broker.codec import Envelope, Signer, TrustRoster, WireCodec
from broker.crdt import CausalContext, ORMap
from broker.errors import CodecError, TransportTimeoutError
from broker.replica import FULL_HEADER, SYNC_HEADER, NullReplicaObserver, Replica, ReplicaConfig
from broker.store import DurableStore
from broker.transport import (
    EmbeddedNatsServer,
    Msg,
    NatsTransport,
    RequestSigner,
    sync_subject,
)
from services.worknode import WorknodeService, load_or_create_signer
from services.worknode._settings import WorknodeSettings
from tests.integration._nodes import SUBJECT, eventually, node_settings, roster_of

SYNC = sync_subject("default", SUBJECT)
_TO = "Worknode-To"


def _refused(svc: WorknodeService, reason: str) -> float:
    value: float = svc.metrics.catchups_refused.labels(SUBJECT, reason)._value.get()
    return value


def _served(svc: WorknodeService) -> float:
    value: float = svc.metrics.catchups_served.labels(SUBJECT)._value.get()
    return value


def _signer(settings: WorknodeSettings, roster: TrustRoster) -> RequestSigner:
    """Signs as the node of ``settings`` (what an attacker captured it signing)."""
    return RequestSigner(load_or_create_signer(settings.node_id, settings.key_path()), roster)


def _probe(signer: Signer) -> bytes:
    """A sync request's body from ``signer``: its (empty) causal context, sealed."""
    return WireCodec().seal(
        signer, subject=SYNC, hlc=time.time_ns() // 1_000_000 << 16, sequence=0,
        document=ORMap(None, CausalContext(), is_delta=True),
    )


class HoldingTransport(NatsTransport):
    """Once ``hold`` is set, holds this node's answer to a sync request until the attacker
    answered the same request (``answered``): the replayed answer always arrives first."""

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


class CountingCodec:
    """A replica's codec, recording the sync envelopes it opens."""

    def __init__(self, codec: WireCodec) -> None:
        self.codec = codec
        self.sync_opened: list[bytes] = []

    def open(self, data: bytes, roster: Any, **kw: Any) -> Envelope:
        if kw.get("subject") == SYNC:
            self.sync_opened.append(data)
        return self.codec.open(data, roster, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.codec, name)


async def test_a_replayed_nothing_new_reply_is_rejected_and_the_node_catches_up(
    tmp_path: Path, nats_server: EmbeddedNatsServer
) -> None:
    url = nats_server.url
    settings = [node_settings(tmp_path, url, n) for n in ("a", "b")]
    roster = roster_of(settings)
    held = HoldingTransport([url], name="a", reconnect_time_wait=0.05)
    a = WorknodeService(settings[0], roster=roster, transport=held)
    replays = 0
    async with a, NatsTransport([url], name="spy") as spy:
        ra = a.replica(SUBJECT)
        b = WorknodeService(settings[1], roster=roster)
        async with b:
            rb = b.replica(SUBJECT)
            await ra.create("seed")
            await ra.flush()
            await eventually(lambda: "seed" in rb.tree, 10, "b sees seed")
            # Captured on the bus: b asks a, b lacks nothing, a answers "nothing new".
            body = rb._context_envelope()
            headers, _ = _signer(settings[1], roster).sign(
                SYNC, body, {SYNC_HEADER: "request", _TO: "a"},
                reply_root=spy.reply_root, lifetime_ms=5_000,
            )
            captured = await spy.request(SYNC, body, timeout=5, headers=headers)
        acked = []
        for i in range(50):  # acknowledged while b is away
            await ra.create(f"w{i}")
            await ra.set(f"w{i}", ("n",), i)
            acked.append(i)
        await ra.flush()

        async def replay(msg: Msg) -> None:
            nonlocal replays
            if (msg.headers or {}).get(SYNC_HEADER) != "request" or not msg.reply:
                return
            await spy.respond(msg, captured.data, headers=captured.headers)
            await spy.flush()
            replays += 1
            held.answered.setdefault(msg.reply, asyncio.Event()).set()

        await spy.subscribe(SYNC, replay)
        await spy.flush()
        held.hold = True
        b = WorknodeService(settings[1], roster=roster)  # b restarts
        async with b:
            rb = b.replica(SUBJECT)

            def missing() -> list[int]:
                return [
                    i for i in acked
                    if f"w{i}" not in rb.tree or rb.tree.fields(f"w{i}").get("n") != i
                ]

            await eventually(lambda: not missing(), 30, "b holds every acknowledged write")
            assert replays >= 1, "the captured reply was replayed to b's request"
            rejected = b.metrics.rejected_envelopes.labels(SUBJECT, "bad_signature")
            assert rejected._value.get() >= replays
            assert rb.digest() == ra.digest()


async def test_an_announce_replayed_as_a_request_is_refused_unopened(
    tmp_path: Path, nats_server: EmbeddedNatsServer
) -> None:
    url = nats_server.url
    settings = [node_settings(tmp_path, url, n) for n in ("a", "b")]
    roster = roster_of(settings)
    announces: list[Msg] = []

    async def capture(msg: Msg) -> None:
        if (msg.headers or {}).get(SYNC_HEADER) == "announce":
            with contextlib.suppress(CodecError):
                if WireCodec().open(msg.data, roster, subject=SYNC).writer == "b":
                    announces.append(msg)

    async with NatsTransport([url], name="spy") as spy:
        await spy.subscribe(SYNC, capture)
        await spy.flush()
        a = WorknodeService(settings[0], roster=roster)
        b = WorknodeService(settings[1], roster=roster)
        async with a, b:
            ra, rb = a.replica(SUBJECT), b.replica(SUBJECT)
            await ra.create("x")
            await ra.flush()
            await eventually(lambda: "x" in rb.tree, 10, "b sees x")
            counting = CountingCodec(ra.codec)
            ra.codec = counting  # type: ignore[assignment]
            announces.clear()
            await rb.announce()
            await eventually(lambda: bool(announces), 10, "b's announce captured")
            await eventually(lambda: announces[-1].data in counting.sync_opened, 10,
                              "a read b's announce")
            served, refused = _served(a), _refused(a, "bad_signature")
            # The amplification: the same bytes, the header flipped to "request".
            headers = dict(announces[-1].headers or {})
            headers[SYNC_HEADER] = "request"
            headers[FULL_HEADER] = "1"
            try:
                await spy.request(SYNC, announces[-1].data, timeout=1.0, headers=headers)
                answered = True
            except TransportTimeoutError:
                answered = False
            assert not answered, "an announce replayed as a request got a state"
            await eventually(lambda: _refused(a, "bad_signature") == refused + 1, 10,
                              "a counts the refusal")
            assert _served(a) == served
            # Opened once, as the announce it is; its replay was refused before.
            assert counting.sync_opened.count(announces[-1].data) == 1


async def test_a_captured_request_replayed_20_times_is_answered_once(
    tmp_path: Path, nats_server: EmbeddedNatsServer
) -> None:
    url = nats_server.url
    settings = [node_settings(tmp_path, url, n) for n in ("a", "b")]
    roster = roster_of(settings)
    a = WorknodeService(settings[0], roster=roster)
    b = WorknodeService(settings[1], roster=roster)
    async with a, b, NatsTransport([url], name="spy") as spy:
        ra, rb = a.replica(SUBJECT), b.replica(SUBJECT)
        await ra.create("x")
        await ra.flush()
        await eventually(lambda: "x" in rb.tree, 10, "b sees x")
        body = rb._context_envelope()
        headers, _ = _signer(settings[1], roster).sign(
            SYNC, body, {SYNC_HEADER: "request", _TO: "a", FULL_HEADER: "1"},
            reply_root=spy.reply_root, lifetime_ms=30_000,
        )
        first = await spy.request(SYNC, body, timeout=5, headers=headers)
        assert first.data, "the request itself is served"
        outcomes = await asyncio.gather(
            *(spy.request(SYNC, body, timeout=1.5, headers=headers) for _ in range(20)),
            return_exceptions=True,
        )
        answered = [o for o in outcomes if isinstance(o, Msg)]
        assert not answered, f"{len(answered)} of 20 replays answered"
        assert all(isinstance(o, TransportTimeoutError) for o in outcomes)
        await eventually(lambda: _refused(a, "replayed") == 20, 10, "20 replays counted")


async def test_unsigned_and_unknown_requests_are_refused_and_counted(
    tmp_path: Path, nats_server: EmbeddedNatsServer
) -> None:
    url = nats_server.url
    settings = [node_settings(tmp_path, url, n) for n in ("a", "b")]
    roster = roster_of(settings)
    stranger = Signer("mallory", os.urandom(32))
    a = WorknodeService(settings[0], roster=roster)
    b = WorknodeService(settings[1], roster=roster)
    async with a, b, NatsTransport([url], name="spy") as spy:
        rb = b.replica(SUBJECT)
        body = rb._context_envelope()
        plain = {SYNC_HEADER: "request", _TO: "a", FULL_HEADER: "1"}
        forged, _ = RequestSigner(stranger, TrustRoster()).sign(
            SYNC, body, plain, reply_root=spy.reply_root, lifetime_ms=5_000
        )
        for headers in (plain, forged):
            try:
                await spy.request(SYNC, body, timeout=1.0, headers=headers)
                answered = True
            except TransportTimeoutError:
                answered = False
            assert not answered
        await eventually(
            lambda: (_refused(a, "unsigned"), _refused(a, "unknown_signer")) == (1, 1), 10,
            "both refusals counted",
        )
        assert _served(a) >= 1, "b's own catch-up at start was served"


class _Counts(NullReplicaObserver):
    def __init__(self) -> None:
        self.served = 0
        self.refused: list[str] = []

    def catchup_served(self, subject: str, nbytes: int) -> None:
        self.served += 1

    def catchup_refused(self, subject: str, reason: str) -> None:
        self.refused.append(reason)


async def test_a_replica_serves_catchups_only_to_the_peers_it_names(
    tmp_path: Path, nats_server: EmbeddedNatsServer
) -> None:
    """``serve_to`` (the service will wire roster roles to it): a roster member it does not
    name is refused ``not_served``; one it names is served, its reply verified."""
    signers = {n: Signer(n, os.urandom(32)) for n in ("x", "y", "z")}
    roster = TrustRoster({n: s.public_key for n, s in signers.items()})
    counts = _Counts()
    with DurableStore(tmp_path / "x.db", synchronous="normal") as store:
        await _serve_only_y(store, nats_server.url, signers, roster, counts)


async def _serve_only_y(
    store: DurableStore, url: str, signers: dict[str, Signer], roster: TrustRoster,
    counts: _Counts,
) -> None:
    async with NatsTransport([url], name="x") as tx, NatsTransport(
        [url], name="client"
    ) as client:
        x = Replica(
            signer=signers["x"], roster=roster, codec=WireCodec(), transport=tx, store=store,
            config=ReplicaConfig(namespace="default", subject=SUBJECT, catchup_timeout=0.2),
            observer=counts, serve_to=lambda: {"y"},
        )
        async with x:
            await x.create("k")
            hdrs = {SYNC_HEADER: "request", _TO: "x", FULL_HEADER: "1"}
            z = RequestSigner(signers["z"], roster)
            try:
                await z.request(client, SYNC, _probe(signers["z"]), timeout=1.0, headers=hdrs)
                answered = True
            except TransportTimeoutError:
                answered = False
            assert not answered
            assert counts.refused == ["not_served"]
            y = RequestSigner(signers["y"], roster)
            reply = await y.request(
                client, SYNC, _probe(signers["y"]), timeout=5, headers=hdrs, signers={"x"}
            )
            assert reply.data
            assert counts.served == 1


async def test_a_flooding_peer_is_rate_limited_while_another_is_served(
    tmp_path: Path, nats_server: EmbeddedNatsServer
) -> None:
    url = nats_server.url
    settings = [node_settings(tmp_path, url, n) for n in ("a", "b", "c")]
    roster = roster_of(settings)
    a = WorknodeService(settings[0], roster=roster)
    async with a, NatsTransport([url], name="spy") as spy:
        ra = a.replica(SUBJECT)
        for i in range(20):
            await ra.create(f"k{i}")
        await ra.flush()
        hdrs = {SYNC_HEADER: "request", _TO: "a", FULL_HEADER: "1"}
        flooder = _signer(settings[1], roster)
        body = _probe(flooder.signer)
        # Each request fresh (its own nonce): a legitimate peer's key, not a replay.
        signed = [
            flooder.sign(SYNC, body, hdrs, reply_root=spy.reply_root, lifetime_ms=5_000)[0]
            for _ in range(40)
        ]
        outcomes = await asyncio.gather(
            *(spy.request(SYNC, body, timeout=2.0, headers=h) for h in signed),
            return_exceptions=True,
        )
        answered = sum(isinstance(o, Msg) for o in outcomes)
        assert 1 <= answered < 40, f"{answered} of 40 flooding requests answered"
        assert _refused(a, "rate_limited") == 40 - answered
        # Meanwhile another peer is served, its reply bound to its own request.
        other = _signer(settings[2], roster)
        reply = await other.request(
            spy, SYNC, _probe(other.signer), timeout=5.0, headers=hdrs, signers={"a"}
        )
        assert reply.data
