"""STRONG under NATS authentication (``render_accounts``): a node and a writer, each its own
nkey user, create the STRONG stream, write through it (compare-and-set, create-if-absent) and
read linearizably with no permission violation; the healer can neither publish to the log nor
use its stream's API. Real nats-server with JetStream, real worknode services."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import nats
import pytest

from broker.codec import Signer, TrustRoster
from broker.crdt import Assign
from broker.strong import strong_stream, strong_subject
from broker.testing import running_nats_server
from broker.transport import (
    ConnectOptions,
    NatsIdentity,
    NatsTransport,
    Role,
    inbox_prefix,
    nkey_seed,
    render_accounts,
)
from broker.transport._auth import strong_stream_name
from services.worknode import WorknodeService, WorknodeSettings

NS = "shop"
SUBJECT = "orders"
ROLES = {"n1": Role.NODE, "w": Role.WRITER, "healer": Role.HEALER}


def _transport(url: str, name: str, seed: bytes) -> NatsTransport:
    options = ConnectOptions((url,), nkey_seed=nkey_seed(seed),
                             inbox_prefix=inbox_prefix(Signer(name, seed).public_key))
    return options.transport(name=name, reconnect_time_wait=0.05, drain_timeout=2.0)


def test_permissions_name_the_stream_the_strong_log_uses() -> None:
    for ns, subject in ((NS, SUBJECT), ("default", "demo"), ("a-b", "c_d")):
        assert strong_stream_name(ns, subject) == strong_stream(ns, subject)


async def test_node_and_writer_use_strong_under_auth_and_the_healer_cannot(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    seeds = {name: Signer.generate(name).seed for name in ROLES}
    # The node has every subject of the namespace (a wildcard grant), the writer one subject
    # (its stream named in its permissions).
    ids = [NatsIdentity(n, role, Signer(n, seeds[n]).public_key, NS,
                        (SUBJECT,) if role is Role.WRITER else ())
           for n, role in ROLES.items()]
    roster = TrustRoster({"n1": Signer("n1", seeds["n1"]).public_key})
    roster.add("w", Signer("w", seeds["w"]).public_key, "writer")
    roster.add("healer", Signer("healer", seeds["healer"]).public_key, "healer")
    for name, seed in seeds.items():
        (tmp_path / f"{name}.key").write_bytes(seed)

    async with running_nats_server(tmp_path / "nats", config_extra=render_accounts(ids),
                                   monitor_port=None) as server:

        def service(name: str) -> WorknodeService:
            return WorknodeService(
                WorknodeSettings(node_id=name, namespace=NS, subjects=[SUBJECT],
                                 nats_urls=[server.url], state_dir=tmp_path / name,
                                 key_file=tmp_path / f"{name}.key", metrics_port=None,
                                 store_sync="normal", flush_interval_ms=2,
                                 strong={SUBJECT: ["acct-"]}, strong_timeout_s=5.0),
                transport=_transport(server.url, name, seeds[name]), roster=roster)

        node, writer = service("n1"), service("w")
        errors: list[str] = []

        async def on_error(exc: Exception) -> None:
            errors.append(str(exc))

        healer = await nats.connect(
            server.url, nkeys_seed_str=nkey_seed(seeds["healer"]), error_cb=on_error,
            inbox_prefix=inbox_prefix(Signer("healer", seeds["healer"]).public_key),
            allow_reconnect=False)
        try:
            await node.start()
            await writer.start()
            ns_, ws_ = node.replica(SUBJECT).strong, writer.replica(SUBJECT).strong
            assert ns_ is not None
            assert ws_ is not None
            v1 = await ns_.create_if_absent("acct-1", "root")
            v2 = await ws_.write([Assign("acct-1", ("owner",), "w")], if_version=v1)
            read = await ns_.read(["acct-1"])
            assert read.versions == {"acct-1": v2}
            assert read.state.value()["acct-1"]["fields"] == {"owner": "w"}
            assert ns_.available
            assert ws_.available

            # The healer: a publish on the log and a stream API request are refused.
            await healer.publish(strong_subject(NS, SUBJECT, "acct-1"), b"forged")
            with pytest.raises(nats.errors.Error):  # no reply: the request was refused
                await healer.request(f"$JS.API.STREAM.INFO.{strong_stream(NS, SUBJECT)}",
                                     b"", timeout=1.0)
            await healer.flush(timeout=5)
            assert any("permissions violation" in e for e in errors), errors
            again = await ns_.read(["acct-1"])
            assert again.versions == {"acct-1": v2}  # nothing reached the log
            assert ns_.entries_refused == 0
        finally:
            await healer.close()
            await writer.stop()
            await node.stop()
        await asyncio.sleep(0)
    violations = [r.getMessage() for r in caplog.records if "violation" in r.getMessage()]
    assert violations == []
