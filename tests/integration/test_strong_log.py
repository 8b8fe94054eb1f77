"""``StrongLog`` against real nats-servers: a single embedded server (R1) for the log's
operations, and a 3-server cluster (R3, ``sync_interval: always``) cut by proxies for what
the log promises under partitions and crashes."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from broker.chaos import NatsCluster
from broker.errors import (
    BoundsError,
    ConflictError,
    InvalidArgumentError,
    LogTruncatedError,
    OutcomeUnknownError,
    UnavailableError,
    UnsupportedByServerError,
)
from broker.transport import (
    BatchEntry,
    EmbeddedNatsServer,
    LogEntry,
    LogReader,
    NatsTransport,
    StrongLog,
)

SUBJECTS = ["strong.t.>"]
FENCE = "strongfence.t"


def _log(transport: NatsTransport, **kw: object) -> StrongLog:
    options: dict[str, object] = {
        "stream": "STRONG_T",
        "subjects": SUBJECTS,
        "fence_subject": FENCE,
        "timeout": 2.0,
    }
    options.update(kw)
    return StrongLog(transport, **options)  # type: ignore[arg-type]


async def _read_until(reader: LogReader, last: int, *, timeout: float = 10.0) -> list[LogEntry]:
    """Every entry the reader delivers up to sequence ``last`` (fences included)."""
    got: list[LogEntry] = []
    while reader.last_seq < last:
        got.append(await reader.next(timeout=timeout))
    return got


@pytest.fixture
async def log(nats_transport: NatsTransport) -> StrongLog:
    strong = _log(nats_transport)
    await strong.ensure()
    return strong


# -- one server, R1 -----------------------------------------------------------------------------


async def test_ensure_sets_the_options_explicitly_and_reports_support(
    nats_transport: NatsTransport,
) -> None:
    strong = _log(nats_transport)
    support = await strong.ensure()
    assert support.created
    assert (support.replicas, support.atomic_batch, support.msg_ttl, support.direct_get,
            support.subject_filter_cas) == (1, True, True, True, True)
    # Again (a restart): the stream is updated in place, not refused.
    again = await _log(nats_transport).ensure()
    assert not again.created
    info = json.loads((await nats_transport.request(
        "$JS.API.STREAM.INFO.STRONG_T", b"", timeout=2.0)).data)["config"]
    assert info["subjects"] == [*SUBJECTS, FENCE]
    assert (info["storage"], info["discard"], info["deny_delete"], info["deny_purge"],
            info["allow_rollup_hdrs"]) == ("file", "old", True, True, False)


async def test_publish_and_compare_and_set_with_the_current_sequence(log: StrongLog) -> None:
    first = await log.publish("strong.t.a", b"1", expected_last_subject_seq=0)  # create
    assert await log.last_subject_seq("strong.t.a") == first
    with pytest.raises(ConflictError) as info:
        await log.publish("strong.t.a", b"2", expected_last_subject_seq=0)
    assert (info.value.expected, info.value.current) == (0, first)
    other = await log.publish("strong.t.b", b"x")  # another subject does not matter
    second = await log.publish("strong.t.a", b"2", expected_last_subject_seq=first)
    assert first < other < second
    with pytest.raises(ConflictError) as stale:
        await log.publish("strong.t.a", b"3", expected_last_subject_seq=first)
    assert stale.value.current == second
    assert log.stats.conflicts == 2
    assert log.stats.by_error_code == {10071: 2}  # JSStreamWrongLastSequenceErrF
    assert await log.last_subject_seq("strong.t.none") == 0


async def test_a_subtree_check_sees_every_subject_under_it(log: StrongLog) -> None:
    a = await log.publish("strong.t.n1.a", b"a")
    b = await log.publish(
        "strong.t.n1.b", b"b", expected_last_subject_seq=a, expected_subject_filter="strong.t.n1.>"
    )
    # n1.c was never written, but its subtree was (by b): the check is on the subtree.
    with pytest.raises(ConflictError) as info:
        await log.publish("strong.t.n1.c", b"c", expected_last_subject_seq=a,
                          expected_subject_filter="strong.t.n1.>")
    assert info.value.current == b
    await log.publish("strong.t.n2.x", b"x")  # outside the subtree
    c = await log.publish("strong.t.n1.c", b"c", expected_last_subject_seq=b,
                          expected_subject_filter="strong.t.n1.>")
    assert c > b
    with pytest.raises(InvalidArgumentError):
        await log.publish("strong.t.n1.d", b"d", expected_subject_filter="strong.t.n1.>")


async def test_an_atomic_batch_is_stored_whole_or_not_at_all(log: StrongLog) -> None:
    base = await log.publish("strong.t.k1", b"v0")
    last = await log.publish_batch([
        ("strong.t.k1", b"v1", base),
        BatchEntry("strong.t.k2", b"w1", 0),
        BatchEntry("strong.t.k3", b"u1"),
    ])
    assert last == base + 3
    assert [await log.last_subject_seq(f"strong.t.k{i}") for i in (1, 2, 3)] == [
        base + 1, base + 2, base + 3
    ]
    # One stale check (k2 expects 0: it exists now) refuses the whole batch.
    with pytest.raises(ConflictError) as info:
        await log.publish_batch([
            ("strong.t.k1", b"v2", base + 1),
            ("strong.t.k2", b"w2", 0),
            ("strong.t.k4", b"z", None),
        ])
    assert (info.value.expected, info.value.current) == (0, base + 2)
    assert await log.state() == (1, last)  # nothing of it was stored
    assert await log.last_subject_seq("strong.t.k4") == 0
    assert (log.stats.batches, log.stats.batch_entries) == (1, 3)


async def test_batch_bounds_and_misuse_are_refused_before_sending(
    nats_transport: NatsTransport,
) -> None:
    strong = _log(nats_transport, max_batch=2)
    await strong.ensure()
    with pytest.raises(BoundsError):
        await strong.publish_batch([("strong.t.a", b"", None)] * 3)
    with pytest.raises(InvalidArgumentError):  # a check after a write to the same subject
        await strong.publish_batch([("strong.t.a", b"", None), ("strong.t.a", b"", 1)])
    with pytest.raises(InvalidArgumentError):
        await strong.publish_batch([])
    with pytest.raises(InvalidArgumentError):
        await strong.publish("other.subject", b"")
    with pytest.raises(InvalidArgumentError):
        await strong.publish(FENCE, b"")
    assert await strong.state() == (0, 0)


async def test_a_stream_without_atomic_publish_refuses_batches_clearly(
    nats_transport: NatsTransport, log: StrongLog
) -> None:
    config = json.loads((await nats_transport.request(
        "$JS.API.STREAM.INFO.STRONG_T", b"", timeout=2.0)).data)["config"]
    config["allow_atomic"] = False
    reply = json.loads((await nats_transport.request(
        "$JS.API.STREAM.UPDATE.STRONG_T", json.dumps(config).encode(), timeout=2.0)).data)
    assert "error" not in reply
    with pytest.raises(UnsupportedByServerError):
        await log.publish_batch([("strong.t.a", b"1", None), ("strong.t.b", b"2", None)])
    assert await log.state() == (0, 0)
    assert log.stats.by_error_code == {10174: 1}  # JSAtomicPublishDisabledErr


async def test_a_fence_comes_after_every_acknowledged_write(log: StrongLog) -> None:
    w1 = await log.publish("strong.t.a", b"1")
    f1 = await log.fence()
    w2 = await log.publish("strong.t.a", b"2")
    f2 = await log.fence()
    assert w1 < f1 < w2 < f2
    async with log.read_from(1) as reader:
        entries = await _read_until(reader, f2)
    assert [(e.seq, e.fence) for e in entries] == [(w1, False), (f1, True), (w2, False), (f2, True)]
    assert entries[1].headers["Nats-TTL"] == "60s"  # fences expire
    assert log.stats.fences == 2


async def test_read_from_resumes_where_the_reader_stopped(log: StrongLog) -> None:
    seqs = [await log.publish(f"strong.t.k{i % 3}", str(i).encode()) for i in range(5)]
    async with log.read_from(1) as reader:
        first = await _read_until(reader, seqs[-1])
    assert [e.seq for e in first] == seqs
    assert [e.payload for e in first] == [str(i).encode() for i in range(5)]
    assert first[-1].pending == 0
    applied = first[-1].seq
    more = [await log.publish("strong.t.k9", str(i).encode()) for i in range(3)]
    async with log.read_from(applied + 1) as reader:
        rest = await _read_until(reader, more[-1])
        with pytest.raises(TimeoutError):  # caught up: nothing more
            await reader.next(timeout=0.2)
    assert [e.seq for e in rest] == more
    assert [e.subject for e in rest] == ["strong.t.k9"] * 3


async def test_a_waiting_reader_fails_when_its_connection_closes(
    tmp_path: Path, nats_server: EmbeddedNatsServer
) -> None:
    """A reader waiting for the next entry (no timeout: a follower's tail) learns that its
    connection was closed for good within about a second: ``UnavailableError``, never a hang
    (entries reach it through a subscription callback, which stops silently)."""
    transport = NatsTransport([nats_server.url], name="closing")
    await transport.start()
    try:
        log = _log(transport)
        await log.ensure()
        seq = await log.publish("strong.t.k0", b"x")
        reader = log.read_from(1)
        await reader.start()
        await _read_until(reader, seq)
        waiting = asyncio.ensure_future(reader.next())
        await asyncio.sleep(0.1)
        await transport.stop()
        async with asyncio.timeout(10.0):
            with pytest.raises(UnavailableError):
                await waiting
    finally:
        await transport.stop()


async def test_entries_removed_by_the_limits_are_reported_as_a_gap(
    nats_transport: NatsTransport,
) -> None:
    strong = _log(nats_transport, stream="STRONG_LIMITS", max_msgs=4)
    await strong.ensure()
    seqs = [await strong.publish("strong.t.a", b"x") for _ in range(7)]
    assert await strong.state() == (4, 7)
    with pytest.raises(LogTruncatedError) as info:
        async with strong.read_from(2):
            pass
    assert (info.value.requested, info.value.first_seq) == (2, 4)
    async with strong.read_from(4) as reader:
        assert [e.seq for e in await _read_until(reader, 7)] == seqs[3:]
    assert strong.stats.truncations == 1


async def test_entries_removed_inside_the_log_are_skipped_not_reported(
    nats_transport: NatsTransport,
) -> None:
    """A per-subject limit removes an older entry in the middle of the log: the reader skips
    it (the log's head did not move past the reader, so nothing is missing for it)."""
    strong = _log(nats_transport, stream="STRONG_PER_SUBJECT", max_msgs_per_subject=1)
    await strong.ensure()
    b1 = await strong.publish("strong.t.b", b"b1")
    await strong.publish("strong.t.a", b"a1")  # removed by a2
    a2 = await strong.publish("strong.t.a", b"a2")
    assert await strong.state() == (b1, a2)
    async with strong.read_from(b1) as reader:
        entries = await _read_until(reader, a2)
    assert [(e.seq, e.payload) for e in entries] == [(b1, b"b1"), (a2, b"a2")]
    assert strong.stats.truncations == 0


async def test_an_unreachable_stream_fails_within_the_timeout(tmp_path: Path) -> None:
    """A server without JetStream: nobody answers; the log says so, it does not hang."""
    from broker.testing import running_nats_server

    async with running_nats_server(tmp_path / "nojs", jetstream=False) as server:
        transport = NatsTransport([server.url], name="nojs", reconnect_time_wait=0.05)
        async with transport:
            strong = _log(transport, timeout=0.5)
            with pytest.raises(UnavailableError):
                await strong.ensure()
            with pytest.raises(UnavailableError):
                await strong.publish("strong.t.a", b"x")
            with pytest.raises(UnavailableError):
                await strong.fence()


# -- three servers, R3, cut by proxies -----------------------------------------------------------


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[NatsCluster]:
    """Three clustered servers fsyncing every write (``sync_interval: always``)."""
    async with NatsCluster(tmp_path / "c", 3, server_options={"sync_interval": "always"}) as c:
        await c.wait_routes()
        yield c


@pytest.fixture
async def clients(cluster: NatsCluster) -> AsyncIterator[list[NatsTransport]]:
    """One connection per server, each staying on its server."""
    transports = [
        NatsTransport([url], name=f"strong-{i}", reconnect_time_wait=0.1, drain_timeout=1.0)
        for i, url in enumerate(cluster.urls)
    ]
    try:
        for t in transports:
            await t.start()
        yield transports
    finally:
        for t in transports:
            await t.stop()


def test_sync_interval_is_checked() -> None:
    from broker.transport import EmbeddedNatsServer

    for bad in ("sometimes", "2 m", ""):
        with pytest.raises(InvalidArgumentError):
            EmbeddedNatsServer("/nonexistent", sync_interval=bad)
    with pytest.raises(InvalidArgumentError):
        EmbeddedNatsServer("/nonexistent", jetstream=False, sync_interval="always")


async def _r3_logs(clients: list[NatsTransport]) -> list[StrongLog]:
    logs = [_log(t, replicas=3) for t in clients]
    support = await logs[0].ensure(wait=20.0)
    assert support.replicas == 3
    return logs


async def _publish_retrying(strong: StrongLog, subject: str, payload: bytes) -> int:
    """Publish until acknowledged (a new leader may be being elected); at most 20 s."""
    async with asyncio.timeout(20.0):
        while True:
            try:
                return await strong.publish(subject, payload, msg_id=payload.decode())
            except UnavailableError:
                await asyncio.sleep(0.2)


async def _replay_retrying(strong: StrongLog, last: int) -> list[LogEntry]:
    """Every entry from 1 to ``last``, read through ``strong``'s server; retried while the
    server cannot serve a reader yet (just healed or restarted); at most 30 s."""
    async with asyncio.timeout(30.0):
        while True:
            try:
                async with strong.read_from(1) as reader:
                    return await _read_until(reader, last, timeout=5.0)
            except (UnavailableError, TimeoutError):
                await asyncio.sleep(0.2)


def _index(cluster: NatsCluster, name: str | None) -> int | None:
    return next((i for i in range(cluster.size) if cluster.server_name(i) == name), None)


async def test_a_minority_fails_fast_and_catches_up_after_healing(
    cluster: NatsCluster, clients: list[NatsTransport]
) -> None:
    for server in cluster.servers:
        assert 'sync_interval: "always"' in server.config_path.read_text()
    logs = await _r3_logs(clients)
    acked = [await _publish_retrying(logs[0], "strong.t.a", f"a{i}".encode()) for i in range(3)]
    # The lone server is the stream's leader: the hard case, a leader that keeps believing
    # it leads for a while; its writes must still never be acknowledged.
    lone = _index(cluster, await logs[0].leader())
    assert lone is not None
    majority = [i for i in range(cluster.size) if i != lone]
    cluster.partition([majority, [lone]])
    published = logs[lone].stats.publishes

    # Each fails within the timeout: not answered (OutcomeUnknownError) or refused.
    with pytest.raises(UnavailableError):
        await logs[lone].publish("strong.t.lost", b"never", expected_last_subject_seq=0)
    with pytest.raises(UnavailableError):
        await logs[lone].fence()
    with pytest.raises(UnavailableError):
        await logs[lone].publish_batch([("strong.t.lost", b"never", None)])
    assert logs[lone].stats.outcome_unknown + logs[lone].stats.unavailable == 3
    assert logs[lone].stats.publishes == published

    side = logs[majority[0]]
    acked += [await _publish_retrying(side, "strong.t.b", f"b{i}".encode()) for i in range(3)]
    fence = await side.fence()

    cluster.heal()
    await cluster.wait_routes()
    entries = await _replay_retrying(logs[lone], fence)
    writes = [e for e in entries if not e.fence]
    assert [e.seq for e in writes] == acked
    assert [e.payload for e in writes] == [b"a0", b"a1", b"a2", b"b0", b"b1", b"b2"]
    # What the lone leader was sent never became an entry, not even after healing.
    assert all(e.subject != "strong.t.lost" for e in entries)
    assert await logs[majority[0]].last_subject_seq("strong.t.lost") == 0


async def test_killing_the_stream_leader_loses_no_acknowledged_write(
    cluster: NatsCluster, clients: list[NatsTransport]
) -> None:
    logs = await _r3_logs(clients)
    await _publish_retrying(logs[0], "strong.t.warm", b"warm")
    leader = _index(cluster, await logs[0].leader())
    assert leader is not None
    writer = next(i for i in range(cluster.size) if i != leader)
    acked = [await _publish_retrying(logs[writer], "strong.t.k", f"k{i}".encode())
             for i in range(10)]
    async with logs[writer].read_from(acked[-1], heartbeat=0.5) as tail:
        assert (await tail.next(timeout=5.0)).seq == acked[-1]
        await cluster.kill(leader)
        # The survivors elect a leader and take writes again; the tail follows them.
        acked += [await _publish_retrying(logs[writer], "strong.t.k", f"k{i}".encode())
                  for i in range(10, 13)]
        followed = await _read_until(tail, acked[-1], timeout=15.0)
    assert [e.seq for e in followed] == acked[10:]
    await cluster.restart(leader)
    await cluster.wait_routes()
    entries = await _replay_retrying(logs[leader], acked[-1])
    got = [(e.seq, e.payload) for e in entries if e.subject == "strong.t.k"]
    assert got == [(s, f"k{i}".encode()) for i, s in enumerate(acked)]
    assert OutcomeUnknownError.retriable


async def test_concurrent_compare_and_set_never_lets_two_writers_win_the_same_version(
    cluster: NatsCluster, clients: list[NatsTransport]
) -> None:
    """Three writers, one per server, each read the subtree's last sequence and write under it
    with a CAS on that subtree. No write may succeed if another write to the subtree landed
    between the version it read and its own sequence (a lost update). Every write under the
    subtree names the same filter: on R3 the leader checks expected sequences before the Raft
    proposal and refuses a check whose exact subject or filter has a write in flight (10164);
    it does not match a filter against in-flight writes to other subjects, so a plain write
    (or a CAS on a nested subject) beside a subtree CAS is not protected (see the report)."""
    logs = await _r3_logs(clients)
    await _publish_retrying(logs[0], "strong.t.n.a", b"seed")
    wins: list[tuple[int, int]] = []  # (version read, sequence written)
    conflicts: list[tuple[int, int | None]] = []  # (version read, current when refused)

    async def writer(strong: StrongLog, subject: str) -> None:
        for _ in range(40):
            seen = await strong.last_subject_seq("strong.t.n.>")
            try:
                seq = await strong.publish(subject, b"v", expected_last_subject_seq=seen,
                                           expected_subject_filter="strong.t.n.>")
            except ConflictError as exc:
                conflicts.append((seen, exc.current))
            else:
                wins.append((seen, seq))

    await asyncio.gather(*(writer(strong, f"strong.t.n.w{i}") for i, strong in enumerate(logs)))
    written = sorted(seq for _, seq in wins)
    assert written, "no write succeeded"
    lost_updates = [(seen, seq) for seen, seq in wins if any(seen < w < seq for w in written)]
    assert lost_updates == []
    assert len(wins) + len(conflicts) == 3 * 40
    assert all(current is None or current > seen for seen, current in conflicts)
    # The versions line up into one chain: each winner read the previous winner's sequence.
    assert sorted(seen for seen, _ in wins)[1:] == written[:-1]
