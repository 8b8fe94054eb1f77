"""STRONG consistency over a real nats-server with JetStream (R1, one server): compare-and-set
writes, create-if-absent, linearizable reads, retries after lost races, refusals of
EVENTUAL writes to STRONG worknodes, restart and fast-forward, bounded failure when the
server is gone. Worknode services with SQLite stores, as ``worknode run`` starts them."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from broker.codec import WireCodec
from broker.crdt import Assign, Create, Increment, Tree
from broker.errors import BoundsError, ConflictError, InvalidArgumentError, UnavailableError
from broker.replica import Consistency, Replica
from broker.replication import STRONG_AUTHOR
from broker.strong import StrongMode
from broker.transport import EmbeddedNatsServer, NatsTransport, delta_subject
from tests.integration._nodes import SUBJECT, eventually, running_nodes

STRONG = {SUBJECT: ["acct-"]}


def _nodes(tmp: Path, url: str, names: Sequence[str], **kw: Any) -> Any:
    """Worknode services with ``acct-`` worknodes STRONG (see ``running_nodes``)."""
    return running_nodes(tmp, url, names, strong=STRONG, strong_timeout_s=2.0, **kw)


def _strong(r: Replica) -> StrongMode:
    assert r.strong is not None
    return r.strong


async def test_create_if_absent_wins_once_and_the_loser_gets_the_version(
    tmp_path: Path, nats_server: EmbeddedNatsServer
) -> None:
    async with _nodes(tmp_path, nats_server.url, ["a", "b"]) as svcs:
        a, b = (_strong(s.replica(SUBJECT)) for s in svcs)
        results = await asyncio.gather(
            a.create_if_absent("acct-1", "root"), b.create_if_absent("acct-1", "root"),
            return_exceptions=True)
        won = [r for r in results if isinstance(r, int)]
        lost = [r for r in results if isinstance(r, ConflictError)]
        assert len(won) == 1, results
        assert len(lost) == 1, results
        assert lost[0].expected == 0
        assert lost[0].current == won[0]
        # Both read it linearizably, at the same version, as one write.
        ra, rb = await a.read(["acct-1"]), await b.read(["acct-1"])
        assert ra.versions == rb.versions == {"acct-1": won[0]}
        assert ra.state.value() == rb.state.value() == {"acct-1": {"parent": "root"}}


async def test_concurrent_unconditional_increments_all_count(
    tmp_path: Path, nats_server: EmbeddedNatsServer
) -> None:
    """Two nodes increment one STRONG counter concurrently: every acknowledged increment is
    in the total (lost races are recomputed on the newer state, never merged blindly)."""
    async with _nodes(tmp_path, nats_server.url, ["a", "b"]) as svcs:
        ra, rb = (s.replica(SUBJECT) for s in svcs)
        await _strong(ra).create_if_absent("acct-1", "root")

        async def incr(r: Replica, n: int) -> int:
            done = 0
            for _ in range(n):
                await r.write(Increment("acct-1", ("bal",), 1), Consistency.STRONG)
                done += 1
            return done

        counts = await asyncio.gather(incr(ra, 25), incr(rb, 25))
        reads = [await _strong(r).read(["acct-1"]) for r in (ra, rb)]
        for read in reads:
            assert read.state.value()["acct-1"]["fields"]["bal"] == sum(counts) == 50
        assert reads[0].versions == reads[1].versions
        assert reads[0].state.store == reads[1].state.store  # the same entries, same dots


async def test_a_conditional_write_on_a_stale_version_changes_nothing(
    tmp_path: Path, nats_server: EmbeddedNatsServer
) -> None:
    async with _nodes(tmp_path, nats_server.url, ["a", "b"]) as svcs:
        a, b = (_strong(s.replica(SUBJECT)) for s in svcs)
        v1 = await a.create_if_absent("acct-1", "root")
        v2 = await b.write([Assign("acct-1", ("owner",), "bob")], if_version=v1)
        assert v2 > v1
        with pytest.raises(ConflictError) as info:
            await a.write([Assign("acct-1", ("owner",), "alice")], if_version=v1)
        assert info.value.expected == v1
        assert info.value.current == v2
        for m in (a, b):
            read = await m.read(["acct-1"])
            assert read.state.value()["acct-1"]["fields"] == {"owner": "bob"}
            assert read.versions["acct-1"] == v2


async def test_a_read_includes_every_write_acknowledged_before_it(
    tmp_path: Path, nats_server: EmbeddedNatsServer
) -> None:
    """No sleep between a write acknowledged on one node and a read on the other: the read's
    fence orders it after the write."""
    async with _nodes(tmp_path, nats_server.url, ["a", "b"]) as svcs:
        a, b = (_strong(s.replica(SUBJECT)) for s in svcs)
        await a.create_if_absent("acct-1", "root")
        for i in range(20):
            await a.write([Assign("acct-1", ("n",), i)])
            read = await b.read(["acct-1"])
            assert read.state.value()["acct-1"]["fields"]["n"] == i


async def test_eventual_writes_to_strong_worknodes_are_refused_and_others_go_on(
    tmp_path: Path, nats_server: EmbeddedNatsServer
) -> None:
    async with _nodes(tmp_path, nats_server.url, ["a"]) as svcs:
        r = svcs[0].replica(SUBJECT)
        await _strong(r).create_if_absent("acct-1", "root")
        for consistency in (Consistency.EVENTUAL, Consistency.LOCAL):
            with pytest.raises(InvalidArgumentError):
                await r.write(Assign("acct-1", ("x",), 1), consistency)
        with pytest.raises(InvalidArgumentError):  # and the other way round
            await r.write(Create("plain", "root"), Consistency.STRONG)
        await r.write(Create("plain", "root"))  # EVENTUAL worknodes as before
        assert "x" not in r.state.value()["acct-1"].get("fields", {})
        assert "plain" in r.state.value()


async def test_a_restarted_node_fast_forwards_from_the_log(
    tmp_path: Path, nats_server: EmbeddedNatsServer
) -> None:
    async with _nodes(tmp_path, nats_server.url, ["a", "b"]) as svcs:
        a = _strong(svcs[0].replica(SUBJECT))
        await a.create_if_absent("acct-1", "root")
        await a.write([Increment("acct-1", ("bal",), 5)])
        await svcs[1].stop()
        for _ in range(10):
            await a.write([Increment("acct-1", ("bal",), 1)])
        await svcs[1].start()
        b = _strong(svcs[1].replica(SUBJECT))
        read = await b.read(["acct-1"])
        assert read.state.value()["acct-1"]["fields"]["bal"] == 15
        # The log's dots are 1..applied on every replica: nothing else names them.
        ctx = svcs[1].replica(SUBJECT).state.context
        assert ctx.version_vector[STRONG_AUTHOR] == b.applied
        assert not [d for d in ctx.cloud if d[0] == STRONG_AUTHOR]


async def test_without_a_server_strong_fails_in_bounded_time_and_eventual_goes_on(
    tmp_path: Path, nats_server: EmbeddedNatsServer
) -> None:
    async with _nodes(tmp_path, nats_server.url, ["a"]) as svcs:
        r = svcs[0].replica(SUBJECT)
        await _strong(r).create_if_absent("acct-1", "root")
        await nats_server.stop()
        # Each fails within its 2 s timeout; wait_for only turns a hang into a failure.
        with pytest.raises(UnavailableError):
            await asyncio.wait_for(
                r.write(Increment("acct-1", ("bal",), 1), Consistency.STRONG), 30)
        with pytest.raises(UnavailableError):
            await asyncio.wait_for(_strong(r).read(["acct-1"]), 30)
        await r.write(Create("plain", "root"), Consistency.LOCAL)  # LOCAL goes on
        assert "plain" in r.state.value()
        assert _strong(r).available is False


async def test_a_write_to_several_worknodes_is_all_or_nothing(
    tmp_path: Path, nats_server: EmbeddedNatsServer
) -> None:
    """A transfer between two STRONG accounts is one atomic batch: with a stale version on
    either key nothing is written; with current ones both change at one log position."""
    async with _nodes(tmp_path, nats_server.url, ["a", "b"]) as svcs:
        a, b = (_strong(s.replica(SUBJECT)) for s in svcs)
        v1 = await a.create_if_absent("acct-1", "root")
        v2 = await a.create_if_absent("acct-2", "root")
        await b.write([Increment("acct-2", ("bal",), 1)])  # acct-2 moves past v2
        with pytest.raises(ConflictError):
            await a.write([Increment("acct-1", ("bal",), -10), Increment("acct-2", ("bal",), 10)],
                          if_versions={"acct-1": v1, "acct-2": v2})
        read = await b.read(["acct-1", "acct-2"])
        assert read.state.value()["acct-1"].get("fields") is None  # nothing of it written
        assert read.state.value()["acct-2"]["fields"]["bal"] == 1
        seq = await a.write([Increment("acct-1", ("bal",), -10),
                             Increment("acct-2", ("bal",), 10)], if_versions=read.versions)
        read = await b.read(["acct-1", "acct-2"])
        assert read.state.value()["acct-1"]["fields"]["bal"] == -10
        assert read.state.value()["acct-2"]["fields"]["bal"] == 11
        assert read.versions["acct-2"] == seq
        assert read.versions["acct-1"] == seq - 1  # one batch: consecutive positions


async def test_a_peers_delta_touching_a_strong_worknode_changes_it_nowhere_even_after_reload(
    tmp_path: Path, nats_server: EmbeddedNatsServer
) -> None:
    """node-b's key signs an EVENTUAL delta that sets a STRONG account (its own dot, so the
    Byzantine gate lets it through): node-a joins the delta without it, logs the delta with
    its next write as received, and after a restart (the records replayed) still holds only
    what the log says."""
    async with _nodes(tmp_path, nats_server.url, ["a", "b"]) as svcs:
        ra, rb = (s.replica(SUBJECT) for s in svcs)
        await _strong(ra).create_if_absent("acct-1", "root")
        await _strong(ra).write([Assign("acct-1", ("owner",), "alice")])
        await _strong(rb).read(["acct-1"])  # b applied the log too
        tree = Tree(rb.state.copy())
        forged = tree.state.assign("b", ("acct-1", "fields", "owner"), "mallory",
                                   rb.hlc())
        tree.merge(forged)
        forged.merge(tree.state.assign("b", ("plain-b", "parent"), "root", rb.hlc()))
        async with NatsTransport([nats_server.url], name="attacker") as attacker:
            await attacker.publish(delta_subject(svcs[1].settings.namespace, SUBJECT),
                                   WireCodec().seal(
                rb.signer, subject=delta_subject(svcs[1].settings.namespace, SUBJECT),
                hlc=rb.hlc(), sequence=rb.machine.sequence + 1, document=forged))
        await eventually(lambda: "plain-b" in ra.state.value(), 10, "a joined b's delta")
        await ra.write(Create("after", "root"))  # logs the received delta with it
        assert ra.state.value()["acct-1"]["fields"] == {"owner": "alice"}

        async def no_snapshot() -> None:  # stop as a crash would: the records stay the truth
            return None

        ra._snapshot = no_snapshot  # type: ignore[method-assign]
        await svcs[0].stop()
        await svcs[0].start()
        ra = svcs[0].replica(SUBJECT)
        assert "plain-b" in ra.state.value()  # the delta's other part was kept
        read = await _strong(ra).read(["acct-1"])
        assert read.state.value()["acct-1"]["fields"] == {"owner": "alice"}
        assert ra.state.value()["acct-1"]["fields"] == {"owner": "alice"}


async def test_the_stream_holds_at_most_strong_max_worknodes(
    tmp_path: Path, nats_server: EmbeddedNatsServer
) -> None:
    """One entry per worknode: with strong_max_worknodes=2 a third worknode is refused by the
    stream with a clear error (nothing written), while the two go on being written."""
    async with _nodes(tmp_path, nats_server.url, ["a"], strong_max_worknodes=2) as svcs:
        a = _strong(svcs[0].replica(SUBJECT))
        await a.create_if_absent("acct-1", "root")
        await a.create_if_absent("acct-2", "root")
        with pytest.raises(BoundsError):  # a limit, not a lost quorum: not UnavailableError
            await a.create_if_absent("acct-3", "root")
        for _ in range(3):
            await a.write([Increment("acct-1", ("n",), 1)])
        read = await a.read(["acct-1", "acct-2"])
        assert read.state.value()["acct-1"]["fields"]["n"] == 3
        assert "acct-3" not in svcs[0].replica(SUBJECT).state.value()


async def test_an_own_entry_is_applied_from_its_bytes_and_any_other_bytes_are_verified(
    tmp_path: Path, nats_server: EmbeddedNatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The log often delivers a replica's own entry before the publish ack: the follower
    then applies the entry it sealed, recognised by its exact bytes (no verify, no decode).
    Only those bytes: an entry on the same subject with other bytes (here a corrupted
    signature) is verified and refused as any entry is."""
    from broker.replication import strong_entry
    from broker.strong import strong_subject

    async with _nodes(tmp_path, nats_server.url, ["a"]) as svcs:
        r = svcs[0].replica(SUBJECT)
        m = _strong(r)
        await m.create_if_absent("acct-1", "root")
        base = m.applied
        _, delta = strong_entry(r.machine.tree, Increment("acct-1", ("bal",), 5), r.hlc())
        subject = strong_subject(r.config.namespace, SUBJECT, "acct-1")
        data = r.codec.seal(r.signer, subject=subject, hlc=r.hlc(),
                            sequence=m.version("acct-1"), document=delta)
        m._own[subject] = (data, delta)

        forged = data[:-1] + bytes([data[-1] ^ 1])
        m._apply(base + 1, subject, forged, False)
        assert m.entries_refused == 1
        assert "bal" not in r.tree.fields("acct-1")

        def no_open(*a: Any, **k: Any) -> Any:
            raise AssertionError("an own entry's bytes were verified and decoded again")

        monkeypatch.setattr(WireCodec, "open", no_open)
        m._apply(base + 2, subject, data, False)
        assert r.tree.fields("acct-1")["bal"] == 5
        assert m.version("acct-1") == base + 2
