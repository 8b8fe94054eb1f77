"""Partition scenarios on a real 3-server NATS cluster whose routes pass through proxies.

1. Clean split {1,2,3} | {4,5,6}: both sides write 10,000 keys in all; heal -> every root
   identical, no acknowledged write lost.
2. Minority {1..5} | {6}: node 6 writes alone; heal -> node 6 fast-forwards and its writes
   reach the majority.
3. Byzantine: during the partition an attacker publishes forged deltas on one side (unknown
   key, bad signature, a valid signature over a tampered payload); none is applied, and
   healing never spreads them.

Each scenario prints its convergence time after the network heals (``pytest -s``).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from broker.chaos import NatsCluster
from broker.codec import Signer, TrustRoster, WireCodec
from broker.crdt import ORMap
from broker.repair import key_digests
from broker.transport import NatsTransport, delta_subject
from services.worknode import WorknodeService, WorknodeSettings, load_or_create_signer

SUBJECT = "orders"
pytestmark = pytest.mark.slow


@asynccontextmanager
async def _healer_process(
    tmp: Path, cluster: NatsCluster, server: int, secret: Path, keys: dict[str, bytes]
) -> AsyncIterator[asyncio.subprocess.Process]:
    """``worknode healer`` in its own process, as deployed (its CPU apart from the replicas'
    process); stopped with SIGTERM (SIGKILL if it lingers) even if the test fails."""
    roster_file = tmp / "roster.json"
    roster_file.write_text(json.dumps({n: k.hex() for n, k in keys.items()}))
    config = tmp / "healer.toml"
    config.write_text("\n".join([
        f"nats_urls = [{json.dumps(cluster.urls[server])}]",
        f"state_dir = {json.dumps(str(tmp / 'healer'))}",
        f"cluster_secret_file = {json.dumps(str(secret))}",
        f"roster_file = {json.dumps(str(roster_file))}",
        f"subjects = [{json.dumps(SUBJECT)}]",
        "metrics_port = 0",
        "interval_s = 3600",
        "membership_poll_s = 0.25",
        "fetch_batch = 5000",
    ]) + "\n")
    log = tmp / "healer.log"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", "from services.cli import main; main()",
            "healer", "--config", str(config),
            stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out,
            env={**os.environ, "WORKNODE_LOG_LEVEL": "INFO"},
        )
    try:
        deadline = time.monotonic() + 30
        while b"metrics on port" not in log.read_bytes():
            assert proc.returncode is None, f"the healer exited: {log.read_text()}"
            assert time.monotonic() < deadline, f"the healer did not start: {log.read_text()}"
            await asyncio.sleep(0.05)
        yield proc
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        # With -s: what the healer did (one line per heal that repaired something).
        for line in log.read_text(errors="replace").splitlines():
            if "heal of" in line or "Error" in line:
                print(f"  healer: {line}")


@asynccontextmanager
async def _deploy(
    tmp: Path, cluster: NatsCluster, placement: dict[str, int], healer_server: int
) -> AsyncIterator[dict[str, WorknodeService]]:
    """Worknodes in this process (each on its server), the healer in its own process."""
    secret = tmp / "cluster.secret"
    secret.write_bytes(os.urandom(32))
    settings = {
        name: WorknodeSettings(
            node_id=name, subjects=[SUBJECT], nats_urls=[cluster.urls[server]],
            state_dir=tmp / name, metrics_port=None, store_sync="normal",
            cluster_secret_file=secret, flush_interval_ms=2,
        )
        for name, server in placement.items()
    }
    keys = {n: load_or_create_signer(n, s.key_path()).public_key for n, s in settings.items()}
    keys["healer"] = load_or_create_signer("healer", tmp / "healer" / "healer.key").public_key
    roster = TrustRoster(keys)
    services = {n: WorknodeService(s, roster=roster) for n, s in settings.items()}
    try:
        for svc in services.values():
            await svc.start()
        async with _healer_process(tmp, cluster, healer_server, secret, keys):
            yield services
    finally:
        for svc in services.values():
            await svc.stop()


async def _write_keys(svc: WorknodeService, prefix: str, n: int) -> list[str]:
    r = svc.replica(SUBJECT)
    keys = [f"{prefix}-{i:05d}" for i in range(n)]
    for i in range(0, n, 100):
        await r.write_many([
            lambda t, rid, ts, k=k: t.state.assign(rid, (k, "v"), k, ts) for k in keys[i : i + 100]
        ])
    await r.flush()
    return keys


async def _eventually(cond: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


def _root(svc: WorknodeService) -> bytes:
    assert svc.heal_endpoints is not None
    return svc.heal_endpoints.trees[SUBJECT].current().root()  # incremental: cheap to poll


async def _converge(services: dict[str, WorknodeService], timeout: float = 60.0) -> float:
    """Seconds until every replica holds the same entries (Merkle roots polled), checked
    once more with full per-key digests at the end."""
    t0 = time.monotonic()
    while len({_root(s) for s in services.values()}) > 1:
        assert time.monotonic() - t0 < timeout, "replicas did not converge after the heal"
        await asyncio.sleep(0.05)
    seconds = time.monotonic() - t0
    digests = [key_digests(s.replica(SUBJECT).state) for s in services.values()]
    assert all(d == digests[0] for d in digests)
    return seconds


async def test_scenario_1_clean_split(tmp_path: Path, nats_cluster: NatsCluster) -> None:
    placement = {"n1": 0, "n2": 0, "n3": 0, "n4": 1, "n5": 1, "n6": 2}
    async with _deploy(tmp_path, nats_cluster, placement, healer_server=1) as svcs:
        nats_cluster.partition([{0}, {1, 2}])
        per = 10_000 // 6 + 1
        written = await asyncio.gather(*(_write_keys(s, n, per) for n, s in svcs.items()))
        acked = [k for ks in written for k in ks]
        assert len(acked) >= 10_000
        # Each side converges on its own writes, and only those.
        await _eventually(lambda: len(svcs["n1"].replica(SUBJECT).state) == 3 * per)
        await _eventually(lambda: len(svcs["n4"].replica(SUBJECT).state) == 3 * per)
        await asyncio.sleep(0.2)
        assert len(svcs["n1"].replica(SUBJECT).state) == 3 * per
        nats_cluster.heal()
        seconds = await _converge(svcs)
        print(f"\nscenario 1 (clean split, {len(acked):,} keys): converged {seconds:.2f} s "
              "after the network healed")
        for svc in svcs.values():
            state = svc.replica(SUBJECT).state.value()
            missing = [k for k in acked if state.get(k, {}).get("v") != k]
            assert not missing, f"{svc.settings.node_id} lost {len(missing)} acknowledged writes"


async def test_scenario_2_minority_fast_forwards(
    tmp_path: Path, nats_cluster: NatsCluster
) -> None:
    placement = {"n1": 0, "n2": 0, "n3": 1, "n4": 1, "n5": 0, "n6": 2}
    async with _deploy(tmp_path, nats_cluster, placement, healer_server=0) as svcs:
        nats_cluster.partition([{0, 1}, {2}])
        majority = [n for n in svcs if n != "n6"]
        written = await asyncio.gather(*(_write_keys(svcs[n], n, 400) for n in majority))
        alone = await _write_keys(svcs["n6"], "n6", 500)
        assert len(svcs["n6"].replica(SUBJECT).state) == 500
        nats_cluster.heal()
        seconds = await _converge(svcs)
        print(f"\nscenario 2 (minority of one): converged {seconds:.2f} s after the heal")
        n6 = svcs["n6"].replica(SUBJECT).state.value()
        assert all(k in n6 for ks in written for k in ks)  # node 6 fast-forwarded
        n1 = svcs["n1"].replica(SUBJECT).state.value()
        assert all(n1.get(k, {}).get("v") == k for k in alone)  # its writes reached the rest


async def test_scenario_3_byzantine_writes_are_refused_and_never_spread(
    tmp_path: Path, nats_cluster: NatsCluster
) -> None:
    placement = {"n1": 0, "n2": 1, "n3": 2}
    async with _deploy(tmp_path, nats_cluster, placement, healer_server=0) as svcs:
        nats_cluster.partition([{0, 1}, {2}])
        subject = delta_subject("default", SUBJECT)
        codec = WireCodec()
        mallory = Signer("mallory", b"m" * 32)  # not in anyone's roster
        n3_key = load_or_create_signer("n3", svcs["n3"].settings.key_path())
        evil = ORMap().assign("mallory", ("evil", "v"), "pwned", 1)
        evil.is_delta = True
        unknown = codec.seal(mallory, subject=subject, hlc=1, sequence=1, document=evil)
        # n3's identity, but a signature that does not match (signed by someone else)
        impostor = Signer("n3", b"x" * 32)
        bad_sig = codec.seal(impostor, subject=subject, hlc=1, sequence=2, document=evil)
        # a valid n3 signature whose payload was tampered with after signing
        good = codec.seal(n3_key, subject=subject, hlc=1, sequence=3,
                          document=ORMap().assign("n3", ("fine", "v"), "ok", 1))
        tampered = bytearray(good)
        at = tampered.find(b"fine")
        tampered[at : at + 4] = b"evil"
        async with NatsTransport([nats_cluster.urls[2]], name="attacker") as attacker:
            for raw in (unknown, bad_sig, bytes(tampered)):
                await attacker.publish(subject, raw)
            await attacker.flush()
        await _write_keys(svcs["n3"], "n3", 50)
        await _write_keys(svcs["n1"], "n1", 50)
        await asyncio.sleep(0.3)
        r3 = svcs["n3"].replica(SUBJECT)
        assert "evil" not in r3.state
        rejected = svcs["n3"].metrics.rejected_envelopes
        reasons = {
            reason: rejected.labels(SUBJECT, reason)._value.get()
            for reason in ("unknown_signer", "bad_signature", "malformed")
        }
        assert reasons["unknown_signer"] >= 1
        assert reasons["bad_signature"] + reasons["malformed"] >= 2
        nats_cluster.heal()
        seconds = await _converge(svcs)
        print(f"\nscenario 3 (forged deltas on one side): converged {seconds:.2f} s after "
              f"the heal; rejected {reasons}")
        for svc in svcs.values():
            assert "evil" not in svc.replica(SUBJECT).state
            assert len(svc.replica(SUBJECT).state) == 100
