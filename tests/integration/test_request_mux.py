"""``NatsTransport``'s request multiplexer against a real nats-server: one wildcard inbox
subscription per connection, one future per request keyed by its reply token, and none left
behind, whatever ends the request (reply, timeout, cancellation, no responders, stop); and
the RPC client pipelining hundreds of signed calls over it, each answered to its caller."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

import pytest

from broker.errors import NoRespondersError, NotConnectedError, TransportTimeoutError
from broker.rpc import CallContext, Grant, MethodRegistry, RpcClient, mint
from broker.transport import Msg, NatsTransport, RequestSigner
from services.worknode import WorknodeService, WorknodeSettings

from .test_rpc import CLIENT, NS, ROOT, SUBJECT, node_roster


def _waiting(t: NatsTransport) -> int:
    """Requests the transport still holds a future for."""
    return len(t._mux)


def _subscriptions(t: NatsTransport) -> int:
    """Subscriptions the nats-py client holds (the mux's inbox one included)."""
    return len(t.nats_client()._subs)


async def _echo_responder(t: NatsTransport, subject: str) -> None:
    async def echo(msg: Msg) -> None:
        await t.respond(msg, b"re:" + msg.data)

    await t.subscribe(subject, echo, queue="q")


@pytest.fixture
async def pair(nats_server):
    a = NatsTransport([nats_server.url], name="a", reconnect_time_wait=0.05)
    b = NatsTransport([nats_server.url], name="b", reconnect_time_wait=0.05)
    async with a, b:
        yield a, b


async def test_one_inbox_subscription_serves_every_request_and_nothing_is_left(pair):
    a, b = pair
    await _echo_responder(b, "svc.echo")
    before = _subscriptions(a)
    first = await asyncio.gather(  # the first requests race to make the inbox subscription
        *(a.request("svc.echo", b"f%d" % i, timeout=5.0) for i in range(50)))
    assert [r.data for r in first] == [b"re:f%d" % i for i in range(50)]
    assert _subscriptions(a) == before + 1  # the mux's wildcard inbox, made once
    replies = await asyncio.gather(
        *(a.request("svc.echo", str(i).encode(), timeout=10.0) for i in range(500))
    )
    assert [r.data for r in replies] == [b"re:" + str(i).encode() for i in range(500)]
    assert _subscriptions(a) == before + 1
    assert _waiting(a) == 0


async def test_two_requesters_pipelining_get_only_their_own_replies(nats_server, pair):
    a, b = pair
    c = NatsTransport([nats_server.url], name="c")
    async with c:
        await _echo_responder(b, "svc.echo")
        await _echo_responder(c, "svc.echo")  # two responders in the queue group
        d = NatsTransport([nats_server.url], name="d")
        async with d:
            ra, rd = await asyncio.gather(
                asyncio.gather(*(a.request("svc.echo", b"a%d" % i, timeout=10.0)
                                 for i in range(300))),
                asyncio.gather(*(d.request("svc.echo", b"d%d" % i, timeout=10.0)
                                 for i in range(300))),
            )
            assert [r.data for r in ra] == [b"re:a%d" % i for i in range(300)]
            assert [r.data for r in rd] == [b"re:d%d" % i for i in range(300)]
            assert _waiting(a) == _waiting(d) == 0


async def test_timeouts_cancellations_and_no_responders_leave_no_future(pair):
    a, b = pair
    arrived: list[Msg] = []

    async def silent(msg: Msg) -> None:
        arrived.append(msg)

    await b.subscribe("svc.silent", silent)
    await _echo_responder(b, "svc.echo")
    with pytest.raises(TransportTimeoutError):
        await a.request("svc.silent", b"", timeout=0.05)
    assert _waiting(a) == 0

    tasks = [asyncio.create_task(a.request("svc.silent", b"", timeout=30.0)) for _ in range(50)]
    while len(arrived) < 51:  # every one is out (and waiting) before it is cancelled
        await asyncio.sleep(0.01)
    assert _waiting(a) == 50
    for task in tasks:
        task.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, asyncio.CancelledError) for r in results)
    assert _waiting(a) == 0

    with pytest.raises(NoRespondersError):
        await a.request("svc.nobody", b"", timeout=5.0)
    assert _waiting(a) == 0
    # Late answers to all of those reach nobody; the next request gets its own.
    for msg in arrived:
        await b.respond(msg, b"late")
    assert (await a.request("svc.echo", b"x", timeout=5.0)).data == b"re:x"
    assert _waiting(a) == 0


async def test_requests_work_again_after_the_server_restarts(nats_server, pair):
    a, b = pair
    await _echo_responder(b, "svc.echo")
    assert (await a.request("svc.echo", b"1", timeout=5.0)).data == b"re:1"
    reconnects = a.reconnects
    await nats_server.restart()
    deadline = time.monotonic() + 20
    while not (a.reconnects > reconnects and b.reconnects > 0 and a.connected and b.connected):
        assert time.monotonic() < deadline, "no reconnect"
        await asyncio.sleep(0.02)
    for _ in range(200):  # b's queue subscription may reach the server after a's request
        try:
            reply = await a.request("svc.echo", b"2", timeout=1.0)
            break
        except (NoRespondersError, TransportTimeoutError):
            await asyncio.sleep(0.05)
    assert reply.data == b"re:2"  # the inbox subscription was restored with the connection
    assert _waiting(a) == 0


async def test_stop_fails_every_waiting_request_at_once(pair):
    a, b = pair
    arrived = asyncio.Event()

    async def silent(msg: Msg) -> None:
        arrived.set()

    await b.subscribe("svc.silent", silent)
    tasks = [asyncio.create_task(a.request("svc.silent", b"", timeout=60.0)) for _ in range(20)]
    await arrived.wait()
    await a.stop()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, NotConnectedError) for r in results), results
    assert _waiting(a) == 0


# -- the RPC client over it: pipelined signed calls -------------------------------------------


async def test_hundreds_of_rpc_calls_in_flight_on_one_client_each_get_their_own_result(
    tmp_path, nats_server
) -> None:
    reg = MethodRegistry()

    @reg.method("echo")
    def echo(ctx: CallContext) -> dict[str, Any]:
        return {"v": ctx.arguments.get("v")}

    keyring = tmp_path / "keyring.json"
    keyring.write_text(json.dumps({"1": ROOT.public_key.hex()}))
    settings = {
        n: WorknodeSettings(
            node_id=n, namespace=NS, subjects=[SUBJECT], nats_urls=[nats_server.url],
            state_dir=tmp_path / n, metrics_port=None, store_sync="normal",
            rpc_keyring_file=keyring, rpc_max_in_flight=512,
            rpc_rate_per_s=1e6, rpc_burst=1_000_000,
        )
        for n in ("n1", "n2")
    }
    roster = node_roster(settings)
    token = mint(ROOT, [Grant(NS, SUBJECT, "root", ("*",))], expires_at=time.time() + 3600,
                 holder=CLIENT.public_key)
    async with contextlib.AsyncExitStack() as stack:
        for s in settings.values():  # two nodes in the queue group: replies interleave
            await stack.enter_async_context(WorknodeService(s, roster=roster, rpc_methods=reg))
        transport = await stack.enter_async_context(
            NatsTransport([nats_server.url], name="rpc-client"))
        client = RpcClient(transport, namespace=NS, signer=RequestSigner(CLIENT, roster))
        results = await asyncio.gather(*(
            client.call(SUBJECT, "root", "echo", {"v": f"call-{i}"}, token=token)
            for i in range(300)
        ))
        assert [r.result["v"] for r in results] == [f"call-{i}" for i in range(300)]
        assert _waiting(transport) == 0
