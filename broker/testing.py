"""Test helpers shipped with worknode (in the spirit of ``trio.testing``).

- ``running_nats_server``: a real ``nats-server`` on free loopback ports, always stopped.
- ``memory_transport_pair``: two connected in-memory transports on a fresh network.
- ``RecordingObserver``: a ``TransportObserver`` that records every event.
- ``Collector``: a handler that keeps messages and lets a test wait for a count.

Invariant: every process a helper starts, the helper stops, also when the test fails.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker.errors import TransportTimeoutError
from broker.transport import EmbeddedNatsServer, MemoryNetwork, MemoryTransport, Msg

__all__ = ["Collector", "RecordingObserver", "memory_transport_pair", "running_nats_server"]


@asynccontextmanager
async def running_nats_server(tmp_path: Path, **kwargs: Any) -> AsyncIterator[EmbeddedNatsServer]:
    """Run an ``EmbeddedNatsServer`` with its state under ``tmp_path`` for the ``async with``
    block; ``kwargs`` go to ``EmbeddedNatsServer`` (e.g. ``max_payload=1024``)."""
    server = EmbeddedNatsServer(tmp_path, **kwargs)
    try:
        await server.start()
        yield server
    finally:
        await server.stop()


def memory_transport_pair(
    network: MemoryNetwork | None = None, names: tuple[str, str] = ("a", "b")
) -> tuple[MemoryTransport, MemoryTransport]:
    """Two started transports on ``network`` (a fresh one by default; reach it as
    ``a.network``). Stop them, or use ``async with a, b:`` (start is idempotent)."""
    net = network if network is not None else MemoryNetwork()
    first, second = net.transport(names[0]), net.transport(names[1])
    first._open()
    second._open()
    return first, second


@dataclass
class RecordingObserver:
    """A ``TransportObserver`` that records events, in order, as ``(name, *args)`` tuples."""

    events: list[tuple[Any, ...]] = field(default_factory=list)

    def connected(self) -> None:
        """Record ``("connected",)``."""
        self.events.append(("connected",))

    def disconnected(self) -> None:
        """Record ``("disconnected",)``."""
        self.events.append(("disconnected",))

    def reconnected(self) -> None:
        """Record ``("reconnected",)``."""
        self.events.append(("reconnected",))

    def slow_consumer(self, subject: str, dropped: int) -> None:
        """Record ``("slow_consumer", subject, dropped)``."""
        self.events.append(("slow_consumer", subject, dropped))

    def handler_error(self, subject: str, exc: Exception) -> None:
        """Record ``("handler_error", subject, exc)``."""
        self.events.append(("handler_error", subject, exc))

    def count(self, name: str) -> int:
        """How many events called ``name`` were recorded."""
        return sum(1 for event in self.events if event[0] == name)

    def dropped(self) -> int:
        """Messages reported dropped by all ``slow_consumer`` events."""
        return sum(event[2] for event in self.events if event[0] == "slow_consumer")


class Collector:
    """An async handler that keeps every message it gets; ``wait_for(n)`` waits for ``n``."""

    def __init__(self) -> None:
        self.messages: list[Msg] = []
        self._changed = asyncio.Event()

    async def __call__(self, msg: Msg) -> None:
        """Keep ``msg``."""
        self.messages.append(msg)
        self._changed.set()

    @property
    def data(self) -> list[bytes]:
        """The payloads received, in order."""
        return [msg.data for msg in self.messages]

    async def wait_for(self, count: int, timeout: float = 5.0) -> list[Msg]:  # noqa: ASYNC109
        """Wait until at least ``count`` messages arrived; raise ``TransportTimeoutError``."""
        try:
            async with asyncio.timeout(timeout):
                while len(self.messages) < count:
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            raise TransportTimeoutError(
                f"got {len(self.messages)} of {count} messages within {timeout} s"
            ) from None
        return self.messages
