"""Shrinking a failing run to a short history: delta debugging over the schedule's steps.

A candidate is the same seed and setup with a subset of the steps (the network's choices
stay seeded by the seed, so every candidate is itself a replayable run); it is kept when it
fails with the same signature (``signature``). ``ddmin`` (Zeller) removes chunks, then single
steps, until no single removal keeps the failure, within ``budget`` runs.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from tests.sim.world import Result, Step, run

__all__ = ["SIGNATURES", "shrink", "signature"]

SIGNATURES = (
    "exception escaped",
    "snapshot does not reload",
    "record does not reload",
    "refused by its own codec",
    "value differs from the model",
    "tree invariants",
    "heal did not converge",
    "differ after healing",
    "contexts, contents differ",
    "differ without the healer",
    "did not settle",
    "over its bound",
    "catch-ups once faults stopped",
)
"""Failure classes, most specific first."""


def signature(failure: str) -> str:
    """The class of a failure: the first known phrase found, else its first line's words."""
    for phrase in SIGNATURES:
        if phrase in failure:
            return phrase
    return re.sub(r"[^a-z ]", "", failure.splitlines()[0] if failure else "")[:60]


def shrink(
    seed: int,
    schedule: tuple[dict[str, Any], list[Step]],
    failure: str,
    *,
    budget: int = 300,
    runner: Callable[..., Result] = run,
) -> tuple[list[Step], Result]:
    """The shortest failing step list found (same failure class) and its result."""
    setup, steps = schedule
    want = signature(failure)
    runs = 0
    best: Result | None = None

    def fails(cand: list[Step]) -> bool:
        nonlocal runs, best
        runs += 1
        r = runner(seed, schedule=(setup, cand))
        if not r.ok and signature(r.failure) == want:
            best = r
            return True
        return False

    n = 2
    while len(steps) >= 1 and runs < budget:
        chunk = max(1, len(steps) // n)
        reduced = False
        for i in range(0, len(steps), chunk):
            cand = steps[:i] + steps[i + chunk:]
            if runs >= budget:
                break
            if fails(cand):
                steps = cand
                n = max(n - 1, 2)
                reduced = True
                break
        if not reduced:
            if chunk == 1:
                break
            n = min(len(steps), n * 2)
    if best is None:
        best = runner(seed, schedule=(setup, steps))
    return steps, best
