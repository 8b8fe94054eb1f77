"""Dots and causal contexts.

A *dot* ``(replica_id, counter)`` names one write. A :class:`CausalContext` is the set of dots a
state has seen, kept as a version vector (every counter up to ``vv[r]`` seen) plus a *cloud* of
dots seen out of order. Invariants kept by every method:

- the context is always compact: no cloud dot is at or below its replica's vector entry, and
  no cloud dot is the vector entry's successor (it would have been folded in);
- so two contexts that have seen the same set of dots are equal field by field, which makes
  digests and equality independent of delivery order;
- its size is bounded by the number of replicas plus the dots still missing a predecessor,
  never by the number of operations.

The fields are ``_vv`` (replica -> counter, no zeros) and ``_cloud`` (replica -> non-empty set
of counters). The register join in ``_stores`` reads them directly: it is the innermost step of
every delta join, where a method call per dot costs more than the check itself.

Pure: no I/O, no clock, no asyncio.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence

from broker.errors import InvalidReplicaIdError

__all__ = ["MAX_REPLICA_ID_LENGTH", "CausalContext", "Dot", "validate_replica_id"]

Dot = tuple[str, int]
"""A dot: the replica that wrote, and that replica's write counter (starting at 1)."""

MAX_REPLICA_ID_LENGTH = 64
_REPLICA_ID = re.compile(rf"[A-Za-z0-9_-]{{1,{MAX_REPLICA_ID_LENGTH}}}")


_valid_ids: set[str] = set()  # memo of ids already checked; bounded by _MEMO_LIMIT
_MEMO_LIMIT = 4096


def validate_replica_id(replica_id: object) -> str:
    """Return ``replica_id`` if it is a valid replica id, else raise InvalidReplicaIdError."""
    if type(replica_id) is str and replica_id in _valid_ids:
        return replica_id
    if not isinstance(replica_id, str) or _REPLICA_ID.fullmatch(replica_id) is None:
        raise InvalidReplicaIdError(
            f"invalid replica id {replica_id!r}: need 1-{MAX_REPLICA_ID_LENGTH} characters "
            "from [A-Za-z0-9_-]"
        )
    if len(_valid_ids) >= _MEMO_LIMIT:
        _valid_ids.clear()
    _valid_ids.add(replica_id)
    return replica_id


class CausalContext:
    """The set of dots a state has seen: a version vector plus out-of-order dots."""

    __slots__ = ("_cloud", "_vv")

    def __init__(self, vv: Mapping[str, int] | None = None, cloud: Iterable[Dot] = ()) -> None:
        self._vv: dict[str, int] = {r: n for r, n in (vv or {}).items() if n > 0}
        # replica -> counters seen out of order; never holds an empty set
        self._cloud: dict[str, set[int]] = {}
        for dot in cloud:
            self.add(dot)

    @classmethod
    def from_dots(cls, dots: Iterable[Dot]) -> CausalContext:
        """A context holding exactly ``dots`` (as a delta's context does)."""
        ctx = cls.__new__(cls)
        vv: dict[str, int] = {}
        cloud: dict[str, set[int]] = {}
        ones = False
        # Every delta's context is built here, usually from 1-2 dots: one plain loop, and the
        # fold into the vector only when a counter 1 makes it possible.
        for r, n in dots:
            ns = cloud.get(r)
            if ns is None:
                cloud[r] = {n}
            else:
                ns.add(n)
            if n == 1:
                ones = True
        ctx._vv = vv
        ctx._cloud = cloud
        if ones:
            for r in [r for r, ns in cloud.items() if 1 in ns]:
                vv[r] = 0
                ctx._absorb(r)
        return ctx

    @classmethod
    def from_parts(cls, vv: dict[str, int], cloud: dict[str, set[int]]) -> CausalContext:
        """The context ``CausalContext(vv, cloud dots)`` builds (equal to it), from a vector
        and counters grouped by replica (positive ints): built with set and dict operations
        instead of one ``add`` per dot (the decoders build every received context here).

        Takes ownership of ``vv`` and the sets in ``cloud`` (they may be changed)."""
        ctx = cls.__new__(cls)
        ctx._vv = vv if all(n > 0 for n in vv.values()) else {r: n for r, n in vv.items()
                                                                  if n > 0}
        ctx._cloud = {}
        for r, ns in cloud.items():
            if not ns:
                continue
            ctx._cloud[r] = ns
            # Compact it exactly as ``add`` would: only when a dot is at or next to the vector.
            if min(ns) <= ctx._vv.get(r, 0) + 1:
                ctx._vv[r] = ctx._vv.get(r, 0)
                ctx._absorb(r)
                if not ctx._vv[r]:
                    del ctx._vv[r]
        return ctx

    # -- queries -------------------------------------------------------------------------

    def covers(self, replica_id: str, counter: int) -> bool:
        """Whether the dot ``(replica_id, counter)`` has been seen."""
        if counter <= self._vv.get(replica_id, 0):
            return True
        extra = self._cloud.get(replica_id)
        return extra is not None and counter in extra

    def __contains__(self, dot: object) -> bool:
        if not isinstance(dot, tuple) or len(dot) != 2:
            return False
        return self.covers(dot[0], dot[1])

    def max_counter(self, replica_id: str) -> int:
        """The highest counter seen from ``replica_id`` (0 if none)."""
        extra = self._cloud.get(replica_id)
        return max(extra) if extra else self._vv.get(replica_id, 0)

    def next_dot(self, replica_id: str) -> Dot:
        """The dot ``replica_id`` uses for its next write in this state."""
        return (replica_id, self.max_counter(replica_id) + 1)

    @property
    def version_vector(self) -> dict[str, int]:
        """A copy of the contiguous part: ``{replica: highest counter seen without gaps}``."""
        return dict(self._vv)

    @property
    def cloud(self) -> frozenset[Dot]:
        """Dots seen out of order (each missing a predecessor)."""
        return frozenset((r, n) for r, ns in self._cloud.items() for n in ns)

    def dots(self) -> Iterator[Dot]:
        """Every dot seen, in ascending order per replica (can be long for a full state)."""
        for r in sorted(self._vv):
            for n in range(1, self._vv[r] + 1):
                yield (r, n)
        yield from sorted(self.cloud)

    def empty(self) -> bool:
        """Whether no dot is in it (the bottom of the lattice)."""
        return not self._vv and not self._cloud

    def size(self) -> int:
        """Metadata entries kept: vector entries plus cloud dots."""
        return len(self._vv) + sum(len(ns) for ns in self._cloud.values())

    # -- updates -------------------------------------------------------------------------

    def add(self, dot: Dot) -> None:
        """Record ``dot`` as seen, keeping the context compact."""
        r, n = dot
        top = self._vv.get(r, 0)
        if n <= top:
            return
        if n == top + 1:
            self._vv[r] = n
            if r in self._cloud:
                self._absorb(r)
        else:
            self._cloud.setdefault(r, set()).add(n)

    def merge(self, other: CausalContext) -> None:
        """In place: this context becomes the union of both. Costs O(other + what moves)."""
        vv, cloud = self._vv, self._cloud
        if other._vv:
            for r, n in other._vv.items():
                if n > vv.get(r, 0):
                    vv[r] = n
                    if r in cloud:
                        self._absorb(r)
        for r, ns in other._cloud.items():
            top = vv.get(r, 0)
            # A write's delta holds the dots it replaced (seen here already) and its own
            # dot, usually ``top + 1``: when at most one dot is unseen, nothing needs sorting.
            fresh = 0
            for n in ns:
                if n > top:
                    if fresh:
                        break
                    fresh = n
            else:
                if fresh == top + 1:
                    vv[r] = fresh
                    if r in cloud:
                        self._absorb(r)
                elif fresh:
                    cloud.setdefault(r, set()).add(fresh)
                continue
            for n in sorted(ns):
                if n == top + 1:
                    top = n
                elif n > top:
                    cloud.setdefault(r, set()).add(n)
            if top != vv.get(r, 0):
                vv[r] = top
                if r in cloud:
                    self._absorb(r)

    def issue(self, replica_id: str) -> int:
        """Record ``next_dot(replica_id)`` here (as ``add`` would); return its counter."""
        extra = self._cloud.get(replica_id)
        if extra is None:
            n = self._vv.get(replica_id, 0) + 1
            self._vv[replica_id] = n
        else:
            # Cloud dots are above ``vv + 1``, so ``max + 1`` stays in the cloud: still compact.
            n = max(extra) + 1
            extra.add(n)
        return n

    def issue_delta(
        self, replica_id: str, replaced: Sequence[Dot] = ()
    ) -> tuple[Dot, CausalContext]:
        """Issue a local write's dot and build the context of the write's delta.

        Records ``next_dot(replica_id)`` here (as ``add`` would) and returns it with a new
        context holding exactly ``replaced`` and that dot (as ``from_dots``): the context of
        a delta whose write overwrites the entries with dots ``replaced``.
        """
        n = self.issue(replica_id)
        dot = (replica_id, n)
        if len(replaced) == 1 and n > 1:
            r, m = replaced[0]
            if m > 1:
                # No counter 1, so nothing folds into the vector: the dots are the cloud.
                ctx = CausalContext.__new__(CausalContext)
                ctx._vv = {}
                ctx._cloud = {r: {m, n}} if r == replica_id else {r: {m}, replica_id: {n}}
                return dot, ctx
        return dot, CausalContext.from_dots((*replaced, dot))

    def copy(self) -> CausalContext:
        """An independent copy."""
        ctx = CausalContext.__new__(CausalContext)
        ctx._vv = dict(self._vv)
        ctx._cloud = {r: set(ns) for r, ns in self._cloud.items()}
        return ctx

    def _absorb(self, r: str) -> None:
        """Drop ``r``'s cloud dots now covered by the vector; fold in successors."""
        extra = self._cloud[r]
        top = self._vv[r]
        stale = [n for n in extra if n <= top] if min(extra) <= top else ()
        extra.difference_update(stale)
        while top + 1 in extra:
            top += 1
            extra.discard(top)
        self._vv[r] = top
        if not extra:
            del self._cloud[r]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CausalContext):
            return NotImplemented
        return self._vv == other._vv and self._cloud == other._cloud

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"CausalContext(vv={self._vv!r}, cloud={sorted(self.cloud)!r})"
