"""Histories whose truth is known: for property tests, benchmarks and the EVENTUAL control.

Invariants:

- :func:`generate_history` runs a sequential model: every operation gets a linearization
  point inside its ``[call, ret]`` interval (anywhere after ``call`` for an indeterminate one
  that took effect; none for one that did not), outputs are computed by applying the operations
  in the order of those points, so the history is linearizable by construction.
- :func:`eventual_history` simulates two replicas with asynchronous last-writer-wins
  replication and clients reading their local replica: what the EVENTUAL mode promises, which
  is not linearizability (a client reads its replica's old value after another client's write
  completed elsewhere). With ``sync=True`` replication is instantaneous (one copy in effect),
  the control's control: that history is linearizable.
- Randomness comes from the caller's seeded ``random.Random``; no clock.
"""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass
from typing import Any

from broker.lincheck._history import Fail, Operation, Value

__all__ = ["NEVER_WRITTEN", "eventual_history", "generate_history"]

NEVER_WRITTEN: Value = -1
"""No generated write, CAS or create ever stores this value, and no generated counter reaches
it (adds are positive): a read of it is illegal in every history generated here."""


@dataclass
class _Draft:
    client: int
    call: float
    ret: float | None
    point: float | None  # linearization point; None: an indeterminate op that never happened
    key: str
    f: str = ""
    arg: Any = None
    out: Any = None


_FUNCTIONS = {
    "register": ("read", "write"),
    "cas": ("read", "write", "cas", "cas", "create"),
    "counter": ("read", "add"),
}


def generate_history(
    rng: random.Random,
    model: str,
    *,
    ops: int,
    keys: int = 1,
    clients: int = 3,
    indeterminate: float = 0.0,
    max_indeterminate: int = 6,
    values: int = 4,
    overlap: float = 1.0,
) -> list[Operation]:
    """A linearizable history of ``ops`` operations of ``model`` (``register``, ``cas``,
    ``counter``) on ``keys`` keys (``k0``, ``k1``, ...) by ``clients`` concurrent clients.

    Each client runs its operations one after another with random durations (``overlap`` scales
    them: larger means more concurrency). With probability ``indeterminate`` an operation gets
    no response (at most ``max_indeterminate`` of them: each one stays concurrent with
    everything after it, and proving a history illegal costs up to twice as much per such
    operation); it took effect or not with even odds, and its client is replaced by a fresh
    one (a crashed Jepsen process), since a client never overlaps itself. Values written are
    ``0 .. values-1``; reads returning :data:`NEVER_WRITTEN` are impossible.
    """
    free = [rng.random() for _ in range(clients)]
    names = list(range(clients))
    fresh = clients
    drafts: list[_Draft] = []
    for _ in range(ops):
        slot = rng.randrange(clients)
        call = free[slot] + rng.random() * 0.2
        duration = rng.random() * overlap
        key = f"k{rng.randrange(keys)}"
        if rng.random() < indeterminate and fresh - clients < max_indeterminate:
            took = rng.random() < 0.5
            point = call + rng.random() * 4 * overlap if took else None
            drafts.append(_Draft(names[slot], call, None, point, key))
            names[slot], fresh = fresh, fresh + 1
            free[slot] = call + duration
        else:
            ret = call + duration
            drafts.append(_Draft(names[slot], call, ret, call + rng.random() * duration, key))
            free[slot] = ret
    state: dict[str, Any] = {}
    init: Any = 0 if model == "counter" else None
    functions = _FUNCTIONS[model]
    done = sorted((d for d in drafts if d.point is not None), key=lambda d: d.point or 0.0)
    for d in done:
        _apply(rng, model, functions, d, state, init, values)
    for d in drafts:
        if d.point is None:  # never took effect: any operation that does not read
            d.f = rng.choice([f for f in functions if f != "read"])
            d.arg = _arg(rng, d.f, values, state.get(d.key, init))
    return [Operation(client=d.client, call=d.call, ret=d.ret, f=d.f, arg=d.arg,
                      out=None if d.ret is None else d.out, key=d.key) for d in drafts]


def _arg(rng: random.Random, f: str, values: int, current: Any) -> Any:
    if f == "write" or f == "create":
        return rng.randrange(values)
    if f == "add":
        return rng.randint(1, 3)
    if f == "cas":
        # Half the time the expected value is the current one, so some CAS succeed.
        expected = current if rng.random() < 0.5 else rng.randrange(values)
        return (expected, rng.randrange(values))
    return None


def _apply(rng: random.Random, model: str, functions: tuple[str, ...], d: _Draft,
           state: dict[str, Any], init: Any, values: int) -> None:
    current = state.get(d.key, init)
    d.f = rng.choice(functions)
    d.arg = _arg(rng, d.f, values, current)
    if d.f == "read":
        d.out = current
    elif d.f == "write":
        state[d.key] = d.arg
    elif d.f == "add":
        state[d.key] = current + d.arg
    else:
        expected, new = (None, d.arg) if d.f == "create" else d.arg
        swapped = type(current) is type(expected) and current == expected
        if swapped:
            state[d.key] = new
            d.out = True
        else:
            d.out = Fail(current) if rng.random() < 0.5 else False


def eventual_history(
    rng: random.Random,
    *,
    ops: int = 40,
    clients: int = 4,
    keys: int = 1,
    max_delay: float = 2.0,
    sync: bool = False,
) -> list[Operation]:
    """The history of a simulated eventually consistent register store.

    Two replicas; client ``c`` talks to replica ``c % 2``. A write applies to the client's
    replica at its execution point, is acknowledged, and reaches the other replica after a
    random delay up to ``max_delay`` (last writer wins by execution time, so replicas
    converge); a read returns the local replica's value. Written values are unique (1, 2, ...).
    With ``sync=True`` a write reaches both replicas at its execution point.
    """
    # Plan each client's sequential operations: call, execution point, response.
    plan: list[tuple[float, float, float, int, str, str]] = []
    for c in range(clients):
        t = rng.random()
        for _ in range(ops // clients):
            call = t + rng.random() * 0.3
            point = call + rng.random() * 0.3
            ret = point + rng.random() * 0.3
            f = "write" if rng.random() < 0.5 else "read"
            plan.append((point, call, ret, c, f"k{rng.randrange(keys)}", f))
            t = ret
    # Events in time order: executions and replication arrivals.
    replicas: list[dict[str, tuple[float, int]]] = [{}, {}]
    events: list[tuple[float, int, Any]] = [(p[0], 1, p) for p in plan]
    heapq.heapify(events)
    history: list[Operation] = []
    written = 0
    while events:
        _at, kind, item = heapq.heappop(events)
        if kind == 0:  # a replicated write arrives
            replica, key, stamp, value = item
            if replicas[replica].get(key, (-1.0, 0))[0] < stamp:
                replicas[replica][key] = (stamp, value)
            continue
        point, call, ret, c, key, f = item
        local = replicas[c % 2]
        if f == "write":
            written += 1
            local[key] = (point, written)
            other = 1 - c % 2
            delay = 0.0 if sync else rng.random() * max_delay
            if sync:
                replicas[other][key] = (point, written)
            else:
                heapq.heappush(events, (point + delay, 0, (other, key, point, written)))
            history.append(Operation(c, call, ret, "write", written, None, key))
        else:
            history.append(Operation(c, call, ret, "read", None,
                                     local.get(key, (0.0, None))[1], key))
    history.sort(key=lambda op: op.call)
    return history

