"""Two replicas over an in-memory bus, each on its own SQLite store, and a store whose
appends a test can hold (shared by the replica tests of the write path)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from broker.codec import Signer, TrustRoster, WireCodec
from broker.replica import Replica, ReplicaConfig
from broker.store import DurableStore
from broker.testing import memory_transport_pair

SA, SB = Signer("a", b"a" * 32), Signer("b", b"b" * 32)
ROSTER = TrustRoster({"a": SA.public_key, "b": SB.public_key})


class GatedStore(DurableStore):
    """Holds each append until ``gate`` is set (so writes queue behind it); ``entered`` is
    set when an append arrives; ``appends`` records each one's records and received marks."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.appends: list[tuple[list[bytes], list[int]]] = []

    def append(self, subject: str, records: Any, *, received: Any = ()) -> int:
        self.entered.set()
        self.gate.wait(5)
        self.appends.append((list(records), list(received)))
        return super().append(subject, records, received=received)


def replica(signer: Signer, transport: Any, store: DurableStore, **cfg: Any) -> Replica:
    """A replica of subject ``s`` (catch-ups time out fast), with ``cfg`` for its config."""
    config = ReplicaConfig(namespace="ns", subject="s", catchup_timeout=0.05, **cfg)
    return Replica(signer=signer, roster=ROSTER, codec=WireCodec(), transport=transport,
                   store=store, config=config)


async def replica_pair(
    tmp: Path, store_a: DurableStore | None = None, store_b: DurableStore | None = None,
    **cfg: Any,
) -> tuple[Replica, Replica]:
    """Replicas ``a`` and ``b`` (started) on stores ``store_a``, ``store_b`` (opened here;
    default: plain stores in ``tmp``)."""
    ta, tb = memory_transport_pair(names=("a", "b"))
    sa = store_a if store_a is not None else DurableStore(tmp / "a.db")
    sb = store_b if store_b is not None else DurableStore(tmp / "b.db")
    sa.open()
    sb.open()
    a, b = replica(SA, ta, sa, **cfg), replica(SB, tb, sb, **cfg)
    await a.start()
    await b.start()
    return a, b


async def until(check: Callable[[], object], what: str, seconds: float = 5.0) -> None:
    """Wait until ``check()`` is true (polling), else fail naming ``what``."""
    for _ in range(int(seconds / 0.005)):
        if check():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"not reached: {what}")
