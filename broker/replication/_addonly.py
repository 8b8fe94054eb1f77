"""Add-only subjects: whether joining a document would remove anything a state holds.

A subject configured add-only (``ReplicationConfig.add_only``; the RPC revocation set by
default) refuses every document whose join would take something away from its state: a
peer's delta or full state, and a local write. "Something" is a dot held at a place: a
``(path, kind[, set element])`` and a dot ``(replica, counter)`` stored there. Joining
``delta`` into ``state`` drops a dot ``d`` held at place ``p`` exactly when

- ``delta``'s context covers ``d`` and ``delta``'s store does not hold ``d`` at ``p``, and
  the join visits ``p`` (the delta holds ``p`` or an entry above it marked ``Whole``, or it
  is a full state, or its store is empty there: a map joined with nothing is filtered by the
  context); or
- ``delta`` holds at ``p`` a later dot of ``d``'s replica that survives the join (the
  one-entry-per-writer rule of ``broker.crdt._stores._latest_per_writer``).

``removes`` answers with the first such ``(path, dot)`` (a ``Removal``), or None. It is exact:
None if and only if every dot held in ``state`` is held at the same place after the join
(tests/unit/test_addonly.py checks it against the join itself on random histories and forged
contexts).

What add-only therefore allows: adding a set element not yet present, creating a key or a
register, a counter or a flag that does not exist yet. What it refuses: removing an element,
a key, a field, ``clear``; overwriting a register (the old value's dot is removed), a second
increment of a counter by the same writer (it replaces the writer's entry), disabling a
flag; and adding an element again once present (the add replaces the element's dots). So an
add-only subject's registers, counters and flags are write-once per writer, and a writer
adds an element only when it does not hold it yet (``RevocationList.revoke`` skips ids
present). This is dot-level on purpose: a Byzantine writer cannot even re-attribute an
element to itself by replacing its dots; the element-level rule ("an element present stays
present") would allow that.

Cost: O(size of ``delta``) plus, for each place the delta visits, the state's entries there.
The state is walked beyond the delta's own places only where the join itself filters the
state by the delta's context (a full state, a ``Whole`` marker, an empty store), and only
when that context shares a dot with the state's context (``_overlaps``: O(entries of the
delta's context)); otherwise nothing the state holds can be covered. An honest add-only delta
claims only the new dots it carries, so its check never walks the state. A full state's check
costs one walk of both, as its join does.

Pure: no I/O, no clock.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from broker.crdt import CausalContext, ORMap, _stores
from broker.crdt._stores import MAX_NESTING_DEPTH, KindStore, MapStore, SetStore, Whole
from broker.errors import NestingDepthError

__all__ = ["Removal", "removes"]

Dot = tuple[str, int]


class Removal(NamedTuple):
    """A dot that a join would remove, and where: map keys from the root, then the set
    element for a set's dot (a NamedTuple of two: always true)."""

    path: tuple[Any, ...]
    dot: Dot


def removes(delta: ORMap, state: ORMap) -> Removal | None:
    """The first dot held in ``state`` that ``state.merge(delta)`` would drop, with its path,
    or None when the join removes nothing (see the module doc). ``delta`` may be a delta or a
    full state (``is_delta`` False: every key of ``state`` is joined). Neither changes.

    To check a document before joining it on an add-only subject::

        hit = removes(document, machine.state)
        if hit is not None:
            refuse (Report("rejected", ("removal", signer)))

    Costs O(size of ``delta``) plus the state's entries at the places it touches (module doc).
    """
    if state.store is None:
        return None
    walk = _Walk(state.context, delta.context)
    return walk.entry(state.store, delta.store, not delta.is_delta, (), 1)


def _overlaps(theirs: CausalContext, mine: CausalContext) -> bool:
    """Whether context ``theirs`` covers some dot that ``mine`` covers: O(entries of
    ``theirs``, plus ``mine``'s out-of-order dots of the replicas ``theirs`` covers from 1)."""
    # The fields read directly, as the store join does: a range 1..n of ``theirs`` meets
    # ``mine`` iff ``mine`` covers dot 1 of that replica or an out-of-order dot <= n.
    for r, n in theirs._vv.items():
        if mine._vv.get(r, 0) > 0 or any(k <= n for k in mine._cloud.get(r, ())):
            return True
    return any(mine.covers(r, k) for r, ns in theirs._cloud.items() for k in ns)


class _Walk:
    """One ``removes`` check: the state's context ``ca``, the document's ``cb``."""

    __slots__ = ("ca", "cb", "filters")

    def __init__(self, ca: CausalContext, cb: CausalContext) -> None:
        self.ca, self.cb = ca, cb
        # Where the join filters the state by ``cb`` alone, it can drop only dots ``cb``
        # covers: none of the state's if the two contexts share no dot.
        self.filters = _overlaps(cb, ca)

    def entry(
        self, a: Any, b: Any, full: bool, path: tuple[Any, ...], depth: int
    ) -> Removal | None:
        """Removals in the state's entry ``a`` joined with the document's entry ``b``
        (``b`` None: ``a`` filtered by the document's context; ``full``: every part of ``a``
        is joined, not only what ``b`` names), as ``broker.crdt._stores.join_entry`` does."""
        if type(a) is Whole:  # states hold no markers; read one as its content if given
            a = a.store
        if a is None:
            return None
        if type(b) is Whole:
            return self.entry(a, b.store, True, path, depth)
        if b is None:
            return self.filtered(a, path, depth) if self.filters else None
        ta, tb = type(a), type(b)
        if ta is MapStore and tb is MapStore:
            return self.map(a, b, full, path, depth)
        if ta is SetStore and tb is SetStore:
            return self.set(a, b, full, path)
        if ta is tb and ta is not KindStore:
            return self.fun(a, b, ta.STRIDE, path)
        # Different kinds, or several under one name: each kind is its own CRDT.
        da = a if ta is KindStore else {a.KIND: a}
        db = b if tb is KindStore else {b.KIND: b}
        for kind, x in da.items():
            y = db.get(kind)
            if y is None and not full:
                continue  # the join leaves a kind the document does not name untouched
            if y is not None and type(x) is not type(y):
                continue  # opaque on one side, known on the other: the join raises instead
            hit = self.entry(x, y, full, path, depth)
            if hit is not None:
                return hit
        return None

    def map(
        self, a: MapStore, b: MapStore, full: bool, path: tuple[Any, ...], depth: int
    ) -> Removal | None:
        if depth > MAX_NESTING_DEPTH:
            raise NestingDepthError(f"maps nest deeper than {MAX_NESTING_DEPTH}")
        for k, bv in b.items():
            av = a.get(k)
            if av is not None:
                hit = self.entry(av, bv, full, (*path, k), depth + 1)
                if hit is not None:
                    return hit
        if full and self.filters:
            for k, av in a.items():
                if k not in b:
                    hit = self.filtered(av, (*path, k), depth + 1)
                    if hit is not None:
                        return hit
        return None

    def set(self, a: SetStore, b: SetStore, full: bool, path: tuple[Any, ...]) -> Removal | None:
        for e, bd in b.items():
            ad = a.get(e)
            if ad:
                hit = self.fun(ad, bd, 2, (*path, e))
                if hit is not None:
                    return hit
        if full and self.filters:
            for e, ad in a.items():
                if e not in b and ad:
                    hit = self.fun(ad, None, 2, (*path, e))
                    if hit is not None:
                        return hit
        return None

    def filtered(self, a: Any, path: tuple[Any, ...], depth: int) -> Removal | None:
        """Removals in ``a`` joined with nothing (filtered by the document's context)."""
        t = type(a)
        if t is Whole:
            return None if a.store is None else self.filtered(a.store, path, depth)
        if t is MapStore:
            if depth > MAX_NESTING_DEPTH:
                raise NestingDepthError(f"maps nest deeper than {MAX_NESTING_DEPTH}")
            for k, v in a.items():
                hit = self.filtered(v, (*path, k), depth + 1)
                if hit is not None:
                    return hit
            return None
        if t is KindStore:
            for v in a.values():
                hit = self.filtered(v, path, depth)
                if hit is not None:
                    return hit
            return None
        if t is SetStore:
            for e, ad in a.items():
                if ad:
                    hit = self.fun(ad, None, 2, (*path, e))
                    if hit is not None:
                        return hit
            return None
        return self.fun(a, None, t.STRIDE, path)

    def fun(
        self, a: tuple[Any, ...], b: tuple[Any, ...] | None, s: int, path: tuple[Any, ...]
    ) -> Removal | None:
        """Removals in dot function (or dot set, ``s`` 2) ``a`` joined with ``b``: the join
        keeps a dot both hold or one side holds and the other's context has not seen, then
        only each replica's highest surviving dot."""
        ca, cb = self.ca, self.cb
        bdots = {(b[i], b[i + 1]) for i in range(0, len(b), s)} if b else set()
        adots = [(a[i], a[i + 1]) for i in range(0, len(a), s)]
        top: dict[str, int] = {}  # each replica's highest surviving dot here
        for r, n in adots:
            if (r, n) in bdots or not cb.covers(r, n):
                top[r] = max(top.get(r, 0), n)
        held = set(adots)
        for r, n in bdots:
            if (r, n) not in held and not ca.covers(r, n):
                top[r] = max(top.get(r, 0), n)
        for r, n in adots:
            if (r, n) not in bdots and cb.covers(r, n):
                return Removal(path, (r, n))
            if _stores.ONE_ENTRY_PER_WRITER and top.get(r, 0) > n:
                return Removal(path, (r, n))
        return None
