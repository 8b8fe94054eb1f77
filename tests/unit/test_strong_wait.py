"""``StrongMode._wait_applied`` after the follower marked a truncated prefix seen.

The follower, told the stream no longer holds entries before ``first`` (superseded), marks
them applied at once (``applied = first - 1``) and sets ``_skipped``; the barrier (how far it
must apply before its state is the log's again) is set only when the next entry arrives. In
between, ``applied`` can be past a reader's fence although the entries that superseded the
dropped ones were not applied: the Jepsen run (tests/jepsen) saw such reads return stale
values at their deadline. A wait must not end while ``_skipped`` is set.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from broker.errors import UnavailableError
from broker.strong import StrongMode


def _mode(applied: int, *, skipped: bool) -> StrongMode:
    mode = object.__new__(StrongMode)  # only the wait's own state: no replica, no log
    mode.replica = SimpleNamespace(  # type: ignore[assignment]
        machine=SimpleNamespace(log_applied=applied), config=SimpleNamespace(subject="s"))
    mode.timeout = 1.0
    mode._now = lambda: 100.0
    mode._failure = None
    mode._barrier = 0
    mode._skipped = skipped
    return mode


async def test_a_wait_does_not_end_while_a_skipped_prefix_has_no_barrier_yet() -> None:
    with pytest.raises(UnavailableError):
        await _mode(applied=50, skipped=True)._wait_applied(10, deadline=100.0)


async def test_a_wait_past_the_fence_ends_at_once_otherwise() -> None:
    await _mode(applied=50, skipped=False)._wait_applied(10, deadline=100.0)
