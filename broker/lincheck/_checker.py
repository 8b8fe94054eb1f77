"""The Wing-Gong-Lowe search for a linearization, per key, under a budget.

Invariants:

- A history is linearizable iff each key's part is (locality); parts are checked in key order
  and the first illegal one is reported.
- Search (Wing and Gong, with Lowe's memo): the part's call and return events, sorted by time
  (a call before a return at the same instant: touching operations are concurrent), form a
  doubly linked list. Walking from the head, a call whose operation the model accepts in the
  current state is *lifted* (its call and return leave the list) and pushed on a stack; reaching
  a return means that operation had to be linearized before anything later, so the last choice
  is popped and *unlifted* and the walk resumes after it. The search succeeds when every
  operation with a known completion is linearized; it fails when it must backtrack from an
  empty stack.
- Memo: a pair (set of linearized operations, model state) reached once is never explored
  again, since what can follow depends only on that pair. The set is an int bitset.
- Indeterminate operations have no return event: nothing forces them before anything, so they
  are linearized at any point after their call or never.
- Budget: ``max_states`` memo entries over all keys (checked at every entry), and/or a
  deadline on an injected clock (``now() >= deadline``, read once per key and then every few
  thousand steps). Out of budget: ``UNKNOWN``.
  No clock is read here.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass

from broker.errors import InvalidArgumentError
from broker.lincheck._history import HistoryError, Operation, check_times, partition
from broker.lincheck._models import MODELS, Model

__all__ = ["CheckResult", "Verdict", "check"]

_CLOCK_EVERY = 4096
"""Steps between two reads of the injected clock (a read costs more than a step)."""

_SHOWN = 8
"""Operations an explanation names at most, per list."""


class Verdict(enum.Enum):
    """What the search established."""

    OK = "linearizable"
    ILLEGAL = "NOT linearizable"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class CheckResult:
    """The verdict, and for ``ILLEGAL`` enough for a human to see why.

    ``key`` is the failing key (``ILLEGAL``) or the one the budget ran out on (``UNKNOWN``);
    ``ops`` that key's operations; ``linearized`` the longest linearizable prefix found of that
    key's history (for ``OK``: ``None`` key and empty tuples); ``state`` the model's state after
    that prefix; ``pending`` the operations that were candidates to go next there (the ones
    invoked before the earliest unlinearized completion): none of them leads to a full
    linearization. ``explored`` counts memoised states over all keys checked; ``keys`` is the
    number of keys in the history.
    """

    verdict: Verdict
    key: str | None = None
    ops: tuple[Operation, ...] = ()
    linearized: tuple[Operation, ...] = ()
    state: Hashable = None
    pending: tuple[Operation, ...] = ()
    explored: int = 0
    keys: int = 0

    @property
    def ok(self) -> bool:
        """Whether the history is linearizable."""
        return self.verdict is Verdict.OK

    def explain(self) -> str:
        """One line: the verdict, and for a failure the key, the prefix and what is stuck."""
        if self.verdict is Verdict.OK:
            return f"linearizable ({self.keys} keys, {self.explored} states explored)"
        if self.verdict is Verdict.UNKNOWN:
            return (f"unknown: budget exhausted on key {self.key!r} "
                    f"({self.explored} states explored)")
        tail = self.linearized[-3:]
        prefix = "; ".join(op.describe() for op in tail)
        if len(self.linearized) > len(tail):
            prefix = "...; " + prefix
        stuck = "; ".join(op.describe() for op in self.pending[:_SHOWN])
        if len(self.pending) > _SHOWN:
            stuck += f"; ... ({len(self.pending) - _SHOWN} more)"
        return (f"NOT linearizable: key {self.key!r}: the longest linearizable prefix holds "
                f"{len(self.linearized)} of {len(self.ops)} operations [{prefix}] and leaves "
                f"state {self.state!r}, from which none of these can go next: [{stuck}]")


class _Budget:
    """Shared by every key of one check."""

    def __init__(self, now: Callable[[], float] | None, deadline: float | None,
                 max_states: int | None) -> None:
        if (now is None) != (deadline is None):
            raise InvalidArgumentError("now and deadline come together")
        self.now, self.deadline, self.max_states = now, deadline, max_states
        self.explored = 0

    def states_left(self) -> float:
        """Memo entries the next key may add before the budget is out."""
        return math.inf if self.max_states is None else self.max_states - self.explored

    def late(self) -> bool:
        """Whether the deadline has passed."""
        return self.now is not None and self.now() >= self.deadline  # type: ignore[operator]


@dataclass
class _Outcome:
    verdict: Verdict
    linearized: list[int]
    state: Hashable
    pending: list[int]


def _search(model: Model, ops: Sequence[Operation], budget: _Budget) -> _Outcome:
    """WGL search over one key's operations (indeterminate reads already dropped)."""
    n = len(ops)
    # Nodes: call of op i is 2i, its return 2i+1; head 2n and tail 2n+1 are sentinels.
    events = [(op.call, 0, 2 * i) for i, op in enumerate(ops)]
    events += [(op.ret, 1, 2 * i + 1) for i, op in enumerate(ops) if op.ret is not None]
    events.sort()
    head, tail = 2 * n, 2 * n + 1
    nxt = [0] * (2 * n + 2)
    prv = [0] * (2 * n + 2)
    last = head
    for _, _, node in events:
        nxt[last], prv[node] = node, last
        last = node
    nxt[last], prv[tail] = tail, last
    finite = [op.ret is not None for op in ops]
    remaining = sum(finite)
    step = model.step
    states_left = budget.states_left()

    state: Hashable = model.init()
    if remaining == 0:
        return _Outcome(Verdict.OK, [], state, [])
    bits = 0
    stack: list[tuple[int, Hashable]] = []
    memo: set[tuple[int, type, Hashable]] = set()
    best: _Outcome | None = None
    steps = 0
    entry = nxt[head]
    try:
        while True:
            steps += 1
            if steps % _CLOCK_EVERY == 0 and budget.late():
                return _Outcome(Verdict.UNKNOWN, [], state, [])
            if not entry & 1:  # a call: try to linearize its operation now
                i = entry >> 1
                legal, after = step(state, ops[i])
                if legal:
                    seen = bits | (1 << i)
                    k = (seen, type(after), after)
                    if k not in memo:
                        if len(memo) >= states_left:
                            return _Outcome(Verdict.UNKNOWN, [], state, [])
                        memo.add(k)
                        stack.append((i, state))
                        state, bits = after, seen
                        # lift: the call leaves the list, and the return if there is one
                        p, q = prv[entry], nxt[entry]
                        nxt[p], prv[q] = q, p
                        if finite[i]:
                            r = entry + 1
                            p, q = prv[r], nxt[r]
                            nxt[p], prv[q] = q, p
                            remaining -= 1
                            if remaining == 0:
                                return _Outcome(Verdict.OK, [j for j, _ in stack], state, [])
                        entry = nxt[head]
                        continue
                entry = nxt[entry]
                continue
            # A return (or the tail, unreachable while a completion remains): backtrack.
            if best is None or len(stack) > len(best.linearized):
                best = _Outcome(Verdict.ILLEGAL, [j for j, _ in stack], state,
                                _window(nxt, head, tail))
            if not stack:
                return best
            i, state = stack.pop()
            bits &= ~(1 << i)
            c = 2 * i
            if finite[i]:  # unlift in the reverse order: the return first
                r = c + 1
                nxt[prv[r]] = r
                prv[nxt[r]] = r
                remaining += 1
            nxt[prv[c]] = c
            prv[nxt[c]] = c
            entry = nxt[c]
    finally:
        budget.explored += len(memo)


def _window(nxt: list[int], head: int, tail: int) -> list[int]:
    """The operations whose calls come before the first return still in the list."""
    out: list[int] = []
    node = nxt[head]
    while node != tail and not node & 1:
        out.append(node >> 1)
        node = nxt[node]
    return out


def check(
    history: Iterable[Operation],
    model: Model | str = "cas",
    *,
    now: Callable[[], float] | None = None,
    deadline: float | None = None,
    max_states: int | None = None,
) -> CheckResult:
    """Check that ``history`` is linearizable for ``model`` (an instance or a name in
    :data:`MODELS`), key by key.

    ``now``/``deadline`` (together) bound the time: the check gives up with ``UNKNOWN`` once
    ``now() >= deadline``; ``max_states`` bounds the memoised states over all keys. Raises
    :class:`HistoryError` for a malformed operation (before any search).
    """
    if isinstance(model, str):
        if model not in MODELS:
            raise HistoryError(f"unknown model {model!r} (one of {', '.join(MODELS)})")
        model = MODELS[model]
    parts = partition(op.settled() for op in history)
    for ops in parts.values():
        for op in ops:
            check_times(op)
            model.validate(op)
    budget = _Budget(now, deadline, max_states)
    for key in sorted(parts):
        if budget.late():
            return CheckResult(Verdict.UNKNOWN, key=key, ops=tuple(parts[key]),
                               explored=budget.explored, keys=len(parts))
        # An indeterminate read constrains nothing: drop it before the search.
        ops = [op for op in parts[key] if not (op.ret is None and op.f == "read")]
        found = _search(model, ops, budget)
        if found.verdict is Verdict.OK:
            continue
        if found.verdict is Verdict.UNKNOWN:
            return CheckResult(Verdict.UNKNOWN, key=key, ops=tuple(ops),
                               explored=budget.explored, keys=len(parts))
        pending = sorted(found.pending, key=lambda j: (ops[j].call, j))
        return CheckResult(
            Verdict.ILLEGAL, key=key, ops=tuple(ops),
            linearized=tuple(ops[j] for j in found.linearized), state=found.state,
            pending=tuple(ops[j] for j in pending), explored=budget.explored, keys=len(parts),
        )
    return CheckResult(Verdict.OK, explored=budget.explored, keys=len(parts))

