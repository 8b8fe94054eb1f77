"""Fixtures for tests against a real nats-server (started per test on free loopback ports)."""

from __future__ import annotations

import pytest

from broker.testing import RecordingObserver, running_nats_server
from broker.transport import NatsTransport


@pytest.fixture
async def nats_server(tmp_path):
    """A nats-server with JetStream, state in ``tmp_path``; stopped even if the test fails."""
    async with running_nats_server(tmp_path / "nats") as server:
        yield server


@pytest.fixture
def observer():
    """Records the events of ``nats_transport``."""
    return RecordingObserver()


@pytest.fixture
async def nats_transport(nats_server, observer):
    """A NatsTransport connected to ``nats_server``, with short timeouts for tests."""
    transport = NatsTransport(
        [nats_server.url],
        name="test",
        observer=observer,
        reconnect_time_wait=0.05,
        drain_timeout=2.0,
    )
    async with transport:
        yield transport
