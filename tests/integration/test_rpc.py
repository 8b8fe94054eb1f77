"""Capability-checked RPC against a real nats-server: two worknode services serving one
subject, a client, and tokens minted with the cluster root key for the client's key (the
client signs every request with it and checks every reply is signed by a node)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import psutil
import pytest

from broker.codec import Signer, TrustRoster, WireCodec
from broker.rpc import (
    MAX_CALL_DEPTH,
    CallContext,
    CallDepthExceededError,
    DeadlineExceededError,
    FailedPreconditionError,
    Grant,
    MethodRegistry,
    PermissionDeniedError,
    ResourceExhaustedError,
    RootKey,
    RpcClient,
    RpcInvalidArgumentError,
    RpcNotFoundError,
    StatusCode,
    UnauthenticatedError,
    UnavailableError,
    attenuate,
    decode_response,
    inspect,
    mint,
)
from broker.transport import (
    ERROR_CODE_HEADER,
    NatsTransport,
    RequestSigner,
    discover,
    rpc_subject,
)
from services.worknode import WorknodeService, WorknodeSettings, load_or_create_signer

NS = "shop"
SUBJECT = "orders"
ROOT = RootKey(1, bytes(range(32)))
ROTATED = RootKey(2, bytes(range(1, 33)))
MAX_IN_FLIGHT = 16
CLIENT = Signer("client", bytes(range(64, 96)))
"""The caller: tokens are minted for its key, and it signs every request with it."""


def _registry(events: dict[str, Any]) -> MethodRegistry:
    reg = MethodRegistry()

    @reg.method("slow")
    async def slow(ctx: CallContext) -> dict[str, Any]:
        events["slow_started"] = events.get("slow_started", 0) + 1
        await asyncio.sleep(float(ctx.arguments.get("seconds", 2.0)))
        events["slow_finished"] = events.get("slow_finished", 0) + 1
        return {"done": True}

    @reg.method("busy")
    def busy(ctx: CallContext) -> dict[str, Any]:
        # A plain function: runs inline on the receive path, with no task and no timer.
        events["busy_started"] = events.get("busy_started", 0) + 1
        time.sleep(float(ctx.arguments.get("seconds", 0.0)))
        return {"busy": True}

    @reg.method("chain")
    async def chain(ctx: CallContext) -> dict[str, Any]:
        # Calls itself on the same worknode: only MAX_CALL_DEPTH ends the recursion.
        events.setdefault("depths", []).append(ctx.depth)
        events.setdefault("deadlines", []).append(ctx.remaining_ms())
        r = await ctx.call(ctx.subject, ctx.worknode, "chain")
        return dict(r.result)

    @reg.method("relay")
    async def relay(ctx: CallContext) -> dict[str, Any]:
        target = str(ctx.arguments["target"])
        r = await ctx.call(ctx.subject, target, "get", methods=["get"])
        return {"relayed": str(r.result.get("worknode", ""))}

    return reg


@asynccontextmanager
async def _cluster(
    tmp: Path, url: str, events: dict[str, Any], names: tuple[str, ...] = ("n1", "n2")
) -> AsyncIterator[dict[str, WorknodeService]]:
    keyring = tmp / "keyring.json"
    keyring.write_text(json.dumps({"1": ROOT.public_key.hex(), "2": ROTATED.public_key.hex()}))
    settings = {
        n: WorknodeSettings(
            node_id=n, namespace=NS, subjects=[SUBJECT], nats_urls=[url], state_dir=tmp / n,
            metrics_port=None, store_sync="normal", rpc_keyring_file=keyring,
            rpc_max_in_flight=MAX_IN_FLIGHT, flush_interval_ms=2,
            # The in-flight bound is what these tests flood, not the per-holder rate limit
            # (tests/integration/test_review_i16.py covers that one).
            rpc_rate_per_s=1e6, rpc_burst=1_000_000,
        )
        for n in names
    }
    roster = node_roster(settings)
    services = {
        n: WorknodeService(s, roster=roster, rpc_methods=_registry(events))
        for n, s in settings.items()
    }
    try:
        for svc in services.values():
            await svc.start()
        yield services
    finally:
        for svc in services.values():
            await svc.stop()


def node_roster(settings: dict[str, WorknodeSettings]) -> TrustRoster:
    """The nodes' keys (created now if new): whose replies a client accepts."""
    return TrustRoster(
        {n: load_or_create_signer(n, s.key_path()).public_key for n, s in settings.items()}
    )


def _token(*, methods: tuple[str, ...] = ("*",), worknode: str = "root", subject: str = SUBJECT,
           expires_in: float = 3600, root: RootKey = ROOT) -> bytes:
    return mint(root, [Grant(NS, subject, worknode, methods)], expires_at=time.time() + expires_in,
                holder=CLIENT.public_key)


@pytest.fixture
async def client(nats_server, nodes):
    transport = NatsTransport([nats_server.url], name="rpc-client")
    async with transport:
        yield RpcClient(transport, namespace=NS,
                        signer=RequestSigner(CLIENT, nodes["n1"].roster))


@pytest.fixture
async def nodes(tmp_path, nats_server):
    events: dict[str, Any] = {}
    async with _cluster(tmp_path, nats_server.url, events) as services:
        services["n1"].events = events  # type: ignore[attr-defined]
        yield services


async def _eventually(cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def _create(nodes, client, node: str, token: bytes) -> None:
    """Create a worknode and wait until every replica has it (requests go to any node)."""
    await client.call(SUBJECT, node, "create", token=token)
    for svc in nodes.values():
        await _eventually(lambda svc=svc: node in svc.replica(SUBJECT).state.value())


def _sample(svc: WorknodeService, name: str, **labels: str) -> float:
    value = svc.metrics.registry.get_sample_value(name, labels)
    return value or 0.0


async def test_allowed_calls_read_and_mutate_through_the_replica(nodes, client) -> None:
    token = _token()
    await _create(nodes, client, "o1", token)
    await client.call(SUBJECT, "o1", "set", {"path": "total", "value": 1250}, token=token)
    await client.call(SUBJECT, "o1", "incr", {"path": "views", "amount": 2}, token=token)
    # The mutation was persisted and replicated: both replicas show it.
    for svc in nodes.values():
        await _eventually(
            lambda svc=svc: svc.replica(SUBJECT).state.value().get("o1", {}).get("fields", {})
            == {"total": 1250, "views": 2}
        )
    got = await client.call(SUBJECT, "o1", "get", token=token)
    assert got.result == {"worknode": "o1"}
    assert got.state is not None
    assert got.state.value()["o1"]["fields"] == {"total": 1250, "views": 2}


async def test_micro_discovery_lists_the_rpc_endpoints(nodes, client) -> None:
    found = await discover(client.transport, "worknode-rpc", timeout=1.0)
    assert sorted(s.metadata["node"] for s in found) == ["n1", "n2"]
    subjects = {subj for _, subj in found[0].endpoints}
    assert rpc_subject(NS, SUBJECT, "get") in subjects
    assert rpc_subject(NS, "revocations", "revoke") in subjects
    pings = await client.transport.request_many("$SRV.PING.worknode-rpc", b"", timeout=1.0)
    assert len(pings) == 2
    await client.call(SUBJECT, "root", "get", token=_token())
    stats = await client.transport.request_many("$SRV.STATS.worknode-rpc", b"", timeout=1.0)
    served = sum(
        e["num_requests"] for m in stats for e in json.loads(m.data)["endpoints"]
        if e["subject"] == rpc_subject(NS, SUBJECT, "get")
    )
    assert served == 1


async def test_refused_tokens_get_the_right_code(nodes, client) -> None:
    admin = _token()
    await _create(nodes, client, "o1", admin)
    await _create(nodes, client, "o2", admin)
    with pytest.raises(UnauthenticatedError):  # missing
        await client.call(SUBJECT, "o1", "get", token=b"")
    with pytest.raises(UnauthenticatedError, match="expired"):
        await client.call(SUBJECT, "o1", "get", token=_token(expires_in=-5))
    forged = _token(root=RootKey(1, b"\x07" * 32))  # right key id, wrong key
    with pytest.raises(UnauthenticatedError):
        await client.call(SUBJECT, "o1", "get", token=forged)
    with pytest.raises(UnauthenticatedError):  # unknown key id
        await client.call(SUBJECT, "o1", "get", token=_token(root=RootKey(9, b"\x09" * 32)))
    with pytest.raises(PermissionDeniedError):  # wrong subject
        await client.call(SUBJECT, "o1", "get", token=_token(subject="users"))
    # A key id added by rotation verifies.
    assert (await client.call(SUBJECT, "o1", "get", token=_token(root=ROTATED))).status \
        is StatusCode.OK
    # Attenuated: only get, only o1's subtree.
    keyring = {1: ROOT.public_key}
    narrow = attenuate(admin, keyring, methods=["get"], worknode="o1")
    assert (await client.call(SUBJECT, "o1", "get", token=narrow)).status is StatusCode.OK
    with pytest.raises(PermissionDeniedError):
        await client.call(SUBJECT, "o2", "get", token=narrow)
    with pytest.raises(PermissionDeniedError):
        await client.call(SUBJECT, "o1", "set", {"path": "x", "value": 1}, token=narrow)
    # Widened: a holder appends a block claiming more rights; later blocks' facts are ignored.
    import biscuit_auth as bi

    reader = _token(methods=("get",))
    parsed = bi.Biscuit.from_bytes(
        reader, lambda kid: bi.PublicKey.from_bytes(ROOT.public_key, bi.Algorithm.Ed25519)
    )
    widened = bytes(parsed.append(bi.BlockBuilder(
        f'right("{NS}", "{SUBJECT}", "root", "set"); right("{NS}", "{SUBJECT}", "root", "*");'
    )).to_bytes())
    with pytest.raises(PermissionDeniedError):
        await client.call(SUBJECT, "o1", "set", {"path": "x", "value": 1}, token=widened)
    # No such worknode: NOT_FOUND only for a token that could see it.
    with pytest.raises(RpcNotFoundError):
        await client.call(SUBJECT, "nope", "get", token=admin)
    with pytest.raises(PermissionDeniedError):
        await client.call(SUBJECT, "nope", "get", token=narrow)
    with pytest.raises(UnauthenticatedError):
        await client.call(SUBJECT, "nope", "get", token=forged)


async def test_a_revoked_token_is_refused_everywhere(nodes, client) -> None:
    admin = _token()
    await _create(nodes, client, "o1", admin)
    user = attenuate(admin, {1: ROOT.public_key}, methods=["get"])
    for _ in range(4):  # both nodes have verified (and cached) it
        await client.call(SUBJECT, "o1", "get", token=user)
    revoker = mint(ROOT, [Grant(NS, "revocations", "root", ("revoke",))],
                   expires_at=time.time() + 60, holder=CLIENT.public_key)
    with pytest.raises(PermissionDeniedError):  # revoking needs its own right
        await client.call("revocations", "root", "revoke",
                          {"token_id": inspect(user).token_id}, token=admin)
    await client.call("revocations", "root", "revoke", {"token_id": inspect(user).token_id},
                      token=revoker)
    for svc in nodes.values():
        await _eventually(lambda svc=svc: inspect(user).token_id in svc.rpc.revocations.ids)
    for _ in range(4):  # the queue group spreads these over both nodes
        with pytest.raises(UnauthenticatedError, match="revoked"):
            await client.call(SUBJECT, "o1", "get", token=user)
    # The parent token was not revoked.
    assert (await client.call(SUBJECT, "o1", "get", token=admin)).status is StatusCode.OK


async def test_call_chains_stop_at_max_call_depth(nodes, client) -> None:
    admin = _token()
    await _create(nodes, client, "o1", admin)
    with pytest.raises(CallDepthExceededError):
        await client.call(SUBJECT, "o1", "chain", token=admin, timeout_ms=10_000)
    events = nodes["n1"].events
    assert sorted(events["depths"]) == list(range(MAX_CALL_DEPTH + 1))
    # Each hop passed on what remained: deadlines only shrink along the chain.
    deadlines = events["deadlines"]
    assert deadlines == sorted(deadlines, reverse=True)
    assert deadlines[0] <= 10_000


async def test_nested_calls_carry_an_attenuated_token(nodes, client) -> None:
    admin = _token()
    await _create(nodes, client, "o1", admin)
    await _create(nodes, client, "o2", admin)
    r = await client.call(SUBJECT, "o1", "relay", {"target": "o2"}, token=admin)
    assert r.result == {"relayed": "o2"}


async def test_a_slow_handler_yields_deadline_exceeded_and_its_result_is_discarded(
    nodes, client
) -> None:
    admin = _token()
    await _create(nodes, client, "o1", admin)
    events = nodes["n1"].events
    t0 = time.monotonic()
    with pytest.raises(DeadlineExceededError):
        await client.call(SUBJECT, "o1", "slow", {"seconds": 1.5}, token=admin, timeout_ms=200)
    assert time.monotonic() - t0 < 1.4
    await asyncio.sleep(1.8)
    assert events["slow_started"] == 1
    assert events.get("slow_finished", 0) == 0  # cancelled at the deadline, never completed
    total = sum(
        _sample(s, "worknode_rpc_requests_total", method="slow", code="deadline_exceeded")
        for s in nodes.values()
    )
    assert total == 1
    # A request whose deadline already passed is dropped, not run.
    with pytest.raises(DeadlineExceededError):
        await client.call(SUBJECT, "o1", "slow", {"seconds": 0.01}, token=admin, timeout_ms=0)
    assert events["slow_started"] == 1


async def test_a_plain_function_handler_answers_inline_and_a_late_result_is_discarded(
    nodes, client
) -> None:
    admin = _token()
    await _create(nodes, client, "o1", admin)
    r = await client.call(SUBJECT, "o1", "busy", token=admin)
    assert r.result == {"busy": True}
    # It cannot be cancelled, but a result ready after the deadline is never sent.
    with pytest.raises(DeadlineExceededError):
        await client.call(SUBJECT, "o1", "busy", {"seconds": 0.3}, token=admin, timeout_ms=100)
    await _eventually(lambda: sum(
        _sample(s, "worknode_rpc_requests_total", method="busy", code="deadline_exceeded")
        for s in nodes.values()
    ) == 1)
    assert sum(
        _sample(s, "worknode_rpc_requests_total", method="busy", code="ok")
        for s in nodes.values()
    ) == 1
    assert all(s.rpc.in_flight(SUBJECT, "busy") == 0 for s in nodes.values())


async def test_flooding_an_endpoint_yields_resource_exhausted_with_bounded_memory(
    nodes, client
) -> None:
    admin = _token()
    await _create(nodes, client, "o1", admin)
    proc = psutil.Process()
    servers = [s.rpc for s in nodes.values()]
    peak = 0

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, *(srv.in_flight(SUBJECT, "slow") for srv in servers))
            await asyncio.sleep(0.005)

    async def one() -> str:
        try:
            await client.call(SUBJECT, "o1", "slow", {"seconds": 0.3}, token=admin,
                              timeout_ms=5_000)
            return "ok"
        except ResourceExhaustedError:
            return "exhausted"

    watcher = asyncio.create_task(watch())
    rss0 = proc.memory_info().rss
    try:
        for _ in range(5):
            results = await asyncio.gather(*(one() for _ in range(400)))
            assert results.count("exhausted") >= 300
            assert results.count("ok") >= MAX_IN_FLIGHT
    finally:
        watcher.cancel()
    assert peak <= MAX_IN_FLIGHT
    assert proc.memory_info().rss - rss0 < 64 * 1024 * 1024
    exhausted = sum(
        _sample(s, "worknode_rpc_requests_total", method="slow", code="resource_exhausted")
        for s in nodes.values()
    )
    assert exhausted >= 1500
    assert all(srv.in_flight(SUBJECT, "slow") == 0 for srv in servers)


async def test_a_method_nobody_serves_is_unavailable_quickly(nodes, client) -> None:
    t0 = time.monotonic()
    with pytest.raises(UnavailableError):
        await client.call(SUBJECT, "o1", "nosuchmethod", token=_token(), timeout_ms=10_000)
    with pytest.raises(UnavailableError):
        await client.call("nosuchsubject", "o1", "get", token=_token(), timeout_ms=10_000)
    assert time.monotonic() - t0 < 2.0


async def test_malformed_requests_get_invalid_argument_and_the_service_stays_up(
    nodes, client
) -> None:
    codec = WireCodec()
    subject = rpc_subject(NS, SUBJECT, "get")
    for junk in (b"", b"\x00" * 8, b"\xff" * 40, b"garbage" * 10):
        reply = await client.transport.request(subject, junk, timeout=2.0)
        assert reply.headers is not None
        assert reply.headers[ERROR_CODE_HEADER] == "400"
        assert decode_response(codec, reply.data).status is StatusCode.INVALID_ARGUMENT
    # An unsupported (missing) wire version: FAILED_PRECONDITION.
    msg = codec.schema.rpc.RpcRequest.new_message()
    msg.worknode = "o1"
    msg.method = "get"
    reply = await client.transport.request(subject, msg.to_bytes_packed(), timeout=2.0)
    assert decode_response(codec, reply.data).status is StatusCode.FAILED_PRECONDITION
    with pytest.raises(RpcInvalidArgumentError):
        await client.call(SUBJECT, "bad id!", "get", token=_token())
    # Too large: RESOURCE_EXHAUSTED before anything is decoded.
    reply = await client.transport.request(subject, b"\x00" * (128 * 1024), timeout=2.0)
    assert decode_response(codec, reply.data).status is StatusCode.RESOURCE_EXHAUSTED
    # Still serving.
    admin = _token()
    await _create(nodes, client, "o1", admin)
    assert (await client.call(SUBJECT, "o1", "get", token=admin)).status is StatusCode.OK
    bad = sum(
        _sample(s, "worknode_rpc_requests_total", method="get", code="invalid_argument")
        for s in nodes.values()
    )
    assert bad >= 5
    with pytest.raises(FailedPreconditionError):
        raise FailedPreconditionError("mapped")  # the class callers catch exists and is raised


async def test_metrics_count_requests_errors_and_latency_by_method(nodes, client) -> None:
    admin = _token()
    await _create(nodes, client, "o1", admin)
    for _ in range(5):
        await client.call(SUBJECT, "o1", "get", token=admin)
    with pytest.raises(PermissionDeniedError):
        await client.call(SUBJECT, "o1", "get", token=_token(methods=("set",)))

    def total(name: str, **labels: str) -> float:
        return sum(_sample(s, name, **labels) for s in nodes.values())

    assert total("worknode_rpc_requests_total", method="get", code="ok") == 5
    assert total("worknode_rpc_requests_total", method="get", code="permission_denied") == 1
    assert total("worknode_rpc_request_duration_seconds_count", method="get") == 6
    assert total("worknode_rpc_token_verify_seconds_count") >= 7
    assert total("worknode_rpc_in_flight", method="get") == 0
    # Unknown method names never become labels.
    for s in nodes.values():
        names = {
            sample.labels.get("method")
            for metric in s.metrics.registry.collect()
            if metric.name.startswith("worknode_rpc")
            for sample in metric.samples
        }
        assert names <= {*s.rpc.method_labels, None}
