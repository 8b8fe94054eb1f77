"""The store's own thread (``broker._store_thread``): a replica's store calls run there, in
order, never on the event loop; outcomes reach the caller, cancelled callers are skipped,
and the thread ends with its store."""

from __future__ import annotations

import asyncio
import gc
import threading
from pathlib import Path

import pytest

from broker._store_thread import StoreThread, store_thread
from broker.codec import Signer, TrustRoster, WireCodec
from broker.replica import Replica, ReplicaConfig
from broker.store import DurableStore
from broker.testing import memory_transport_pair


async def test_calls_run_in_order_on_one_thread_off_the_loop() -> None:
    t = StoreThread()
    try:
        seen: list[tuple[int, int]] = []

        def call(i: int) -> int:
            seen.append((i, threading.get_ident()))
            return i * 2

        results = await asyncio.gather(*(t.run(call, i) for i in range(50)))
        assert results == [i * 2 for i in range(50)]
        assert [i for i, _ in seen] == list(range(50))
        assert len({ident for _, ident in seen}) == 1
        assert seen[0][1] != threading.get_ident()
    finally:
        t.close()


async def test_an_exception_reaches_the_caller_and_the_thread_goes_on() -> None:
    t = StoreThread()
    try:
        def boom() -> None:
            raise OSError("disk full")

        with pytest.raises(OSError, match="disk full"):
            await t.run(boom)
        assert await t.run(lambda: 7) == 7
    finally:
        t.close()


async def test_a_cancelled_caller_does_not_stop_the_call_nor_the_thread() -> None:
    t = StoreThread()
    try:
        started, release = threading.Event(), threading.Event()
        done: list[int] = []

        def slow() -> int:
            started.set()
            release.wait(5)
            done.append(1)
            return 1

        fut = t.run(slow)
        await asyncio.to_thread(started.wait, 5)
        fut.cancel()
        release.set()
        assert await t.run(lambda: 2) == 2  # behind the slow call: it finished first
        assert done == [1]
        assert fut.cancelled()
    finally:
        t.close()


def test_a_call_outliving_its_loop_is_dropped_quietly() -> None:
    t = StoreThread()
    release = threading.Event()

    async def main() -> None:
        t.run(release.wait, 5)  # never awaited: the loop closes first

    asyncio.run(main())
    release.set()

    async def again() -> int:
        return await t.run(lambda: 3)

    assert asyncio.run(again()) == 3
    t.close()


def test_one_thread_per_store_ended_with_it() -> None:
    class Store:
        pass

    a, b = Store(), Store()
    ta = store_thread(a)
    assert store_thread(a) is ta
    assert store_thread(b) is not ta
    del a
    gc.collect()
    ta._thread.join(5)
    assert not ta.alive


async def test_a_replica_commits_on_its_store_thread(tmp_path: Path) -> None:
    signer = Signer("a", b"a" * 32)
    threads: list[str] = []

    class Watched(DurableStore):
        def append(self, subject: str, records: object, *, received: object = ()) -> int:  # type: ignore[override]
            threads.append(threading.current_thread().name)
            return super().append(subject, records, received=received)  # type: ignore[arg-type]

    store = Watched(tmp_path / "a.db")
    store.open()
    ta, _ = memory_transport_pair(names=("a", "b"))
    replica = Replica(
        signer=signer, roster=TrustRoster({"a": signer.public_key}), codec=WireCodec(),
        transport=ta, store=store, config=ReplicaConfig(namespace="ns", subject="s"),
    )
    async with replica:
        for i in range(3):
            await replica.create(f"n{i}")
    assert threads == ["store-Watched"] * 3
    store.close()
