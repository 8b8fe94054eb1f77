"""The chaos harness itself: the proxy forwards, cuts, holds, delays and drops; the cluster's
partitions really stop traffic and heals really restore it; no route goes around a proxy."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from broker.chaos import NatsCluster, TcpProxy
from broker.errors import ServerError
from broker.testing import Collector, RecordingObserver
from broker.transport import NatsTransport

SUBJECT = "chaos.t"


async def eventually(condition, within: float = 10.0) -> None:
    """Poll ``condition`` (sync or async) until it holds; fail after ``within`` seconds."""
    async with asyncio.timeout(within):
        while True:
            result = condition()
            if asyncio.iscoroutine(result):
                result = await result
            if result:
                return
            await asyncio.sleep(0.02)


async def deliver(pub: NatsTransport, got: Collector, tag: bytes, within: float = 10.0) -> float:
    """Publish ``tag-<n>`` on ``pub`` until one reaches ``got``; return the seconds it took.

    Repeating covers the time a route needs to carry the subscriber's interest."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    async with asyncio.timeout(within):
        n = 0
        while not any(data.startswith(tag + b"-") for data in got.data):
            await pub.publish(SUBJECT, b"%s-%d" % (tag, n))
            n += 1
            await asyncio.sleep(0.02)
    return loop.time() - start


# -- TcpProxy alone, in front of an echo server ----------------------------------------------


@pytest.fixture
async def echo_port():
    """A loopback echo server; yields its port."""

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


@pytest.fixture
async def proxy(echo_port):
    """A proxy to the echo server, stopped after the test."""
    async with TcpProxy(target=("127.0.0.1", echo_port), name="echo") as running:
        yield running


async def round_trip(proxy: TcpProxy, data: bytes = b"ping") -> bytes:
    reader, writer = await asyncio.open_connection(*proxy.address)
    try:
        writer.write(data)
        async with asyncio.timeout(5):
            return await reader.readexactly(len(data))
    finally:
        writer.close()


async def closed_by_peer(reader: asyncio.StreamReader) -> bool:
    """Whether the connection ends (EOF or reset) within 5 s."""
    try:
        async with asyncio.timeout(5):
            return await reader.read(1) == b""
    except ConnectionError:
        return True


async def test_proxy_forwards_both_ways_and_counts(proxy):
    assert await round_trip(proxy, b"hello world") == b"hello world"
    await eventually(lambda: proxy.bytes_down == 11)
    assert proxy.bytes_up == 11
    assert proxy.connections_accepted == 1
    await eventually(lambda: proxy.active_connections == 0)  # closing one side closes both


async def test_cut_aborts_live_connections_and_refuses_new_ones_until_restore(proxy):
    reader, writer = await asyncio.open_connection(*proxy.address)
    writer.write(b"x")
    assert await reader.readexactly(1) == b"x"
    proxy.cut()
    assert proxy.active_connections == 0
    assert await closed_by_peer(reader)
    writer.close()
    reader2, writer2 = await asyncio.open_connection(*proxy.address)
    assert await closed_by_peer(reader2)
    writer2.close()
    assert proxy.connections_dropped == 1
    assert proxy.connections_refused == 1
    proxy.restore()
    assert await round_trip(proxy) == b"ping"


async def test_cut_with_hold_keeps_new_connections_waiting_until_restore(proxy):
    proxy.cut(hold=True)
    reader, writer = await asyncio.open_connection(*proxy.address)
    writer.write(b"held")
    await asyncio.sleep(0.1)  # nothing may come back while cut: a bounded absence window
    assert proxy.bytes_up == 0
    proxy.restore()
    async with asyncio.timeout(5):
        assert await reader.readexactly(4) == b"held"
    writer.close()
    assert proxy.connections_refused == 0


async def test_delay_holds_every_chunk_back_in_each_direction(proxy):
    loop = asyncio.get_running_loop()
    proxy.delay = 0.15
    start = loop.time()
    assert await round_trip(proxy) == b"ping"
    assert loop.time() - start >= 0.3 - 0.01  # one delay each way


async def test_drop_connections_rate_resets_live_connections(echo_port):
    async with TcpProxy(
        target=("127.0.0.1", echo_port), drop_connections_rate=20.0, seed=1
    ) as chaotic:
        reader, writer = await asyncio.open_connection(*chaotic.address)
        assert await closed_by_peer(reader)
        writer.close()
        assert chaotic.connections_dropped >= 1
        chaotic.drop_connections_rate = 0.0
        assert await round_trip(chaotic) == b"ping"


def test_proxy_stays_on_loopback():
    with pytest.raises(ValueError, match="loopback"):
        TcpProxy(listen_host="0.0.0.0", target=("127.0.0.1", 4222))
    with pytest.raises(ValueError, match="loopback"):
        TcpProxy(target=("192.0.2.1", 4222))


# -- NatsCluster -----------------------------------------------------------------------------


@pytest.fixture
def observers():
    """One ``RecordingObserver`` per client in ``clients``."""
    return [RecordingObserver() for _ in range(3)]


@pytest.fixture
async def clients(nats_cluster, observers):
    """One NatsTransport per server, each knowing only its own server's URL."""
    async with contextlib.AsyncExitStack() as stack:
        transports = []
        for i, url in enumerate(nats_cluster.urls):
            transport = NatsTransport(
                [url],
                name=f"client-{i}",
                observer=observers[i],
                reconnect_time_wait=0.05,
                drain_timeout=2.0,
            )
            transports.append(await stack.enter_async_context(transport))
        yield transports


async def routes_all_on_proxies(cluster: NatsCluster) -> bool:
    """Whether each server has exactly as many route connections as its proxies carry."""
    for i in range(cluster.size):
        doc = await cluster.routez(i)
        proxied = sum(
            proxy.active_connections for (a, b), proxy in cluster.proxies.items() if i in (a, b)
        )
        if len(doc.get("routes") or []) != proxied:
            return False
    return True


async def test_healthy_cluster_carries_traffic_and_every_route_is_proxied(nats_cluster, clients):
    got = Collector()
    await clients[2].subscribe(SUBJECT, got)
    await deliver(clients[0], got, b"zero")
    for i in range(3):
        assert await nats_cluster.peers(i) == nats_cluster.expected_peers(i)
        assert len(nats_cluster.expected_peers(i)) == 2
    # Each route connection a server reports is one a proxy carries: none is direct.
    await eventually(lambda: routes_all_on_proxies(nats_cluster))
    carried = proxied_bytes(nats_cluster)
    await deliver(clients[0], got, b"again")
    assert proxied_bytes(nats_cluster) > carried


def proxied_bytes(cluster: NatsCluster) -> int:
    return sum(proxy.bytes_up + proxy.bytes_down for proxy in cluster.proxies.values())


async def test_a_failed_start_stops_everything_it_started(tmp_path):
    root = tmp_path / "broken"
    root.mkdir()
    (root / "n2").write_text("a file where server 2's state directory should be")
    cluster = NatsCluster(root, 3)
    with pytest.raises(ServerError, match="state directory"):
        await cluster.start()
    assert len(cluster.servers) == 3
    assert not any(server.running for server in cluster.servers)
    assert len(cluster.proxies) == 6
    assert not any(proxy.running for proxy in cluster.proxies.values())
    await cluster.stop()  # idempotent


async def test_partition_cuts_the_minority_off_and_heal_restores_traffic(nats_cluster, clients):
    loop = asyncio.get_running_loop()
    c0, c1, c2 = clients
    got1, got2 = Collector(), Collector()
    await c1.subscribe(SUBJECT, got1)
    await c2.subscribe(SUBJECT, got2)
    await deliver(c0, got1, b"before")
    await deliver(c0, got2, b"before")

    nats_cluster.partition([{0}, {1, 2}])
    for n in range(50):
        await c0.publish(SUBJECT, b"during-%d" % n)
    await c0.flush()
    await deliver(c1, got2, b"one-to-two")  # the majority side still talks
    await deliver(c2, got1, b"two-to-one")
    await nats_cluster.wait_routes(timeout=5)
    assert await nats_cluster.peers(0) == set()
    assert await nats_cluster.peers(1) == {nats_cluster.server_name(2)}

    nats_cluster.heal()
    healed = loop.time()
    await nats_cluster.wait_routes(timeout=10)
    await deliver(c0, got2, b"after")
    await deliver(c0, got1, b"after")
    heal_seconds = loop.time() - healed
    assert heal_seconds < 5.0, f"traffic took {heal_seconds:.2f} s to flow again"
    # Per publisher, NATS keeps order: a message sent during the cut would have arrived
    # before the first "after" one. None did.
    for got in (got1, got2):
        assert not [data for data in got.data if data.startswith(b"during-")]


async def test_cut_everywhere_leaves_no_route_and_gossip_cannot_route_around(nats_cluster):
    c = nats_cluster
    c.partition([{0}, {1}, {2}])
    await c.wait_routes(0, timeout=5)  # every route was on a proxy: none survives the cut
    with pytest.raises(TimeoutError):
        await c.wait_flow(0, 2, timeout=0.5)

    refused_before = c.refused_implicit_routes(0) + c.refused_implicit_routes(2)
    # Linking 0-1 and 1-2 but not 0-2: server 1 tells 0 and 2 about each other, and they
    # dial each other's advertised address, which refuses: no direct 0-2 route may appear.
    c.restore_link(0, 1)
    c.restore_link(1, 2)
    await c.wait_routes(timeout=10)
    await eventually(
        lambda: c.refused_implicit_routes(0) + c.refused_implicit_routes(2) > refused_before
    )
    assert await c.peers(0) == {c.server_name(1)}
    assert await c.peers(2) == {c.server_name(1)}
    with pytest.raises(TimeoutError):  # routes are not transitive in NATS: 0 cannot reach 2
        await c.wait_flow(0, 2, timeout=0.5)
    await c.wait_flow(0, 1)
    await c.wait_flow(1, 2)


async def test_without_the_closed_advertised_port_gossip_bypasses_the_proxies(tmp_path):
    """The control for the test above: it shows the trap the harness avoids is real."""
    async with NatsCluster(tmp_path / "trap", 3, advertise_closed=False) as c:
        await c.wait_routes()
        c.partition([{0}, {1}, {2}])
        # No waiting for the routes to drop: direct ones may already exist and never will.
        c.restore_link(0, 1)
        c.restore_link(1, 2)
        name2 = c.server_name(2)
        await eventually(lambda: _has_peer(c, 0, name2))
        await c.wait_flow(0, 2)  # traffic crosses a link that is cut


async def _has_peer(cluster: NatsCluster, i: int, name: str) -> bool:
    return name in await cluster.peers(i)


async def test_killed_server_restarts_and_its_clients_reconnect(nats_cluster, clients, observers):
    c0, c1, c2 = clients
    got1, got2 = Collector(), Collector()
    await c1.subscribe(SUBJECT, got1)
    await c2.subscribe(SUBJECT, got2)
    await deliver(c0, got1, b"before")

    await nats_cluster.kill(1)
    assert not nats_cluster.servers[1].running
    await eventually(lambda: observers[1].count("disconnected") == 1)
    assert not c1.connected  # no other server was advertised to it: it waits for server 1
    await nats_cluster.wait_routes(timeout=10)  # 0 and 2 see only each other
    await deliver(c0, got2, b"while-down")

    await nats_cluster.restart(1)
    await eventually(lambda: observers[1].count("reconnected") == 1)
    assert c1.connected
    await nats_cluster.wait_routes(timeout=10)
    await deliver(c0, got1, b"after")  # c1's subscription came back with the connection
    await deliver(c1, got2, b"from-one")
