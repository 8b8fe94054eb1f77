"""MemoryTransport keeps the Transport contract: same behaviour and errors as NATS, in-process."""

from __future__ import annotations

import asyncio

import pytest

from broker.errors import (
    InvalidArgumentError,
    InvalidSubjectError,
    NoRespondersError,
    NotConnectedError,
    PayloadTooLargeError,
    TransportTimeoutError,
)
from broker.testing import Collector, RecordingObserver, memory_transport_pair
from broker.transport import MemoryNetwork, Msg, encoded_size


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


async def test_order_is_kept_per_subscription(pair):
    a, b = pair
    got = Collector()
    await b.subscribe("s", got)
    for i in range(50):
        await a.publish("s", str(i).encode())
    await a.network.settle()
    assert got.data == [str(i).encode() for i in range(50)]


async def test_wildcards(pair):
    a, b = pair
    star, tail, exact = Collector(), Collector(), Collector()
    await b.subscribe("wn.ns.delta.*", star)
    await b.subscribe("wn.ns.>", tail)
    await b.subscribe("wn.ns.rpc.svc.m", exact)
    for subject in ("wn.ns.delta.a", "wn.ns.rpc.svc.m", "wn.other.delta.a", "wn.ns.delta.a.b"):
        await a.publish(subject, b"x")
    await a.network.settle()
    assert [m.subject for m in star.messages] == ["wn.ns.delta.a"]
    assert [m.subject for m in tail.messages] == [
        "wn.ns.delta.a",
        "wn.ns.rpc.svc.m",
        "wn.ns.delta.a.b",
    ]
    assert [m.subject for m in exact.messages] == ["wn.ns.rpc.svc.m"]


async def test_queue_group_gives_each_message_to_one_member(pair):
    a, b = pair
    w1, w2, w3, watcher = Collector(), Collector(), Collector(), Collector()
    await a.subscribe("jobs", w1, queue="workers")
    await b.subscribe("jobs", w2, queue="workers")
    await b.subscribe("jobs", w3, queue="other")
    await b.subscribe("jobs", watcher)
    for i in range(100):
        await a.publish("jobs", str(i).encode())
    await a.network.settle()
    workers = sorted(w1.data + w2.data, key=int)
    assert workers == [str(i).encode() for i in range(100)]
    assert w1.messages
    assert w2.messages
    assert len(w3.messages) == len(watcher.messages) == 100


async def test_request_reply(pair):
    a, b = pair

    async def upper(msg: Msg) -> None:
        await b.respond(msg, msg.data.upper(), headers={"Served-By": "b"})

    await b.subscribe("svc.upper", upper)
    reply = await a.request("svc.upper", b"hello", timeout=1.0)
    assert reply.data == b"HELLO"
    assert reply.headers == {"Served-By": "b"}
    replies = await asyncio.gather(*(a.request("svc.upper", b"x", timeout=1.0) for _ in range(20)))
    assert {r.data for r in replies} == {b"X"}


async def test_no_responders_and_timeout(pair):
    a, b = pair
    with pytest.raises(NoRespondersError):
        await a.request("svc.none", b"", timeout=1.0)

    async def ignore(msg: Msg) -> None:
        pass

    await b.subscribe("svc.silent", ignore)
    with pytest.raises(TransportTimeoutError) as info:
        await a.request("svc.silent", b"", timeout=0.05)
    assert isinstance(info.value, TimeoutError)
    assert info.value.retriable


async def test_respond_needs_a_reply_subject(pair):
    a, _ = pair
    with pytest.raises(InvalidSubjectError, match="no reply subject"):
        await a.respond(Msg("s", b""), b"x")


async def test_max_payload_counts_headers_too():
    net = MemoryNetwork(max_payload=100)
    a, b = memory_transport_pair(net)
    got = Collector()
    await b.subscribe("s", got)
    await a.publish("s", b"x" * 100)
    with pytest.raises(PayloadTooLargeError, match="max_payload of 100"):
        await a.publish("s", b"x" * 101)
    headers = {"K": "v"}
    room = 100 - (encoded_size(b"", headers))
    await a.publish("s", b"x" * room, headers=headers)
    with pytest.raises(PayloadTooLargeError):
        await a.publish("s", b"x" * (room + 1), headers=headers)
    with pytest.raises(PayloadTooLargeError):
        await a.request("s", b"x" * 101, timeout=1.0)
    await net.settle()
    assert len(got.messages) == 2
    assert a.max_payload == 100
    await a.stop()
    await b.stop()


@pytest.mark.parametrize("subject", ["", "a b", "a.*", "a.>", "a..b", "a\r\nPUB x"])
async def test_invalid_subjects_are_refused_before_sending(pair, subject):
    a, b = pair
    got = Collector()
    await b.subscribe(">", got)
    with pytest.raises(InvalidSubjectError):
        await a.publish(subject, b"")
    with pytest.raises(InvalidSubjectError):
        await a.request(subject, b"", timeout=1.0)
    await a.network.settle()
    assert got.messages == []


@pytest.mark.parametrize("pattern", ["", "a.>.b", "a b", "a.*x"])
async def test_invalid_patterns_and_queues_are_refused(pair, pattern):
    a, _ = pair
    got = Collector()
    with pytest.raises(InvalidSubjectError):
        await a.subscribe(pattern, got)
    with pytest.raises(InvalidSubjectError):
        await a.subscribe("ok", got, queue="bad queue")


async def test_bad_headers_and_data_are_refused(pair):
    a, _ = pair
    with pytest.raises(InvalidArgumentError, match="header name"):
        await a.publish("s", b"", headers={"bad key": "v"})
    with pytest.raises(InvalidArgumentError, match="control"):
        await a.publish("s", b"", headers={"k": "a\r\nb"})
    with pytest.raises(InvalidArgumentError, match="bytes"):
        await a.publish("s", "text")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="timeout"):
        await a.request("s", b"", timeout=0)


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


async def test_a_raising_handler_is_counted_and_the_subscription_lives_on():
    obs = RecordingObserver()
    net = MemoryNetwork()
    a = net.transport("a", observer=obs)
    await a.start()
    got: list[bytes] = []

    async def picky(msg: Msg) -> None:
        if msg.data == b"bad":
            raise ValueError("boom")
        got.append(msg.data)

    sub = await a.subscribe("s", picky)
    for data in (b"1", b"bad", b"2"):
        await a.publish("s", data)
    await net.settle()
    assert got == [b"1", b"2"]
    assert sub.handler_errors == 1
    assert sub.delivered == 3
    [(_, subject, exc)] = [e for e in obs.events if e[0] == "handler_error"]
    assert subject == "s"
    assert isinstance(exc, ValueError)
    await a.stop()


async def test_a_raising_observer_does_not_break_delivery():
    class Broken(RecordingObserver):
        def handler_error(self, subject, exc):
            raise RuntimeError("observer bug")

    net = MemoryNetwork()
    a = net.transport("a", observer=Broken())
    await a.start()
    got = Collector()

    async def fail(msg: Msg) -> None:
        raise ValueError

    await a.subscribe("s", fail)
    await a.subscribe("s", got)
    await a.publish("s", b"1")
    await a.publish("s", b"2")
    await net.settle()
    assert got.data == [b"1", b"2"]
    await a.stop()


async def test_unsubscribe_stops_delivery_and_is_idempotent(pair):
    a, b = pair
    got = Collector()
    sub = await b.subscribe("s", got)
    await a.publish("s", b"1")
    await a.network.settle()
    await sub.unsubscribe()
    await sub.unsubscribe()
    await a.publish("s", b"2")
    await a.network.settle()
    assert got.data == [b"1"]
    assert not sub.active


async def test_a_handler_may_unsubscribe_itself(pair):
    a, b = pair
    got: list[bytes] = []

    async def once(msg: Msg) -> None:
        got.append(msg.data)
        await sub.unsubscribe()

    sub = await b.subscribe("s", once)
    for data in (b"1", b"2", b"3"):
        await a.publish("s", data)
    await a.network.settle()
    assert got == [b"1"]


async def test_stop_drains_pending_messages_then_refuses_work():
    net = MemoryNetwork()
    a = net.transport("a")
    b = net.transport("b")
    await a.start()
    await b.start()
    handled: list[bytes] = []

    async def slowish(msg: Msg) -> None:
        await asyncio.sleep(0.001)
        handled.append(msg.data)

    await b.subscribe("s", slowish)
    for i in range(20):
        await a.publish("s", bytes([i]))
    await b.stop()
    assert handled == [bytes([i]) for i in range(20)]
    await b.stop()  # idempotent
    assert not b.connected
    with pytest.raises(NotConnectedError):
        await b.publish("s", b"")
    with pytest.raises(NotConnectedError):
        await b.subscribe("s", slowish)
    with pytest.raises(NotConnectedError):
        await b.start()
    await a.publish("s", b"nobody listens")  # b left the network
    await a.stop()
    # the name is free again
    async with net.transport("b") as again:
        assert again.connected


async def test_not_started_transport_refuses_work():
    net = MemoryNetwork()
    t = net.transport("t")
    assert not t.connected
    with pytest.raises(NotConnectedError, match="not started"):
        await t.publish("s", b"")
    with pytest.raises(NotConnectedError):
        await t.flush()
    await t.stop()


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


async def test_echo_off_skips_own_messages():
    net = MemoryNetwork()
    a = net.transport("a", echo=False)
    b = net.transport("b")
    await a.start()
    await b.start()
    own, other = Collector(), Collector()
    await a.subscribe("s", own)
    await b.subscribe("s", other)
    await a.publish("s", b"1")
    await net.settle()
    assert own.messages == []
    assert other.data == [b"1"]
    await a.stop()
    await b.stop()


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


async def test_pending_requests_fail_when_the_requester_stops(pair):
    a, b = pair

    async def ignore(msg: Msg) -> None:
        pass

    await b.subscribe("svc", ignore)
    pending = asyncio.create_task(a.request("svc", b"", timeout=5.0))
    await asyncio.sleep(0.01)
    await a.stop()
    with pytest.raises(NotConnectedError):
        await pending


async def test_request_many_with_idle_stops_after_a_pause(pair):
    """With ``idle``, collection ends once replies pause for that long: prompt answers are
    kept, one that comes after the pause is not (a later discovery finds it)."""
    a, b = pair

    async def prompt(msg: Msg) -> None:
        await b.respond(msg, b"prompt")

    async def late(msg: Msg) -> None:
        await asyncio.sleep(0.5)
        await b.respond(msg, b"late")

    await b.subscribe("svc.who", prompt)
    await b.subscribe("svc.who", prompt)
    await b.subscribe("svc.who", late)
    quick = await a.request_many("svc.who", b"", timeout=5.0, idle=0.05)
    assert sorted(m.data for m in quick) == [b"prompt", b"prompt"]
    everyone = await a.request_many("svc.who", b"", timeout=1.0)
    assert sorted(m.data for m in everyone) == [b"late", b"prompt", b"prompt"]
    assert await a.request_many("svc.nobody", b"", timeout=0.05, idle=0.01) == []
    # With min_replies, the pause counts only once that many answered: the late one is kept.
    waited = await a.request_many("svc.who", b"", timeout=5.0, idle=0.05, min_replies=3)
    assert sorted(m.data for m in waited) == [b"late", b"prompt", b"prompt"]
