"""Each role can do no more than its permissions, against a real nats-server whose accounts
block ``render_accounts`` generated (broker/transport/_auth.py).

The attacks of issue 15 are tests here: connecting without (or with a wrong) key, reading
another client's replies, joining the RPC queue group, answering the healer's discovery as a
fake replica, publishing repairs without being the healer. Clients are raw nats-py
connections as each identity (nkey seed + per-identity inbox prefix).

NATS reports a refused publish or subscribe asynchronously (``-ERR 'Permissions
Violation ...'``, nats-py's error callback); the server processes a connection's commands in
order, so after ``flush()`` (PING/PONG) every violation of what came before has been reported
(with ``_OrderedClient``, the transport's nats-py client whose PING cannot overtake the SUB
and PUB commands still buffered).
That a refused message did not get through is shown with a sentinel: a message sent after it
on an allowed path to the same subscriber connection arrives, and nothing arrived before it
(one connection receives messages in the order the server processed them). No sleeps.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import nats
import pytest
from nats import micro
from nats.aio.client import Client
from nats.aio.msg import Msg

from broker.codec import Signer
from broker.testing import running_nats_server
from broker.transport import (
    EmbeddedNatsServer,
    NatsIdentity,
    Role,
    inbox_prefix,
    nkey_seed,
    render_accounts,
)
from broker.transport._nats import _OrderedClient
from services.worknode._keys import merge_identities, read_identities

NS = "ns"
WAIT = 10.0  # a bound on waiting for a message that must come, never an assertion

ROLES: dict[str, tuple[Role, tuple[str, ...]]] = {
    "n1": (Role.NODE, ()),
    "n2": (Role.NODE, ()),
    "h": (Role.HEALER, ()),
    "w": (Role.WRITER, ("a",)),
    "r": (Role.READER, ("a",)),
    "c": (Role.CALLER, ("a",)),
    "adm": (Role.ADMIN, ()),
}


def identities(seeds: dict[str, bytes]) -> list[NatsIdentity]:
    return [NatsIdentity(name, role, Signer(name, seeds[name]).public_key, NS, subjects)
            for name, (role, subjects) in ROLES.items()]


@dataclass
class Conn:
    """One identity's connection and the permission violations the server reported to it."""

    name: str
    nc: Client
    errors: list[str] = field(default_factory=list)

    async def violations(self) -> list[str]:
        """Every violation reported so far, once the server processed all that was sent."""
        await self.nc.flush(timeout=WAIT)
        # nats-py lowercases the server's message
        return [e for e in self.errors if "permissions violation" in e]

    async def collect(self, subject: str, queue: str = "") -> asyncio.Queue[Msg]:
        """Subscribe; what arrives goes into the returned queue."""
        got: asyncio.Queue[Msg] = asyncio.Queue()

        async def cb(msg: Msg) -> None:
            got.put_nowait(msg)

        await self.nc.subscribe(subject, queue=queue, cb=cb)
        return got


Connect = Callable[..., Awaitable[Conn]]


def _seed(name: str) -> bytes:
    return hashlib.sha256(f"test-nats-permissions/{name}".encode()).digest()


IB = {name: inbox_prefix(Signer(name, _seed(name)).public_key) for name in ROLES}
"""Each identity's inbox prefix, ``_INBOX.<its public nkey>``."""


@pytest.fixture
def seeds() -> dict[str, bytes]:
    return {name: _seed(name) for name in ROLES}


@pytest.fixture
async def server(tmp_path, seeds) -> AsyncIterator[EmbeddedNatsServer]:
    # No monitoring port: reload() rewrites the config with the port the server chose
    # (``http_port: -1`` becomes the number), and nats-server refuses to reload a changed
    # HTTP port, so the whole reload (users included) would fail.
    async with running_nats_server(
        tmp_path / "nats", config_extra=render_accounts(identities(seeds)), monitor_port=None
    ) as srv:
        yield srv


async def _open(url: str, name: str, seed: bytes | None, conn_errors: list[str]) -> Client:
    async def on_error(exc: Exception) -> None:
        conn_errors.append(str(exc))  # nats-py lowercases -ERR texts

    kw: dict[str, Any] = {}
    if seed is not None:
        kw["nkeys_seed_str"] = nkey_seed(seed)
    # Its own inbox, named by its key (without a key it is refused anyway).
    inbox = inbox_prefix(Signer(name, seed).public_key) if seed is not None else "_INBOX.none"
    nc = _OrderedClient()  # PING behind what was sent before it: a PONG proves order
    try:
        await nc.connect(
            url, name=name, inbox_prefix=inbox, error_cb=on_error,
            allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=2, **kw,
        )
    except BaseException:
        await nc.close()  # nats-py leaves the refused socket open otherwise
        raise
    return nc


@pytest.fixture
async def connect(server, seeds) -> AsyncIterator[Connect]:
    """``await connect(name)``: a connection as identity ``name`` (closed after the test)."""
    opened: list[Client] = []

    async def _connect(name: str, seed: bytes | None = None) -> Conn:
        errors: list[str] = []
        nc = await _open(server.url, name, seed if seed is not None else seeds[name], errors)
        opened.append(nc)
        return Conn(name, nc, errors)

    yield _connect
    for nc in opened:
        await nc.close()


def literal(pattern: str) -> str:
    """A subject the subscription ``pattern`` would receive."""
    return ".".join({"*": "x", ">": "x.y"}.get(t, t) for t in pattern.split("."))


async def sentinel_path(conn: Conn) -> tuple[str, asyncio.Queue[Msg]]:
    """A subject ``conn`` may subscribe to (and the admin publish on), subscribed (and the
    subscription in place at the server: flushed)."""
    subject = "wn.ns.delta.a" if ROLES[conn.name][0] is Role.READER else conn.nc.new_inbox()
    got = await conn.collect(subject)
    await conn.nc.flush(timeout=WAIT)
    return subject, got


# -- who may connect ------------------------------------------------------------------------


async def test_a_client_without_credentials_cannot_connect(server) -> None:
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await _open(server.url, "anon", None, [])


async def test_a_key_the_server_does_not_list_cannot_connect(server) -> None:
    stranger = Signer.generate("r").seed
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await _open(server.url, "r", stranger, [])


async def test_every_listed_identity_connects(connect) -> None:
    for name in ROLES:
        conn = await connect(name)
        assert conn.nc.is_connected


# -- subscriptions: refused, and nothing arrives on them -------------------------------------

REFUSED_SUBSCRIPTIONS = [
    # a reader: only deltas and heal reports of its granted subjects
    ("r", "wn.ns.sync.a", ""),
    ("r", "wn.ns.merkle.a.n1.root", ""),
    ("r", "wn.ns.merkle.a.n1.root", "q"),
    ("r", "wn.ns.rpc.a.get", ""),
    ("r", "wn.ns.rpc.a.get", "q"),  # joining the RPC queue group (call hijacking)
    ("r", "wn.ns.delta.b", ""),  # a subject it was not granted
    ("r", "wn.ns.>", ""),
    ("r", ">", ""),
    ("r", f"{IB['c']}.>", ""),  # another identity's replies
    ("r", "_INBOX.>", ""),
    ("r", "$SRV.INFO.worknode-replica", ""),
    # a writer: its replica's delta and sync subjects, its inbox
    ("w", "wn.ns.rpc.a.get", "q"),
    ("w", "wn.ns.merkle.a.w.root", "q"),
    ("w", "$SRV.INFO.worknode-replica", ""),  # registering as a replica
    ("w", "$SRV.INFO", ""),
    ("w", "wn.ns.delta.b", ""),
    ("w", f"{IB['c']}.>", ""),
    # a caller: its inbox only
    ("c", "wn.ns.delta.a", ""),
    ("c", "wn.ns.rpc.a.get", "q"),
    ("c", "$SRV.INFO.worknode-replica", ""),
    ("c", f"{IB['n1']}.>", ""),
    ("c", "_INBOX.>", ""),
    # the healer: its inbox only
    ("h", "wn.ns.delta.a", ""),
    ("h", "wn.ns.merkle.a.n1.root", "q"),
    ("h", "$SRV.INFO.worknode-replica", ""),
    ("h", f"{IB['n1']}.>", ""),
    # a node: its own healing endpoints and the RPC endpoints, in the queue group only
    ("n1", "wn.ns.merkle.a.n2.root", "q"),  # another node's healing endpoint
    ("n1", "wn.ns.merkle.a.n1.root", ""),  # its own, but outside the queue group
    ("n1", "wn.ns.rpc.a.get", ""),  # sniffing every call (and its token)
    ("n1", "wn.ns.rpc.a.get", "evil"),  # a queue group of its own
    ("n1", "wn.ns.heal.a", ""),
    ("n1", f"{IB['n2']}.>", ""),
    ("n1", "_INBOX.>", ""),
    ("n1", "$SRV.INFO.other-service", ""),
]


@pytest.mark.parametrize(("name", "pattern", "queue"), REFUSED_SUBSCRIPTIONS,
                         ids=[f"{n}-{p}-{q}" for n, p, q in REFUSED_SUBSCRIPTIONS])
async def test_a_subscription_outside_the_role_is_refused_and_receives_nothing(
    connect, name: str, pattern: str, queue: str
) -> None:
    conn = await connect(name)
    forbidden = await conn.collect(pattern, queue)
    where, sentinel = await sentinel_path(conn)
    violations = await conn.violations()
    assert len(violations) == 1
    assert f'subscription to "{pattern.lower()}"' in violations[0]

    admin = await connect("adm")
    await admin.nc.publish(literal(pattern), b"secret")
    await admin.nc.publish(where, b"sentinel")
    assert (await asyncio.wait_for(sentinel.get(), WAIT)).data == b"sentinel"
    assert forbidden.empty()


# -- publishing: refused, and nothing arrives ------------------------------------------------

REFUSED_PUBLISHES = [
    ("r", "wn.ns.delta.a"),  # a reader publishes nothing
    ("r", "wn.ns.sync.a"),
    ("r", "wn.ns.rpc.a.get"),
    ("r", "wn.ns.heal.a"),
    ("r", f"{IB['c']}.x.y"),  # a forged reply
    ("n1", "wn.ns.merkle.a.n2.apply"),  # only the healer repairs
    ("n1", "wn.ns.merkle.a.n1.root"),
    ("n1", "wn.ns.heal.a"),  # only the healer reports
    ("n1", "$SRV.INFO.worknode-replica"),
    ("n1", f"{IB['h']}.x.y"),  # a reply to a request it never received
    ("w", "wn.ns.delta.b"),  # a subject it was not granted
    ("w", "wn.ns.merkle.a.n1.apply"),
    ("w", "wn.ns.rpc.a.get"),
    ("w", f"{IB['h']}.x.y"),
    ("c", "wn.ns.rpc.b.get"),  # a subject it was not granted
    ("c", "wn.ns.delta.a"),
    ("c", "wn.ns.merkle.a.n1.apply"),
    ("c", f"{IB['n1']}.x.y"),
    ("h", "wn.ns.delta.a"),
    ("h", "wn.ns.sync.a"),
    ("h", "wn.ns.rpc.a.get"),
    ("h", "wn.other.merkle.a.n1.apply"),  # another namespace
]


@pytest.mark.parametrize(("name", "subject"), REFUSED_PUBLISHES,
                         ids=[f"{n}-{s}" for n, s in REFUSED_PUBLISHES])
async def test_a_publish_outside_the_role_is_refused_and_never_delivered(
    connect, name: str, subject: str
) -> None:
    admin = await connect("adm")
    watched = await admin.collect(subject)
    await admin.nc.flush()
    conn = await connect(name)
    await conn.nc.publish(subject, b"forged")
    violations = await conn.violations()
    assert len(violations) == 1
    assert f'publish to "{subject.lower()}"' in violations[0]

    await admin.nc.publish(subject, b"sentinel")
    assert (await asyncio.wait_for(watched.get(), WAIT)).data == b"sentinel"


# -- the attacks of issue 15, as scenarios -----------------------------------------------------


async def test_a_reader_receives_granted_deltas_and_heal_reports_only(connect) -> None:
    reader = await connect("r")
    deltas = await reader.collect("wn.ns.delta.a")
    reports = await reader.collect("wn.ns.heal.a")
    other = await reader.collect("wn.ns.delta.b")
    writer, healer, admin = await connect("w"), await connect("h"), await connect("adm")
    await reader.nc.flush()
    await admin.nc.publish("wn.ns.delta.b", b"not yours")
    await admin.nc.flush()
    await writer.nc.publish("wn.ns.delta.a", b"delta")
    await healer.nc.publish("wn.ns.heal.a", b"report")
    assert (await asyncio.wait_for(deltas.get(), WAIT)).data == b"delta"
    assert (await asyncio.wait_for(reports.get(), WAIT)).data == b"report"
    assert other.empty()
    assert await writer.violations() == []
    assert await healer.violations() == []
    assert [v for v in await reader.violations() if "delta.b" not in v] == []


async def test_rpc_calls_cannot_be_hijacked_by_joining_the_queue_group(connect) -> None:
    node = await connect("n1")

    async def answer(msg: Msg) -> None:
        await msg.respond(b"n1")

    await node.nc.subscribe("wn.ns.rpc.a.get", queue="q", cb=answer)
    thieves = [await connect(name) for name in ("r", "w", "c", "h")]
    stolen: list[Msg] = []

    async def steal(msg: Msg) -> None:
        stolen.append(msg)
        await msg.respond(b"forged")

    for thief in thieves:
        await thief.nc.subscribe("wn.ns.rpc.a.get", queue="q", cb=steal)
        assert len(await thief.violations()) == 1
    assert await node.violations() == []

    caller = await connect("c")
    answers = [(await caller.nc.request("wn.ns.rpc.a.get", b"token", timeout=WAIT)).data
               for _ in range(10)]
    assert answers == [b"n1"] * 10
    assert stolen == []
    assert await caller.violations() == []


async def test_a_callers_reply_cannot_be_read_by_another_client(connect) -> None:
    node = await connect("n1")

    async def answer(msg: Msg) -> None:
        await msg.respond(b"the answer")

    await node.nc.subscribe("wn.ns.rpc.a.get", queue="q", cb=answer)
    snoopers = {name: await connect(name) for name in ("n2", "w", "r", "h")}
    overheard = {name: await s.collect(f"{IB['c']}.>") for name, s in snoopers.items()}
    for s in snoopers.values():
        assert len(await s.violations()) == 1
    caller = await connect("c")
    reply = await caller.nc.request("wn.ns.rpc.a.get", b"token", timeout=WAIT)
    assert reply.data == b"the answer"
    assert reply.subject.startswith(f"{IB['c']}.")
    admin = await connect("adm")  # sentinels on each snooper's own allowed path
    for name, s in snoopers.items():
        where, sentinel = await sentinel_path(s)
        await admin.nc.publish(where, b"sentinel")
        assert (await asyncio.wait_for(sentinel.get(), WAIT)).data == b"sentinel"
        assert overheard[name].empty()


async def test_only_nodes_answer_the_healers_discovery(connect) -> None:
    node = await connect("n1")

    async def info(msg: Msg) -> None:
        await msg.respond(json.dumps({"node": "n1"}).encode())

    await node.nc.subscribe("$SRV.INFO.worknode-replica", cb=info)
    fake = await connect("w")
    asked: list[Msg] = []

    async def fake_info(msg: Msg) -> None:
        asked.append(msg)
        await msg.respond(json.dumps({"node": "fake", "items": 10**9}).encode())

    await fake.nc.subscribe("$SRV.INFO.worknode-replica", cb=fake_info)
    assert len(await fake.violations()) == 1
    assert await node.violations() == []

    healer = await connect("h")
    inbox = healer.nc.new_inbox()
    replies = await healer.collect(inbox)
    await healer.nc.publish("$SRV.INFO.worknode-replica", b"", reply=inbox)
    assert json.loads((await asyncio.wait_for(replies.get(), WAIT)).data) == {"node": "n1"}
    # Had the fake been asked, the request would have reached it before this sentinel.
    where, sentinel = await sentinel_path(fake)
    await (await connect("adm")).nc.publish(where, b"sentinel")
    await asyncio.wait_for(sentinel.get(), WAIT)
    assert asked == []
    assert replies.empty()
    assert await healer.violations() == []


# -- the real services' subscriptions fit their role -------------------------------------------


async def test_a_node_serves_micro_services_and_the_healer_and_caller_use_them(connect) -> None:
    """nats.micro's own subscriptions (control subjects plain, endpoints in queue ``q``) and
    replies fit a node's permissions; a healer discovers and calls, a caller calls."""
    node = await connect("n1")

    async def root(req: Any) -> None:
        await req.respond(b"root of a")

    async def get(req: Any) -> None:
        await req.respond(b"value")

    replica = await micro.add_service(node.nc, name="worknode-replica", version="1.0.0",
                                      metadata={"node": "n1", "namespace": NS})
    await replica.add_endpoint(name="root-a", subject="wn.ns.merkle.a.n1.root", handler=root)
    rpc = await micro.add_service(node.nc, name="worknode-rpc", version="1.0.0")
    await rpc.add_endpoint(name="a-get", subject="wn.ns.rpc.a.get", handler=get)
    try:
        healer = await connect("h")
        found = await healer.nc.request("$SRV.INFO.worknode-replica", b"", timeout=WAIT)
        assert json.loads(found.data)["metadata"]["node"] == "n1"
        reply = await healer.nc.request("wn.ns.merkle.a.n1.root", b"", timeout=WAIT)
        assert reply.data == b"root of a"
        caller = await connect("c")
        assert (await caller.nc.request("wn.ns.rpc.a.get", b"", timeout=WAIT)).data == b"value"
        admin = await connect("adm")  # the control subjects the node subscribed answer too
        for subject, services in (("$SRV.PING", 2), ("$SRV.INFO", 2), ("$SRV.STATS", 2),
                                  ("$SRV.STATS.worknode-rpc", 1),
                                  (f"$SRV.PING.worknode-replica.{replica.id}", 1)):
            inbox = admin.nc.new_inbox()
            answers = await admin.collect(inbox)
            await admin.nc.publish(subject, b"", reply=inbox)
            names = {json.loads((await asyncio.wait_for(answers.get(), WAIT)).data)["name"]
                     for _ in range(services)}
            assert len(names) == services  # both services answer a plain $SRV request
        assert await node.violations() == []
        assert await healer.violations() == []
        assert await caller.violations() == []
    finally:
        await replica.stop()
        await rpc.stop()


async def test_catch_up_requests_and_replies_fit_node_and_writer(connect) -> None:
    """A node answers catch-up requests (allow_responses) from a node and from a writer."""
    node = await connect("n1")

    async def state(msg: Msg) -> None:
        await msg.respond(b"state")

    await node.nc.subscribe("wn.ns.sync.a", cb=state)
    for name in ("n2", "w"):
        peer = await connect(name)
        reply = await peer.nc.request("wn.ns.sync.a", b"context", timeout=WAIT)
        assert reply.data == b"state"
        await peer.nc.publish("wn.ns.delta.a", b"batch")
        assert await peer.violations() == []
    assert await node.violations() == []


# -- rotation ---------------------------------------------------------------------------------


async def test_a_rotated_key_locks_the_old_one_out_after_a_reload(tmp_path, server, seeds) -> None:
    """``keys add --replace`` with a new seed, the config rendered again, ``reload()``
    (SIGHUP): the new key connects, the old one is refused, and the old key's live
    connection is closed by the server."""
    ids_file = tmp_path / "ids.json"
    merge_identities(ids_file, {i.name: i for i in identities(seeds)})
    closed = asyncio.Event()
    old_errors: list[str] = []
    old = await _open(server.url, "r", seeds["r"], old_errors)
    old._closed_cb = _set(closed)  # nats-py calls it when the server drops the connection

    new_seed = Signer.generate("r").seed
    rotated = NatsIdentity("r", Role.READER, Signer("r", new_seed).public_key, NS, ("a",))
    merge_identities(ids_file, {"r": rotated}, replace=True)
    server.config_extra = render_accounts(read_identities(ids_file).values())
    server.reload()

    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    while True:  # the reload is asynchronous: wait until the server applied it
        try:
            fresh = await _open(server.url, "r", new_seed, [])
            break
        except (nats.errors.Error, OSError):  # refused before the reload: an error or a reset
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.05)
    try:
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            await _open(server.url, "r", seeds["r"], [])
        await asyncio.wait_for(closed.wait(), WAIT)
        assert old.is_closed
        assert fresh.is_connected
    finally:
        await fresh.close()
        await old.close()


def _set(event: asyncio.Event) -> Callable[[], Awaitable[None]]:
    async def cb() -> None:
        event.set()

    return cb
