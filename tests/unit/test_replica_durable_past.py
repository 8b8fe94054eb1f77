"""A local write is never durable without the received state it was applied over, even when
a commit fails (the review's case: the commit carrying that state fails, a write queued
behind it must not be acknowledged alone) or when received state piles up on a node that
does not write (logged on its own past the bound, so memory stays bounded)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from broker.errors import StoreError
from broker.replica import Replica
from broker.replication import ReplicationConfig
from broker.store import DurableStore
from tests.unit._replica_pair import replica_pair, until


class Flaky(DurableStore):
    """Fails the next append (slowly, so a second write queues behind it)."""

    fail_next = False

    def append(self, subject: str, records: object, *, received: object = ()) -> int:
        if self.fail_next:
            self.fail_next = False
            time.sleep(0.3)
            raise StoreError("disk full (injected)")
        return super().append(subject, records, received=received)  # type: ignore[arg-type]


async def _pair(tmp: Path, **cfg: Any) -> tuple[Replica, Replica, Flaky]:
    store = Flaky(tmp / "a.db")
    a, b = await replica_pair(tmp, store, **cfg)
    return a, b, store


async def test_a_write_queued_behind_a_failed_commit_is_not_acknowledged(
    tmp_path: Path,
) -> None:
    a, b, sa = await _pair(tmp_path)
    try:
        await b.create("n1")
        await b.flush()
        await until(lambda: "n1" in a.tree, "a joined b's n1")
        sa.fail_next = True
        w1 = asyncio.create_task(a.create("n2"))  # carries b's envelope; its commit fails
        await asyncio.sleep(0.1)  # the committer is inside the failing append
        with pytest.raises(StoreError):
            await a.create("n3", parent="n1")  # queued behind it: refused too
        with pytest.raises(StoreError):
            await w1
        loaded = sa.load("s")
        assert loaded.records == []  # nothing logged: no n3 without the n1 it hangs under
    finally:
        for r in (a, b):
            await r.stop()


async def test_received_state_past_the_bound_is_logged_on_its_own(tmp_path: Path) -> None:
    a, b, sa = await _pair(tmp_path)
    try:
        a.machine.config = ReplicationConfig(max_unlogged_bytes=1)  # every envelope
        await b.create("n1")
        await b.flush()
        await until(lambda: sa.load("s").received, "a logged b's envelope on its own")
        assert a.machine.unlogged_bytes == 0
        loaded = sa.load("s")
        assert loaded.received == frozenset(n for n, _ in loaded.records)
    finally:
        for r in (a, b):
            await r.stop()
