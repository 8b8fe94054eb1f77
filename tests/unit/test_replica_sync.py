"""A catch-up asked of one peer takes that peer's answer only (memory transport, real stores):
a roster member relaying its own signed "nothing new" ahead of the peer asked is counted as
rejected, and the wait goes on for the real answer, which is joined. (Replays, refusals and
rate limits run against a real nats-server in tests/integration/test_sync_binding.py.)"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

from broker.codec import Signer, TrustRoster, WireCodec
from broker.crdt import ORMap
from broker.replica import NullReplicaObserver, Replica, ReplicaConfig
from broker.store import DurableStore
from broker.transport import MemoryNetwork, Msg, RequestSigner, sync_subject

SIGNERS = {n: Signer(n, bytes([i + 1]) * 32) for i, n in enumerate("abc")}
ROSTER = TrustRoster({n: s.public_key for n, s in SIGNERS.items()})
SUBJECT = "orders"
SYNC = sync_subject("t", SUBJECT)


async def _eventually(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "not reached"
        await asyncio.sleep(0.01)


class _Rejects(NullReplicaObserver):
    def __init__(self) -> None:
        self.reasons: list[str] = []

    def rejected(self, subject: str, reason: str, writer: str | None = None) -> None:
        self.reasons.append(reason)


async def test_a_relayed_answer_is_rejected_and_the_peer_asked_is_heard(tmp_path: Path) -> None:
    net = MemoryNetwork()
    codec = WireCodec()
    observer = _Rejects()
    relays = 0
    stores = [DurableStore(tmp_path / f"{n}.db", synchronous="normal") for n in "ab"]
    for store in stores:
        store.open()
    relay = net.transport("c")
    relay._open()
    signer_c = RequestSigner(SIGNERS["c"], ROSTER)

    async def answer_first(msg: Msg) -> None:
        # c answers requests meant for a: signed by c, bound to the request, "nothing new".
        nonlocal relays
        if (msg.headers or {}).get("Worknode-To") != "a" or not msg.reply:
            return
        body = codec.seal(SIGNERS["c"], subject=SYNC, hlc=1 << 16, sequence=0,
                          document=ORMap(is_delta=True))
        await relay.respond(msg, body, headers=signer_c.reply_headers(msg, body))
        relays += 1

    await relay.subscribe(SYNC, answer_first)
    config = ReplicaConfig(namespace="t", subject=SUBJECT, catchup_timeout=2.0)
    transports = [net.transport(n) for n in "ab"]
    for t in transports:
        t._open()
    a = Replica(signer=SIGNERS["a"], roster=ROSTER, codec=codec, transport=transports[0],
                store=stores[0], config=config)
    b = Replica(signer=SIGNERS["b"], roster=ROSTER, codec=codec, transport=transports[1],
                store=stores[1], config=config, observer=observer)
    try:
        await a.start()
        for i in range(5):
            await a.create(f"k{i}")
        await b.start()
        await _eventually(lambda: all(f"k{i}" in b.tree for i in range(5)))
        await b._subs[0].unsubscribe()  # b's deltas: it misses what a writes next
        for i in range(5, 10):
            await a.create(f"k{i}")
        await a.flush()
        observer.reasons.clear()
        await b.catch_up("a")
        await _eventually(lambda: all(f"k{i}" in b.tree for i in range(10)))
        assert relays >= 1, "c answered requests meant for a"
        assert "bad_signature" in observer.reasons
    finally:
        await b.stop()
        await a.stop()
        for t in (*transports, relay):
            await t.stop()
        for store in stores:
            store.close()
