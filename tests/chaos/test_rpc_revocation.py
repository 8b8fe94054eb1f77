"""Revocation across a partition: a token revoked on one side is still honoured on the other
while the network is split (the revocation set is replicated state, not a central service),
and refused there once the network heals and the healer merges the revocation sets."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import pytest

from broker.chaos import NatsCluster
from broker.codec import Signer, TrustRoster
from broker.rpc import (
    Grant,
    RootKey,
    RpcClient,
    StatusCode,
    UnauthenticatedError,
    attenuate,
    inspect,
    mint,
)
from broker.transport import NatsTransport, RequestSigner
from services.healer import HealerService, HealerSettings
from services.worknode import WorknodeService, WorknodeSettings, load_or_create_signer

NS = "default"
SUBJECT = "orders"
ROOT = RootKey(1, b"\x05" * 32)
pytestmark = pytest.mark.slow


async def _eventually(cond, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def test_revoked_on_one_side_refused_on_the_other_after_the_heal(
    tmp_path: Path, nats_cluster: NatsCluster
) -> None:
    secret = tmp_path / "cluster.secret"
    secret.write_bytes(os.urandom(32))
    keyring = tmp_path / "keyring.json"
    keyring.write_text(json.dumps({"1": ROOT.public_key.hex()}))
    placement = {"n1": 0, "n2": 2}
    settings = {
        n: WorknodeSettings(
            node_id=n, namespace=NS, subjects=[SUBJECT], nats_urls=[nats_cluster.urls[i]],
            state_dir=tmp_path / n, metrics_port=None, store_sync="normal",
            cluster_secret_file=secret, rpc_keyring_file=keyring, flush_interval_ms=2,
        )
        for n, i in placement.items()
    }
    hs = HealerSettings(
        nats_urls=[nats_cluster.urls[1]], state_dir=tmp_path / "healer",
        cluster_secret_file=secret, subjects=[SUBJECT, "revocations"], metrics_port=None,
        interval_s=3600, membership_poll_s=0.25,
    )
    roster = TrustRoster(
        {n: load_or_create_signer(n, s.key_path()).public_key for n, s in settings.items()}
    )
    roster.add("healer", load_or_create_signer("healer", hs.key_path()).public_key)
    services = {n: WorknodeService(s, roster=roster) for n, s in settings.items()}
    healer = HealerService(hs, roster=roster)
    side_a = NatsTransport([nats_cluster.urls[0]], name="client-a")
    side_b = NatsTransport([nats_cluster.urls[2]], name="client-b")
    caller = Signer("client", os.urandom(32))  # the tokens' holder: signs every call
    admin = mint(ROOT, [Grant(NS, SUBJECT), Grant(NS, "revocations", "root", ("revoke",))],
                 expires_at=time.time() + 600, holder=caller.public_key)
    user = attenuate(admin, {1: ROOT.public_key}, methods=["get"])
    token_id = inspect(user).token_id
    try:
        for svc in services.values():
            await svc.start()
        await healer.start()
        await side_a.start()
        await side_b.start()
        a = RpcClient(side_a, namespace=NS, signer=RequestSigner(caller, roster))
        b = RpcClient(side_b, namespace=NS, signer=RequestSigner(caller, roster))
        await a.call(SUBJECT, "o1", "create", token=admin)
        for svc in services.values():
            await _eventually(lambda svc=svc: "o1" in svc.replica(SUBJECT).state.value())

        nats_cluster.partition([{0, 1}, {2}])
        await asyncio.sleep(0.5)
        await a.call("revocations", "root", "revoke", {"token_id": token_id}, token=admin)
        assert token_id in services["n1"].rpc.revocations.ids
        with pytest.raises(UnauthenticatedError, match="revoked"):
            await a.call(SUBJECT, "o1", "get", token=user)
        # Side B has not heard of it: the split is real, and B still serves the token.
        await asyncio.sleep(0.5)
        assert token_id not in services["n2"].rpc.revocations.ids
        r = await b.call(SUBJECT, "o1", "get", token=user)
        assert r.status is StatusCode.OK

        nats_cluster.heal()
        await nats_cluster.wait_routes()
        healer.trigger()
        await _eventually(lambda: token_id in services["n2"].rpc.revocations.ids)
        with pytest.raises(UnauthenticatedError, match="revoked"):
            await b.call(SUBJECT, "o1", "get", token=user)
        # The parent token was not revoked, on either side.
        assert (await b.call(SUBJECT, "o1", "get", token=admin)).status is StatusCode.OK
    finally:
        await side_a.stop()
        await side_b.stop()
        await healer.stop()
        for svc in services.values():
            await svc.stop()
