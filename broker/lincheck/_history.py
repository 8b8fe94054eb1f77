"""Histories: operations with an invocation and a completion time, per key.

Invariants:

- An :class:`Operation` is one call of one client on one key: ``call`` is when it was invoked,
  ``ret`` when its response arrived, or ``None`` (or ``math.inf``) when the outcome is
  indeterminate (a timeout, a crashed client): such an operation may have taken effect at any
  moment after ``call``, or never, and its ``out`` is not constrained (Jepsen's ``:info``
  operations). An operation known to have failed without effect (a refusal, an unavailable
  minority) is simply left out of the history; a CAS that answered "no" is an operation.
- Operation ``a`` precedes ``b`` in real time iff ``a.ret < b.call`` (strictly): operations that
  touch at one instant are concurrent.
- Values are JSON scalars (``None``, bool, int, float, str), so states hash and histories round
  trip through JSON lines unchanged.
- Pure: parses and prints text, reads no file and no clock.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeAlias

from broker.errors import InvalidArgumentError

__all__ = [
    "Fail",
    "HistoryError",
    "Operation",
    "Value",
    "dumps",
    "loads",
    "partition",
]

Value: TypeAlias = bool | int | float | str | None
"""What a register holds and a read returns."""

_SCALARS = (type(None), bool, int, float, str)


HistoryError = InvalidArgumentError
"""What a malformed history raises (a line is not an operation, a time is missing or a
completion precedes its invocation, an operation does not fit the model): worknode's
``InvalidArgumentError`` itself (a ``ValueError``), so the one error tree covers it. Fix the
recorded history; checking the same input again fails again."""


@dataclass(frozen=True, slots=True)
class Fail:
    """The output of a compare-and-set that did not swap and reported the value it found."""

    current: Value


@dataclass(frozen=True, slots=True)
class Operation:
    """One call of client ``client`` on ``key``: ``f`` with argument ``arg``, invoked at
    ``call``, answered with ``out`` at ``ret`` (``ret`` ``None`` or ``inf``: indeterminate,
    ``out`` ignored).

    The functions and their forms (models accept the subset they know):

    - ``read``: ``arg`` unused, ``out`` the value read (``None``: absent; counters: an int);
    - ``write``: ``arg`` the value written, ``out`` unused;
    - ``cas``: ``arg`` the pair ``(expected, new)``, ``out`` ``True`` (swapped), ``False`` (not
      swapped) or :class:`Fail` (not swapped, with the current value);
    - ``create``: create-if-absent, ``cas`` from ``None``: ``arg`` the value, ``out`` as ``cas``;
    - ``add``: counters, ``arg`` the (int) amount, ``out`` unused.
    """

    client: int | str
    call: float
    ret: float | None
    f: str
    arg: Any = None
    out: Any = None
    key: str = ""

    @property
    def indeterminate(self) -> bool:
        """Whether the outcome is unknown (no response: it may or may not have taken effect)."""
        return self.ret is None or self.ret == math.inf

    def settled(self) -> Operation:
        """This operation with an indeterminate completion spelled ``None`` (not ``inf``)."""
        return replace(self, ret=None) if self.ret is not None and self.indeterminate else self

    def describe(self) -> str:
        """A short human form: ``c1 cas(0, 1) -> True [2.0, 3.5]``."""
        if self.f == "cas" and isinstance(self.arg, tuple):
            args = ", ".join(repr(a) for a in self.arg)
        else:
            args = "" if self.f == "read" else repr(self.arg)
        shown = "?" if self.indeterminate else (
            repr(self.out) if self.f in ("read", "cas", "create") else "ok")
        end = "inf" if self.ret is None else f"{self.ret:g}"  # inf prints as inf too
        return f"{self.client} {self.f}({args}) -> {shown} [{self.call:g}, {end}]"


def partition(history: Iterable[Operation]) -> dict[str, list[Operation]]:
    """The history split per key, each part in the given order. Linearizability is local
    (Herlihy and Wing): a history is linearizable iff every key's part is, so each part is
    checked alone."""
    parts: dict[str, list[Operation]] = {}
    for op in history:
        parts.setdefault(op.key, []).append(op)
    return parts


def check_times(op: Operation) -> None:
    """Raise :class:`HistoryError` unless ``op``'s times are finite numbers, ``ret >= call``."""
    for t in (op.call,) if op.ret is None else (op.call, op.ret):
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
            raise HistoryError(f"operation of client {op.client!r}: time {t!r} is not a number")
    if op.ret is not None and op.ret < op.call:
        raise HistoryError(
            f"operation of client {op.client!r}: completes at {op.ret} before its call {op.call}"
        )


# -- JSON lines -------------------------------------------------------------------------------

_FIELDS = frozenset({"key", "client", "call", "ret", "f", "arg", "out"})


def _value(raw: object, where: str) -> Value:
    if not isinstance(raw, _SCALARS):
        raise HistoryError(f"{where}: value {raw!r} is not a JSON scalar")
    return raw


def _out(raw: object, where: str) -> Any:
    if isinstance(raw, dict):
        if set(raw) != {"fail"}:
            raise HistoryError(f"{where}: output object must be {{\"fail\": current}}")
        return Fail(_value(raw["fail"], where))
    return _value(raw, where)


def _parse(line: str, number: int) -> Operation:
    where = f"line {number}"
    try:
        raw = json.loads(line)
    except (ValueError, RecursionError):
        raise HistoryError(f"{where}: not JSON") from None
    if not isinstance(raw, dict):
        raise HistoryError(f"{where}: not a JSON object")
    unknown = set(raw) - _FIELDS
    if unknown:
        raise HistoryError(f"{where}: unknown field {sorted(unknown)[0]!r}")
    for name in ("client", "call", "f"):
        if name not in raw:
            raise HistoryError(f"{where}: field {name!r} is missing")
    client, key, f = raw["client"], raw.get("key", ""), raw["f"]
    if isinstance(client, bool) or not isinstance(client, (int, str)):
        raise HistoryError(f"{where}: client must be an int or a string")
    if not isinstance(key, str) or not isinstance(f, str):
        raise HistoryError(f"{where}: key and f must be strings")
    arg = raw.get("arg")
    arg = tuple(_value(a, where) for a in arg) if isinstance(arg, list) else _value(arg, where)
    ret = raw.get("ret")
    if ret == math.inf:  # Python's json writes and reads an unbounded completion as Infinity
        ret = None
    op = Operation(client=client, call=raw["call"], ret=ret, f=f, arg=arg,
                   out=_out(raw.get("out"), where), key=key)
    try:
        check_times(op)
    except HistoryError as exc:
        raise HistoryError(f"{where}: {exc}") from None
    return op


def loads(lines: Iterable[str]) -> list[Operation]:
    """Operations from JSON lines (one object per line, blank lines skipped):
    ``{"key": "k", "client": 1, "call": 0.5, "ret": 1.25, "f": "cas", "arg": [0, 1],
    "out": true}``; ``ret`` ``null`` or absent means indeterminate; a failed CAS that reports
    the current value has ``"out": {"fail": 3}``. Raises :class:`HistoryError` naming the line.
    """
    return [_parse(line, n) for n, line in enumerate(lines, 1) if line.strip()]


def _jsonable(op: Operation) -> dict[str, Any]:
    out: Any = {"fail": op.out.current} if isinstance(op.out, Fail) else op.out
    arg: Any = list(op.arg) if isinstance(op.arg, tuple) else op.arg
    return {"key": op.key, "client": op.client, "call": op.call, "ret": op.ret, "f": op.f,
            "arg": arg, "out": out}


def dumps(history: Sequence[Operation]) -> Iterator[str]:
    """One JSON line (no newline) per operation, the form :func:`loads` reads."""
    for op in history:
        yield json.dumps(_jsonable(op), allow_nan=False, separators=(",", ":"))
