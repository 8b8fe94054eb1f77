"""A lone write's path: its batch is sealed while the store commits it (and published only
once the commit is durable, with the very envelope sealed for it, never another batch's);
publish progress saves are joined, and the last one is saved when the replica stops."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any

from broker.codec import Signer, TrustRoster, WireCodec
from broker.crdt import Assign, Create, ORMap
from broker.replica import Consistency, Replica, ReplicaConfig
from broker.store import DurableStore
from broker.testing import memory_transport_pair

SA, SB = Signer("a", b"a" * 32), Signer("b", b"b" * 32)
ROSTER = TrustRoster({"a": SA.public_key, "b": SB.public_key})


class Gated(DurableStore):
    """Holds each append until released; records what each append carried."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.appends: list[tuple[int, int]] = []  # (records, of them received)

    def append(self, subject: str, records: Any, *, received: Any = ()) -> int:
        self.entered.set()
        self.gate.wait(5)
        self.appends.append((len(records), len(received)))
        return super().append(subject, records, received=received)


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


async def _pair(tmp: Path) -> tuple[Replica, Replica, Gated, Gated, list[bytes]]:
    ta, tb = memory_transport_pair(names=("a", "b"))
    sa, sb = Gated(tmp / "a.db"), Gated(tmp / "b.db")
    sa.open()
    sb.open()

    def config() -> ReplicaConfig:
        return ReplicaConfig(namespace="ns", subject="s", catchup_timeout=0.05)
    a = Replica(signer=SA, roster=ROSTER, codec=WireCodec(), transport=ta, store=sa,
                config=config())
    b = Replica(signer=SB, roster=ROSTER, codec=WireCodec(), transport=tb, store=sb,
                config=config())
    await a.start()
    await b.start()
    published: list[bytes] = []
    real = ta.publish

    async def publish(subject: str, data: bytes, **kw: Any) -> None:
        if subject == a.delta_subject:
            published.append(data)
        await real(subject, data, **kw)

    ta.publish = publish  # type: ignore[method-assign]
    return a, b, sa, sb, published


async def _until(cond: Any, seconds: float = 5.0) -> None:
    for _ in range(int(seconds / 0.005)):
        if cond():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition not reached")


async def test_a_lone_write_is_sealed_during_its_commit_and_published_once_durable(
    tmp_path: Path,
) -> None:
    a, b, sa, _, published = await _pair(tmp_path)
    try:
        await a.write(Create("n"))
        await a.flush()
        await _until(lambda: "n" in b.tree)
        spy = SealSpy(a.codec, a.delta_subject)
        a.codec = spy  # type: ignore[assignment]
        await asyncio.sleep(0.02)  # past the flush window of the last batch: a lone write
        sa.gate.clear()
        sa.entered.clear()
        before = len(published)
        write = asyncio.ensure_future(a.write(Assign("n", ("x",), 1)))
        await _until(sa.entered.is_set)
        await _until(lambda: spy.seals == 1)  # sealed while the commit is held
        await asyncio.sleep(0.02)
        assert len(published) == before  # but not published: not durable yet
        assert not write.done()
        sa.gate.set()
        await write
        await a.flush()
        await _until(lambda: b.tree.fields("n").get("x") == 1)
        assert spy.seals == 1  # the envelope sealed during the commit is the one published
        assert len(published) == before + 1
        assert a.codec.open(published[-1], ROSTER).sequence == a.machine.sequence
    finally:
        sa.gate.set()
        await a.stop()
        await b.stop()


async def test_an_envelope_sealed_for_one_batch_is_never_published_for_another(
    tmp_path: Path,
) -> None:
    """While a lone write's commit is held (its batch sealed as the next sequence), a sync
    publishes a LOCAL write under that sequence: it gets its own envelope, and the held
    write goes out after it under the next sequence; a peer gets both."""
    a, b, sa, _, published = await _pair(tmp_path)
    try:
        await a.write(Create("n"))
        await a.flush()
        await _until(lambda: "n" in b.tree)
        await a.write(Assign("n", ("loc",), 1), Consistency.LOCAL)
        await asyncio.sleep(0.02)  # past the flush window of the last batch: a lone write
        sa.gate.clear()
        sa.entered.clear()
        before = len(published)
        write = asyncio.ensure_future(a.write(Assign("n", ("x",), 2)))
        await _until(sa.entered.is_set)
        await _until(lambda: a._presealed is not None)
        sync = asyncio.ensure_future(a.sync())
        await _until(lambda: len(published) == before + 1)  # the LOCAL write, at once
        sa.gate.set()
        await write
        await sync
        await a.flush()
        await _until(lambda: b.tree.fields("n").get("x") == 2)
        assert b.tree.fields("n").get("loc") == 1
        envs = [a.codec.open(p, ROSTER) for p in published[before:]]
        assert [e.sequence for e in envs] == [envs[0].sequence, envs[0].sequence + 1]
        docs = [e.document for e in envs]
        assert all(isinstance(d, ORMap) for d in docs)
        assert [(d.get(("n", "fields", "loc")), d.get(("n", "fields", "x")))  # type: ignore[attr-defined]
                for d in docs] == [(1, None), (None, 2)]
    finally:
        sa.gate.set()
        await a.stop()
        await b.stop()


async def test_the_last_publish_progress_is_saved_when_the_replica_stops(
    tmp_path: Path,
) -> None:
    a, b, sa, _, _ = await _pair(tmp_path)
    try:
        await a.write(Create("n"))
        for i in range(3):
            await a.write(Assign("n", ("x",), i))
            await a.flush()
    finally:
        await a.stop()  # at once: the progress save of the last publish is still waiting
        await b.stop()
    saved = json.loads(sa.get_meta("s", "published") or b"{}")
    assert saved.get("sequence") == a.machine.sequence
