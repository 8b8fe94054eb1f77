"""Partition scenarios on a real 3-server NATS cluster whose routes pass through proxies.

1. Clean split {1,2,3} | {4,5,6}: both sides write 10,000 keys in all; heal -> every root
   identical, no acknowledged write lost.
2. Minority {1..5} | {6}: node 6 writes alone; heal -> node 6 fast-forwards and its writes
   reach the majority.
3. Byzantine: during the partition an attacker publishes forged deltas on one side (unknown
   key, bad signature, a valid signature over a tampered payload); none is applied, and
   healing never spreads them.

As deployed, every worknode runs in its own process (``tests/chaos/_node.py``, driven over
its stdin/stdout) and so does the healer (``worknode healer``); every process is stopped even
if the test fails. Each scenario prints its convergence time after the network heals
(``pytest -s``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from broker.chaos import NatsCluster
from broker.codec import Signer, WireCodec
from broker.crdt import ORMap
from broker.transport import NatsTransport, delta_subject
from services.worknode import WorknodeSettings, load_or_create_signer

SUBJECT = "orders"
ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


class Node:
    """A worknode process (``tests/chaos/_node.py``): one request at a time."""

    def __init__(self, name: str, settings: WorknodeSettings, proc: asyncio.subprocess.Process,
                 log: Path) -> None:
        self.name, self.settings, self.proc, self.log = name, settings, proc, log
        self._lock = asyncio.Lock()

    async def call(self, op: str, **args: Any) -> Any:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        async with self._lock:
            self.proc.stdin.write((json.dumps({"op": op, **args}) + "\n").encode())
            await self.proc.stdin.drain()
            line = await asyncio.wait_for(self.proc.stdout.readline(), 60)
        assert line, f"node {self.name} exited: {self.log.read_text(errors='replace')[-2000:]}"
        reply = json.loads(line)
        assert "error" not in reply, f"node {self.name}: {reply['error']}"
        return reply

    async def write(self, n: int) -> list[str]:
        """Write ``n`` registers (key = value), acknowledged; their keys."""
        await self.call("write", prefix=self.name, n=n)
        return [f"{self.name}-{i:05d}" for i in range(n)]

    async def size(self) -> int:
        return int((await self.call("size"))["size"])

    async def root(self) -> str:
        return str((await self.call("root"))["root"])


@asynccontextmanager
async def _node_process(name: str, settings: WorknodeSettings, roster_file: Path
                        ) -> AsyncIterator[Node]:
    """Start a worknode process and wait until it serves; stop it (SIGKILL if it lingers)
    even if the test fails."""
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    settings_file = settings.state_dir / "settings.json"
    settings_file.write_text(settings.model_dump_json())
    log = settings.state_dir / "node.log"
    with log.open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.chaos._node", str(settings_file), str(roster_file),
            cwd=ROOT,  # where the ``tests`` package is importable
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=err,
            limit=1 << 26,  # a digests reply is one long line
        )
    node = Node(name, settings, proc, log)
    try:
        assert proc.stdout is not None
        ready = await asyncio.wait_for(proc.stdout.readline(), 60)
        assert ready, f"node {name} did not start: {log.read_text(errors='replace')[-2000:]}"
        yield node
    finally:
        if proc.returncode is None:
            with contextlib.suppress(OSError):  # already gone: a broken pipe
                assert proc.stdin is not None
                proc.stdin.write(b'{"op": "stop"}\n')
                await proc.stdin.drain()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()


@asynccontextmanager
async def _healer_process(
    tmp: Path, cluster: NatsCluster, server: int, secret: Path, roster_file: Path
) -> AsyncIterator[asyncio.subprocess.Process]:
    """``worknode healer`` in its own process, as deployed (its CPU apart from the replicas'
    process); stopped with SIGTERM (SIGKILL if it lingers) even if the test fails."""
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
        "fetch_batch = 2000",  # the most a replica serves in one fetch
    ]) + "\n")
    log = tmp / "healer.log"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", "from services.cli import main; main()",
            "healer", "--config", str(config),
            cwd=ROOT,  # the same code as the node processes
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
            if "event=heal " in line or "Error" in line:
                print(f"  healer: {line}")


@asynccontextmanager
async def _deploy(
    tmp: Path, cluster: NatsCluster, placement: dict[str, int], healer_server: int
) -> AsyncIterator[dict[str, Node]]:
    """A worknode process per node (each on its server) and a healer process."""
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
    roster_file = tmp / "roster.json"
    roster_file.write_text(json.dumps({n: k.hex() for n, k in keys.items()}))
    async with AsyncExitStack() as stack:
        # Started side by side; if one fails, the task group cancels the others' startups
        # (each stops its process) before the stack unwinds the ones that started.
        async with asyncio.TaskGroup() as tg:
            starting = [
                tg.create_task(stack.enter_async_context(_node_process(n, s, roster_file)))
                for n, s in settings.items()
            ]
        nodes = [t.result() for t in starting]
        await stack.enter_async_context(
            _healer_process(tmp, cluster, healer_server, secret, roster_file)
        )
        yield {n.name: n for n in nodes}


async def _eventually(cond: Callable[[], Awaitable[bool]], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not await cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def _converge(nodes: dict[str, Node], timeout: float = 60.0) -> float:
    """Seconds until every replica holds the same entries (Merkle roots polled), checked
    once more with full per-key digests at the end."""
    t0 = time.monotonic()
    while len(set(await asyncio.gather(*(n.root() for n in nodes.values())))) > 1:
        assert time.monotonic() - t0 < timeout, "replicas did not converge after the heal"
        await asyncio.sleep(0.05)
    seconds = time.monotonic() - t0
    digests = [(await n.call("digests"))["digests"] for n in nodes.values()]
    assert all(d == digests[0] for d in digests)
    return seconds


async def test_scenario_1_clean_split(tmp_path: Path, nats_cluster: NatsCluster) -> None:
    placement = {"n1": 0, "n2": 0, "n3": 0, "n4": 1, "n5": 1, "n6": 2}
    async with _deploy(tmp_path, nats_cluster, placement, healer_server=1) as nodes:
        nats_cluster.partition([{0}, {1, 2}])
        per = 10_000 // 6 + 1
        written = await asyncio.gather(*(n.write(per) for n in nodes.values()))
        acked = [k for ks in written for k in ks]
        assert len(acked) >= 10_000
        # Each side converges on its own writes, and only those.
        await _eventually(lambda: _size_is(nodes["n1"], 3 * per))
        await _eventually(lambda: _size_is(nodes["n4"], 3 * per))
        await asyncio.sleep(0.2)
        assert await nodes["n1"].size() == 3 * per
        nats_cluster.heal()
        seconds = await _converge(nodes)
        print(f"\nscenario 1 (clean split, {len(acked):,} keys): converged {seconds:.2f} s "
              "after the network healed")
        for node in nodes.values():
            missing = (await node.call("missing", keys=acked))["missing"]
            assert not missing, f"{node.name} lost {len(missing)} acknowledged writes"


async def _size_is(node: Node, n: int) -> bool:
    return await node.size() == n


async def test_scenario_2_minority_fast_forwards(
    tmp_path: Path, nats_cluster: NatsCluster
) -> None:
    placement = {"n1": 0, "n2": 0, "n3": 1, "n4": 1, "n5": 0, "n6": 2}
    async with _deploy(tmp_path, nats_cluster, placement, healer_server=0) as nodes:
        nats_cluster.partition([{0, 1}, {2}])
        majority = [n for name, n in nodes.items() if name != "n6"]
        written = await asyncio.gather(*(n.write(400) for n in majority))
        alone = await nodes["n6"].write(500)
        assert await nodes["n6"].size() == 500
        nats_cluster.heal()
        seconds = await _converge(nodes)
        print(f"\nscenario 2 (minority of one): converged {seconds:.2f} s after the heal")
        # node 6 fast-forwarded, and its writes reached the rest
        assert not (await nodes["n6"].call("missing", keys=[k for ks in written for k in ks])
                    )["missing"]
        assert not (await nodes["n1"].call("missing", keys=alone))["missing"]


async def test_scenario_3_byzantine_writes_are_refused_and_never_spread(
    tmp_path: Path, nats_cluster: NatsCluster
) -> None:
    placement = {"n1": 0, "n2": 1, "n3": 2}
    async with _deploy(tmp_path, nats_cluster, placement, healer_server=0) as nodes:
        nats_cluster.partition([{0, 1}, {2}])
        subject = delta_subject("default", SUBJECT)
        codec = WireCodec()
        mallory = Signer("mallory", b"m" * 32)  # not in anyone's roster
        n3_key = load_or_create_signer("n3", nodes["n3"].settings.key_path())
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
        await nodes["n3"].write(50)
        await nodes["n1"].write(50)
        await asyncio.sleep(0.3)
        assert not (await nodes["n3"].call("has", key="evil"))["has"]
        reasons = (await nodes["n3"].call("rejected"))["rejected"]
        assert reasons["unknown_signer"] >= 1
        assert reasons["bad_signature"] + reasons["malformed"] >= 2
        nats_cluster.heal()
        seconds = await _converge(nodes)
        print(f"\nscenario 3 (forged deltas on one side): converged {seconds:.2f} s after "
              f"the heal; rejected {reasons}")
        for node in nodes.values():
            assert not (await node.call("has", key="evil"))["has"]
            assert await node.size() == 100
