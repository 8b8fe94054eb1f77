"""Writes that queue behind a commit are committed together, and their EVENTUAL deltas as
one record (joined, encoded once): published alone, that record is the envelope's document
too, so a batch is not encoded twice. A LOCAL write keeps its own record; each writer's
delta is left as it was; a peer and a restart read what was acknowledged."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from broker.crdt import Assign, Create
from broker.replica import Consistency, Replica
from broker.store import DurableStore
from broker.testing import memory_transport_pair
from tests.unit._replica_pair import SA, GatedStore, replica, replica_pair


async def _pair(tmp: Path) -> tuple[Replica, Replica, GatedStore]:
    store = GatedStore(tmp / "a.db")
    a, b = await replica_pair(tmp, store, publish_alone_bytes=1)
    return a, b, store


async def test_queued_writes_share_one_record_published_as_it_is(tmp_path: Path) -> None:
    a, b, store = await _pair(tmp_path)
    try:
        await a.write(Create("n"))
        await a.flush()
        sealed: list[Any] = []
        real = a.codec

        class Spy:
            def __getattr__(self, name: str) -> Any:
                return getattr(real, name)

            def seal(self, *args: Any, **kwargs: Any) -> bytes:
                sealed.append(kwargs.get("packed"))
                return real.seal(*args, **kwargs)

        a.codec = Spy()  # type: ignore[assignment]
        store.gate.clear()  # the first write's commit waits: the others queue behind it
        first = asyncio.ensure_future(a.write(Assign("n", ("f0",), 0)))
        await asyncio.sleep(0.05)
        writes = [asyncio.ensure_future(a.write_many([Assign("n", (f"k{i}",), i)]))
                  for i in range(3)]
        local = asyncio.ensure_future(a.write(Assign("n", ("loc",), 1), Consistency.LOCAL))
        more = asyncio.ensure_future(a.write(Assign("n", ("k9",), 9)))
        await asyncio.sleep(0.05)
        appended = len(store.appends)
        store.gate.set()
        deltas = await asyncio.gather(first, *writes, local, more)
        await a.flush()
        assert len(store.appends[appended][0]) == 1  # the first write, held at the gate
        group = store.appends[appended + 1][0]
        assert len(group) == 3  # k0-k2 joined; the LOCAL write; k9 after it
        assert [sorted(d.value()["n"]["fields"]) for d in deltas[1:4]] == [
            ["k0"], ["k1"], ["k2"]]  # each writer's delta as it was
        assert a.codec.decode_record(group[0]).value()["n"]["fields"] == {
            "k0": 0, "k1": 1, "k2": 2}
        assert any(p == group[0] for p in sealed)  # published with its record as it is
        await a.sync()
        for _ in range(100):
            if b.state.digest() == a.state.digest():
                break
            await asyncio.sleep(0.02)
        assert b.state.digest() == a.state.digest()
    finally:
        await a.stop()
        await b.stop()
    store2 = DurableStore(tmp_path / "a.db")
    store2.open()
    ta, _ = memory_transport_pair(names=("a", "b"))
    again = replica(SA, ta, store2)
    await again.start()
    try:
        assert again.tree.fields("n") == {
            "f0": 0, "k0": 0, "k1": 1, "k2": 2, "loc": 1, "k9": 9}
    finally:
        await again.stop()


async def test_a_record_joins_at_most_a_batch_of_ops(tmp_path: Path) -> None:
    """Queued writes are joined up to ``max_batch_ops`` per record (a record stays within what
    one batch may carry)."""
    ta, _ = memory_transport_pair(names=("a", "b"))
    store = GatedStore(tmp_path / "a.db")
    store.open()
    a = replica(SA, ta, store, max_batch_ops=3)
    await a.start()
    try:
        await a.write(Create("n"))
        store.gate.clear()
        first = asyncio.ensure_future(a.write(Assign("n", ("f",), 0)))
        await asyncio.sleep(0.05)
        appended = len(store.appends)
        writes = [asyncio.ensure_future(a.write_many([Assign("n", (f"k{i}",), i)] * 2))
                  for i in range(3)]
        await asyncio.sleep(0.05)
        store.gate.set()
        await asyncio.gather(first, *writes)
        group = store.appends[appended + 1][0]
        assert len(group) == 3  # 2 + 2 > 3 ops: each write its own record
        assert a.tree.fields("n") == {"f": 0, "k0": 0, "k1": 1, "k2": 2}
    finally:
        await a.stop()
