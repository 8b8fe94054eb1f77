"""Hostile review of issue 16 (binding, budgets, revocation, rotation): each test is one
finding, against real processes (a real nats-server, real services)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path

import pytest

from broker.codec import Signer, TrustRoster
from broker.rpc import Grant, RootKey, RpcClient, mint
from broker.transport import EmbeddedNatsServer, NatsTransport, RequestSigner
from services.worknode import WorknodeService, WorknodeSettings
from tests.integration._nodes import SUBJECT

WAIT = 30.0
POLL = 0.05
NS = "shop"


async def until(cond: Callable[[], bool], what: str) -> None:
    """Wait for ``cond`` (a generous bound only so a broken build fails instead of hanging)."""
    deadline = time.monotonic() + WAIT
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        await asyncio.sleep(0.02)


def sample(svc: WorknodeService, name: str, **labels: str) -> float:
    return svc.metrics.registry.get_sample_value(name, labels) or 0.0


# -- finding 1: a root key ADDED to the keyring by a reload ----------------------------------


async def test_rpc_root_key_added_by_a_reload_is_honoured_by_the_authorizer_pool(
    tmp_path: Path, nats_server: EmbeddedNatsServer
) -> None:
    """Rotation of the RPC root key: the new key is added to the keyring file and the
    service reloads it. Its tokens must work without a restart. (The jobs sent to the
    authorizer pool carried the keyring of the start, so the worker refused every token of
    the new key: UNAUTHENTICATED until restart.)"""
    old, new = RootKey(1, bytes(range(32))), RootKey(2, bytes(range(1, 33)))
    keyring = tmp_path / "keyring.json"
    keyring.write_text(json.dumps({"1": old.public_key.hex()}))
    svc = WorknodeService(WorknodeSettings(
        node_id="n1", namespace=NS, subjects=[SUBJECT], nats_urls=[nats_server.url],
        state_dir=tmp_path / "n1", metrics_port=None, store_sync="normal",
        rpc_keyring_file=keyring, key_reload_interval_s=POLL))
    caller = Signer("caller", bytes(range(5, 37)))
    token = mint(new, [Grant(NS, SUBJECT, "root", ("*",))], expires_at=time.time() + 600,
                 holder=caller.public_key)
    async with AsyncExitStack() as stack:
        stack.push_async_callback(svc.stop)
        await svc.start()
        transport = await stack.enter_async_context(
            NatsTransport([nats_server.url], name="client"))
        client = RpcClient(transport, namespace=NS, signer=RequestSigner(
            caller, TrustRoster({"n1": svc.signer.public_key})))
        keyring.write_text(json.dumps({"1": old.public_key.hex(), "2": new.public_key.hex()}))
        await until(lambda: sample(svc, "worknode_key_reloads_total", file="rpc_keyring",
                                   result="ok") == 1, "the keyring reloaded")
        await client.call(SUBJECT, "root", "get", token=token)
