"""The real services fit their roles' permissions: two worknodes (replicas, catch-up, healing
endpoints, RPC with a nested call), a writer, the healer, a reader and an RPC caller, each
connected as its own nkey user of a server whose accounts block ``render_accounts`` generated,
do their whole job and the server reports no permission violation to any of them.

This is what keeps the permission model honest from the other side: the tests in
``test_nats_permissions.py`` show that each role can do no more; this one shows that each
role can do all it needs (a subject the code uses but the model forgot fails here).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from broker.codec import Signer, TrustRoster
from broker.replica import Consistency
from broker.rpc import CallContext, Grant, MethodRegistry, RootKey, RpcClient, mint
from broker.testing import running_nats_server
from broker.transport import (
    ConnectOptions,
    Msg,
    NatsIdentity,
    NatsTransport,
    RequestSigner,
    Role,
    delta_subject,
    heal_subject,
    inbox_prefix,
    nkey_seed,
    render_accounts,
)
from services.healer import HealerService, HealerSettings
from services.worknode import WorknodeService, WorknodeSettings

NS = "shop"
SUBJECT = "orders"
ROOT = RootKey(1, bytes(range(32)))
WAIT = 15.0  # a bound on waiting for what must happen, never an assertion

ROLES = {"n1": Role.NODE, "n2": Role.NODE, "n3": Role.NODE, "healer": Role.HEALER,
         "w": Role.WRITER, "r": Role.READER, "c": Role.CALLER}


def nkey_transport(url: str, name: str, seed: bytes) -> NatsTransport:
    """A transport connected as identity ``name``."""
    options = ConnectOptions((url,), nkey_seed=nkey_seed(seed),
                             inbox_prefix=inbox_prefix(Signer(name, seed).public_key))
    return options.transport(name=name, reconnect_time_wait=0.05, drain_timeout=2.0)


def relay_registry() -> MethodRegistry:
    reg = MethodRegistry()

    @reg.method("relay")
    async def relay(ctx: CallContext) -> dict[str, Any]:
        # A nested call: the node publishes an RPC request itself.
        r = await ctx.call(ctx.subject, str(ctx.arguments["target"]), "get", methods=["get"])
        return {"relayed": str(r.result.get("worknode", ""))}

    return reg


async def until(cond: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0.02)


async def test_every_role_does_its_whole_job_without_a_permission_violation(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    seeds = {name: Signer.generate(name).seed for name in ROLES}
    ids = [NatsIdentity(n, role, Signer(n, seeds[n]).public_key, NS,
                        (SUBJECT,) if role in (Role.READER, Role.CALLER, Role.WRITER) else ())
           for n, role in ROLES.items()]
    secret = tmp_path / "cluster.secret"
    secret.write_bytes(os.urandom(32))
    keyring = tmp_path / "keyring.json"
    keyring.write_text(json.dumps({"1": ROOT.public_key.hex()}))
    roster = TrustRoster({n: i.public_key for n, i in zip(ROLES, ids, strict=True)
                          if i.role is not Role.READER and i.role is not Role.CALLER})
    for name, seed in seeds.items():  # each service signs with the key its NATS user is
        (tmp_path / f"{name}.key").write_bytes(seed)

    async with running_nats_server(tmp_path / "nats", config_extra=render_accounts(ids),
                                   monitor_port=None) as server:
        transports = {n: nkey_transport(server.url, n, seeds[n]) for n in ROLES}
        nodes = [
            WorknodeService(
                WorknodeSettings(
                    node_id=n, namespace=NS, subjects=[SUBJECT], nats_urls=[server.url],
                    state_dir=tmp_path / n, key_file=tmp_path / f"{n}.key", metrics_port=None,
                    store_sync="normal", cluster_secret_file=secret, rpc_keyring_file=keyring,
                    flush_interval_ms=2),
                transport=transports[n], roster=roster, rpc_methods=relay_registry())
            for n in ("n1", "n2")
        ]
        writer = WorknodeService(  # as `worknode set` runs it: replicas only
            WorknodeSettings(node_id="w", namespace=NS, subjects=[SUBJECT],
                             nats_urls=[server.url], state_dir=tmp_path / "w",
                             key_file=tmp_path / "w.key", metrics_port=None,
                             store_sync="normal", flush_interval_ms=2),
            transport=transports["w"], roster=roster)
        healer = HealerService(
            HealerSettings(namespace=NS, nats_urls=[server.url], state_dir=tmp_path / "healer",
                           key_file=tmp_path / "healer.key", cluster_secret_file=secret,
                           subjects=[SUBJECT], metrics_port=None, interval_s=3600,
                           # a one-shot heal waits this long for both replicas' answers: a
                           # bound generous enough for a loaded machine
                           discover_timeout_s=2.0),
            transport=transports["healer"], roster=roster)
        try:
            reader = transports["r"]
            await reader.start()
            deltas: list[Msg] = []
            reports: list[Msg] = []

            async def on_delta(msg: Msg) -> None:
                deltas.append(msg)

            async def on_report(msg: Msg) -> None:
                reports.append(msg)

            await reader.subscribe(delta_subject(NS, SUBJECT), on_delta)
            await reader.subscribe(heal_subject(NS, SUBJECT), on_report)
            for node in nodes:
                await node.start()
            r1, r2 = (node.replica(SUBJECT) for node in nodes)

            # the writer writes; both nodes and the reader see it (it caught up first)
            await writer.start()
            await writer.replica(SUBJECT).write(
                lambda t, r, ts: t.state.assign(r, ("from-w", "v"), 1, ts))
            await writer.replica(SUBJECT).flush()
            await until(lambda: all("from-w" in r.state.value() for r in (r1, r2)))
            await until(lambda: bool(deltas))

            # A node that joins later catches up from the others, which forward the writer's
            # signed batches ahead of their answer as evidence: many replies to one request
            # (seven batches here; the permission model allows a node EVIDENCE_REPLIES more).
            for i in range(6):
                await writer.replica(SUBJECT).write(
                    lambda t, r, ts, i=i: t.state.assign(r, (f"more-{i}", "v"), i, ts))
                await writer.replica(SUBJECT).flush()
            await until(lambda: all(f"more-{i}" in r.state.value()
                                    for i in range(6) for r in (r1, r2)))
            await writer.stop()  # the nodes alone hold its writes, and its batches
            late = WorknodeService(
                WorknodeSettings(
                    node_id="n3", namespace=NS, subjects=[SUBJECT], nats_urls=[server.url],
                    state_dir=tmp_path / "n3", key_file=tmp_path / "n3.key",
                    metrics_port=None, store_sync="normal", flush_interval_ms=2),
                transport=transports["n3"], roster=roster)
            async with late:
                r3 = late.replica(SUBJECT)
                await until(lambda: all(f"more-{i}" in r3.state.value() for i in range(6)))

            # The writer is done (as `worknode set` exits): nothing of its own announces
            # any more. A write n2 never hears of (LOCAL: not published, and no announce
            # shows it before the healer has compared the replicas); the healer repairs it
            # and reports.
            await r1.write(lambda t, r, ts: t.state.assign(r, ("lost", "v"), 2, ts),
                           Consistency.LOCAL)
            async with healer:
                healed = await healer.heal_subject(SUBJECT, ["n1", "n2"])
                assert healed.converged
                assert healed.keys_repaired >= 1
                assert r2.state.value()["lost"] == r1.state.value()["lost"]
                await until(lambda: bool(reports))
                # and discovery: both replicas answer the healer's $SRV.INFO
                (outcome,) = await healer.heal_all()
                assert sorted(outcome.replicas) == ["n1", "n2"]

            # a caller calls a method, one that makes a nested call too
            # (signed with its own key, the token's holder; replies signed by a node)
            caller = Signer("c", seeds["c"])
            client = RpcClient(transports["c"], namespace=NS,
                               signer=RequestSigner(caller, roster))
            await transports["c"].start()
            token = mint(ROOT, [Grant(NS, SUBJECT, "root", ("*",))],
                         expires_at=time.time() + 3600, holder=caller.public_key)
            await client.call(SUBJECT, "o1", "create", token=token)
            await client.call(SUBJECT, "o2", "create", token=token)
            await until(lambda: all("o2" in r.state.value() for r in (r1, r2)))
            relayed = await client.call(SUBJECT, "o1", "relay", {"target": "o2"}, token=token)
            assert relayed.result == {"relayed": "o2"}

            for transport in transports.values():  # every -ERR the server sent has arrived
                await transport.flush()
        finally:
            await healer.stop()
            await writer.stop()
            for node in nodes:
                await node.stop()
            for transport in transports.values():
                await transport.stop()
    violations = [r.getMessage() for r in caplog.records if "violation" in r.getMessage()]
    assert violations == []
