"""Replication under faults over real nats-servers, checked against the acknowledged writes.

- One batch lost on its way to one node (a transport wrapper drops it, so the loss is
  certain, not lucky): the counter counts right on every node, the node that lost the batch
  held the next one (causal gate) and caught up from the writer; its snapshot reloads after a
  restart with the same value, and a fresh node catches up from it alone.
- The nats-server killed and restarted on the same port under write load, with no healer:
  every node ends holding every acknowledged write of every writer (catch-up retried until a
  peer answers, wants coalesced, never dropped).
- A crash right after a local write applied over received state (simulation finding F9):
  the node reloads that state with the write, not the write alone.
"""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from broker.codec import TrustRoster
from broker.replica import Replica
from broker.transport import EmbeddedNatsServer, Msg, NatsTransport, delta_subject
from services.worknode import WorknodeService
from tests.integration._nodes import SUBJECT, node_settings, roster_of

WAIT = 30.0  # seconds a convergence may take on a loaded 2-core machine before failing


class DropBatches:
    """A transport losing chosen batches of one writer on their way to this node (the
    ``n``-th batch seen from ``writer``, counting from 1); everything else passes."""

    def __init__(self, inner: NatsTransport, writer: str, drop: set[int]) -> None:
        self.inner = inner
        self.writer = writer
        self.drop = drop
        self.seen = 0
        self.dropped = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def subscribe(self, subject: str, handler: Any, **kw: Any) -> Any:
        if subject != delta_subject("default", SUBJECT):
            return await self.inner.subscribe(subject, handler, **kw)

        async def lossy(msg: Msg) -> None:
            if (msg.headers or {}).get("Worknode-Writer") == self.writer:
                self.seen += 1
                if self.seen in self.drop:
                    self.dropped += 1
                    return
            await handler(msg)

        return await self.inner.subscribe(subject, lossy, **kw)




def _roster(tmp: Path, url: str, names: Sequence[str]) -> TrustRoster:
    return roster_of([node_settings(tmp, url, n) for n in names])


async def _until(check: Any, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {WAIT} s: {what}")
        await asyncio.sleep(0.05)


async def _more_writes(acked: dict[str, list[int]], more: int) -> None:
    """Wait until every writer got ``more`` further writes acknowledged."""
    floor = min(len(v) for v in acked.values())
    await _until(lambda: all(len(v) >= floor + more for v in acked.values()), "writes flow")


def _counter(r: Replica, node: str = "c", field: str = "n") -> Any:
    return r.state.value().get(node, {}).get("fields", {}).get(field)


async def test_one_lost_batch_counts_right_reloads_and_seeds_a_fresh_node(
    tmp_path: Path, nats_server: EmbeddedNatsServer
) -> None:
    url = nats_server.url
    roster = _roster(tmp_path, url, ["a", "b", "c", "d"])
    lossy = DropBatches(NatsTransport([url], name="b"), writer="a", drop={3})
    svcs = {
        "a": WorknodeService(node_settings(tmp_path, url, "a"), roster=roster),
        "b": WorknodeService(node_settings(tmp_path, url, "b"), roster=roster, transport=lossy),  # type: ignore[arg-type]
        "c": WorknodeService(node_settings(tmp_path, url, "c"), roster=roster),
    }
    started: list[WorknodeService] = []
    try:
        for svc in svcs.values():
            await svc.start()
            started.append(svc)
        a = svcs["a"].replica(SUBJECT)
        await a.create("c")
        await a.flush()  # batch 1
        acked = 0
        for _ in range(8):  # batches 2..9, one increment each; batch 3 never reaches b
            await a.increment("c", ("n",), 1)
            acked += 1
            await a.flush()
        assert lossy.dropped == 1
        reps = {n: s.replica(SUBJECT) for n, s in svcs.items()}
        await _until(lambda: all(_counter(r) == acked for r in reps.values()),
                     f"every node counts {acked}")
        b = reps["b"]
        assert b.held_deltas == 0
        gated = svcs["b"].metrics.gated_deltas.labels(SUBJECT, "held")._value.get()
        assert gated >= 1  # the batch after the lost one waited for the writer's state

        # b's own snapshot reloads with the same value.
        await svcs["b"].stop()
        started.remove(svcs["b"])
        await lossy.inner.stop()
        svcs["b"] = WorknodeService(node_settings(tmp_path, url, "b"), roster=roster)
        await svcs["b"].start()
        started.append(svcs["b"])
        assert _counter(svcs["b"].replica(SUBJECT)) == acked

        # A fresh node catches up from b alone.
        for n in ("a", "c"):
            await svcs[n].stop()
            started.remove(svcs[n])
        d = WorknodeService(node_settings(tmp_path, url, "d"), roster=roster)
        await d.start()
        started.append(d)
        await _until(lambda: _counter(d.replica(SUBJECT)) == acked, "d caught up from b")
    finally:
        for svc in started:
            await svc.stop()
        await lossy.inner.stop()


async def test_server_restart_under_load_loses_no_acknowledged_write_without_healer(
    tmp_path: Path,
) -> None:
    names = ["a", "b", "c"]
    async with EmbeddedNatsServer(tmp_path / "nats") as server:
        url = server.url
        roster = _roster(tmp_path, url, names)
        svcs = [WorknodeService(node_settings(tmp_path, url, n), roster=roster) for n in names]
        started: list[WorknodeService] = []
        try:
            for svc in svcs:
                await svc.start()
                started.append(svc)
            reps = [s.replica(SUBJECT) for s in svcs]
            for r in reps:
                await r.create(f"w-{r.node_id}")
            acked: dict[str, list[int]] = {n: [] for n in names}
            stop = asyncio.Event()

            async def writer(r: Replica) -> None:
                i = 0
                while not stop.is_set():
                    i += 1
                    await r.add(f"w-{r.node_id}", ("acked",), i)  # returns once durable
                    acked[r.node_id].append(i)
                    if i % 5 == 0:
                        await asyncio.sleep(0.005)

            tasks = [asyncio.create_task(writer(r)) for r in reps]
            for _ in range(2):  # each outage under load loses batches in flight
                await _more_writes(acked, 100)
                await server.kill()
                await asyncio.sleep(1.0)  # writes go on, acknowledged by the local stores
                await server.start()
            await _more_writes(acked, 100)
            stop.set()
            await asyncio.gather(*tasks)

            def holds_all() -> bool:
                for r in reps:
                    shown = r.state.value()
                    for n in names:
                        have = shown.get(f"w-{n}", {}).get("fields", {}).get("acked", frozenset())
                        if not set(acked[n]) <= have:
                            return False
                return True

            await _until(holds_all, "every node holds every acknowledged write")
        finally:
            for svc in started:
                await svc.stop()


def _snapshots_with_a_bad_key() -> tuple[bytes, bytes]:
    """``(bad, good)``: a state the codec refuses under key ``c`` (a counter counting its
    writer twice, as a lost delta left it before the fix) beside a good key ``ok``; and the
    writer's own state, which holds ``c`` right (its counter at 3)."""
    from broker.codec import WireCodec
    from broker.crdt import Create, Increment, Tree, _stores

    a, b = Tree(), Tree()
    _stores.ONE_ENTRY_PER_WRITER = False
    try:
        b.merge(Create("c").apply(a, "r1", 1))
        b.merge(Increment("c", ("n",), 1).apply(a, "r1", 2))
        Increment("c", ("n",), 1).apply(a, "r1", 3)  # lost
        b.merge(Increment("c", ("n",), 1).apply(a, "r1", 4))
    finally:
        _stores.ONE_ENTRY_PER_WRITER = True
    Create("ok").apply(b, "r2", 5)
    return WireCodec().encode_document(b.state), WireCodec().encode_document(a.state)


async def test_a_stored_state_with_a_bad_key_loads_without_it_and_gets_it_back(
    tmp_path: Path, nats_server: EmbeddedNatsServer
) -> None:
    """The node starts without the bad key and names it; its start-up catch-up (a full
    state from a peer holding the key right) brings the key back, although the node's own
    context already claims that key's dots."""
    from broker.store import DurableStore

    bad, good = _snapshots_with_a_bad_key()
    roster = _roster(tmp_path, nats_server.url, ["a", "b"])
    services = []
    for name, snapshot in (("b", good), ("a", bad)):
        settings = node_settings(tmp_path, nats_server.url, name)
        settings.state_dir.mkdir(parents=True, exist_ok=True)
        store = DurableStore(settings.state_dir / "worknode.db", synchronous="normal")
        store.open()
        store.write_snapshot(SUBJECT, snapshot, 0)
        store.close()
        services.append(WorknodeService(settings, roster=roster))
    try:
        for svc in services:
            await svc.start()
        b, a = (svc.replica(SUBJECT) for svc in services)
        assert [k for k, _ in a.load_errors] == ["c"]
        assert "two entries of one replica" in a.load_errors[0][1]
        assert b.load_errors == []
        await _until(lambda: _counter(a) == 3, "node a holds key c again, counting 3")
        assert set(a.state.value()) >= {"c", "ok"}
        await a.set("ok", ("x",), 1)  # the node works
    finally:
        for svc in services:
            await svc.stop()


def _crash_image(db: Path, image: Path) -> None:
    """What a crash of the node would leave on disk now: its committed transactions
    (SQLite's online backup reads exactly those)."""
    src, dst = sqlite3.connect(db), sqlite3.connect(image)
    try:
        src.backup(dst)
    finally:
        src.close()
        dst.close()


def _restore(image: Path, db: Path) -> None:
    """Put the crash image in place of the node's file (and drop its write-ahead log)."""
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    shutil.copy(image, db)


async def test_a_crash_keeps_the_received_state_a_logged_write_was_applied_over(
    tmp_path: Path, nats_server: EmbeddedNatsServer
) -> None:
    """Simulation finding F9 over real NATS and SQLite. Node a counts 3, b removes the
    field, a applies the removal (in memory) and then logs a write of its own. A crash now
    must not bring back a's counter entry without the removal: a's next increment would
    build on it (3 - 1 = 2, on every node for good) where the acknowledged writes say -1.
    Received state is logged with the local write that follows it, so a reloads without it."""
    url = nats_server.url
    roster = _roster(tmp_path, url, ["a", "b"])
    sa, sb = node_settings(tmp_path, url, "a"), node_settings(tmp_path, url, "b")
    svcs = {"a": WorknodeService(sa, roster=roster), "b": WorknodeService(sb, roster=roster)}
    running: list[WorknodeService] = []
    try:
        for svc in svcs.values():
            await svc.start()
            running.append(svc)
        a, b = svcs["a"].replica(SUBJECT), svcs["b"].replica(SUBJECT)
        await a.create("c")
        for _ in range(3):
            await a.increment("c", ("n",), 1)
        await a.flush()
        await _until(lambda: _counter(b) == 3, "b counts 3")
        await b.write(lambda t, rid, ts: t.remove_field("c", ("n",)))
        await b.flush()
        await _until(lambda: _counter(a) is None and "c" in a.state.value(),
                     "a applied b's removal")
        await a.set("c", ("x",), 1)  # logged on a, applied over the removal
        db = sa.state_dir / "worknode.db"
        _crash_image(db, tmp_path / "crash.db")
        for svc in list(running):
            await svc.stop()
            running.remove(svc)
        _restore(tmp_path / "crash.db", db)

        svcs["a"] = WorknodeService(sa, roster=roster)  # b is down: a reloads alone
        await svcs["a"].start()
        running.append(svcs["a"])
        a = svcs["a"].replica(SUBJECT)
        assert _counter(a) is None, "the crash brought back a counter entry b had removed"
        assert _counter(a, field="x") == 1
        await a.increment("c", ("n",), -1)
        await a.flush()
        svcs["b"] = WorknodeService(sb, roster=roster)
        await svcs["b"].start()
        running.append(svcs["b"])
        b = svcs["b"].replica(SUBJECT)
        await _until(lambda: _counter(a) == _counter(b) == -1 and a.digest() == b.digest(),
                     "both nodes count -1 (the acknowledged writes), equal digests")
    finally:
        for svc in running:
            await svc.stop()
