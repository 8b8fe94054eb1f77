"""Hostile review of issue 16 (binding, budgets, revocation, rotation): each test is one
finding, against real processes (a real nats-server, real services)."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest

from broker.codec import ReplayGuard, Signer, TrustRoster, WireCodec
from broker.errors import NoRespondersError
from broker.rpc import (
    Grant,
    ResourceExhaustedError,
    RootKey,
    RpcClient,
    UnavailableError,
    mint,
)
from broker.transport import EmbeddedNatsServer, Msg, NatsTransport, RequestSigner
from services.worknode import WorknodeService, WorknodeSettings, load_or_create_signer
from tests.integration._nodes import SUBJECT, node_settings, run_cli

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


def _key(svc: WorknodeService) -> bytes:
    assert svc.signer is not None
    return svc.signer.public_key


def sample(svc: WorknodeService, name: str, **labels: str) -> float:
    return svc.metrics.registry.get_sample_value(name, labels) or 0.0


ROOT = RootKey(1, bytes(range(32)))


def _rpc_node_settings(tmp_path: Path, url: str, **extra: Any) -> WorknodeSettings:
    """Node n1 serving RPC with a keyring of ``ROOT`` alone (``extra``: more settings)."""
    keyring = tmp_path / "keyring.json"
    keyring.write_text(json.dumps({"1": ROOT.public_key.hex()}))
    return WorknodeSettings(
        node_id="n1", namespace=NS, subjects=[SUBJECT], nats_urls=[url],
        state_dir=tmp_path / "n1", metrics_port=None, store_sync="normal",
        rpc_keyring_file=keyring, **extra)


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
            caller, TrustRoster({"n1": _key(svc)})))
        keyring.write_text(json.dumps({"1": old.public_key.hex(), "2": new.public_key.hex()}))
        await until(lambda: sample(svc, "worknode_key_reloads_total", file="rpc_keyring",
                                   result="ok") == 1, "the keyring reloaded")
        await client.call(SUBJECT, "root", "get", token=token)


# -- finding 2: one holder fills the replay guard and locks every other caller out ----------


async def test_one_holder_flooding_fresh_requests_cannot_lock_other_callers_out(
    tmp_path: Path, nats_server: EmbeddedNatsServer
) -> None:
    """Every signed request is remembered by the node's replay guard for its lifetime (up to
    60 s, the sender's choice), whatever its token grants. A guard of 100 000 entries was
    filled by ONE token holder at ~1.7 k requests/s, and then every caller of the node was
    refused RESOURCE_EXHAUSTED. Here the guard is scaled down (8 entries, 2 per holder);
    the attacker varies its signer label (only a label in RPC) to dodge a per-id share."""
    root = ROOT
    svc = WorknodeService(_rpc_node_settings(tmp_path, nats_server.url))
    attacker_seed, honest_seed = bytes(range(5, 37)), bytes(range(9, 41))
    grants = [Grant(NS, SUBJECT, "root", ("get",))]

    def token(seed: bytes) -> bytes:
        return mint(root, grants, expires_at=time.time() + 600,
                    holder=Signer("x", seed).public_key)

    async with AsyncExitStack() as stack:
        stack.push_async_callback(svc.stop)
        await svc.start()
        assert svc.rpc is not None
        svc.rpc.replay = ReplayGuard(capacity=8, per_signer=2)
        transport = await stack.enter_async_context(
            NatsTransport([nats_server.url], name="client"))
        trust = TrustRoster({"n1": _key(svc)})

        def client(label: str, seed: bytes) -> RpcClient:
            return RpcClient(transport, namespace=NS, default_timeout_ms=30_000,
                             signer=RequestSigner(Signer(label, seed), trust))

        bad = token(attacker_seed)
        refused = 0
        for i in range(8):
            try:
                await client(f"label-{i}", attacker_seed).call(SUBJECT, "root", "get",
                                                               token=bad)
            except ResourceExhaustedError:
                refused += 1
        assert refused == 6  # the attacker's share is 2
        await client("honest", honest_seed).call(SUBJECT, "root", "get",
                                                 token=token(honest_seed))


# -- finding 3: `worknode call --roster` drops roles and previous keys ------------------------



async def _cli(*args: str) -> tuple[int, str, str]:
    return await run_cli(*args, cwd=REPO)


REPO = Path(__file__).resolve().parents[2]


async def test_call_with_roster_accepts_a_node_inside_its_rotation_window(
    tmp_path: Path, nats_server: EmbeddedNatsServer
) -> None:
    """``worknode keys rotate`` writes the node's new key into the roster with the old one
    as ``previous`` (the overlap window) and the node goes on signing with the old key until
    it restarts. ``worknode call --roster`` read the roster with ``read_roster``, which keeps
    only the new key (no previous key, no roles): every reply of the still-running node was
    refused as unauthenticated during the very window meant to keep things running (and any
    roster entry, a writer's or the healer's, counted as a node that may answer)."""
    rc, _, err = await _cli("token", "keygen", "--key-id", "1", "--out",
                            str(tmp_path / "root.key"), "--keyring",
                            str(tmp_path / "keyring.json"))
    assert rc == 0, err
    settings = WorknodeSettings(
        node_id="node-a", namespace="shop", subjects=["orders"], nats_urls=[nats_server.url],
        state_dir=tmp_path / "node-a", metrics_port=None, store_sync="normal",
        rpc_keyring_file=tmp_path / "keyring.json")
    caller = tmp_path / "caller.key"
    caller.write_bytes(os.urandom(32))
    roster = tmp_path / "roster.json"
    running_key = load_or_create_signer("node-a", settings.key_path()).public_key
    roster.write_text(json.dumps({"node-a": running_key.hex()}))
    seed_copy = tmp_path / "rotated.key"  # rotate a copy: the service keeps its seed
    seed_copy.write_bytes(settings.key_path().read_bytes())
    rc, _, err = await _cli("keys", "rotate", "node-a", "--seed", str(seed_copy),
                            "--roster", str(roster), "--overlap", "1h")
    assert rc == 0, err
    async with WorknodeService(settings):
        rc, token, err = await _cli("token", "mint", "--root-key", str(tmp_path / "root.key"),
                                    "--namespace", "shop", "--subject", "orders",
                                    "--holder", f"@{caller}")
        assert rc == 0, err
        rc, _, err = await _cli("call", "orders", "root", "get", "--token", token.strip(),
                                  "--nats-url", nats_server.url, "--namespace", "shop",
                                  "--key", str(caller), "--roster", str(roster))
        assert rc == 0, err


# -- finding 4: a captured RPC request replayed after a restart (or to another node) ---------


class _Recording:
    """A transport that keeps every request it sends (what a node in the queue group, or
    anyone on an open bus, captures)."""

    def __init__(self, inner: NatsTransport) -> None:
        self.inner = inner
        self.sent: list[tuple[str, bytes, dict[str, str] | None]] = []

    @property
    def reply_root(self) -> str:
        return self.inner.reply_root

    async def request(self, subject: str, data: bytes, *, timeout: float,
                      headers: dict[str, str] | None = None) -> Msg:
        self.sent.append((subject, data, headers))
        return await self.inner.request(subject, data, timeout=timeout, headers=headers)


async def _served(call: Callable[[], Awaitable[object]]) -> None:
    """``call`` once a server's endpoints are subscribed (a service's subscriptions reach
    the server a moment after its start returns: NoResponders until then)."""
    deadline = time.monotonic() + WAIT
    while True:
        try:
            await call()
            return
        except (UnavailableError, NoRespondersError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


async def test_a_captured_incr_replayed_after_a_restart_is_refused(
    tmp_path: Path, nats_server: EmbeddedNatsServer
) -> None:
    root = ROOT
    settings = _rpc_node_settings(tmp_path, nats_server.url)
    caller = Signer("caller", bytes(range(5, 37)))
    token = mint(root, [Grant(NS, SUBJECT, "root", ("*",))], expires_at=time.time() + 600,
                 holder=caller.public_key)
    async with AsyncExitStack() as stack:
        inner = await stack.enter_async_context(NatsTransport([nats_server.url], name="c"))
        recording = _Recording(inner)
        svc = WorknodeService(settings)
        stack.push_async_callback(svc.stop)
        await svc.start()
        client = RpcClient(recording, namespace=NS,  # type: ignore[arg-type]
                           default_timeout_ms=30_000, signer=RequestSigner(
                               caller, TrustRoster({"n1": _key(svc)})))
        await _served(lambda: client.call(SUBJECT, "root", "get", token=token))
        await client.call(SUBJECT, "o1", "create", {"parent": "root"}, token=token)
        await client.call(SUBJECT, "o1", "incr", {"path": "n"}, token=token)
        incr = recording.sent[-1]
        await svc.stop()
        again = WorknodeService(settings)
        stack.push_async_callback(again.stop)
        await again.start()
        subject, data, headers = incr
        await _served(lambda: inner.request(subject, data, timeout=10, headers=headers))
        fields = again.replica(SUBJECT).state.value()
        assert fields["o1"]["fields"] == {"n": 1}, fields


# -- finding 5: a writer's key answers "nothing new" to a node's catch-up --------------------


async def test_a_writer_answering_nothing_new_does_not_end_a_nodes_catch_up(
    tmp_path: Path, nats_server: EmbeddedNatsServer
) -> None:
    """The issue's "catch-up can be suppressed" attack, with a writer's key instead of a
    replay: the CLI writer's key (the least guarded one) answers each catch-up request at
    once with a signed, bound, empty delta; the node takes it as its catch-up. Only a node
    should end a catch-up (a writer's state may still be joined)."""
    from broker.crdt import ORMap
    from broker.transport import sync_subject

    writer = Signer("w", bytes(range(7, 39)))
    roster_file = tmp_path / "roster.json"
    roster_file.write_text(json.dumps({"w": {"key": writer.public_key.hex(),
                                              "role": "writer"}}))
    settings = node_settings(tmp_path, nats_server.url, "n1", roster_file=roster_file)
    codec = WireCodec()
    answered: list[str] = []
    async with AsyncExitStack() as stack:
        svc = WorknodeService(settings)
        stack.push_async_callback(svc.stop)
        await svc.start()
        signing = RequestSigner(writer, svc.roster)
        attacker = await stack.enter_async_context(NatsTransport([nats_server.url], name="w"))
        subject = sync_subject(settings.namespace, SUBJECT)

        async def answer(msg: Msg) -> None:
            if (msg.headers or {}).get("Worknode-Sync") != "request" or not msg.reply:
                return
            data = codec.seal(writer, subject=subject, hlc=1 << 16, sequence=1,
                              document=ORMap(is_delta=True))
            await attacker.respond(msg, data, headers=signing.reply_headers(msg, data))
            answered.append(msg.reply)

        await attacker.subscribe(subject, answer)
        await attacker.flush()
        ended = await svc.replica(SUBJECT).catch_up()
        assert answered  # the writer did answer
        assert not ended  # ... but no node did: the catch-up is not over


# -- finding 6: a node signs error replies bound to an unverified request signature ----------


async def test_a_refusal_is_never_bound_to_a_signature_the_node_did_not_verify(
    tmp_path: Path, nats_server: EmbeddedNatsServer
) -> None:
    """Who sees a victim's request (a node; anyone on an open bus) copies its signature into
    the ``Worknode-Auth`` of a junk request of its own to the same node; the node's error
    reply is signed by the node and bound to that signature, and the victim's client accepts
    it as the answer to its own call (first reply wins): a forged "unauthenticated" for a call
    that the node actually served."""
    from broker.codec import AUTH_HEADER, RequestAuth
    from broker.errors import SignatureError
    from broker.transport import rpc_subject

    svc = WorknodeService(_rpc_node_settings(tmp_path, nats_server.url))
    victim = RequestSigner(Signer("victim", bytes(range(5, 37))), TrustRoster())
    async with AsyncExitStack() as stack:
        stack.push_async_callback(svc.stop)
        await svc.start()
        victim.keys = TrustRoster({"n1": _key(svc)})
        transport = await stack.enter_async_context(NatsTransport([nats_server.url], name="a"))
        subject = rpc_subject(NS, SUBJECT, "get")
        # The victim's signed request (what the attacker saw go by).
        _, auth = victim.sign(subject, b"the victim's call", reply_root=transport.reply_root)
        forged = RequestAuth("x", b"n" * 16, auth.issued_ms, auth.expires_ms,
                             transport.reply_root, auth.signature)
        reply = await transport.request(subject, b"junk", timeout=10,
                                        headers={AUTH_HEADER: forged.header()})
        with pytest.raises(SignatureError):
            victim.check_reply(reply, auth, {"n1"})


# -- finding 8: RPC had no per-caller rate limit (the README said every endpoint has one) ----


async def test_rpc_rate_limits_each_token_holder(
    tmp_path: Path, nats_server: EmbeddedNatsServer
) -> None:
    """The README: "every signed endpoint rate-limits each caller". The RPC endpoints did
    not: one holder could take every in-flight slot and all the authorizer's time. Now each
    holder has a bucket (``rpc_rate_per_s``, ``rpc_burst``); another holder is still served."""
    root = ROOT
    svc = WorknodeService(_rpc_node_settings(tmp_path, nats_server.url, rpc_rate_per_s=0.001,
                                             rpc_burst=2))
    seeds = bytes(range(5, 37)), bytes(range(9, 41))

    async with AsyncExitStack() as stack:
        stack.push_async_callback(svc.stop)
        await svc.start()
        transport = await stack.enter_async_context(NatsTransport([nats_server.url], name="c"))
        trust = TrustRoster({"n1": _key(svc)})

        def call(seed: bytes) -> Awaitable[object]:
            signer = Signer("caller", seed)
            token = mint(root, [Grant(NS, SUBJECT, "root", ("get",))],
                         expires_at=time.time() + 600, holder=signer.public_key)
            client = RpcClient(transport, namespace=NS, default_timeout_ms=30_000,
                               signer=RequestSigner(signer, trust))
            return client.call(SUBJECT, "root", "get", token=token)

        await _served(lambda: call(seeds[0]))
        await call(seeds[0])
        with pytest.raises(ResourceExhaustedError):
            await call(seeds[0])
        await call(seeds[1])


# -- finding 9: an unsigned "no responders" status from a writer ends a node's catch-up ------


async def test_a_forged_no_responders_status_does_not_end_a_catch_up(
    tmp_path: Path, nats_server: EmbeddedNatsServer
) -> None:
    """The server's no-responders answer is an empty message whose only header is
    ``Status: 503``; nats-py parses an ordinary header ``Status: 503`` into the same dict.
    A writer (it may answer catch-up requests) answers each one that way, unsigned, before
    the real peer: the node's catch-up ends with no reply ("no_peer") although n2 answers.
    Here n2's answer is held until the writer has answered (the race the writer wins)."""
    from broker.transport import sync_subject

    writer = Signer("w", bytes(range(7, 39)))
    roster_file = tmp_path / "roster.json"
    names = ["n1", "n2"]
    keys = {n: load_or_create_signer(n, tmp_path / n / f"{n}.key").public_key for n in names}
    roster_file.write_text(json.dumps({
        **{n: k.hex() for n, k in keys.items()},
        "w": {"key": writer.public_key.hex(), "role": "writer"}}))
    s1, s2 = (node_settings(tmp_path, nats_server.url, n, roster_file=roster_file)
              for n in names)
    async with AsyncExitStack() as stack:
        attacker = await stack.enter_async_context(NatsTransport([nats_server.url], name="w"))
        subject = sync_subject(s1.namespace, SUBJECT)
        answered: dict[str, asyncio.Event] = {}

        def event(reply: str) -> asyncio.Event:
            return answered.setdefault(reply, asyncio.Event())

        async def answer(msg: Msg) -> None:
            headers = msg.headers or {}
            if headers.get("Worknode-Sync") != "request" or not msg.reply:
                return
            await attacker.publish(msg.reply, b"", headers={"Status": "503"})
            await attacker.flush()  # at the server before n2's answer is let go
            event(msg.reply).set()

        await attacker.subscribe(subject, answer)
        await attacker.flush()
        n2 = WorknodeService(s2)
        stack.push_async_callback(n2.stop)
        await n2.start()
        replica2 = n2.replica(SUBJECT)
        send_state = replica2._send_state

        async def held(action: Any) -> None:
            await event(action.reply_to.reply).wait()  # the writer answers first
            await send_state(action)

        replica2._send_state = held  # type: ignore[method-assign]
        n1 = WorknodeService(s1)
        stack.push_async_callback(n1.stop)
        await n1.start()
        assert await n1.replica(SUBJECT).catch_up()  # n2 answered
