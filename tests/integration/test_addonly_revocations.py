"""The revocation set is add-only at every replica, against a stolen roster key (issue 17).

A real nats-server and three real worknode services serving RPC, with real SQLite stores. A
client revokes a token id through the ``revoke`` RPC; node-c is restarted (fresh process
state: its revocation list remembers only what its store holds). Then the attacker, holding
node-b's roster key, seals envelopes with it and publishes them on the revocation subject's
delta subject: an OR-set remove of the id, then a full state that holds nothing (so not the
id) with a context that saw the id. Every node keeps the id in its replicated set at every
moment (a change listener watches each join), the revoked token stays refused, and node-a
and node-c count both envelopes in ``worknode_byzantine_rejected_total{reason="removal",
signer="node-b"}``.

On the base commit (dc837b9) this fails: both envelopes are joined, the id leaves every
node's set (the revocation list then writes it again from memory), and no removal is
counted.
"""

from __future__ import annotations

import json
import time
from collections.abc import Collection
from pathlib import Path

import pytest

from broker.codec import Signer, TrustRoster, WireCodec
from broker.crdt import ORMap
from broker.replica import Replica
from broker.rpc import Grant, RootKey, RpcClient, UnauthenticatedError, attenuate, inspect, mint
from broker.transport import EmbeddedNatsServer, NatsTransport, RequestSigner, delta_subject
from services.worknode import WorknodeService, WorknodeSettings, load_or_create_signer
from tests.integration._nodes import eventually

NS = "shop"
SUBJECT = "orders"
REVOCATIONS = "revocations"
DELTA = delta_subject(NS, REVOCATIONS)
ROOT = RootKey(1, bytes(range(32)))
CLIENT = Signer("client", bytes(range(64, 96)))
NODES = ("node-a", "node-b", "node-c")
HONEST = ("node-a", "node-c")


def _removals(svc: WorknodeService) -> float:
    value = svc.metrics.registry.get_sample_value(
        "worknode_byzantine_rejected_total",
        {"subject": REVOCATIONS, "reason": "removal", "signer": "node-b"})
    return value or 0.0


def _holds(replica: Replica, token_id: str) -> bool:
    value = replica.state.get(("revoked",))
    return isinstance(value, frozenset) and token_id in value


class Cluster:
    """Three RPC nodes; ``absent``: (node, moment) each time a node's replicated set lacked
    the revoked id after a join (watched from the revocation)."""

    def __init__(self, tmp: Path, url: str) -> None:
        keyring = tmp / "keyring.json"
        keyring.write_text(json.dumps({"1": ROOT.public_key.hex()}))
        self.settings = {
            n: WorknodeSettings(
                node_id=n, namespace=NS, subjects=[SUBJECT], nats_urls=[url],
                state_dir=tmp / n, metrics_port=None, store_sync="normal",
                rpc_keyring_file=keyring, flush_interval_ms=2,
            )
            for n in NODES
        }
        self.roster = TrustRoster({
            n: load_or_create_signer(n, s.key_path()).public_key
            for n, s in self.settings.items()})
        self.stolen = load_or_create_signer("node-b", self.settings["node-b"].key_path())
        self.svcs: dict[str, WorknodeService] = {}
        self.watched: str | None = None
        self.absent: list[str] = []

    async def start(self, name: str) -> WorknodeService:
        svc = WorknodeService(self.settings[name], roster=self.roster)
        self.svcs[name] = svc
        await svc.start()
        if self.watched is not None:
            self.watch(name)
        return svc

    async def stop(self, name: str) -> None:
        await self.svcs.pop(name).stop()

    async def stop_all(self) -> None:
        for name in list(self.svcs):
            await self.stop(name)

    def holds(self, name: str, token_id: str) -> bool:
        return _holds(self.svcs[name].replica(REVOCATIONS), token_id)

    def watch(self, name: str) -> None:
        replica = self.svcs[name].replica(REVOCATIONS)

        def changed(keys: Collection[str] | None) -> None:
            if self.watched is not None and not _holds(replica, self.watched):
                self.absent.append(name)

        replica.add_change_listener(changed)

    def seal(self, document: ORMap, sequence: int) -> bytes:
        """``document`` as node-b's stolen key signs it."""
        return WireCodec().seal(
            self.stolen, subject=DELTA, hlc=time.time_ns() // 1_000_000 << 16,
            sequence=sequence, document=document)


async def test_a_stolen_key_cannot_remove_a_revoked_id(
    tmp_path: Path, nats_server: EmbeddedNatsServer
) -> None:
    c = Cluster(tmp_path, nats_server.url)
    try:
        for name in NODES:
            await c.start(name)
        admin = mint(ROOT, [Grant(NS, SUBJECT, "root", ("*",))],
                     expires_at=time.time() + 3600, holder=CLIENT.public_key)
        user = attenuate(admin, {1: ROOT.public_key}, methods=["get"])
        revoker = mint(ROOT, [Grant(NS, REVOCATIONS, "root", ("revoke",))],
                       expires_at=time.time() + 3600, holder=CLIENT.public_key)
        token_id = inspect(user).token_id
        async with NatsTransport([nats_server.url], name="rpc-client") as transport:
            client = RpcClient(transport, namespace=NS,
                               signer=RequestSigner(CLIENT, c.svcs["node-a"].roster))
            await client.call(REVOCATIONS, "root", "revoke", {"token_id": token_id},
                              token=revoker)
            for name in NODES:
                await eventually(lambda name=name: c.holds(name, token_id), 20,  # type: ignore[misc]
                                 f"{name} holds the revoked id")
            # node-c restarts: its process remembers only what its store holds.
            await c.stop("node-c")
            await c.start("node-c")
            assert c.holds("node-c", token_id)
            c.watched = token_id
            for name in NODES:
                c.watch(name)

            state = c.svcs["node-c"].replica(REVOCATIONS).state.copy()
            remove = state.discard("node-b", ("revoked",), token_id)
            # A full state holding none of it (only node-b's own dots may be in a store
            # node-b signs), whose context saw everything: it removes every id.
            full = ORMap(None, state.context.copy(), is_delta=False)
            seq = c.svcs["node-b"].replica(REVOCATIONS).machine.sequence
            async with NatsTransport([nats_server.url], name="attacker") as attacker:
                await attacker.publish(DELTA, c.seal(remove, seq + 1))
                await attacker.publish(DELTA, c.seal(full, seq + 2))
            for name in HONEST:
                svc = c.svcs[name]
                await eventually(
                    lambda svc=svc, name=name: (  # type: ignore[misc]
                        _removals(svc) >= 2 or name in c.absent),
                    20, f"{name} handled both envelopes")
                assert name not in c.absent, f"{name}'s set lost the revoked id"
                assert _removals(svc) == 2
            # A marker: a later honest revoke reaches every node, so the envelopes before it
            # were handled everywhere (node-b's own service drops its key's echo unopened).
            marker = inspect(mint(ROOT, [Grant(NS, SUBJECT, "root", ("get",))],
                                  expires_at=time.time() + 60,
                                  holder=CLIENT.public_key)).token_id
            await client.call(REVOCATIONS, "root", "revoke", {"token_id": marker},
                              token=revoker)
            for name in NODES:
                await eventually(lambda name=name: c.holds(name, marker), 20,  # type: ignore[misc]
                                 f"{name} holds the second revoked id")
                assert c.holds(name, token_id)
                assert token_id in c.svcs[name].rpc.revocations.ids  # type: ignore[union-attr]
                assert c.svcs[name].rpc.revocations.readded == 0  # type: ignore[union-attr]
            assert c.absent == []
            for _ in range(3):  # the queue group spreads these over the nodes
                with pytest.raises(UnauthenticatedError, match="revoked"):
                    await client.call(SUBJECT, "root", "get", token=user)
    finally:
        await c.stop_all()
