"""Fixtures for chaos tests: a 3-server nats-server cluster whose routes pass through proxies."""

from __future__ import annotations

import pytest

from broker.chaos import NatsCluster


@pytest.fixture
async def nats_cluster(tmp_path):
    """Three clustered nats-servers with JetStream, every route through its own ``TcpProxy``,
    all routes up; every server and proxy is stopped even if the test fails."""
    async with NatsCluster(tmp_path / "cluster", 3) as cluster:
        await cluster.wait_routes()
        yield cluster
