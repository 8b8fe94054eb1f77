"""Lost batches and a crashed nats-server, over real NATS, with no healer: what the causal gate
and catch-up alone guarantee, beyond tests/integration/test_replication_faults.py (which
covers counting, snapshot reload and seeding a fresh node after one lost batch, and a server
restarted under load with writes going on afterwards):

- after one batch deterministically lost on its way to one node, the counter never shows a
  value its writer did not have at some point (checked at every change), and ends right;
- the nats-server crashed three times under write load with writes stopping at the last
  restart, so that no later batch reveals by a sequence gap what was lost: every node ends
  holding every acknowledged write (announce back, catch-up retried and coalesced);
- the first catch-ups find no peer and nothing else will ask again: retrying recovers the
  lost batch.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from broker.errors import NoRespondersError
from broker.replica import Replica
from broker.transport import EmbeddedNatsServer, Msg, NatsSubscription, NatsTransport
from services.worknode import WorknodeService
from tests.integration._nodes import SUBJECT, node_settings, roster_of

_WRITER = "Worknode-Writer"




class DroppingTransport(NatsTransport):
    """A NatsTransport that drops, on receipt, the ``nth`` delta batch from ``writer``
    (counting from 1): the batch is lost for this node alone, deterministically."""

    def __init__(self, urls: list[str], *, writer: str, nth: int, **kw: Any) -> None:
        super().__init__(urls, **kw)
        self.writer, self.nth = writer, nth
        self.seen = 0
        self.dropped: list[Msg] = []
        self.fail_catchups = 0
        """Catch-up requests still to fail as if no peer answered."""
        self.failed_catchups = 0

    async def request(self, subject: str, data: bytes, **kw: Any) -> Msg:
        self._maybe_fail(subject)
        return await super().request(subject, data, **kw)

    async def request_many(self, subject: str, data: bytes, **kw: Any) -> list[Msg]:
        self._maybe_fail(subject)  # a catch-up waits for the first reply that verifies
        return await super().request_many(subject, data, **kw)

    def _maybe_fail(self, subject: str) -> None:
        if ".sync." in f".{subject}." and self.fail_catchups > 0:
            self.fail_catchups -= 1
            self.failed_catchups += 1
            raise NoRespondersError(f"no responders on {subject} (injected)")

    async def subscribe(self, subject: str, handler: Any, **kw: Any) -> NatsSubscription:
        if ".delta." not in f".{subject}.":
            return await super().subscribe(subject, handler, **kw)

        async def dropping(msg: Msg) -> None:
            if (msg.headers or {}).get(_WRITER) == self.writer:
                self.seen += 1
                if self.seen == self.nth:
                    self.dropped.append(msg)
                    return
            await handler(msg)

        return await super().subscribe(subject, dropping, **kw)


def _counter(r: Replica) -> int | None:
    if "x" not in r.tree:
        return None
    value = r.tree.fields("x").get("n")
    return value if isinstance(value, int) else None


async def _eventually(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached in {timeout} s: {what}")
        await asyncio.sleep(0.05)


async def test_one_lost_batch_counter_never_shows_a_value_its_writer_did_not_have(
    tmp_path: Path, nats_server: EmbeddedNatsServer
) -> None:
    url = nats_server.url
    settings = [node_settings(tmp_path, url, n) for n in ("a", "b")]
    roster = roster_of(settings)
    lossy = DroppingTransport([url], writer="a", nth=3, name="b", reconnect_time_wait=0.05)
    a = WorknodeService(settings[0], roster=roster)
    b = WorknodeService(settings[1], roster=roster, transport=lossy)
    rounds = 12
    # Increments of 1, 2, 4, ...: the writer's values are 2**k - 1, and a counter that
    # counted a writer's entry twice (the bug behind the issue) shows a value that is not.
    writer_values = {(1 << k) - 1 for k in range(rounds + 1)}
    shown: list[int] = []
    async with a, b:
        ra, rb = a.replica(SUBJECT), b.replica(SUBJECT)
        rb.add_change_listener(lambda keys: shown.append(v) if (v := _counter(rb)) else None)
        await ra.create("x")
        await ra.flush()
        await _eventually(lambda: "x" in rb.tree, 10, "b sees x")
        for k in range(rounds):
            await ra.increment("x", ("n",), 1 << k)
            await ra.flush()  # one batch per increment: batch 3 is the one b loses
            await asyncio.sleep(0.02)
        expected = (1 << rounds) - 1
        assert _counter(ra) == expected
        await _eventually(lambda: _counter(rb) == expected, 30, f"b counts {expected}")
        assert len(lossy.dropped) == 1, "exactly one batch was lost on its way to b"
        assert set(shown) <= writer_values, f"b showed {sorted(set(shown) - writer_values)}"
        assert rb.digest() == ra.digest()
        held = b.metrics.gated_deltas.labels(SUBJECT, "held")._value.get()
        assert held >= 1, "the batch after the lost one waited at the causal gate"


def _missing(r: Replica, acked: dict[str, list[int]]) -> dict[str, set[int]]:
    """Per writer: acknowledged writes ``r`` does not hold."""
    out: dict[str, set[int]] = {}
    for writer, elements in acked.items():
        key = f"k-{writer}"
        have = r.tree.fields(key).get("acks", frozenset()) if key in r.tree else frozenset()
        lacking = set(elements) - set(have)
        if lacking:
            out[writer] = lacking
    return out


async def test_server_killed_under_write_load_every_node_gets_every_acknowledged_write(
    tmp_path: Path, nats_server: EmbeddedNatsServer
) -> None:
    """No healer: publish retries, catch-up retried until a peer answers and wants coalesced
    must carry every acknowledged write to every node across a crashed nats-server."""
    names = ("a", "b", "c")
    settings = [node_settings(tmp_path, nats_server.url, n) for n in names]
    roster = roster_of(settings)
    services = [WorknodeService(s, roster=roster) for s in settings]
    acked: dict[str, list[int]] = {n: [] for n in names}
    try:
        for svc in services:
            await svc.start()
        reps = [svc.replica(SUBJECT) for svc in services]
        for r in reps:
            await r.create(f"k-{r.node_id}")
        stop = asyncio.Event()

        async def writer(r: Replica) -> None:
            i = 0
            while not stop.is_set():
                # Acknowledged once durable here, whether or not NATS is up.
                await r.add(f"k-{r.node_id}", ("acks",), i)
                acked[r.node_id].append(i)
                i += 1
                await asyncio.sleep(0.003)

        tasks = [asyncio.create_task(writer(r)) for r in reps]
        for cycle in range(3):
            await asyncio.sleep(0.5)
            await nats_server.kill()  # a crash: whatever it held in flight is lost
            await asyncio.sleep(1.0)
            await nats_server.start()
            if cycle == 2:
                stop.set()  # no later write reveals, by a sequence gap, what it lost
        await asyncio.gather(*tasks)
        assert all(len(v) > 50 for v in acked.values()), "writes went on across the crashes"
        deadline = time.monotonic() + 60
        while True:
            missing = {r.node_id: _missing(r, acked) for r in reps}
            if not any(missing.values()):
                break
            if time.monotonic() > deadline:
                summary = {
                    node: {w: f"{len(s)} of {len(acked[w])} ({min(s)}..{max(s)})"
                           for w, s in lacking.items()}
                    for node, lacking in missing.items()
                }
                states = {
                    r.node_id: (f"queued={r.queued_ops} held={r.held_deltas} "
                                f"seq={r.machine.sequence} idle={r.machine.idle} "
                                f"catching_up={r.machine.catching_up}")
                    for r in reps
                }
                raise AssertionError(f"acknowledged writes missing: {summary}; {states}")
            await asyncio.sleep(0.1)
        for r in reps:
            await r.flush()
            assert r.queued_ops == 0
    finally:
        for svc in services:
            await svc.stop()


async def test_a_lost_batch_is_recovered_although_the_first_catchups_find_no_peer(
    tmp_path: Path, nats_server: EmbeddedNatsServer
) -> None:
    """The batch after a lost one waits at the gate and wants a catch-up; the first three
    catch-ups fail (no peer answers). Nothing else will trigger one (no further writes, no
    reconnect, no healer): only retrying with backoff recovers the lost batch."""
    url = nats_server.url
    settings = [node_settings(tmp_path, url, n) for n in ("a", "b")]
    roster = roster_of(settings)
    lossy = DroppingTransport([url], writer="a", nth=3, name="b", reconnect_time_wait=0.05)
    a = WorknodeService(settings[0], roster=roster)
    b = WorknodeService(settings[1], roster=roster, transport=lossy)
    async with a, b:
        ra, rb = a.replica(SUBJECT), b.replica(SUBJECT)
        await ra.create("x")
        await ra.flush()
        await _eventually(lambda: "x" in rb.tree, 10, "b sees x")
        lossy.fail_catchups = 3
        for k in range(5):
            await ra.increment("x", ("n",), 1 << k)
            await ra.flush()
            await asyncio.sleep(0.02)
        await _eventually(lambda: _counter(rb) == 31, 60, "b counts 31")
        assert len(lossy.dropped) == 1
        assert lossy.failed_catchups == 3
        retries = b.metrics.catchups.labels(SUBJECT, "retry")._value.get()
        assert retries >= 3
        assert rb.digest() == ra.digest()
