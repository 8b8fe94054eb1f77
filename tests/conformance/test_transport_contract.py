"""The ``Transport`` contract, written once and run against every implementation.

Each case here takes ``pair`` or ``harness`` (tests/conformance/conftest.py), parametrised
over ``MemoryTransport`` and ``NatsTransport`` against a real nats-server. Cases prove the
absence of a message with a sentinel published after it (order is kept per subscription and
publisher), never with a sleep. What only one implementation can show stays in
tests/unit/test_memory_transport.py or tests/integration/test_transport.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from broker.errors import (
    InvalidArgumentError,
    InvalidSubjectError,
    NoRespondersError,
    NotConnectedError,
    PayloadTooLargeError,
    TransportTimeoutError,
)
from broker.testing import Collector, RecordingObserver
from broker.transport import Msg, encoded_size

from .conftest import open_harness


async def eventually(condition: Callable[[], bool], within: float = 5.0) -> None:
    """Poll ``condition`` until it holds (a generous deadline, not a timed assertion)."""
    async with asyncio.timeout(within):
        while not condition():
            await asyncio.sleep(0.01)


async def test_publish_reaches_subscribers_with_headers(pair):
    a, b = pair
    got = Collector()
    sub = await b.subscribe("wn.ns.delta.s", got)
    await a.publish("wn.ns.delta.s", b"one", headers={"Wn-Version": " 2 "})
    await a.publish("wn.ns.delta.s", b"two")
    await got.wait_for(2)
    assert got.messages == [
        Msg("wn.ns.delta.s", b"one", "", {"Wn-Version": "2"}),
        Msg("wn.ns.delta.s", b"two", "", None),
    ]
    assert (sub.subject, sub.queue, sub.delivered, sub.dropped) == ("wn.ns.delta.s", "", 2, 0)
    assert sub.active
    assert a.connected
    assert b.connected


async def test_order_is_kept_per_subscription(pair):
    a, b = pair
    got = Collector()
    await b.subscribe("s", got)
    for i in range(50):
        await a.publish("s", str(i).encode())
    await got.wait_for(50)
    assert got.data == [str(i).encode() for i in range(50)]


async def test_wildcards(pair):
    a, b = pair
    star, tail, exact = Collector(), Collector(), Collector()
    await b.subscribe("wn.ns.delta.*", star)
    await b.subscribe("wn.ns.>", tail)
    await b.subscribe("wn.ns.rpc.svc.m", exact)
    subjects = ("wn.ns.delta.a", "wn.ns.rpc.svc.m", "wn.other.delta.a", "wn.ns.delta.a.b")
    # then one sentinel per subscription: anything wrongly matched would arrive before it
    for subject in (*subjects, "wn.ns.delta.z", "wn.ns.rpc.svc.m"):
        await a.publish(subject, b"x")
    await star.wait_for(2)
    await tail.wait_for(5)
    await exact.wait_for(2)
    assert [m.subject for m in star.messages] == ["wn.ns.delta.a", "wn.ns.delta.z"]
    assert [m.subject for m in tail.messages] == [
        "wn.ns.delta.a",
        "wn.ns.rpc.svc.m",
        "wn.ns.delta.a.b",
        "wn.ns.delta.z",
        "wn.ns.rpc.svc.m",
    ]
    assert [m.subject for m in exact.messages] == ["wn.ns.rpc.svc.m"] * 2


async def test_queue_group_gives_each_message_to_one_member(pair):
    a, b = pair
    w1, w2, w3, watcher = Collector(), Collector(), Collector(), Collector()
    await a.subscribe("jobs", w1, queue="workers")
    await b.subscribe("jobs", w2, queue="workers")
    await b.subscribe("jobs", w3, queue="other")
    await b.subscribe("jobs", watcher)
    for i in range(100):
        await a.publish("jobs", str(i).encode())
    await watcher.wait_for(100)
    await w3.wait_for(100)
    await eventually(lambda: len(w1.messages) + len(w2.messages) >= 100)
    assert sorted(w1.data + w2.data, key=int) == [str(i).encode() for i in range(100)]
    assert w1.messages  # both members get work (all to one: chance 2**-99)
    assert w2.messages
    assert len(w3.messages) == len(watcher.messages) == 100


async def test_request_reply(pair):
    a, b = pair

    async def upper(msg: Msg) -> None:
        await b.respond(msg, msg.data.upper(), headers={"Served-By": "b"})

    await b.subscribe("svc.upper", upper)
    reply = await a.request("svc.upper", b"hello", timeout=2.0)
    assert reply.data == b"HELLO"
    assert reply.headers == {"Served-By": "b"}
    replies = await asyncio.gather(
        *(a.request("svc.upper", bytes([97 + i]), timeout=2.0) for i in range(20))
    )
    assert [r.data for r in replies] == [bytes([65 + i]) for i in range(20)]


async def test_no_responders(pair):
    a, _ = pair
    with pytest.raises(NoRespondersError):
        await a.request("svc.nobody", b"", timeout=2.0)


async def test_request_timeout_is_a_retriable_timeout_error(pair):
    a, b = pair

    async def ignore(msg: Msg) -> None:
        pass

    await b.subscribe("svc.silent", ignore)
    with pytest.raises(TransportTimeoutError) as info:
        await a.request("svc.silent", b"", timeout=0.1)
    assert isinstance(info.value, TimeoutError)
    assert info.value.retriable


async def test_hundreds_of_concurrent_requests_each_get_their_own_reply(pair):
    # Pipelined on one connection; answered in reverse order, so a reply matched to its
    # request by arrival order (not by its inbox) would reach the wrong caller.
    a, b = pair
    held: list[Msg] = []
    n = 300

    async def hold(msg: Msg) -> None:
        held.append(msg)
        if len(held) == n:
            for m in reversed(held):
                await b.respond(m, b"re:" + m.data)

    await b.subscribe("svc.pipe", hold)
    replies = await asyncio.gather(
        *(a.request("svc.pipe", str(i).encode(), timeout=10.0) for i in range(n))
    )
    assert [r.data for r in replies] == [b"re:" + str(i).encode() for i in range(n)]


async def test_a_late_reply_after_a_timeout_reaches_nobody(pair):
    a, b = pair
    held: list[Msg] = []

    async def answer_later(msg: Msg) -> None:
        if msg.data == b"first":
            held.append(msg)  # answered only after the requester gave up
        else:
            await b.respond(msg, b"re:" + msg.data)

    await b.subscribe("svc.late", answer_later)
    with pytest.raises(TransportTimeoutError):
        await a.request("svc.late", b"first", timeout=0.1)
    await b.respond(held[0], b"re:first")
    assert (await a.request("svc.late", b"second", timeout=5.0)).data == b"re:second"


async def test_a_cancelled_request_leaves_the_transport_usable(pair):
    a, b = pair
    held: list[Msg] = []
    arrived = asyncio.Event()

    async def hold_first(msg: Msg) -> None:
        if msg.data == b"cancelled":
            held.append(msg)
            arrived.set()
        else:
            await b.respond(msg, b"re:" + msg.data)

    await b.subscribe("svc.cancel", hold_first)
    pending = asyncio.create_task(a.request("svc.cancel", b"cancelled", timeout=30.0))
    await arrived.wait()
    pending.cancel()
    with pytest.raises(asyncio.CancelledError):
        await pending
    await b.respond(held[0], b"re:cancelled")  # a reply to a caller that left: dropped
    replies = await asyncio.gather(
        *(a.request("svc.cancel", str(i).encode(), timeout=5.0) for i in range(10))
    )
    assert [r.data for r in replies] == [b"re:" + str(i).encode() for i in range(10)]


async def test_respond_needs_a_reply_subject(pair):
    a, _ = pair
    with pytest.raises(InvalidSubjectError):
        await a.respond(Msg("s", b""), b"x")


@pytest.mark.parametrize("subject", ["", "a b", "a.*", "a.>", "a..b", "a\r\nPUB x 1"])
async def test_invalid_subjects_are_refused_before_sending(pair, subject):
    a, b = pair
    got = Collector()
    await b.subscribe(">", got)
    with pytest.raises(InvalidSubjectError):
        await a.publish(subject, b"")
    with pytest.raises(InvalidSubjectError):
        await a.request(subject, b"", timeout=1.0)
    with pytest.raises(InvalidSubjectError):
        await a.request_many(subject, b"", timeout=1.0)
    with pytest.raises(InvalidSubjectError):
        await a.respond(Msg("s", b"", subject), b"")
    await a.publish("after", b"")
    await got.wait_for(1)
    assert [m.subject for m in got.messages] == ["after"]
    assert a.connected


@pytest.mark.parametrize("pattern", ["", "a.>.b", "a b", "a.*x", "a..b"])
async def test_invalid_patterns_and_queues_are_refused(pair, pattern):
    a, _ = pair
    got = Collector()
    with pytest.raises(InvalidSubjectError):
        await a.subscribe(pattern, got)
    with pytest.raises(InvalidSubjectError):
        await a.subscribe("ok", got, queue="bad queue")
    assert a.connected


async def test_bad_headers_data_and_timeouts_are_invalid_arguments(pair):
    a, _ = pair
    with pytest.raises(InvalidArgumentError, match="header name"):
        await a.publish("s", b"", headers={"bad key": "v"})
    with pytest.raises(InvalidArgumentError, match="control"):
        await a.publish("s", b"", headers={"k": "a\r\nb"})
    with pytest.raises(InvalidArgumentError, match="bytes"):
        await a.publish("s", "text")
    with pytest.raises(InvalidArgumentError, match="timeout"):
        await a.request("s", b"", timeout=0)
    with pytest.raises(InvalidArgumentError, match="timeout"):
        await a.request_many("s", b"", timeout=0)
    assert a.connected


async def test_max_payload_counts_headers_too(transport_kind, tmp_path):
    async with open_harness(transport_kind, tmp_path, max_payload=1024) as harness:
        a, b = await harness.pair()
        assert a.max_payload == 1024
        got = Collector()
        await b.subscribe("s", got)
        await a.publish("s", b"x" * 1024)
        with pytest.raises(PayloadTooLargeError, match="max_payload of 1024"):
            await a.publish("s", b"x" * 1025)
        headers = {"Key": "value"}
        room = 1024 - encoded_size(b"", headers)
        await a.publish("s", b"y" * room, headers=headers)
        with pytest.raises(PayloadTooLargeError):
            await a.publish("s", b"y" * (room + 1), headers=headers)
        with pytest.raises(PayloadTooLargeError):
            await a.request("s", b"x" * 1025, timeout=1.0)
        await a.publish("s", b"still connected")
        await got.wait_for(3)
        assert got.data == [b"x" * 1024, b"y" * room, b"still connected"]
        assert a.connected


async def test_a_raising_handler_is_counted_and_the_subscription_lives_on(harness):
    obs = RecordingObserver()
    a = await harness.started("a")
    b = await harness.started("b", observer=obs)
    got: list[bytes] = []

    async def picky(msg: Msg) -> None:
        if msg.data == b"bad":
            raise ValueError("boom")
        got.append(msg.data)

    sub = await b.subscribe("s", picky)
    for data in (b"1", b"bad", b"2"):
        await a.publish("s", data)
    await eventually(lambda: len(got) == 2)
    assert got == [b"1", b"2"]
    assert sub.handler_errors == 1
    assert sub.delivered == 3
    [(_, subject, exc)] = [e for e in obs.events if e[0] == "handler_error"]
    assert subject == "s"
    assert isinstance(exc, ValueError)


async def test_a_raising_observer_does_not_break_delivery(harness):
    class Broken(RecordingObserver):
        def handler_error(self, subject, exc):
            raise RuntimeError("observer bug")

    a = await harness.started("a")
    b = await harness.started("b", observer=Broken())
    got = Collector()

    async def fail(msg: Msg) -> None:
        raise ValueError

    await b.subscribe("s", fail)
    await b.subscribe("s", got)
    await a.publish("s", b"1")
    await a.publish("s", b"2")
    await got.wait_for(2)
    assert got.data == [b"1", b"2"]
    assert b.connected


async def test_slow_consumer_drops_are_counted_and_reported(harness):
    obs = RecordingObserver()
    a = await harness.started("a")
    b = await harness.started("b", observer=obs, pending_msgs_limit=4)
    calls: list[int] = []
    release = asyncio.Event()
    handled: list[bytes] = []

    async def slow(msg: Msg) -> None:
        await release.wait()
        handled.append(msg.data)

    sub = await b.subscribe("s", slow, on_slow_consumer=lambda: calls.append(sub.dropped))
    for i in range(50):
        await a.publish("s", bytes([i]))
    await a.flush()
    # every message that reached the subscriber is handled, pending or counted as dropped
    await eventually(lambda: sub.delivered + sub.pending + sub.dropped == 50)
    assert sub.dropped > 0
    await eventually(lambda: obs.dropped() == sub.dropped)
    assert calls
    assert len(calls) == obs.count("slow_consumer")
    release.set()
    await eventually(lambda: sub.delivered + sub.dropped == 50)
    await eventually(lambda: len(handled) == sub.delivered)
    assert handled == sorted(handled)  # order kept among the survivors
    assert b.connected


async def test_unsubscribe_stops_delivery_and_is_idempotent(pair):
    a, b = pair
    got, watcher = Collector(), Collector()
    sub = await b.subscribe("s", got)
    await b.subscribe("s", watcher)
    await a.publish("s", b"1")
    await got.wait_for(1)
    await sub.unsubscribe()
    await sub.unsubscribe()
    assert not sub.active
    await a.publish("s", b"2")
    await watcher.wait_for(2)
    assert got.data == [b"1"]


async def test_a_handler_may_unsubscribe_itself(pair):
    a, b = pair
    got: list[bytes] = []

    async def once(msg: Msg) -> None:
        got.append(msg.data)
        await sub.unsubscribe()

    sub = await b.subscribe("s", once)
    watcher = Collector()
    await b.subscribe("s", watcher)
    for data in (b"1", b"2", b"3"):
        await a.publish("s", data)
    await watcher.wait_for(3)
    await eventually(lambda: not sub.active)
    assert got == [b"1"]
    await sub.unsubscribe()  # idempotent


async def test_stop_drains_pending_messages_then_refuses_work(harness):
    a = await harness.started("a")
    consumer = await harness.started("drained", drain_timeout=5.0)
    gate = asyncio.Event()
    handled: list[bytes] = []

    async def gated(msg: Msg) -> None:
        await gate.wait()
        handled.append(msg.data)

    sub = await consumer.subscribe("s", gated)
    for i in range(30):
        await a.publish("s", bytes([i]))
    await a.flush()
    await eventually(lambda: sub.delivered + sub.pending == 30)
    stopping = asyncio.create_task(consumer.stop())
    await asyncio.sleep(0.05)
    assert handled == []
    assert not stopping.done()  # waiting for the handler to work through what is pending
    gate.set()
    await stopping
    assert handled == [bytes([i]) for i in range(30)]
    assert sub.dropped == 0
    await consumer.stop()  # idempotent
    assert not consumer.connected
    with pytest.raises(NotConnectedError):
        await consumer.publish("s", b"")
    with pytest.raises(NotConnectedError):
        await consumer.subscribe("s", gated)
    with pytest.raises(NotConnectedError):
        await consumer.request("s", b"", timeout=1.0)
    await a.publish("s", b"nobody listens")


async def test_a_transport_not_started_refuses_work(harness):
    idle = harness.transport("idle")
    assert not idle.connected
    got = Collector()
    with pytest.raises(NotConnectedError, match="not started"):
        await idle.publish("s", b"")
    with pytest.raises(NotConnectedError):
        await idle.subscribe("s", got)
    with pytest.raises(NotConnectedError):
        await idle.request("s", b"", timeout=1.0)
    with pytest.raises(NotConnectedError):
        await idle.request_many("s", b"", timeout=1.0)
    with pytest.raises(NotConnectedError):
        await idle.flush()
    await idle.stop()
    assert not idle.connected


async def test_pending_requests_fail_when_the_requester_stops(pair):
    a, b = pair

    async def ignore(msg: Msg) -> None:
        pass

    await b.subscribe("svc", ignore)
    pending = asyncio.create_task(a.request("svc", b"", timeout=5.0))
    await asyncio.sleep(0.05)
    await a.stop()
    with pytest.raises(NotConnectedError):
        await pending


async def test_echo_off_skips_own_messages(harness):
    a = await harness.started("a", echo=False)
    b = await harness.started("b")
    own, other = Collector(), Collector()
    await a.subscribe("s", own)
    await b.subscribe("s", other)
    await a.publish("s", b"from a")
    await a.flush()  # the server has routed "from a" before b's message below
    await b.publish("s", b"from b")
    await own.wait_for(1)
    await other.wait_for(2)
    assert own.data == [b"from b"]
    assert other.data == [b"from a", b"from b"]


async def test_request_many_sends_headers_and_waits_past_refused_replies(pair):
    """``headers`` travel with the request; a reply ``accept`` refuses is dropped and the
    wait goes on for one it takes (a catch-up skips a forged answer that came first)."""
    a, b = pair

    async def forger(msg: Msg) -> None:
        await b.respond(msg, b"forged")

    async def honest(msg: Msg) -> None:
        await asyncio.sleep(0.05)  # after the forger's
        await b.respond(msg, b"honest:" + (msg.headers or {}).get("X-Kind", "").encode())

    await b.subscribe("svc.state", forger)
    await b.subscribe("svc.state", honest)
    seen: list[bytes] = []

    def accept(msg: Msg) -> bool:
        seen.append(msg.data)
        return msg.data != b"forged"

    got = await a.request_many(
        "svc.state", b"", timeout=5.0, max_replies=1, headers={"X-Kind": "request"},
        accept=accept,
    )
    assert [m.data for m in got] == [b"honest:request"]
    assert seen == [b"forged", b"honest:request"]
    assert await a.request_many("svc.state", b"", timeout=0.3, accept=lambda m: False) == []


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
    everyone = await a.request_many("svc.who", b"", timeout=2.0)
    assert sorted(m.data for m in everyone) == [b"late", b"prompt", b"prompt"]
    assert await a.request_many("svc.nobody", b"", timeout=0.05, idle=0.01) == []
    # With min_replies, the pause counts only once that many answered: the late one is kept.
    waited = await a.request_many("svc.who", b"", timeout=5.0, idle=0.05, min_replies=3)
    assert sorted(m.data for m in waited) == [b"late", b"prompt", b"prompt"]
