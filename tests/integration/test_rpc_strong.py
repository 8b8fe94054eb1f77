"""The RPC built-ins with ``consistency: "strong"`` against a real nats-server (JetStream) and
two worknode services: create-if-absent, conditional writes answered FAILED_PRECONDITION with
the current version, linearizable ``get`` returning the version; a node lagging the STRONG log
fences it before answering NOT_FOUND, and authorizes the call against the path found then."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest

from broker.codec import Signer, TrustRoster
from broker.errors import ConflictError, RpcConflictError
from broker.rpc import (
    DeadlineExceededError,
    Grant,
    PermissionDeniedError,
    RootKey,
    RpcClient,
    RpcInvalidArgumentError,
    RpcNotFoundError,
    StatusCode,
    UnavailableError,
    attenuate,
    mint,
)
from broker.strong import StrongMode, strong_stream
from broker.transport import EmbeddedNatsServer, NatsTransport, RequestSigner
from services.worknode import WorknodeService, WorknodeSettings, load_or_create_signer

NS = "shop"
SUBJECT = "orders"
ROOT = RootKey(1, bytes(range(32)))
CLIENT = Signer("client", bytes(range(64, 96)))


def _token() -> bytes:
    return mint(ROOT, [Grant(NS, SUBJECT, "root", ("*",))], expires_at=time.time() + 3600,
                holder=CLIENT.public_key)


@pytest.fixture
async def nodes(tmp_path: Path, nats_server: EmbeddedNatsServer
                ) -> AsyncIterator[dict[str, WorknodeService]]:
    keyring = tmp_path / "keyring.json"
    keyring.write_text(json.dumps({"1": ROOT.public_key.hex()}))
    settings = {
        n: WorknodeSettings(
            node_id=n, namespace=NS, subjects=[SUBJECT], nats_urls=[nats_server.url],
            state_dir=tmp_path / n, metrics_port=None, store_sync="normal",
            rpc_keyring_file=keyring, flush_interval_ms=2, strong={SUBJECT: ["acct-"]},
            strong_timeout_s=2.0)
        for n in ("n1", "n2")
    }
    roster = TrustRoster({n: load_or_create_signer(n, s.key_path()).public_key
                          for n, s in settings.items()})
    services = {n: WorknodeService(s, roster=roster) for n, s in settings.items()}
    try:
        for svc in services.values():
            await svc.start()
        yield services
    finally:
        for svc in services.values():
            await svc.stop()


@pytest.fixture
async def client(nats_server: EmbeddedNatsServer, nodes: dict[str, WorknodeService]
                 ) -> AsyncIterator[RpcClient]:
    transport = NatsTransport([nats_server.url], name="rpc-client")
    async with transport:
        yield RpcClient(transport, namespace=NS, signer=RequestSigner(CLIENT, nodes["n1"].roster))


STRONG = {"consistency": "strong"}


async def test_strong_create_wins_once_and_the_loser_gets_the_current_version(
    client: RpcClient
) -> None:
    token = _token()
    results = await asyncio.gather(
        *(client.call(SUBJECT, "acct-1", "create", STRONG, token=token) for _ in range(2)),
        return_exceptions=True)
    won = [r for r in results if not isinstance(r, BaseException)]
    lost = [r for r in results if isinstance(r, BaseException)]
    assert len(won) == 1, results
    assert len(lost) == 1, results
    version = won[0].result["version"]
    assert type(version) is int
    assert version > 0
    conflict = lost[0]
    assert isinstance(conflict, RpcConflictError)
    assert isinstance(conflict, ConflictError)
    assert conflict.code is StatusCode.FAILED_PRECONDITION
    assert (conflict.expected, conflict.current) == (0, version)
    got = await client.call(SUBJECT, "acct-1", "get", STRONG, token=token)
    assert got.result["version"] == version
    assert got.state is not None
    assert got.state.value() == {"acct-1": {"parent": "root"}}


async def test_a_conditional_set_on_a_stale_version_conflicts_and_changes_nothing(
    client: RpcClient
) -> None:
    token = _token()
    created = await client.call(SUBJECT, "acct-2", "create", STRONG, token=token)
    v1 = created.result["version"]
    ok = await client.call(SUBJECT, "acct-2", "set",
                           {**STRONG, "path": "owner", "value": "ann", "if_version": v1},
                           token=token)
    v2 = ok.result["version"]
    assert v2 > v1
    with pytest.raises(RpcConflictError) as info:  # still names v1: someone wrote since
        await client.call(SUBJECT, "acct-2", "set",
                          {**STRONG, "path": "owner", "value": "bob", "if_version": v1},
                          token=token)
    assert (info.value.expected, info.value.current) == (v1, v2)
    await client.call(SUBJECT, "acct-2", "incr", {**STRONG, "path": "bal", "amount": 5},
                      token=token)
    got = await client.call(SUBJECT, "acct-2", "get", STRONG, token=token)
    assert got.state is not None
    assert got.state.value()["acct-2"]["fields"] == {"owner": "ann", "bal": 5}
    assert got.result["version"] > v2


async def test_bad_strong_arguments_are_invalid(client: RpcClient) -> None:
    """On an EVENTUAL worknode (``o3``), which a plain create would make: refused for the
    arguments alone."""
    token = _token()
    with pytest.raises(RpcInvalidArgumentError):
        await client.call(SUBJECT, "o3", "create", {"consistency": "linear"}, token=token)
    with pytest.raises(RpcInvalidArgumentError):
        await client.call(SUBJECT, "o3", "create", {**STRONG, "if_version": -1},
                          token=token)
    with pytest.raises(RpcInvalidArgumentError):  # if_version is a STRONG thing
        await client.call(SUBJECT, "o3", "create", {"if_version": 0}, token=token)


# -- a node lagging the STRONG log (the queue group may route a call to it) -----------------


class _Lag:
    """Holds ``svc``'s STRONG follower (it applies nothing from the log) and records the
    fences it publishes; with ``resume``, it follows again right after its first fence was
    published. So a worknode created meanwhile by another node is missing on ``svc``
    until ``svc`` fences: no timing involved."""

    def __init__(self, svc: WorknodeService, *, resume: bool) -> None:
        strong = svc.replica(SUBJECT).strong
        assert strong is not None
        self.strong = strong
        self.resume = resume
        self.fences: list[int] = []
        vars(strong.log).pop("fence", None)  # an earlier _Lag's
        self._fence = strong.log.fence
        self._resuming = False

    async def hold(self) -> _Lag:
        await self.strong.stop()
        self.strong.log.fence = self._fenced  # type: ignore[method-assign]
        return self

    async def _fenced(self) -> int:
        seq = await self._fence()
        if not self._resuming:  # (not the fence StrongMode.start publishes)
            self.fences.append(seq)
            if self.resume and len(self.fences) == 1:
                self._resuming = True
                await self.strong.start()
                self._resuming = False
        return seq


def _strong(svc: WorknodeService) -> StrongMode:
    strong = svc.replica(SUBJECT).strong
    assert strong is not None
    return strong


async def _only(svc: WorknodeService, nodes: dict[str, WorknodeService]) -> None:
    """Every other node stops serving RPC (its micro endpoints drained: the server routes
    no further call to it); ``svc`` answers every call."""
    for other in nodes.values():
        if other is not svc:
            assert other.rpc is not None
            await other.rpc.stop()


def _except(token: bytes, subtree: str) -> bytes:
    """``token`` attenuated by its holder to refuse ``subtree`` (``reject if``): it still
    passes a call authorized as a child of the root."""
    import biscuit_auth as bi

    parsed = bi.Biscuit.from_bytes(
        token, lambda kid: bi.PublicKey.from_bytes(ROOT.public_key, bi.Algorithm.Ed25519))
    return bytes(parsed.append(
        bi.BlockBuilder(f'reject if ancestor("{subtree}");')).to_bytes())


@pytest.mark.parametrize("method", ["get", "set", "create"])
async def test_a_strong_call_on_a_node_lagging_the_log_fences_instead_of_not_found(
    client: RpcClient, nodes: dict[str, WorknodeService], method: str
) -> None:
    """The create was acknowledged before the call began: a linearizable call sees it, on
    whichever node the queue group picks (here the lagging one)."""
    token = _token()
    a, b = nodes["n1"], nodes["n2"]
    lag = await _Lag(b, resume=True).hold()
    version = await _strong(a).create_if_absent("acct-3", "root")
    await _only(b, nodes)
    assert "acct-3" not in b.replica(SUBJECT).tree
    if method == "get":
        got = await client.call(SUBJECT, "acct-3", "get", STRONG, token=token)
        assert got.result["version"] == version
        assert got.state is not None
        assert got.state.value() == {"acct-3": {"parent": "root"}}
    elif method == "create":  # a child of it: its parent is what b has not applied
        made = await client.call(SUBJECT, "acct-3c", "create", {**STRONG, "parent": "acct-3"},
                                 token=token)
        assert made.result["version"] > version
        read = await _strong(a).read(["acct-3c"])
        assert read.state.value() == {"acct-3c": {"parent": "acct-3"}}
    else:
        ok = await client.call(
            SUBJECT, "acct-3", "set",
            {**STRONG, "path": "owner", "value": "ann", "if_version": version}, token=token)
        assert ok.result["version"] > version
        read = await _strong(a).read(["acct-3"])
        assert read.state.value()["acct-3"]["fields"] == {"owner": "ann"}
    assert lag.fences  # b answered after its fence


async def test_after_the_fence_a_call_is_authorized_against_the_worknodes_real_path(
    client: RpcClient, nodes: dict[str, WorknodeService]
) -> None:
    """Never against the path assumed before the fence (a child of the root): a token that
    refuses subtree acct-y passes that, and would reach acct-y's new child."""
    admin = _token()
    keyring = {1: ROOT.public_key}
    a, b = nodes["n1"], nodes["n2"]
    for node in ("acct-x", "acct-y"):
        await _strong(a).create_if_absent(node, "root")
    await _strong(b).read()  # b applied both
    await _only(b, nodes)
    cases = [
        (_except(admin, "acct-y"), PermissionDeniedError),
        (attenuate(admin, keyring, worknode="acct-x"), PermissionDeniedError),
        (attenuate(admin, keyring, worknode="acct-y"), None),
    ]
    for i, (token, refused) in enumerate(cases):
        node = f"acct-y{i}"
        lag = await _Lag(b, resume=True).hold()
        await _strong(a).create_if_absent(node, "acct-y")
        assert node not in b.replica(SUBJECT).tree
        if refused is not None:
            with pytest.raises(refused):
                await client.call(SUBJECT, node, "get", STRONG, token=token)
        else:
            got = await client.call(SUBJECT, node, "get", STRONG, token=token)
            assert got.state is not None
            assert got.state.value() == {node: {"parent": "acct-y"}}
        assert lag.fences, i  # decided after b's fence
        assert node in b.replica(SUBJECT).tree


async def test_a_strong_call_on_a_worknode_that_does_not_exist_is_not_found_after_the_fence(
    client: RpcClient, nodes: dict[str, WorknodeService]
) -> None:
    """Still authorized as a child of the root: a token for another subtree learns nothing
    (PERMISSION_DENIED, as for a worknode outside its subtree that exists)."""
    admin = _token()
    a, b = nodes["n1"], nodes["n2"]
    await _strong(a).create_if_absent("acct-y", "root")
    await _strong(b).read()
    await _only(b, nodes)
    lag = await _Lag(b, resume=True).hold()
    with pytest.raises(RpcNotFoundError):
        await client.call(SUBJECT, "acct-none", "get", STRONG, token=admin)
    assert len(lag.fences) == 1  # looked for in the log first
    with pytest.raises(RpcNotFoundError):  # it could see the worknode if it hung at the root
        await client.call(SUBJECT, "acct-none", "get", STRONG, token=_except(admin, "acct-y"))
    in_x = attenuate(admin, {1: ROOT.public_key}, worknode="acct-x")
    with pytest.raises(PermissionDeniedError):
        await client.call(SUBJECT, "acct-none", "get", STRONG, token=in_x)
    with pytest.raises(PermissionDeniedError):
        await client.call(SUBJECT, "acct-y", "get", STRONG, token=in_x)
    fences = len(lag.fences)
    # EVENTUAL: NOT_FOUND at once, no fence (nor for an id that is not STRONG).
    with pytest.raises(RpcNotFoundError):
        await client.call(SUBJECT, "acct-none", "get", token=admin)
    with pytest.raises(RpcNotFoundError):
        await client.call(SUBJECT, "o-none", "get", STRONG, token=admin)
    assert len(lag.fences) == fences


async def test_a_lagging_node_that_cannot_fence_answers_the_strong_error_not_not_found(
    client: RpcClient, nodes: dict[str, WorknodeService], nats_server: EmbeddedNatsServer
) -> None:
    """The same error as a STRONG call on a worknode the node holds, within the deadline."""
    token = _token()
    a, b = nodes["n1"], nodes["n2"]
    await _strong(a).create_if_absent("acct-5", "root")
    await _strong(b).read()
    await _only(b, nodes)
    lag = await _Lag(b, resume=False).hold()  # b never applies its fence (strong_timeout_s)
    await _strong(a).create_if_absent("acct-4", "root")
    for node in ("acct-5", "acct-4"):
        with pytest.raises(UnavailableError, match="not applied"):
            await client.call(SUBJECT, node, "get", STRONG, token=token, timeout_ms=10_000)
    assert len(lag.fences) == 2
    # A deadline shorter than the STRONG timeout ends the fence.
    with pytest.raises(DeadlineExceededError):
        await client.call(SUBJECT, "acct-4", "get", STRONG, token=token, timeout_ms=300)
    # No log at all (its stream deleted): no fence can be published.
    admin = await nats.connect(nats_server.url)
    try:
        await admin.jetstream().delete_stream(strong_stream(NS, SUBJECT))
    finally:
        await admin.close()
    for node in ("acct-5", "acct-4"):
        with pytest.raises(UnavailableError, match="no stream answers"):
            await client.call(SUBJECT, node, "get", STRONG, token=token, timeout_ms=10_000)
