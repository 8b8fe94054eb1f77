"""One harness over every ``Transport`` implementation, so the contract is tested once.

In the spirit of ``trio.testing.check_two_way_stream``: each case in this package takes the
``harness`` fixture, parametrised over the in-memory transport and the NATS transport (a
real nats-server on loopback), and must pass unchanged against both. A case that only one
implementation can express (partitions, reconnects, server files) stays in that
implementation's own test module.

Invariant: every transport and server the harness starts, it stops (also when a test fails).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from broker.testing import running_nats_server
from broker.transport import EmbeddedNatsServer, MemoryNetwork, NatsTransport, Transport

#: Every Transport implementation the contract suite runs against.
KINDS = ("memory", "nats")


class Harness:
    """Makes transports of one kind that can reach each other (one network or one server)."""

    def __init__(self, kind: str, stack: contextlib.AsyncExitStack, **where: Any) -> None:
        self.kind = kind
        self._stack = stack
        self._network: MemoryNetwork | None = where.get("network")
        self._server: EmbeddedNatsServer | None = where.get("server")
        self._names = itertools.count(1)

    def transport(self, name: str = "", **options: Any) -> Transport:
        """A new transport, not started (``options``: observer, pending limits, echo,
        drain_timeout); the harness stops it at the end of the test."""
        name = name or f"t{next(self._names)}"
        made: Transport
        if self._network is not None:
            made = self._network.transport(name, **options)
        else:
            assert self._server is not None
            options.setdefault("reconnect_time_wait", 0.05)
            options.setdefault("drain_timeout", 2.0)
            made = NatsTransport([self._server.url], name=name, **options)
        self._stack.push_async_callback(made.stop)  # stop is idempotent
        return made

    async def started(self, name: str = "", **options: Any) -> Transport:
        """A new started transport (see ``transport``)."""
        made = self.transport(name, **options)
        await made.start()
        return made

    async def pair(self) -> tuple[Transport, Transport]:
        """Two started transports, ``a`` and ``b``."""
        return await self.started("a"), await self.started("b")


@contextlib.asynccontextmanager
async def open_harness(
    kind: str, tmp_path: Path, *, max_payload: int | None = None
) -> AsyncIterator[Harness]:
    """A harness of ``kind`` on a fresh network or server (with ``max_payload`` if given)."""
    async with contextlib.AsyncExitStack() as stack:
        if kind == "memory":
            sized = {} if max_payload is None else {"max_payload": max_payload}
            yield Harness(kind, stack, network=MemoryNetwork(**sized))
        elif kind == "nats":
            sized = {} if max_payload is None else {"max_payload": max_payload}
            server = await stack.enter_async_context(
                running_nats_server(tmp_path / "nats", monitor_port=None, **sized)
            )
            yield Harness(kind, stack, server=server)
        else:
            raise AssertionError(f"no harness for transport kind {kind!r}")


@pytest.fixture(params=KINDS)
def transport_kind(request: pytest.FixtureRequest) -> str:
    """The kind of transport a contract case runs against."""
    return str(request.param)


@pytest.fixture
async def harness(transport_kind: str, tmp_path: Path) -> AsyncIterator[Harness]:
    """A harness of ``transport_kind`` on a fresh network or server."""
    async with open_harness(transport_kind, tmp_path) as made:
        yield made


@pytest.fixture
async def pair(harness: Harness) -> tuple[Transport, Transport]:
    """Two started transports of ``transport_kind`` that reach each other."""
    return await harness.pair()
