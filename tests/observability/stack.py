"""A small worknode deployment on loopback for the observability tests, and its traffic.

``running_stack`` starts, on free loopback ports: one nats-server (JetStream, monitoring
port on), the NATS exporter stand-in (see ``nats_exporter``), three worknodes replicating
``orders`` — one writing wire version 1 beside two writing version 2, the rolling-upgrade
picture — and the healer, every service with ``/metrics``. Everything it started it stops,
also when the test fails.

``generate_traffic`` drives every kind of traffic the dashboards show: replication,
divergence for the healer, hostile envelopes (garbage, and a roster key's forged deltas),
and capability-checked RPC calls (allowed, and refused for a token without the right).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from broker.codec import Signer, TrustRoster, WireCodec
from broker.crdt import ROOT_ID, Increment, Tree
from broker.errors import WorknodeError
from broker.replica import Consistency
from broker.rpc import Grant, RootKey, RpcClient, RpcError, mint
from broker.testing import running_nats_server
from broker.transport import EmbeddedNatsServer, NatsTransport, RequestSigner
from services.healer import HealerService, HealerSettings
from services.worknode import WorknodeService, WorknodeSettings, load_or_create_signer
from tests.observability.nats_exporter import NatsExporterStandIn

SUBJECT = "orders"
# (node id, wire version written): v1 beside v2, as in the middle of a rolling upgrade.
NODES = (("node-v1", 1), ("node-v2a", 2), ("node-v2b", 2))
NAMESPACE = "default"
ROOT = RootKey(1, bytes(range(32)))  # the cluster's RPC root key (a test key)
RPC_CALLER = Signer("rpc-client", bytes(range(32, 64)))  # holds the tokens, signs the calls
INTRUDER = Signer("intruder", bytes(range(64, 96)))
"""A roster writer whose key signs what no honest writer does (the Byzantine panel, alert)."""
STRONG_PREFIX = "lock-"  # STRONG worknodes of SUBJECT (the STRONG panels' traffic)
MAX_ROUNDS = 2_000  # traffic loops are bounded in count as well as cancelled by the test


@dataclass
class Stack:
    """The running services and where Prometheus finds them."""

    nats: EmbeddedNatsServer
    exporter: NatsExporterStandIn
    nodes: list[WorknodeService]
    healer: HealerService

    def targets(self) -> dict[str, list[str]]:
        """``{job name: ["127.0.0.1:port", ...]}``, the job names of
        ``dashboards/prometheus/prometheus.yml``."""
        return {
            "worknode": [f"127.0.0.1:{n.metrics_port}" for n in self.nodes],
            "worknode-healer": [f"127.0.0.1:{self.healer.metrics_port}"],
            "nats": [self.exporter.address],
        }

    def metrics_urls(self) -> dict[str, str]:
        """``{service name: /metrics URL}`` of every worknode service and the healer."""
        urls = {n.settings.node_id: f"http://127.0.0.1:{n.metrics_port}/metrics"
                for n in self.nodes}
        urls["healer"] = f"http://127.0.0.1:{self.healer.metrics_port}/metrics"
        return urls


def _write_secret(tmp: Path) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    secret = tmp / "cluster.secret"
    secret.write_bytes(os.urandom(32))
    return secret


@contextlib.asynccontextmanager
async def running_stack(tmp: Path) -> AsyncIterator[Stack]:
    """Start the deployment under ``tmp``; stop every part of it on exit."""
    secret = _write_secret(tmp)
    keyring = tmp / "rpc-keyring.json"
    keyring.write_text(json.dumps({"1": ROOT.public_key.hex()}))
    async with running_nats_server(tmp / "nats", monitor_port=0) as nats:
        settings = [
            WorknodeSettings(node_id=name, subjects=[SUBJECT], state_dir=tmp / name,
                             metrics_port=0, store_sync="normal", cluster_secret_file=secret,
                             wire_version=version, peer_version=1, nats_urls=[nats.url],
                             rpc_keyring_file=keyring, strong={SUBJECT: [STRONG_PREFIX]})
            for name, version in NODES
        ]
        hs = HealerSettings(nats_urls=[nats.url], state_dir=tmp / "healer",
                            cluster_secret_file=secret, subjects=[SUBJECT], metrics_port=0,
                            interval_s=1.0, retry_s=0.5, membership_poll_s=0.5)
        roster = TrustRoster(
            {s.node_id: load_or_create_signer(s.node_id, s.key_path()).public_key
             for s in settings}
        )
        roster.add(hs.node_id, load_or_create_signer(hs.node_id, hs.key_path()).public_key)
        roster.add(INTRUDER.node_id, INTRUDER.public_key, "writer")
        assert nats.monitor_url is not None
        exporter = NatsExporterStandIn(nats.monitor_url)
        nodes = [WorknodeService(s, roster=roster) for s in settings]
        healer = HealerService(hs, roster=roster)
        try:
            exporter.start()
            for node in nodes:
                await node.start()
            await healer.start()
            yield Stack(nats, exporter, nodes, healer)
        finally:
            await healer.stop()
            for node in nodes:
                await node.stop()
            exporter.stop()


# -- traffic ---------------------------------------------------------------------------------


async def _strong_round(stack: Stack, i: int) -> None:
    """STRONG traffic: a create-if-absent race (one conflict), increments, reads."""
    key = f"{STRONG_PREFIX}{i % 5}"
    for node in stack.nodes:
        strong = node.replica(SUBJECT).strong
        assert strong is not None
        with contextlib.suppress(WorknodeError):
            await strong.create_if_absent(key, "root")
        with contextlib.suppress(WorknodeError):
            await strong.write([Increment(key, ("n",), 1)])
        with contextlib.suppress(WorknodeError):
            await strong.read([key])


async def _replication_round(stack: Stack, i: int) -> None:
    """Every node writes: deltas out from each, deltas in (v1 and v2) at each."""
    for n, node in enumerate(stack.nodes):
        replica = node.replica(SUBJECT)
        key = f"k{(i * 7 + n) % 50}"
        with contextlib.suppress(WorknodeError):
            await replica.write(lambda t, r, ts, key=key, i=i: t.state.assign(r, (key, "v"), i, ts))
            await replica.write(lambda t, r, ts, key=key: t.state.increment(r, (key, "n"), 1))


async def _divergence_round(stack: Stack, i: int) -> None:
    """A LOCAL write is never published: exactly a lost delta, which only the healer repairs
    (divergence, rounds, repaired keys, bytes and heal reports on the healing dashboard)."""
    replica = stack.nodes[i % len(stack.nodes)].replica(SUBJECT)
    with contextlib.suppress(WorknodeError):
        await replica.write(
            lambda t, r, ts: t.state.assign(r, (f"lost{i % 20}", "v"), i, ts), Consistency.LOCAL
        )


async def _hostile_round(transport: NatsTransport, subject: str) -> None:
    """Garbage on the delta subject: refused and counted (rejections by reason)."""
    with contextlib.suppress(WorknodeError):
        await transport.publish(subject, b"\x00\x01 not an envelope")


async def _byzantine_round(transport: NatsTransport, subject: str, sequence: int) -> None:
    """A delta the intruder's roster key signs carrying another replica's dot: refused by
    every node as ``foreign_dot`` and counted with signer ``intruder``."""
    hlc = time.time_ns() // 1_000_000 << 16
    forged = Tree().create("ghost", f"ghost{sequence}", ROOT_ID, hlc)
    envelope = WireCodec().seal(INTRUDER, subject=subject, hlc=hlc, sequence=sequence,
                                document=forged)
    with contextlib.suppress(WorknodeError):
        await transport.publish(subject, envelope)


async def _rpc_round(client: RpcClient, i: int) -> None:
    """RPC calls: reads and writes a token allows, and a write a read-only token is refused
    (``permission_denied``: the error panels and the error-ratio alert have data)."""
    expires = time.time() + 3600
    holder = RPC_CALLER.public_key
    full = mint(ROOT, [Grant(NAMESPACE, SUBJECT, "root", ("*",))], expires_at=expires,
                holder=holder)
    read_only = mint(ROOT, [Grant(NAMESPACE, SUBJECT, "root", ("get",))], expires_at=expires,
                     holder=holder)
    node = f"rpc{i % 5}"
    with contextlib.suppress(RpcError):
        await client.call(SUBJECT, node, "create", token=full)
    with contextlib.suppress(RpcError):
        await client.call(SUBJECT, node, "incr", {"path": "calls", "amount": 1}, token=full)
        await client.call(SUBJECT, node, "get", token=full)
    with contextlib.suppress(RpcError):
        await client.call(SUBJECT, node, "set", {"path": "x", "value": i}, token=read_only)


async def generate_traffic(stack: Stack, *, pause: float = 0.1) -> None:
    """Run traffic rounds until cancelled (or ``MAX_ROUNDS``)."""
    delta_subject = stack.nodes[0].replica(SUBJECT).delta_subject
    async with (
        NatsTransport([stack.nats.url], name="traffic") as hostile,
        NatsTransport([stack.nats.url], name="rpc-client") as rpc_transport,
    ):
        client = RpcClient(rpc_transport, namespace=NAMESPACE,
                           signer=RequestSigner(RPC_CALLER, stack.nodes[0].roster))
        for i in range(MAX_ROUNDS):
            await _replication_round(stack, i)
            if i % 5 == 0:
                await _divergence_round(stack, i)
            if i % 10 == 0:
                await _hostile_round(hostile, delta_subject)
                await _byzantine_round(hostile, delta_subject, i // 10 + 1)
            await _rpc_round(client, i)
            await _strong_round(stack, i)
            await asyncio.sleep(pause)
