"""Dot stores: the content of every CRDT kind, and the one join that merges them.

This module is the delta-state dot-store construction of Almeida, Shoker and Baquero
("Delta state replicated data types", 2018). A causal CRDT is a pair (store, context); the
context lives one level up (``_causal.py``) and is shared by every store nested inside a map.

Stores, by kind:

- ``LWWStore``, ``MVStore``, ``CounterStore`` are *dot functions*: immutable flat tuples of
  ``(replica, counter, *payload)`` entries, sorted by dot. Flat tuples keep a register at one
  small object per key, which is what makes 1M keys fit in a few hundred MB.
- ``SetStore`` is a dot map from element to a *dot set* (flat tuple ``(r, n, r, n, ...)``).
- ``MapStore`` is a dot map from name to a store. A name may hold several kinds at once
  (two replicas created it concurrently with different kinds): then its entry is a
  ``KindStore`` keyed by ``Kind``. Each (name, kind) pair is its own CRDT, as in Riak maps, so
  no write is lost to a kind conflict.

The join rule for every store: a dot survives if both sides hold it, or if one side holds it
and the other side's context has not seen it; and of one replica's entries in one dot
function or dot set only the highest dot survives (a replica's later write there replaced its
earlier one; see ``_latest_per_writer``: without it, a lost delta left a counter counting its
writer twice). Laws every function here keeps:

- join is commutative, associative and idempotent on states;
- the canonical form is unique: entries sorted, empty children removed, a name with one kind
  is stored bare. So equal content means equal digests, whatever the delivery order;
- recursion is bounded: a map deeper than ``MAX_NESTING_DEPTH`` raises NestingDepthError.

Deltas may carry two markers that states never hold: ``Whole(store)`` on a map entry says
"this delta knows this whole subtree: join it in full" (a removed key, a cleared set), and an
empty dot set ``()`` on a set element says "this element was touched" (a removed element).
They let a small delta be joined in time proportional to its own size: a delta's context only
covers dots under the entries it touches, so every other entry can be skipped. The commonest
delta, one write, is a chain of one-key maps: ``join_store`` joins it by walking the chain
instead of recursing, with the same result.

Pure: no I/O, no clock.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import struct
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, Final, TypeAlias

from broker.crdt._atoms import INT64_MAX, Atom, Element, encode_atom
from broker.crdt._context import CausalContext, Dot
from broker.errors import (
    InvalidArgumentError,
    KindMismatchError,
    NestingDepthError,
    ValueTooLargeError,
)

__all__ = [
    "CLASS_OF_KIND",
    "DIGEST_SIZE",
    "MAX_KIND",
    "MAX_NESTING_DEPTH",
    "CounterStore",
    "Entry",
    "FlagStore",
    "Kind",
    "KindConflict",
    "KindStore",
    "LWWStore",
    "MVStore",
    "MapStore",
    "OpaqueStore",
    "OpaqueValue",
    "SetStore",
    "Store",
    "Whole",
    "canonical_bytes",
    "check_timestamp",
    "count_dots",
    "counter_add",
    "counter_contribution",
    "digest_entry",
    "dots_of",
    "flag_disable",
    "flag_enable",
    "join_entry",
    "join_store",
    "lww_assign",
    "mv_assign",
    "opaque_store_class",
    "set_add",
    "set_remove",
    "value_of",
]

MAX_NESTING_DEPTH: Final = 8
"""Most map levels on any path from a document's root to a value (the root map is level 1)."""


class Kind(enum.IntEnum):
    """The CRDT kinds a map entry can hold. Values are wire constants: never renumber."""

    LWW = 1
    MV = 2
    COUNTER = 3
    SET = 4
    MAP = 5
    FLAG = 6
    """Enable-wins flag (wire v2)."""


MAX_KIND: Final = 255
"""Highest kind number a reader accepts; unknown kinds up to it are kept opaque."""


class _DotFun(tuple[Any, ...]):
    """A dot function as a flat tuple of ``STRIDE``-wide entries ``(replica, counter, ...)``."""

    __slots__ = ()
    STRIDE: ClassVar[int]
    KIND: ClassVar[Kind]

    def entries(self) -> Iterator[tuple[Any, ...]]:
        """Each entry as a tuple, in dot order."""
        s = self.STRIDE
        for i in range(0, len(self), s):
            yield self[i : i + s]


class LWWStore(_DotFun):
    """Last-writer-wins register: entries ``(replica, counter, hlc, value)``.

    Concurrent writes are all kept until a write that has seen them replaces them; the
    visible value is the entry with the greatest ``(hlc, replica)``.
    """

    __slots__ = ()
    STRIDE = 4
    KIND = Kind.LWW


class MVStore(_DotFun):
    """Multi-value register: entries ``(replica, counter, value)``; all concurrent values
    are visible until a write that has seen them replaces them."""

    __slots__ = ()
    STRIDE = 3
    KIND = Kind.MV


class CounterStore(_DotFun):
    """PN-counter: entries ``(replica, counter, increments, decrements)``, at most one live
    entry per replica (each update replaces the writer's previous entry)."""

    __slots__ = ()
    STRIDE = 4
    KIND = Kind.COUNTER


class FlagStore(_DotFun):
    """Enable-wins flag: entries ``(replica, counter)``, one per enabling write not yet
    observed by a disable. The flag is on while any entry is left."""

    __slots__ = ()
    STRIDE = 2
    KIND = Kind.FLAG


class OpaqueStore(_DotFun):
    """A dot-function store of a kind this release does not know (a newer release's kind,
    received during a rolling upgrade): entries ``(replica, counter, payload bytes)``.

    Every kind is a dot function on the wire, so such a store still joins by the dot rule
    without its payloads being understood, and each payload is passed on exactly as it
    arrived. The node's context then never claims a dot whose content it dropped, so a newer
    node joining this node's state loses nothing. One subclass per kind number
    (``opaque_store_class``); ``KIND`` is the plain int.
    """

    __slots__ = ()
    STRIDE = 3
    KIND: ClassVar[int]  # type: ignore[assignment]


class OpaqueValue(tuple[int, int]):
    """What ``value()`` shows for an opaque store: ``(kind number, number of dots)``."""

    __slots__ = ()


class SetStore(dict[Element, tuple[Any, ...]]):
    """Add-wins OR-set: element -> dot set (flat tuple ``(r, n, r, n, ...)``)."""

    __slots__ = ()
    KIND: ClassVar[Kind] = Kind.SET


class MapStore(dict[str, "Entry"]):
    """OR-map: name -> store (or ``KindStore`` when a name holds several kinds)."""

    __slots__ = ()
    KIND: ClassVar[Kind] = Kind.MAP


class KindStore(dict[int, "Store"]):
    """Several kinds under one map name; always two or more, never empty. Keys are ``Kind``
    members, or plain ints for kinds this release does not know (``OpaqueStore``)."""

    __slots__ = ()


class Whole:
    """Delta-only marker on a map entry: join this subtree in full (see module doc)."""

    __slots__ = ("store",)

    def __init__(self, store: Store | KindStore | None) -> None:
        self.store = store

    def __repr__(self) -> str:
        return f"Whole({self.store!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Whole) and self.store == other.store

    __hash__ = None  # type: ignore[assignment]


class KindConflict(dict[int, Any]):
    """What ``value()`` shows for a name that holds several kinds: kind -> value."""

    __slots__ = ()


Store: TypeAlias = (
    LWWStore | MVStore | CounterStore | FlagStore | OpaqueStore | SetStore | MapStore
)
Entry: TypeAlias = Store | KindStore | Whole

# --------------------------------------------------------------------------------------------
# join


ONE_ENTRY_PER_WRITER = True
"""The rule of ``_latest_per_writer``. Only mutation tests turn it off, to show that the tests
and the simulation catch the defect it fixes (tests/unit/test_loss.py, tests/sim)."""


def _latest_per_writer(out: list[Any], stride: int) -> list[Any]:
    """Entries sorted by dot, keeping only each replica's highest dot.

    Why this is sound: a replica's mutators read its own state, so its later write to a
    store replaced (put in its delta's context) every earlier entry of its own there; an
    earlier entry of the same replica beside a later one is always dead. Such a pair is seen
    only when the delta that removed the earlier entry was lost or is late (its removal is
    carried by no later delta: delta contexts are exact, not version vectors), and keeping
    both would show a value no replica ever had (a counter counting a writer twice). Dropping
    the earlier dot is safe for the lattice: it is in the joined context (its holder had seen
    it), so it reads as "seen and removed", as it will once the late delta arrives.
    This holds for every kind, including kinds this release keeps opaque: the wire contract
    requires it of every kind (one live entry per replica per store).

    Limit: the rule sees the later entry only while a side holds it. Joined out of causal
    order after a loss (the later entry removed before the earlier one arrives), two
    receivers of the same deltas can differ until a full state reaches them; on causally
    closed states (every replica's full state) the rule never fires, and the replication
    machine's causal gate joins deltas only in causal order (tests/unit/test_loss.py)."""
    if len(out) <= stride or not ONE_ENTRY_PER_WRITER:
        return out
    keep: list[Any] = []
    n = len(out)
    for i in range(0, n, stride):
        if i + stride < n and out[i + stride] == out[i]:
            continue  # the next entry is the same replica's, with a higher dot
        keep.extend(out[i : i + stride])
    return keep


def _sorted_entries(out: list[Any], stride: int) -> list[Any]:
    rows = [out[i : i + stride] for i in range(0, len(out), stride)]
    rows.sort(key=lambda e: (e[0], e[1]))
    return [x for row in rows for x in row]


def _join_fun(
    cls: type[_DotFun],
    a: tuple[Any, ...] | None,
    b: tuple[Any, ...] | None,
    ca: CausalContext,
    cb: CausalContext,
) -> Any:
    """Join two dot functions (or dot sets, stride 2). ``None``/``()`` mean empty."""
    s = cls.STRIDE
    if a and b and len(a) == s and len(b) == s:
        # Hot path: one entry each side (a register overwritten by a delta).
        ar, an, br, bn = a[0], a[1], b[0], b[1]
        if ar == br and an == bn:
            return a
        # ``covers`` inlined (this is the innermost step of every register join):
        # each side keeps its entry unless the other side's context has seen it.
        keep_a = an > cb._vv.get(ar, 0) and an not in cb._cloud.get(ar, ())
        keep_b = bn > ca._vv.get(br, 0) and bn not in ca._cloud.get(br, ())
        if keep_a and keep_b:
            if ar == br and ONE_ENTRY_PER_WRITER:  # a writer's later entry replaces its earlier
                return a if an > bn else b
            return cls(a + b) if (ar, an) < (br, bn) else cls(b + a)
        if keep_a:
            return a
        return b if keep_b else None
    if a is b:
        return a or None
    if not a:
        if not b:
            return None
        # Adopt b: keep what a's context has not seen.
        if len(b) == s:
            return None if ca.covers(b[0], b[1]) else b
        out: list[Any] = []
        for i in range(0, len(b), s):
            if not ca.covers(b[i], b[i + 1]):
                out.extend(b[i : i + s])
        return cls(_latest_per_writer(out, s)) if out else None
    if not b:
        # Filter a: drop what b's context has seen (b holds none of it).
        if len(a) == s:
            return None if cb.covers(a[0], a[1]) else a
        out = []
        for i in range(0, len(a), s):
            if not cb.covers(a[i], a[i + 1]):
                out.extend(a[i : i + s])
        return cls(_latest_per_writer(out, s)) if out else None
    adots = {(a[i], a[i + 1]) for i in range(0, len(a), s)}
    bdots = {(b[i], b[i + 1]) for i in range(0, len(b), s)}
    out = []
    for i in range(0, len(a), s):
        r, n = a[i], a[i + 1]
        if (r, n) in bdots or not cb.covers(r, n):
            out.extend(a[i : i + s])
    for i in range(0, len(b), s):
        r, n = b[i], b[i + 1]
        if (r, n) not in adots and not ca.covers(r, n):
            out.extend(b[i : i + s])
    if not out:
        return None
    if len(out) > s:
        out = _latest_per_writer(_sorted_entries(out, s), s)
    return cls(out)


class _DotSet(_DotFun):
    """Stride-2 view used only to join dot sets; results are stored as plain tuples."""

    __slots__ = ()
    STRIDE = 2


def _join_dotset(
    a: tuple[Any, ...] | None, b: tuple[Any, ...] | None, ca: CausalContext, cb: CausalContext
) -> tuple[Any, ...] | None:
    r = _join_fun(_DotSet, a, b, ca, cb)
    return None if r is None else tuple(r)


def _put_dots(a: SetStore, e: Element, dots: tuple[Any, ...] | None, keep: bool) -> None:
    """Store an element's joined dots; an empty result is a marker in deltas, gone in states."""
    if dots is not None:
        a[e] = dots
    elif keep:
        a[e] = ()
    else:
        a.pop(e, None)


def _join_set(
    a: SetStore | None,
    b: SetStore | None,
    ca: CausalContext,
    cb: CausalContext,
    full: bool,
    keep: bool,
    depth: int,
) -> SetStore | None:
    if a is b:
        return a or None
    if b is None:
        assert a is not None
        for e in list(a):
            _put_dots(a, e, _join_dotset(a[e], None, ca, cb), keep)
        return a or None
    if a is None:
        a = SetStore()
    for e, bd in b.items():
        _put_dots(a, e, _join_dotset(a.get(e), bd, ca, cb), keep)
    if full:
        for e in [e for e in a if e not in b]:
            _put_dots(a, e, _join_dotset(a[e], None, ca, cb), keep)
    return a or None


def _join_map(
    a: MapStore | None,
    b: MapStore | None,
    ca: CausalContext,
    cb: CausalContext,
    full: bool,
    keep: bool,
    depth: int,
) -> MapStore | None:
    if depth > MAX_NESTING_DEPTH:
        raise NestingDepthError(f"maps nest deeper than MAX_NESTING_DEPTH={MAX_NESTING_DEPTH}")
    if a is b:
        return a or None
    if b is None:
        assert a is not None
        for k in list(a):
            r = join_entry(a[k], None, ca, cb, True, keep, depth + 1)
            if r is None:
                del a[k]
            else:
                a[k] = r
        return a or None
    if a is None:
        a = MapStore()
    elif not full and len(b) == 1:
        return join_store(a, b, ca, cb, False, keep, depth)  # type: ignore[return-value]
    join = _JOIN
    vv, cloud = ca._vv, ca._cloud
    for k, bv in b.items():
        av = a.get(k)
        tb: Any = type(bv)
        if av is None and tb in _DOT_FUNS and len(bv) == tb.STRIDE:  # type: ignore[arg-type]
            # A new key of one entry (a write to a fresh field, the commonest delta entry):
            # ``_join_fun``'s adopt path inlined, keep it unless a's context has seen its dot.
            one: Any = bv
            rid, n = one[0], one[1]
            if n > vv.get(rid, 0) and n not in cloud.get(rid, ()):
                a[k] = bv
            continue
        # Same kind on both sides is the common case: dispatch without join_entry.
        fn = join.get(tb)
        if fn is not None and (av is None or type(av) is type(bv)):
            r = fn(av, bv, ca, cb, full, keep, depth + 1)
        else:
            r = join_entry(av, bv, ca, cb, full, keep, depth + 1)
        if r is None:
            a.pop(k, None)
        else:
            a[k] = r
    if full:
        for k in [k for k in a if k not in b]:
            r = join_entry(a[k], None, ca, cb, True, keep, depth + 1)
            if r is None:
                del a[k]
            else:
                a[k] = r
    return a or None


_DOT_FUNS = frozenset({LWWStore, MVStore, CounterStore, FlagStore})


def join_store(
    a: Entry | None,
    b: Entry | None,
    ca: CausalContext,
    cb: CausalContext,
    full: bool,
    keep: bool,
    depth: int = 1,
) -> Entry | None:
    """``join_entry``, fast for the shape of a single write's delta: one-key maps down to
    the written entry (``b`` not full). ``depth`` must not exceed MAX_NESTING_DEPTH.

    Descends while both sides hold a map under ``b``'s one key, joins the entry below, and
    stores the result in the one map that holds it: the maps above are the same objects, so
    they need no update. Same result as the recursive join, in one loop; nothing is mutated
    before the bottom join, so a NestingDepthError leaves ``a`` unchanged.
    """
    if full or type(a) is not MapStore or type(b) is not MapStore or len(b) != 1 or a is b:
        return join_entry(a, b, ca, cb, full, keep, depth)
    root, b_root = a, b
    m: MapStore = a
    av: Any
    bv: Any
    for level in range(depth, MAX_NESTING_DEPTH + 1):  # noqa: B007 -- used after the loop
        [k] = b
        bv = b[k]
        av = m.get(k)
        if type(av) is not MapStore or type(bv) is not MapStore or len(bv) != 1:
            break
        m, b = av, bv
    else:
        raise NestingDepthError(f"maps nest deeper than MAX_NESTING_DEPTH={MAX_NESTING_DEPTH}")
    r: Any
    tb = type(bv)
    if type(av) is tb and tb in _DOT_FUNS and len(av) == len(bv) == tb.STRIDE:
        # One entry on each side, a register overwritten: the hot path of _join_fun, inlined
        # because every single-write delta ends here.
        ar, an, br, bn = av[0], av[1], bv[0], bv[1]
        if ar == br and an == bn:
            return root
        keep_a = an > cb._vv.get(ar, 0) and an not in cb._cloud.get(ar, ())
        keep_b = bn > ca._vv.get(br, 0) and bn not in ca._cloud.get(br, ())
        if keep_a and keep_b:
            if ar == br and ONE_ENTRY_PER_WRITER:  # a writer's later entry replaces its earlier
                if an > bn:
                    return root
                r = bv
            else:
                r = tb(av + bv) if (ar, an) < (br, bn) else tb(bv + av)
        elif keep_a:
            return root
        else:
            r = bv if keep_b else None
    elif (av is None or type(av) is tb) and tb in _DOT_FUNS:
        r = _join_fun(tb, av, bv, ca, cb)
    else:
        r = join_entry(av, bv, ca, cb, False, keep, level + 1)
    if r is av:
        return root or None
    if r is not None:
        m[k] = r
        return root
    del m[k]
    if not m:
        # Rare: the join emptied a map; empty maps are not canonical, drop them upwards.
        _drop_emptied(root, b_root)
    return root or None


def _drop_emptied(a: MapStore, b: MapStore) -> None:
    """Remove the maps that ``join_store`` left empty along ``b``'s one-key chain."""
    [k] = b
    bv = b[k]
    av = a.get(k)
    if type(av) is MapStore and type(bv) is MapStore and len(bv) == 1:
        _drop_emptied(av, bv)
        if not av:
            del a[k]


def _join_lww(
    a: Any, b: Any, ca: CausalContext, cb: CausalContext, full: bool, keep: bool, depth: int
) -> Any:
    return _join_fun(LWWStore, a, b, ca, cb)


def _join_mv(
    a: Any, b: Any, ca: CausalContext, cb: CausalContext, full: bool, keep: bool, depth: int
) -> Any:
    return _join_fun(MVStore, a, b, ca, cb)


def _join_counter(
    a: Any, b: Any, ca: CausalContext, cb: CausalContext, full: bool, keep: bool, depth: int
) -> Any:
    return _join_fun(CounterStore, a, b, ca, cb)


_Join = Callable[[Any, Any, CausalContext, CausalContext, bool, bool, int], Any]
_JOIN: dict[type, _Join] = {
    LWWStore: _join_lww,
    MVStore: _join_mv,
    CounterStore: _join_counter,
    SetStore: _join_set,
    MapStore: _join_map,
}
CLASS_OF_KIND: dict[Kind, type] = {
    Kind.LWW: LWWStore,
    Kind.MV: MVStore,
    Kind.COUNTER: CounterStore,
    Kind.SET: SetStore,
    Kind.MAP: MapStore,
    Kind.FLAG: FlagStore,
}


def _join_flag(
    a: Any, b: Any, ca: CausalContext, cb: CausalContext, full: bool, keep: bool, depth: int
) -> Any:
    return _join_fun(FlagStore, a, b, ca, cb)


_JOIN[FlagStore] = _join_flag


@functools.cache
def opaque_store_class(kind: int) -> type[OpaqueStore]:
    """The ``OpaqueStore`` subclass for wire kind number ``kind`` (one class per number)."""
    if not 0 < kind <= MAX_KIND:
        raise InvalidArgumentError(f"kind numbers are in [1, {MAX_KIND}], got {kind}")
    cls = type(f"OpaqueStore{kind}", (OpaqueStore,), {"__slots__": (), "KIND": kind})

    def join(
        a: Any, b: Any, ca: CausalContext, cb: CausalContext, full: bool, keep: bool, depth: int
    ) -> Any:
        return _join_fun(cls, a, b, ca, cb)

    _JOIN[cls] = join
    return cls


def _as_kinds(entry: Store | KindStore | None) -> dict[int, Store]:
    if entry is None:
        return {}
    if isinstance(entry, KindStore):
        return entry
    return {entry.KIND: entry}


def join_entry(
    a: Entry | None,
    b: Entry | None,
    ca: CausalContext,
    cb: CausalContext,
    full: bool,
    keep: bool,
    depth: int,
) -> Entry | None:
    """Join map entry ``b`` (context ``cb``) into ``a`` (context ``ca``); may mutate ``a``.

    ``b is None`` filters ``a`` by ``cb``. ``full`` joins every part of ``a`` (a full state
    or a ``Whole`` subtree on the ``b`` side); otherwise only what ``b`` holds is visited.
    ``keep`` (delta into delta) keeps markers. Returns the joined entry or None if empty.
    """
    ta, tb = type(a), type(b)
    if ta is tb and ta in _JOIN:
        return _JOIN[ta](a, b, ca, cb, full, keep, depth)  # type: ignore[no-any-return]
    if tb is Whole:
        inner = b.store  # type: ignore[union-attr]
        if inner is None:
            r = None if a is None else join_entry(a, None, ca, cb, True, keep, depth)
        else:
            r = join_entry(a, inner, ca, cb, True, keep, depth)
        if keep:
            return Whole(r.store if isinstance(r, Whole) else r)
        return r
    if ta is Whole:
        inner_a = a.store  # type: ignore[union-attr]
        if inner_a is None:
            r = None if b is None else join_entry(None, b, ca, cb, True, keep, depth)
        else:
            r = join_entry(inner_a, b, ca, cb, True, keep, depth)
        return Whole(r) if keep else r  # type: ignore[arg-type]
    if b is None and a is None:
        return None
    if ta is tb and ta is not KindStore:
        return _JOIN[ta](a, b, ca, cb, full, keep, depth)  # type: ignore[no-any-return]
    if b is None and ta is not KindStore:
        return _JOIN[ta](a, None, ca, cb, full, keep, depth)  # type: ignore[no-any-return]
    if a is None and tb is not KindStore:
        return _JOIN[tb](None, b, ca, cb, full, keep, depth)  # type: ignore[no-any-return]
    # Different kinds, or a KindStore on either side: join kind by kind.
    da = _as_kinds(a)  # type: ignore[arg-type]
    db = _as_kinds(b)  # type: ignore[arg-type]
    out = KindStore()
    for kind in sorted(da.keys() | db.keys()):
        x, y = da.get(kind), db.get(kind)
        if x is not None and y is not None and type(x) is not type(y):
            # One side read this kind as opaque (a wire version without it), the other knows
            # it: their entries have different shapes. Only a local write of a kind the node's
            # wire version cannot carry leads here (the replica refuses those first); raise
            # before anything is changed, never join mismatched shapes.
            raise KindMismatchError(
                f"kind {kind} is held as {type(x).__name__} on one side and "
                f"{type(y).__name__} on the other: a wire version that lacks the kind "
                "cannot join it with a local store of it"
            )
        if y is None and not full:
            r2: Any = x
        else:
            r2 = _JOIN[type(x if x is not None else y)](x, y, ca, cb, full, keep, depth)
        if r2 is not None:
            out[kind] = r2
    if not out:
        return None
    if len(out) == 1:
        return next(iter(out.values()))
    return out


# --------------------------------------------------------------------------------------------
# mutators: each returns (delta entry, dots the delta removes)


def _dots_fun(store: tuple[Any, ...] | None, stride: int) -> list[Dot]:
    if not store:
        return []
    if len(store) == stride:  # one entry: the common register
        return [(store[0], store[1])]
    return [(store[i], store[i + 1]) for i in range(0, len(store), stride)]


def check_timestamp(ts: object) -> int:
    """Return ``ts`` if it is a hybrid timestamp (int in [0, 2**63)), else raise
    InvalidArgumentError."""
    if type(ts) is not int or not 0 <= ts <= INT64_MAX:
        raise InvalidArgumentError(f"hybrid timestamps are int in [0, 2**63), got {ts!r}")
    return ts


def lww_assign(cur: LWWStore | None, dot: Dot, ts: int, value: Atom) -> tuple[LWWStore, list[Dot]]:
    """Delta that sets a last-writer-wins register to ``value`` at hybrid time ``ts``."""
    check_timestamp(ts)
    return LWWStore((dot[0], dot[1], ts, value)), _dots_fun(cur, 4)


def mv_assign(cur: MVStore | None, dot: Dot, value: Atom) -> tuple[MVStore, list[Dot]]:
    """Delta that sets a multi-value register to ``value``, replacing what was observed."""
    return MVStore((dot[0], dot[1], value)), _dots_fun(cur, 3)


def counter_add(cur: CounterStore | None, dot: Dot, amount: int) -> tuple[CounterStore, list[Dot]]:
    """Delta that adds ``amount`` (negative to subtract) to a PN-counter."""
    inc, dec, removed, _ = counter_contribution(cur, dot[0], amount)
    return CounterStore((dot[0], dot[1], inc, dec)), removed


def counter_contribution(
    cur: CounterStore | None, rid: str, amount: int
) -> tuple[int, int, list[Dot], list[tuple[Any, ...]]]:
    """``rid``'s new (increments, decrements) after adding ``amount``, the dots of its
    entries that the write replaces, and the other replicas' entries (kept by the join).
    Raises ValueTooLargeError when a total would leave the signed 64-bit range."""
    inc = dec = 0
    removed: list[Dot] = []
    others: list[tuple[Any, ...]] = []
    if cur:
        for i in range(0, len(cur), 4):
            if cur[i] == rid:
                inc, dec = max(inc, cur[i + 2]), max(dec, cur[i + 3])
                removed.append((rid, cur[i + 1]))
            else:
                others.append(cur[i : i + 4])
    if amount >= 0:
        inc += amount
    else:
        dec -= amount
    if inc > INT64_MAX or dec > INT64_MAX:
        raise ValueTooLargeError("counter contribution would leave the signed 64-bit range")
    return inc, dec, removed, others


def flag_enable(cur: FlagStore | None, dot: Dot) -> tuple[FlagStore, list[Dot]]:
    """Delta that turns a flag on (wins over concurrent disables)."""
    return FlagStore(dot), _dots_fun(cur, 2)


def flag_disable(cur: FlagStore | None, dot: Dot | None) -> tuple[None, list[Dot]]:
    """Delta that turns a flag off as observed: removes the enabling dots seen here."""
    return None, _dots_fun(cur, 2)


def set_add(cur: SetStore | None, dot: Dot, element: Element) -> tuple[SetStore, list[Dot]]:
    """Delta that adds ``element`` to an OR-set (add wins over concurrent removes)."""
    old = cur.get(element) if cur else None
    d = SetStore()
    d[element] = (dot[0], dot[1])
    return d, _dots_fun(old, 2)


def set_remove(cur: SetStore | None, element: Element) -> tuple[SetStore, list[Dot]]:
    """Delta that removes ``element`` as observed; concurrent adds survive."""
    old = cur.get(element) if cur else None
    d = SetStore()
    d[element] = ()
    return d, _dots_fun(old, 2)


# --------------------------------------------------------------------------------------------
# reading


def dots_of(entry: Entry | None, depth: int = 1) -> Iterator[Dot]:
    """Every dot held in ``entry`` (recursing into maps, bounded by MAX_NESTING_DEPTH)."""
    if entry is None:
        return
    if isinstance(entry, Whole):
        yield from dots_of(entry.store, depth)
    elif isinstance(entry, MapStore):
        if depth > MAX_NESTING_DEPTH:
            raise NestingDepthError(f"maps nest deeper than {MAX_NESTING_DEPTH}")
        for child in entry.values():
            yield from dots_of(child, depth + 1)
    elif isinstance(entry, KindStore):
        for store in entry.values():
            yield from dots_of(store, depth)
    elif isinstance(entry, SetStore):
        for ds in entry.values():
            yield from _dots_fun(ds, 2)
    else:
        yield from _dots_fun(entry, entry.STRIDE)


def count_dots(entry: Entry | None) -> int:
    """Number of dots held: the per-key metadata a state keeps."""
    return sum(1 for _ in dots_of(entry))


def _lww_value(s: LWWStore) -> Atom:
    if len(s) == 4:
        return s[3]  # type: ignore[no-any-return]
    best = max(s.entries(), key=lambda e: (e[2], e[0]))
    return best[3]  # type: ignore[no-any-return]


def value_of(entry: Entry | None, depth: int = 1) -> Any:
    """The plain Python value a reader sees (None for an empty entry)."""
    if entry is None:
        return None
    if isinstance(entry, LWWStore):
        return _lww_value(entry)
    if isinstance(entry, MVStore):
        return tuple(sorted((e[2] for e in entry.entries()), key=encode_atom))
    if isinstance(entry, CounterStore):
        return sum(e[2] - e[3] for e in entry.entries())
    if isinstance(entry, SetStore):
        return frozenset(e for e, ds in entry.items() if ds)
    if isinstance(entry, MapStore):
        if depth > MAX_NESTING_DEPTH:
            raise NestingDepthError(f"maps nest deeper than {MAX_NESTING_DEPTH}")
        return {
            k: value_of(child, depth + 1)
            for k, child in entry.items()
            if not isinstance(child, Whole)
        }
    if isinstance(entry, KindStore):
        return KindConflict({k: value_of(v, depth) for k, v in entry.items()})
    if isinstance(entry, FlagStore):
        return bool(entry)
    if isinstance(entry, OpaqueStore):
        return OpaqueValue((entry.KIND, len(entry) // 3))
    return value_of(entry.store, depth)


# --------------------------------------------------------------------------------------------
# canonical bytes and digests

_pack_q = struct.Struct(">q").pack
_pack_i = struct.Struct(">I").pack
DIGEST_SIZE: Final = 32
_PERSON = b"worknode-dgst1"


def _encode_fun(s: tuple[Any, ...], stride: int, out: list[bytes]) -> None:
    out.append(_pack_i(len(s) // stride))
    for i in range(0, len(s), stride):
        out.append(encode_atom(s[i]))
        out.append(_pack_q(s[i + 1]))
        if stride == 4:  # LWW: (replica, counter, hlc, value)
            out.append(_pack_q(s[i + 2]))
            out.append(encode_atom(s[i + 3]))
        elif stride == 3:  # MV: (replica, counter, value)
            out.append(encode_atom(s[i + 2]))


def _encode(entry: Entry | None, out: list[bytes], depth: int) -> None:
    if entry is None:
        out.append(b"0")
    elif isinstance(entry, LWWStore):
        out.append(b"L")
        _encode_fun(entry, 4, out)
    elif isinstance(entry, MVStore):
        out.append(b"M")
        _encode_fun(entry, 3, out)
    elif isinstance(entry, CounterStore):
        out.append(b"C")
        out.append(_pack_i(len(entry) // 4))
        for r, n, inc, dec in entry.entries():
            out.append(encode_atom(r))
            out.append(_pack_q(n) + _pack_q(inc) + _pack_q(dec))
    elif isinstance(entry, SetStore):
        out.append(b"E")
        items = sorted((encode_atom(e), ds) for e, ds in entry.items())
        out.append(_pack_i(len(items)))
        for enc, ds in items:
            out.append(enc)
            _encode_fun(ds, 2, out)
    elif isinstance(entry, MapStore):
        if depth > MAX_NESTING_DEPTH:
            raise NestingDepthError(f"maps nest deeper than {MAX_NESTING_DEPTH}")
        out.append(b"P")
        out.append(_pack_i(len(entry)))
        for k in sorted(entry):
            out.append(encode_atom(k))
            _encode(entry[k], out, depth + 1)
    elif isinstance(entry, KindStore):
        out.append(b"K")
        out.append(_pack_i(len(entry)))
        for kind in sorted(entry):
            _encode(entry[kind], out, depth)
    elif isinstance(entry, FlagStore):
        out.append(b"G")
        _encode_fun(entry, 2, out)
    elif isinstance(entry, OpaqueStore):
        out.append(b"X")
        out.append(_pack_i(entry.KIND))
        _encode_fun(entry, 3, out)
    else:
        out.append(b"W")
        _encode(entry.store, out, depth)


def canonical_bytes(entry: Entry | None, depth: int = 1) -> bytes:
    """Canonical bytes of an entry: equal content gives equal bytes."""
    out: list[bytes] = []
    _encode(entry, out, depth)
    return b"".join(out)


def digest_entry(entry: Entry | None, key: bytes = b"", depth: int = 1) -> bytes:
    """Keyed BLAKE2b-256 of an entry's canonical bytes (depends on content only)."""
    return hashlib.blake2b(
        canonical_bytes(entry, depth), digest_size=DIGEST_SIZE, key=key, person=_PERSON
    ).digest()
