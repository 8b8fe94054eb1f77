"""The issues' defects, reintroduced on demand, to show the simulation finds each.

Each mutation is a context manager patching the fixed code back to its old behaviour:

- ``counter``: a counter keeps every entry of one writer (the join rule before the fix,
  ``ONE_ENTRY_PER_WRITER = False``) and deltas join without the causal gate (a delta whose
  context claims dots the receiver lacks is applied at once, as before the gate);
- ``catchup``: a catch-up that finds no peer is not retried, and a catch-up wanted while one
  runs is dropped instead of coalesced (and, as in the replica before the fix, no idle
  announce reveals a lost last batch: it would mask the rest);
- ``durable``: a local write is logged without the received state it was applied over
  (``LOG_CAUSAL_PAST = False``): a crash regresses the causal past (finding F9);
- ``forged``: the Byzantine gate is off (``_gate.forged`` and ``relayed`` accept everything,
  as before issue 17): a batch signed by one node carrying another's dots, or dots and
  timestamps near 2**63, is joined; the Byzantine mode of the simulation must fail;
- ``heal``: Merkle digests read an entry as the replica's own release holds it
  (``broker.repair.DIGEST_AS_NEWEST = False``: a v1 node's opaque flag digests differently
  from a v3 node's flag), so a mixed cluster's heal never converges.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import broker.crdt._stores as stores
import broker.repair as repair
import broker.replication._machine as machine
from broker.replication import Report
from broker.replication._gate import Relayed

__all__ = ["MUTATIONS", "mutated"]


@contextlib.contextmanager
def _patch(obj: Any, name: str, value: Any) -> Iterator[None]:
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


@contextlib.contextmanager
def _counter() -> Iterator[None]:
    with _patch(stores, "ONE_ENTRY_PER_WRITER", False), _patch(
        machine, "unseen_claims", lambda *a, **k: []
    ):
        yield


def _no_retry(self: machine.ReplicationMachine, ev: Any) -> list[Any]:
    if not self._catchup_running:
        return []
    self._catchup_running = False
    return [Report("catchup", (ev.outcome,))]


_WANT = machine.ReplicationMachine._want_catchup


def _drop_while_running(
    self: machine.ReplicationMachine, now: float, peer: str | None, **kw: Any
) -> list[Any]:
    if self._catchup_running:
        return []  # the old driver dropped a request arriving while one ran
    return _WANT(self, now, peer, **kw)


_TIMER = machine.ReplicationMachine._on_timer


def _no_idle_announce(self: machine.ReplicationMachine, ev: Any) -> list[Any]:
    if ev.name == machine.TIMER_IDLE_ANNOUNCE:
        return []  # the old replica had no idle announce either
    return _TIMER(self, ev)


@contextlib.contextmanager
def _catchup() -> Iterator[None]:
    cls = machine.ReplicationMachine
    with _patch(cls, "_on_catchup_failed", _no_retry), _patch(
        cls, "_want_catchup", _drop_while_running
    ), _patch(cls, "_on_timer", _no_idle_announce):
        # The handler table holds bound methods taken at construction: machines built
        # inside the block pick the patched ones.
        yield


@contextlib.contextmanager
def _heal() -> Iterator[None]:
    with _patch(repair, "DIGEST_AS_NEWEST", False):
        yield


@contextlib.contextmanager
def _forged() -> Iterator[None]:
    # The whole Byzantine gate: ``forged`` and the relay cut (``relayed``, which also strips
    # a batch's claims of unseen dots when it drains) accept everything.
    with _patch(machine, "forged", lambda *a, **k: None), \
            _patch(machine, "relayed", lambda doc, *a, **k: Relayed(doc)):
        yield


@contextlib.contextmanager
def _durable() -> Iterator[None]:
    with _patch(machine, "LOG_CAUSAL_PAST", False):
        yield


MUTATIONS: dict[str, Callable[[], contextlib.AbstractContextManager[None]]] = {
    "counter": _counter,
    "catchup": _catchup,
    "heal": _heal,
    "durable": _durable,
    "forged": _forged,
}


@contextlib.contextmanager
def mutated(name: str | None) -> Iterator[None]:
    """Run the block with mutation ``name`` applied (none when ``name`` is None)."""
    if name is None:
        yield
        return
    with MUTATIONS[name]():
        yield
