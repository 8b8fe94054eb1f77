"""What only MemoryTransport shows: delivery never inside publish, exact drop counts, network
faults (partitions, disconnects, seeded loss and duplication), settle, transport names.

The Transport contract it shares with NatsTransport is tested once, against both, in
tests/conformance/test_transport_contract.py."""

from __future__ import annotations

import asyncio

import pytest

from broker.errors import (
    InvalidArgumentError,
    InvalidSubjectError,
    NoRespondersError,
    NotConnectedError,
    TransportTimeoutError,
)
from broker.testing import Collector, RecordingObserver, memory_transport_pair
from broker.transport import MemoryNetwork, Msg


@pytest.fixture
async def pair():
    a, b = memory_transport_pair()
    yield a, b
    await a.stop()
    await b.stop()


async def test_publish_reaches_subscribers_later_not_inside_publish(pair):
    a, b = pair
    got = Collector()
    await b.subscribe("wn.ns.delta.s", got)
    await a.publish("wn.ns.delta.s", b"one", headers={"Wn-Version": " 2 "})
    assert got.messages == []  # delivery is never re-entrant
    await a.network.settle()
    assert got.messages == [Msg("wn.ns.delta.s", b"one", "", {"Wn-Version": "2"})]


async def test_slow_consumer_drops_are_counted_and_reported_once_per_burst():
    obs = RecordingObserver()
    net = MemoryNetwork()
    a = net.transport("a")
    b = net.transport("b", observer=obs, pending_msgs_limit=3)
    await a.start()
    await b.start()
    release = asyncio.Event()
    seen: list[bytes] = []
    calls: list[int] = []

    async def slow(msg: Msg) -> None:
        await release.wait()
        seen.append(msg.data)

    sub = await b.subscribe("s", slow, on_slow_consumer=lambda: calls.append(sub.dropped))
    for i in range(10):
        await a.publish("s", bytes([i]))
    assert sub.dropped == 7
    await asyncio.sleep(0)
    assert calls == [7]
    assert obs.events[-1] == ("slow_consumer", "s", 7)
    release.set()
    await net.settle()
    assert sub.delivered == 3
    assert sub.delivered + sub.dropped == 10
    assert seen == [bytes([0]), bytes([1]), bytes([2])]
    # a second burst is a second report
    release.clear()
    for i in range(5):
        await a.publish("s", bytes([i]))
    await asyncio.sleep(0)
    assert calls == [7, 9]
    release.set()
    await a.stop()
    await b.stop()


async def test_pending_bytes_limit_drops_too():
    net = MemoryNetwork()
    a = net.transport("a")
    b = net.transport("b", pending_bytes_limit=1000)
    await a.start()
    await b.start()
    got = Collector()
    sub = await b.subscribe("s", got)
    for _ in range(4):
        await a.publish("s", b"x" * 400)
    assert sub.dropped == 2
    await net.settle()
    assert len(got.messages) == 2
    await a.stop()
    await b.stop()


async def test_a_stopped_transport_stays_stopped_and_frees_its_name():
    net = MemoryNetwork()
    a, b = memory_transport_pair(net)
    await b.stop()
    with pytest.raises(NotConnectedError):
        await b.start()  # unlike NatsTransport, which reconnects: make a new one
    await a.publish("s", b"nobody listens")  # b left the network
    await a.stop()
    async with net.transport("b") as again:
        assert again.connected


async def test_names_are_tokens_and_unique():
    net = MemoryNetwork()
    with pytest.raises(InvalidSubjectError):
        net.transport("a.b")
    async with net.transport("a"):
        with pytest.raises(InvalidArgumentError, match="already"):
            net.transport("a")


async def test_partition_cuts_and_heal_restores():
    net = MemoryNetwork()
    a, b, c = (net.transport(n) for n in "abc")
    for t in (a, b, c):
        await t.start()
    got_b, got_c = Collector(), Collector()
    await b.subscribe("s", got_b)
    await c.subscribe("s", got_c)

    async def serve(msg: Msg) -> None:
        await c.respond(msg, b"from c")

    await c.subscribe("svc", serve)

    net.partition([[a, "b"], ["c"]])
    await a.publish("s", b"1")
    await net.settle()
    assert got_b.data == [b"1"]
    assert got_c.data == []
    assert net.partitioned == 1
    with pytest.raises(NoRespondersError):
        await a.request("svc", b"", timeout=1.0)
    assert (await c.request("svc", b"", timeout=1.0)).data == b"from c"  # c reaches itself

    net.heal()
    await a.publish("s", b"2")
    await net.settle()
    assert got_c.data == [b"2"]
    assert (await a.request("svc", b"", timeout=1.0)).data == b"from c"
    for t in (a, b, c):
        await t.stop()


async def test_a_transport_in_no_group_is_isolated():
    net = MemoryNetwork()
    a, b = memory_transport_pair(net)
    got = Collector()
    await b.subscribe("s", got)
    net.partition([["a"]])
    await a.publish("s", b"1")
    await net.settle()
    assert got.messages == []
    with pytest.raises(InvalidArgumentError):
        net.partition([["a"], ["a"]])
    await a.stop()
    await b.stop()


async def test_disconnect_and_reconnect():
    obs = RecordingObserver()
    net = MemoryNetwork()
    a = net.transport("a")
    b = net.transport("b", observer=obs)
    await a.start()
    await b.start()
    got = Collector()
    await b.subscribe("s", got)
    net.disconnect("b")
    assert not b.connected
    with pytest.raises(NotConnectedError, match="disconnected"):
        await b.publish("s", b"")
    await a.publish("s", b"lost")
    late = Collector()
    await b.subscribe("s", late)  # subscribing while disconnected works, as with NATS
    net.reconnect("b")
    await a.publish("s", b"kept")
    await net.settle()
    assert got.data == [b"kept"]
    assert late.data == [b"kept"]
    assert net.partitioned == 1
    assert [e[0] for e in obs.events] == ["connected", "disconnected", "reconnected"]
    await a.stop()
    await b.stop()


async def test_drop_and_duplicate_rates_are_seeded():
    async def run(seed: int, drop: float, dup: float) -> tuple[list[bytes], MemoryNetwork]:
        net = MemoryNetwork(seed=seed, drop_rate=drop, duplicate_rate=dup)
        a, b = memory_transport_pair(net)
        got = Collector()
        await b.subscribe("s", got)
        for i in range(200):
            await a.publish("s", i.to_bytes(2, "big"))
        await net.settle()
        await a.stop()
        await b.stop()
        return got.data, net

    first, net1 = await run(7, 0.3, 0.2)
    second, _ = await run(7, 0.3, 0.2)
    assert first == second
    assert len(first) == 200 - net1.chaos_dropped + net1.duplicated
    assert 0 < net1.chaos_dropped < 200
    assert 0 < net1.duplicated < 200
    everything, _ = await run(1, 0.0, 1.0)
    assert len(everything) == 400
    nothing, net3 = await run(1, 1.0, 0.0)
    assert nothing == []
    assert net3.chaos_dropped == 200
    with pytest.raises(InvalidArgumentError):
        net3.drop_rate = 1.5


async def test_settle_times_out_on_a_stuck_handler(pair):
    a, b = pair
    never = asyncio.Event()

    async def stuck(msg: Msg) -> None:
        await never.wait()

    await b.subscribe("s", stuck)
    await a.publish("s", b"")
    with pytest.raises(TransportTimeoutError):
        await a.network.settle(timeout=0.05)
    never.set()
