"""Hybrid logical clock (Kulkarni et al., 2014).

A timestamp is one int: ``physical_ms << 16 | logical``. Ints compare in timestamp order and
cost one object. Invariants:

- ``now()`` is strictly greater than every timestamp this clock issued or observed;
- the physical part never runs ahead of the largest physical time given to it, except when
  the 16-bit logical part would overflow, in which case it borrows one millisecond;
- remote timestamps further ahead than ``max_drift_ms`` are refused, so one bad clock cannot
  drag every replica into the future.

Physical time is an argument: this module never reads a clock.
"""

from __future__ import annotations

from broker.errors import ClockSkewError, InvalidArgumentError

__all__ = ["DEFAULT_MAX_DRIFT_MS", "LOGICAL_BITS", "HybridClock", "hlc_logical", "hlc_physical"]

LOGICAL_BITS = 16
_LOGICAL_MASK = (1 << LOGICAL_BITS) - 1
DEFAULT_MAX_DRIFT_MS = 60_000
_MAX_TS = (1 << 63) - 1


def hlc_physical(ts: int) -> int:
    """The physical milliseconds of a hybrid timestamp."""
    return ts >> LOGICAL_BITS


def hlc_logical(ts: int) -> int:
    """The logical counter of a hybrid timestamp."""
    return ts & _LOGICAL_MASK


class HybridClock:
    """Issues monotonic hybrid timestamps from physical times passed in by the caller."""

    __slots__ = ("_last", "max_drift_ms")

    def __init__(self, last: int = 0, max_drift_ms: int = DEFAULT_MAX_DRIFT_MS) -> None:
        if not 0 <= last <= _MAX_TS:
            raise InvalidArgumentError(f"hybrid timestamp out of range: {last}")
        self._last = last
        self.max_drift_ms = max_drift_ms

    @property
    def last(self) -> int:
        """The latest timestamp issued or observed (persist it to stay monotonic on restart)."""
        return self._last

    def witness(self, ts: int) -> None:
        """Never issue a timestamp at or below ``ts`` again: ``ts`` is in state joined here
        (a catch-up state, a repair), already accepted by the peer that wrote it, so no drift
        check applies. A later write overwriting what it observed then also carries a higher
        timestamp, as last-writer-wins readers expect."""
        if not 0 <= ts <= _MAX_TS:
            raise InvalidArgumentError(f"hybrid timestamp out of range: {ts}")
        if ts > self._last:
            self._last = ts

    def now(self, physical_ms: int) -> int:
        """A new timestamp for a local event at wall time ``physical_ms``."""
        candidate = physical_ms << LOGICAL_BITS
        ts = candidate if candidate > self._last else self._last + 1
        if ts > _MAX_TS:
            raise InvalidArgumentError("hybrid clock exhausted the signed 64-bit range")
        self._last = ts
        return ts

    def observe(self, remote: int, physical_ms: int) -> int:
        """Fold in a timestamp received from a peer; return a new local timestamp after it.

        Raises ClockSkewError if ``remote`` is more than ``max_drift_ms`` ahead of
        ``physical_ms``; the clock is left unchanged then.
        """
        if not 0 <= remote <= _MAX_TS:
            raise InvalidArgumentError(f"hybrid timestamp out of range: {remote}")
        if hlc_physical(remote) - physical_ms > self.max_drift_ms:
            raise ClockSkewError(
                f"remote timestamp is {hlc_physical(remote) - physical_ms} ms ahead "
                f"(allowed {self.max_drift_ms} ms)"
            )
        if remote > self._last:
            self._last = remote
        return self.now(physical_ms)
