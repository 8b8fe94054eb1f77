"""Kind ``person``, version 1: the shape the first services were built with."""

from __future__ import annotations

from broker.kinds import LWW, Counter, KindModel, ORSet


class PersonV1(KindModel, kind="person", version=1):
    """A person: a full name, a running total, tags."""

    name: LWW[str] = ""
    total: Counter = 0
    tags: ORSet[str] = frozenset()
