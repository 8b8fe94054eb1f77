"""Sequential specifications: what one key does when operations run one at a time.

Invariants:

- A model is deterministic: ``step(state, op)`` returns ``(legal, next_state)``, where
  ``legal`` says whether ``op`` with its recorded output can happen in ``state``. States are
  hashable and compared by value *and* type (``1``, ``1.0`` and ``True`` are different values
  here, as they are on the wire), so the checker can memoise them.
- Operations come settled (:meth:`Operation.settled`: ``ret is None`` when indeterminate).
  An indeterminate operation is stepped as if it took effect, whatever its
  output; that it did not take effect is the checker's other branch (never linearizing it).
  For a CAS whose expected value does not match, taking effect is not possible, so the step is
  illegal and only the "never" branch remains (a failed CAS changes nothing, exactly like one
  that never ran).
- ``validate`` rejects operations the model does not know with :class:`HistoryError` before
  any search starts, so a typo is an error, never a verdict.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Protocol

from broker.lincheck._history import _SCALARS, Fail, HistoryError, Operation

__all__ = ["MODELS", "CasRegister", "Counter", "Model", "Register", "same"]


def same(a: object, b: object) -> bool:
    """Equal values of the same type (``1 == True`` in Python, not on the wire)."""
    return type(a) is type(b) and a == b


class Model(Protocol):
    """A sequential specification of one key."""

    name: str

    def init(self) -> Hashable:
        """The state before any operation."""
        ...

    def step(self, state: Hashable, op: Operation) -> tuple[bool, Hashable]:
        """Whether ``op`` (with its output) can happen in ``state``, and the state after it."""
        ...

    def validate(self, op: Operation) -> None:
        """Raise :class:`HistoryError` unless ``op`` is one of this model's operations."""
        ...


def _bad(op: Operation, why: str) -> HistoryError:
    return HistoryError(f"operation {op.describe()} on key {op.key!r}: {why}")


def _scalar(op: Operation, v: object, what: str) -> None:
    if not isinstance(v, _SCALARS):
        raise _bad(op, f"{what} is not a scalar value")


class Register:
    """A read/write register, initially ``None`` (absent): ``read`` returns the last write."""

    name = "register"
    functions: frozenset[str] = frozenset({"read", "write"})

    def init(self) -> Hashable:
        """Absent."""
        return None

    def step(self, state: Hashable, op: Operation) -> tuple[bool, Hashable]:
        """Reads must see the state; writes replace it."""
        if op.f == "read":
            return op.ret is None or same(op.out, state), state
        return True, op.arg

    def validate(self, op: Operation) -> None:
        """Known functions, scalar values."""
        if op.f not in self.functions:
            raise _bad(op, f"{op.f!r} is not an operation of the {self.name} model")
        if op.f == "write":
            _scalar(op, op.arg, "the written value")
        elif op.f == "read" and op.ret is not None:
            _scalar(op, op.out, "the value read")


class CasRegister(Register):
    """A register with compare-and-set: ``cas((expected, new))`` swaps iff the value is
    ``expected``; ``create(v)`` is ``cas((None, v))`` (create-if-absent). A failure that reports
    the current value (:class:`Fail`) must report the value the register holds."""

    name = "cas"
    functions = frozenset({"read", "write", "cas", "create"})

    def step(self, state: Hashable, op: Operation) -> tuple[bool, Hashable]:
        """Reads see the state, writes replace it, CAS swaps iff the expected value is there."""
        if op.f == "read" or op.f == "write":
            return super().step(state, op)
        expected, new = (None, op.arg) if op.f == "create" else op.arg
        matches = same(state, expected)
        out = op.out
        if op.ret is None or out is True:
            return (True, new) if matches else (False, state)
        if out is False:
            return not matches, state
        return (not matches and isinstance(out, Fail) and same(out.current, state)), state

    def validate(self, op: Operation) -> None:
        """Also: a CAS takes a pair; its output is a bool or :class:`Fail`."""
        super().validate(op)
        if op.f == "cas":
            if not isinstance(op.arg, tuple) or len(op.arg) != 2:
                raise _bad(op, "cas takes a pair (expected, new)")
            _scalar(op, op.arg[0], "the expected value")
            _scalar(op, op.arg[1], "the new value")
        elif op.f == "create":
            _scalar(op, op.arg, "the created value")
        if op.f in ("cas", "create") and op.ret is not None:
            if not isinstance(op.out, (bool, Fail)):
                raise _bad(op, "a completed CAS answers true, false or {\"fail\": current}")
            if isinstance(op.out, Fail):
                _scalar(op, op.out.current, "the reported current value")


class Counter:
    """A counter, initially 0: ``add(n)`` adds the int ``n``, ``read`` returns the sum."""

    name = "counter"

    def init(self) -> Hashable:
        """Zero."""
        return 0

    def step(self, state: Hashable, op: Operation) -> tuple[bool, Hashable]:
        """Reads see the sum; adds add."""
        if op.f == "read":
            return op.ret is None or same(op.out, state), state
        assert isinstance(state, int)
        return True, state + op.arg

    def validate(self, op: Operation) -> None:
        """``add`` of an int, ``read`` of an int."""
        if op.f not in ("read", "add"):
            raise _bad(op, f"{op.f!r} is not an operation of the counter model")
        if op.f == "add" and (isinstance(op.arg, bool) or not isinstance(op.arg, int)):
            raise _bad(op, "add takes an int")
        if op.f == "read" and op.ret is not None and (
            isinstance(op.out, bool) or not isinstance(op.out, int)
        ):
            raise _bad(op, "a counter reads an int")


MODELS: dict[str, Model] = {"register": Register(), "cas": CasRegister(), "counter": Counter()}
"""The models by the name the CLI takes."""

