"""ADR-32 services over the real server (nats.micro) and the memory transport: discovery,
calls, error replies."""

from __future__ import annotations

import json

import pytest

from broker.errors import InvalidArgumentError, StatusCode
from broker.testing import memory_transport_pair
from broker.transport import (
    EmbeddedNatsServer,
    Endpoint,
    Msg,
    NatsTransport,
    ServiceCallError,
    Transport,
    call,
    discover,
)


async def _exercise(server_side: Transport, client: Transport) -> None:
    async def echo(msg: Msg) -> bytes:
        return b"echo:" + msg.data

    async def refuse(msg: Msg) -> bytes:
        raise InvalidArgumentError("no thanks")

    async def crash(msg: Msg) -> bytes:
        raise RuntimeError("bug")

    handles = []
    for node in ("n1", "n2"):
        handles.append(
            await server_side.add_service(
                name="worknode-test",
                version="1.0.0",
                description="test service",
                metadata={"node": node},
                endpoints=[
                    Endpoint("echo", f"wn.t.rpc.{node}.echo", echo),
                    Endpoint("refuse", f"wn.t.rpc.{node}.refuse", refuse),
                    Endpoint("crash", f"wn.t.rpc.{node}.crash", crash),
                ],
            )
        )
    try:
        found = await discover(client, "worknode-test", timeout=0.5)
        assert [s.metadata["node"] for s in found] == ["n1", "n2"]
        quick = await discover(client, "worknode-test", timeout=5.0, idle=0.05)
        assert [s.metadata["node"] for s in quick] == ["n1", "n2"]
        assert ("echo", "wn.t.rpc.n1.echo") in found[0].endpoints
        assert await call(client, "wn.t.rpc.n2.echo", b"hi", timeout=2) == b"echo:hi"
        # The answer carries its own headers, never the request's echoed back (as nats-py's
        # Msg.respond would send them).
        reply = await client.request("wn.t.rpc.n1.echo", b"x", timeout=2,
                                     headers={"X-Asked": "1"})
        assert reply.data == b"echo:x"
        assert "X-Asked" not in (reply.headers or {})
        with pytest.raises(ServiceCallError) as err:
            await call(client, "wn.t.rpc.n1.refuse", b"", timeout=2)
        assert err.value.http_code == "400"
        assert err.value.code is StatusCode.INVALID_ARGUMENT
        assert not err.value.retriable
        with pytest.raises(ServiceCallError) as err:
            await call(client, "wn.t.rpc.n1.crash", b"", timeout=2)
        assert err.value.http_code == "500"
        assert err.value.code is StatusCode.INTERNAL
        pings = await client.request_many("$SRV.PING.worknode-test", b"", timeout=0.5)
        assert {json.loads(p.data)["type"] for p in pings} == {"io.nats.micro.v1.ping_response"}
        stats = await client.request_many("$SRV.STATS.worknode-test", b"", timeout=0.5)
        assert len(stats) == 2
        # Requests answered on the inlined reply path still count in the service's stats.
        counted = {
            json.loads(s.data)["metadata"]["node"]: {
                e["name"]: e["num_requests"] for e in json.loads(s.data)["endpoints"]}
            for s in stats
        }
        assert counted["n1"]["echo"] == 1
        assert counted["n2"]["echo"] == 1
    finally:
        for h in handles:
            await h.stop()
    assert await discover(client, "worknode-test", timeout=0.3) == []


async def test_services_over_a_real_server(nats_server: EmbeddedNatsServer) -> None:
    async with NatsTransport([nats_server.url], name="srv") as srv, NatsTransport(
        [nats_server.url], name="cli"
    ) as cli:
        await _exercise(srv, cli)


async def test_services_over_the_memory_transport() -> None:
    a, b = memory_transport_pair()
    try:
        await _exercise(a, b)
    finally:
        await a.stop()
        await b.stop()
