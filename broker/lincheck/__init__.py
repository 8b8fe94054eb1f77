"""A linearizability checker (Wing-Gong-Lowe search, in the manner of Porcupine) for
register, compare-and-set and counter histories, partitioned per key, with a budget.

Usage::

    from broker.lincheck import Operation, check
    history = [
        Operation(client=1, call=0.0, ret=1.0, f="write", arg=1, key="a"),
        Operation(client=2, call=2.0, ret=3.0, f="read", out=None, key="a"),  # stale
    ]
    result = check(history, "cas", now=time.monotonic, deadline=time.monotonic() + 10)
    result.verdict    # Verdict.ILLEGAL
    result.explain()  # one line: the key, the longest prefix, the stuck operations

    python -m broker.lincheck history.jsonl --model cas --budget 10
    # prints one line; exit 0 linearizable, 1 NOT linearizable, 2 unknown or bad input;
    # --failing OUT writes the failing key's operations (JSON lines) to study or re-check

A history file holds one JSON object per line (see :func:`loads`):
``{"key": "a", "client": 1, "call": 0.5, "ret": 1.25, "f": "cas", "arg": [0, 1], "out": true}``.

Guarantees:

- **Sound and complete** within the budget: ``OK`` means a linearization exists (the search
  found one: a total order of the operations, consistent with real time, that the model
  accepts with the recorded outputs); ``ILLEGAL`` means the search exhausted every order
  (modulo memoised equivalent states) and none exists. ``UNKNOWN`` means the budget ran out
  first and claims nothing.
- **Real time**: ``a`` must precede ``b`` iff ``a.ret < b.call``; equal times are concurrent.
- **Indeterminate operations** (``ret=None``: a timeout, a crash) may take effect at any point
  after their call or never, and their outputs are ignored (Jepsen's ``:info``).
- **Per key**: the check runs key by key (linearizability is local) and reports the first
  failing key in key order, with its operations, the longest linearizable prefix found, the
  model state after it and the operations none of which can go next.
- **Models**: ``register`` (read/write, initially absent: ``None``), ``cas`` (register plus
  ``cas((expected, new))`` -> true/false/``Fail(current)`` and ``create`` = create-if-absent),
  ``counter`` (``add(n)``, ``read``; initially 0). Values compare by value and type.
- Cost: exponential in the worst case (the problem is NP-complete); in practice it grows with
  the number of operations concurrent at any moment, and each indeterminate operation stays
  concurrent with everything after it. Figures (one core): 2,000 CAS operations, 3 keys, 5
  clients, linearizable, 0.02 s; the same with one read made impossible, refuted in 0.03 s;
  with ~12 indeterminate operations per key refuted in 0.12 s, with ~33 per key not refuted
  in 3M states (26 s): keep timeouts few per key (more keys, shorter runs per key), and treat
  ``UNKNOWN`` as inconclusive, never as a pass.
- Pure: no I/O, no clock (the deadline is checked against the caller's ``now``), no global
  randomness (the simulators take a seeded ``random.Random``).

Recording a history (the Jepsen-style test):

- take ``call`` and ``ret`` from one monotonic clock in the recording process: ``call`` just
  before sending, ``ret`` just after the answer arrived;
- a timeout or a lost connection is indeterminate (``ret=None``) and the client continues under
  a new id (a client never overlaps itself); an operation known to have failed without effect
  (refused before it was sent, or answered with a definite refusal) is left out, but one
  that may have reached the log before its answer was lost is indeterminate; a CAS that
  answered "conflict" is a ``cas`` with ``out=False`` (or ``Fail(current)`` when the answer
  carries the current value);
- make every written value unique: then a CAS on values says what a CAS on versions says (map
  a version the system reports to the value written at it), and a stale read is visible.

:func:`generate_history` makes histories linearizable by construction (tests, benchmarks);
:func:`eventual_history` simulates an eventually consistent two-replica store whose histories
the checker must flag (the EVENTUAL control).
"""

from broker.lincheck._checker import CheckResult, Verdict, check
from broker.lincheck._history import (
    Fail,
    HistoryError,
    Operation,
    Value,
    dumps,
    loads,
    partition,
)
from broker.lincheck._models import MODELS, CasRegister, Counter, Model, Register
from broker.lincheck._simulate import NEVER_WRITTEN, eventual_history, generate_history

__all__ = [
    "MODELS",
    "NEVER_WRITTEN",
    "CasRegister",
    "CheckResult",
    "Counter",
    "Fail",
    "HistoryError",
    "Model",
    "Operation",
    "Register",
    "Value",
    "Verdict",
    "check",
    "dumps",
    "eventual_history",
    "generate_history",
    "loads",
    "partition",
]
