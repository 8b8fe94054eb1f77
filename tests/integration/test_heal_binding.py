"""Healing bound and bounded (issue 16), over a real nats-server with real worknode services,
their SQLite stores and a real healer:

- a root reply relayed from another replica is detected: that replica is left out and
  counted, the heal is not reported converged, and it still repairs the real difference
  (and converges once the relay is gone);
- a replayed signed repair is refused, and a re-signed identical one changes neither the
  state nor the store's size;
- requests signed by a roster key that is not a healer's, and unsigned ones, are refused and
  counted; so are a healer's over its rate limit;
- a heal report signed by a node's key, or altered, fails ``worknode heal verify``; a real
  one passes; ``worknode tail --heal`` marks them;
- a leaves request naming more leaves than one request may, or whole subtrees, and a fetch
  of more keys than one request may, are refused before any work.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest

from broker.codec import REPORT_DOMAIN, Signer, TrustRoster, WireCodec
from broker.errors import StatusCode
from broker.healing import ROOT_LEVELS, HealClient, pack_prefixes
from broker.repair import key_digests
from broker.replica import Consistency
from broker.transport import (
    EmbeddedNatsServer,
    Msg,
    NatsTransport,
    RequestSigner,
    ServiceCallError,
    call,
    heal_subject,
    merkle_subject,
)
from services.healer import HealerService, HealerSettings
from services.worknode import WorknodeService, WorknodeSettings, load_or_create_signer
from tests.integration._nodes import heal_until_converged, run_cli

SUBJECT = "orders"
NS = "default"


def _setup(
    tmp: Path, url: str, names: list[str], **node: Any
) -> tuple[list[WorknodeSettings], HealerSettings, TrustRoster, Path]:
    secret = tmp / "cluster.secret"
    secret.write_bytes(os.urandom(32))
    nodes = [
        WorknodeSettings(node_id=n, subjects=[SUBJECT], nats_urls=[url], state_dir=tmp / n,
                         metrics_port=None, store_sync="normal", cluster_secret_file=secret,
                         **node)
        for n in names
    ]
    healer = HealerSettings(nats_urls=[url], state_dir=tmp / "healer", cluster_secret_file=secret,
                            subjects=[SUBJECT], metrics_port=None, interval_s=3600)
    keys = {s.node_id: load_or_create_signer(s.node_id, s.key_path()).public_key for s in nodes}
    keys["healer"] = load_or_create_signer("healer", healer.key_path()).public_key
    roster_file = tmp / "roster.json"
    roster_file.write_text(json.dumps({k: v.hex() for k, v in keys.items()}))
    return nodes, healer, TrustRoster(keys), roster_file


@asynccontextmanager
async def _services(settings: list[WorknodeSettings], roster: TrustRoster) -> Any:
    svcs = [WorknodeService(s, roster=roster) for s in settings]
    try:
        for svc in svcs:
            await svc.start()
        yield svcs
    finally:
        for svc in svcs:
            await svc.stop()


@asynccontextmanager
async def _healer(hs: HealerSettings, roster: TrustRoster) -> Any:
    """A started healer whose background loop never heals on its own: the test's heals are
    the only ones."""
    healer = HealerService(hs, roster=roster)

    async def idle() -> None:
        await asyncio.Event().wait()

    healer._loop = idle  # type: ignore[method-assign]
    async with healer:
        yield healer


async def _local_writes(svc: WorknodeService, prefix: str, n: int) -> set[str]:
    """``n`` writes applied and stored on ``svc`` alone (never published: lost deltas)."""
    replica = svc.replica(SUBJECT)
    for i in range(n):
        key = f"{prefix}{i}"
        await replica.write(
            lambda t, r, ts, k=key: t.state.assign(r, (k, "v"), 1, ts),  # type: ignore[misc]
            Consistency.LOCAL,
        )
    return {f"{prefix}{i}" for i in range(n)}


def _store_bytes(settings: WorknodeSettings) -> int:
    """The SQLite store's size on disk: the database and its write-ahead log."""
    return sum(p.stat().st_size for p in settings.state_dir.glob("worknode.db*"))


def _root_request(width: int) -> bytes:
    req = WireCodec().schema.healer.RootRequest.new_message()
    req.subject = SUBJECT
    req.levels = ROOT_LEVELS
    req.hashBytes = width % 32
    return req.to_bytes_packed()  # type: ignore[no-any-return]


@pytest.mark.parametrize("relay", ["captured-reply", "answered-with-b-key"])
async def test_a_relayed_root_reply_is_detected_and_the_real_difference_healed(
    tmp_path: Path, nats_server: EmbeddedNatsServer, relay: str
) -> None:
    """Replica c's root subject answered with b's genuine root reply (c's own endpoints
    silent), either replayed as captured (signed for another request) or signed afresh with
    b's own roster key for this very request (a node answering for another): on today's
    code c looks like b, so the healer would take c's root for b's. Now the relay is
    detected: c is left out and counted, the heal repairs a and b and says it did not
    converge; once c answers for itself, the next heal converges all three."""
    relay_mode = relay
    nodes, hs, roster, _ = _setup(tmp_path, nats_server.url, ["a", "b", "c"])
    healer_key = load_or_create_signer("healer", hs.key_path())
    async with _services(nodes, roster) as (a, b, c):
        only_a = await _local_writes(a, "a", 40)
        only_c = await _local_writes(c, "c", 7)
        assert c.heal_endpoints is not None
        await c.heal_endpoints.stop()  # c's own endpoints silent: the relay answers for c

        async with NatsTransport([nats_server.url], name="mallory") as bus:
            # A genuine root reply of b, captured (as by anyone reading the healer's inbox).
            body = _root_request(hs.hash_bytes)
            subject_b = merkle_subject(NS, SUBJECT, "b", "root")
            headers, _ = RequestSigner(healer_key, roster).sign(
                subject_b, body, reply_root=bus.reply_root
            )
            captured = await bus.request(subject_b, body, timeout=5, headers=headers)

            as_b = RequestSigner(load_or_create_signer("b", nodes[1].key_path()), roster)

            async def relay(msg: Msg) -> None:
                if relay_mode == "captured-reply":
                    await bus.respond(msg, captured.data, headers=captured.headers)
                else:  # bound to this request, but signed by b, not by c
                    await bus.respond(msg, captured.data,
                                      headers=as_b.reply_headers(msg, captured.data))

            sub = await bus.subscribe(merkle_subject(NS, SUBJECT, "c", "root"), relay)
            await bus.flush()
            async with _healer(hs, roster) as healer:
                out = await healer.heal_subject(SUBJECT, ["a", "b", "c"])
                assert not out.converged, "a relayed root reply passed for c's"
                assert out.reason == "unverified"
                assert out.unverified == ["c"]
                assert healer.metrics.unverified.labels(SUBJECT, "root")._value.get() >= 1
                assert healer.metrics.heals.labels(SUBJECT, "unverified")._value.get() == 1
                # ... and the real difference between a and b was still found and repaired.
                assert out.divergent_keys == len(only_a)
                sa, sb = (key_digests(s.replica(SUBJECT).state) for s in (a, b))
                assert sa == sb
                assert only_a <= set(sb)

                # The relay gone and c answering for itself, the heal converges everywhere:
                # c keeps a's dots only from a's own signed state (b cannot vouch for them),
                # so a first heal may end ``catchup`` while c catches up from a.
                await sub.unsubscribe()
                await c.heal_endpoints.start()
                assert c.transport is not None
                await c.transport.flush()  # its endpoints subscribed before the heal asks
                again = await heal_until_converged(healer, SUBJECT, ["a", "b", "c"])
                assert again.unverified == []
        states = [key_digests(s.replica(SUBJECT).state) for s in (a, b, c)]
        assert states[0] == states[1] == states[2]
        assert set(states[0]) == only_a | only_c


async def test_a_replayed_repair_changes_neither_state_nor_store_size(
    tmp_path: Path, nats_server: EmbeddedNatsServer
) -> None:
    """A captured repair request (a's signed fetch reply as voucher) replayed 20 times is
    refused (and counted); the same voucher in 20 fresh requests (as a healer retrying would
    send) is accepted but logs nothing: the state and the SQLite file stay exactly as after
    the first repair. On today's code each replay was logged again (the store grew by the
    repair each time)."""
    nodes, hs, roster, _ = _setup(tmp_path, nats_server.url, ["a", "b"])
    healer_key = load_or_create_signer("healer", hs.key_path())
    signer = RequestSigner(healer_key, roster)
    codec = WireCodec()
    async with _services(nodes, roster) as (a, b), \
            NatsTransport([nats_server.url], name="mallory") as bus:
        keys = sorted(await _local_writes(a, "big", 30))
        client = HealClient(bus, namespace=NS, codec=codec, signer=healer_key, roster=roster)
        apply_b = merkle_subject(NS, SUBJECT, "b", "apply")
        body = (await client.fetch_voucher(SUBJECT, "a", keys)).raw  # a's, as the healer pushes
        headers, _ = signer.sign(apply_b, body, reply_root=bus.reply_root)
        first = await bus.request(apply_b, body, timeout=5, headers=headers)
        assert "Nats-Service-Error-Code" not in (first.headers or {})
        rb = b.replica(SUBJECT)
        await rb.flush()
        state, size = rb.state.digest(), _store_bytes(nodes[1])
        assert set(keys) <= set(rb.state.store or ())

        for _ in range(20):  # the captured request itself, replayed
            replay = await bus.request(apply_b, body, timeout=5, headers=headers)
            assert (replay.headers or {}).get("Nats-Service-Error-Code") == "401"
        assert b.heal_endpoints is not None
        assert b.heal_endpoints.rejected[(SUBJECT, "apply", "replayed")] == 20
        for _ in range(20):  # the same repair in fresh, validly signed requests
            await call(bus, apply_b, body, timeout=5, signer=signer, signers=["b"])
        await rb.flush()
        assert rb.state.digest() == state
        assert _store_bytes(nodes[1]) == size, "a repair that changes nothing was logged"
    # and after a restart, b holds exactly what it held
    async with _services(nodes[1:], roster) as (again,):
        assert again.replica(SUBJECT).state.digest() == state


async def test_requests_from_non_healers_are_refused_and_counted(
    tmp_path: Path, nats_server: EmbeddedNatsServer
) -> None:
    """A node's own roster key, validly signing, is not a healer: refused (401, the refusal
    signed by the replica) and counted ``not_healer``; an unsigned request likewise
    (``unsigned``). Today both were served."""
    nodes, hs, roster, _ = _setup(tmp_path, nats_server.url, ["a", "b"])
    node_a = RequestSigner(load_or_create_signer("a", nodes[0].key_path()), roster)
    healer = RequestSigner(load_or_create_signer("healer", hs.key_path()), roster)
    root_b = merkle_subject(NS, SUBJECT, "b", "root")
    body = _root_request(6)
    async with _services(nodes, roster) as (_, b), \
            NatsTransport([nats_server.url], name="mallory") as bus:
        assert b.heal_endpoints is not None
        rejected = b.heal_endpoints.rejected
        with pytest.raises(ServiceCallError) as err:
            await call(bus, root_b, body, timeout=5, signer=node_a, signers=["b"])
        assert err.value.code is StatusCode.UNAUTHENTICATED
        assert rejected[(SUBJECT, "root", "not_healer")] == 1
        with pytest.raises(ServiceCallError) as err:
            await call(bus, root_b, body, timeout=5)
        assert err.value.code is StatusCode.UNAUTHENTICATED
        assert rejected[(SUBJECT, "root", "unsigned")] == 1
        assert await call(bus, root_b, body, timeout=5, signer=healer, signers=["b"])
        text = generate_latest(b.metrics.registry).decode()
        assert ('worknode_heal_rejected_total{reason="not_healer",subject="orders",'
                'verb="root"} 1.0') in text


async def test_a_healer_over_its_rate_limit_is_refused_and_counted(
    tmp_path: Path, nats_server: EmbeddedNatsServer
) -> None:
    """``heal_burst`` requests at once, then 429 (``rate_limited``) until the bucket
    refills (``heal_rate_per_s``)."""
    nodes, hs, roster, _ = _setup(tmp_path, nats_server.url, ["b"],
                                  heal_rate_per_s=0.001, heal_burst=3)
    healer = RequestSigner(load_or_create_signer("healer", hs.key_path()), roster)
    root_b = merkle_subject(NS, SUBJECT, "b", "root")
    body = _root_request(6)
    async with _services(nodes, roster) as (b,), \
            NatsTransport([nats_server.url], name="healer") as bus:
        assert b.heal_endpoints is not None
        for _ in range(3):  # the burst
            await call(bus, root_b, body, timeout=5, signer=healer, signers=["b"])
        with pytest.raises(ServiceCallError) as err:
            await call(bus, root_b, body, timeout=5, signer=healer, signers=["b"])
        assert err.value.code is StatusCode.RESOURCE_EXHAUSTED
        assert b.heal_endpoints.rejected[(SUBJECT, "root", "rate_limited")] == 1


@contextmanager
def _reports(tmp: Path, real: bytes, node: Signer) -> Iterator[tuple[Path, Path, Path]]:
    """Files holding the real report, one signed by a node's key, and the real one altered
    (its ``converged`` flipped, the signature kept)."""
    codec = WireCodec()
    env = codec.schema.envelope.SignedEnvelope.from_bytes_packed(real)
    body = bytes(env.body)
    forged = codec.schema.envelope.SignedEnvelope.new_message()
    forged.signer = node.node_id
    forged.signature = node.sign(body, REPORT_DOMAIN)
    forged.body = body
    report = codec.schema.healer.HealReport.from_bytes_packed(body).as_builder()
    report.converged = not report.converged
    altered = codec.schema.envelope.SignedEnvelope.new_message()
    altered.signer = str(env.signer)
    altered.signature = bytes(env.signature)
    altered.body = report.to_bytes_packed()
    paths = (tmp / "real.report", tmp / "forged.report", tmp / "altered.report")
    for path, data in zip(paths, (real, forged.to_bytes_packed(), altered.to_bytes_packed()),
                          strict=True):
        path.write_bytes(data)
    yield paths


async def test_forged_heal_reports_fail_verification_and_tail_marks_them(
    tmp_path: Path, nats_server: EmbeddedNatsServer
) -> None:
    """A real heal's report passes ``worknode heal verify`` (it names its healer); the same
    report signed by a node's roster key, or altered, fails with one error line and exit 1;
    ``worknode tail --heal`` marks the real one verified and the two others UNVERIFIED."""
    nodes, hs, roster, roster_file = _setup(tmp_path, nats_server.url, ["a", "b"])
    published: list[bytes] = []
    async with _services(nodes, roster) as (a, _), \
            NatsTransport([nats_server.url], name="listener") as bus:
        await _local_writes(a, "k", 5)

        async def on_report(msg: Msg) -> None:
            published.append(msg.data)

        await bus.subscribe(heal_subject(NS, SUBJECT), on_report)
        await bus.flush()
        async with _healer(hs, roster) as healer:
            out = await healer.heal_subject(SUBJECT, ["a", "b"])
            assert out.converged
            assert out.published
        await bus.flush()
        for _ in range(100):
            if published:
                break
            await asyncio.sleep(0.05)
        assert published, "no heal report was published"
        node_a = load_or_create_signer("a", nodes[0].key_path())
        with _reports(tmp_path, published[0], node_a) as (real, forged, altered):
            rc, out_, err = await run_cli("heal", "verify", str(real), "--roster", str(roster_file))
            assert rc == 0, err
            assert "valid" in out_
            assert "healer healer" in out_
            for bad in (forged, altered):
                rc, out_, err = await run_cli("heal", "verify", str(bad),
                                              "--roster", str(roster_file))
                assert rc == 1, out_
                assert out_ == ""
                assert len(err.strip().splitlines()) == 1
                assert err.startswith("error: INVALID heal report")
            # tail --heal: publish the three in turn until it has printed three reports
            # (it may subscribe after the first few: any three in a row hold one of each).
            tail = asyncio.create_task(run_cli(
                "tail", SUBJECT, "--heal", "--nats-url", nats_server.url,
                "--roster", str(roster_file), "--count", "3", "--timeout", "60",
            ))
            datas = [p.read_bytes() for p in (real, forged, altered)]
            i = 0
            while not tail.done():
                await bus.publish(heal_subject(NS, SUBJECT), datas[i % 3])
                i += 1
                await asyncio.sleep(0.05)
            rc, out_, err = await tail
            # heal verify --subject: the next report published for the subject (a forged one)
            verify = asyncio.create_task(run_cli(
                "heal", "verify", "--subject", SUBJECT, "--nats-url", nats_server.url,
                "--roster", str(roster_file), "--timeout", "60",
            ))
            while not verify.done():
                await bus.publish(heal_subject(NS, SUBJECT), datas[1])
                await asyncio.sleep(0.05)
            vrc, vout, verr = await verify
            assert vrc == 1, vout
            assert verr.startswith("error: INVALID heal report (signed as 'a')")
        assert rc == 0, err
        lines = out_.strip().splitlines()
        assert len(lines) == 3
        assert sum("verified by healer healer" in line for line in lines) == 1
        assert sum("UNVERIFIED" in line for line in lines) == 2


async def test_expensive_leaves_requests_are_refused_before_any_work(
    tmp_path: Path, nats_server: EmbeddedNatsServer
) -> None:
    """One request naming every leaf of the tree (65,536 packed indices, 128 KiB) is over
    what one request may ask (429, counted ``too_costly``); one naming whole subtrees (16
    empty prefixes: 16 copies of the whole tree, seconds of CPU on a large store for 70
    bytes) is malformed (leaves are asked at leaf level). The healer's own requests (up to
    1,024 leaves) are served. Today both were served in full."""
    nodes, hs, roster, _ = _setup(tmp_path, nats_server.url, ["a"])
    healer = RequestSigner(load_or_create_signer("healer", hs.key_path()), roster)
    codec = WireCodec()
    leaves_a = merkle_subject(NS, SUBJECT, "a", "leaves")

    def packed(count: int) -> bytes:
        req = codec.schema.healer.NodeHashesRequest.new_message()
        req.subject = SUBJECT
        req.hashBytes = 6
        prefixes = [((i >> 12) & 15, (i >> 8) & 15, (i >> 4) & 15, i & 15)
                    for i in range(count)]
        req.prefixLevel, req.packedPrefixes = pack_prefixes(prefixes, 4)
        return req.to_bytes_packed()  # type: ignore[no-any-return]

    subtrees = codec.schema.healer.NodeHashesRequest.new_message()
    subtrees.subject = SUBJECT
    lst = subtrees.init("prefixes", 16)
    for i in range(16):
        lst[i] = b""
    async with _services(nodes, roster) as (a,), \
            NatsTransport([nats_server.url], name="mallory") as bus:
        await _local_writes(a, "k", 50)
        assert a.heal_endpoints is not None
        rejected = a.heal_endpoints.rejected
        with pytest.raises(ServiceCallError) as err:
            await call(bus, leaves_a, packed(65_536), timeout=10, signer=healer, signers=["a"])
        assert err.value.code is StatusCode.RESOURCE_EXHAUSTED
        assert rejected[(SUBJECT, "leaves", "too_costly")] == 1
        with pytest.raises(ServiceCallError) as err:
            await call(bus, leaves_a, subtrees.to_bytes_packed(), timeout=10, signer=healer,
                       signers=["a"])
        assert err.value.code is StatusCode.INVALID_ARGUMENT
        assert rejected[(SUBJECT, "leaves", "malformed")] == 1
        reply = await call(bus, leaves_a, packed(1024), timeout=10, signer=healer,
                           signers=["a"])
        assert reply
        # A fetch is bounded too (its entries are sealed one by one): 2,000 keys at most.
        fetch = codec.schema.healer.FetchStatesRequest.new_message()
        fetch.subject = SUBJECT
        keys = fetch.init("keys", 2_001)
        for i in range(2_001):
            keys[i] = f"k{i}"
        with pytest.raises(ServiceCallError) as err:
            await call(bus, merkle_subject(NS, SUBJECT, "a", "fetch"), fetch.to_bytes_packed(),
                       timeout=10, signer=healer, signers=["a"])
        assert err.value.code is StatusCode.RESOURCE_EXHAUSTED
        assert rejected[(SUBJECT, "fetch", "too_costly")] == 1
