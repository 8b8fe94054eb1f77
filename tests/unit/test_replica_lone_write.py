"""A lone write's path: its batch is sealed while the store commits it (and published only
once the commit is durable, with the very envelope sealed for it, never another batch's);
publish progress saves are joined, and the last one is saved when the replica stops."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from broker.codec import WireCodec
from broker.crdt import Assign, Create, ORMap
from broker.replica import Consistency, Replica
from tests.unit._replica_pair import ROSTER, GatedStore, replica_pair, until


class SealSpy:
    """The codec, counting seals of delta batches."""

    def __init__(self, real: WireCodec, subject: str) -> None:
        self.real = real
        self.subject = subject
        self.seals = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def seal(self, *args: Any, **kwargs: Any) -> bytes:
        self.seals += kwargs.get("subject") == self.subject
        return self.real.seal(*args, **kwargs)


@contextlib.asynccontextmanager
async def _pair(tmp: Path) -> AsyncIterator[tuple[Replica, Replica, GatedStore, list[bytes]]]:
    """``a`` on a store whose appends a test can hold, ``b``, and the batches ``a``
    publishes; on leaving, the store lets appends through and both replicas stop."""
    store = GatedStore(tmp / "a.db")
    a, b = await replica_pair(tmp, store)
    published: list[bytes] = []
    real = a.transport.publish

    async def publish(subject: str, data: bytes, **kw: Any) -> None:
        if subject == a.delta_subject:
            published.append(data)
        await real(subject, data, **kw)

    a.transport.publish = publish  # type: ignore[method-assign]
    try:
        yield a, b, store, published
    finally:
        store.gate.set()
        await a.stop()
        await b.stop()


async def _hold_lone_write(
    a: Replica, b: Replica, store: GatedStore, published: list[bytes], value: int,
    local: bool = False,
) -> tuple[asyncio.Future[Any], int]:
    """After ``a`` created n (and, with ``local``, a LOCAL write to n.loc), a lone write of
    n.x = ``value`` whose commit the store holds: the write and how many batches went out
    before it."""
    await a.write(Create("n"))
    await a.flush()
    await until(lambda: "n" in b.tree, "b got n")
    if local:
        await a.write(Assign("n", ("loc",), 1), Consistency.LOCAL)
    await asyncio.sleep(0.02)  # past the flush window of the last batch: a lone write
    store.gate.clear()
    store.entered.clear()
    before = len(published)
    write = asyncio.ensure_future(a.write(Assign("n", ("x",), value)))
    await until(store.entered.is_set, "the commit reached the store")
    return write, before


async def test_a_lone_write_is_sealed_during_its_commit_and_published_once_durable(
    tmp_path: Path,
) -> None:
    async with _pair(tmp_path) as (a, b, sa, published):
        spy = SealSpy(a.codec, a.delta_subject)
        a.codec = spy  # type: ignore[assignment]
        write, before = await _hold_lone_write(a, b, sa, published, 1)
        await until(lambda: spy.seals == 2, "sealed while the commit is held")
        await asyncio.sleep(0.02)
        assert len(published) == before  # but not published: not durable yet
        assert not write.done()
        sa.gate.set()
        await write
        await a.flush()
        await until(lambda: b.tree.fields("n").get("x") == 1, "b got x")
        assert spy.seals == 2  # n's, then x's (during its commit): the one published
        assert len(published) == before + 1
        assert a.codec.open(published[-1], ROSTER).sequence == a.machine.sequence


async def test_an_envelope_sealed_for_one_batch_is_never_published_for_another(
    tmp_path: Path,
) -> None:
    """While a lone write's commit is held (its batch sealed as the next sequence), a sync
    publishes a LOCAL write under that sequence: it gets its own envelope, and the held
    write goes out after it under the next sequence; a peer gets both."""
    async with _pair(tmp_path) as (a, b, sa, published):
        write, before = await _hold_lone_write(a, b, sa, published, 2, local=True)
        await until(lambda: a._presealed is not None, "presealed")
        sync = asyncio.ensure_future(a.sync())
        await until(lambda: len(published) == before + 1, "the LOCAL batch, at once")
        sa.gate.set()
        await write
        await sync
        await a.flush()
        await until(lambda: b.tree.fields("n").get("x") == 2, "b got x")
        assert b.tree.fields("n").get("loc") == 1
        envs = [a.codec.open(p, ROSTER) for p in published[before:]]
        assert [e.sequence for e in envs] == [envs[0].sequence, envs[0].sequence + 1]
        docs = [e.document for e in envs]
        assert all(isinstance(d, ORMap) for d in docs)
        assert [(d.get(("n", "fields", "loc")), d.get(("n", "fields", "x")))  # type: ignore[attr-defined]
                for d in docs] == [(1, None), (None, 2)]


async def test_the_last_publish_progress_is_saved_when_the_replica_stops(
    tmp_path: Path,
) -> None:
    async with _pair(tmp_path) as (a, _, sa, _):
        await a.write(Create("n"))
        for i in range(3):
            await a.write(Assign("n", ("x",), i))
            await a.flush()
    # (left at once, stopping both: the progress save of the last publish was still waiting)
    saved = json.loads(sa.get_meta("s", "published") or b"{}")
    assert saved.get("sequence") == a.machine.sequence
