"""Causal CRDTs: a dot store paired with the causal context every nested store shares.

Every mutator here is a *delta-mutator*: it reads the state, returns a small delta (itself a
CRDT of the same class, ``is_delta=True``) and leaves the state unchanged. The only way a state
changes is ``merge``/``join`` with another state or delta:

    delta = doc.assign("r1", ("profile", "name"), "ada", ts)
    doc.merge(delta)          # doc now holds the write
    peer.merge(delta)         # so does any replica that receives the delta
    batch.merge(delta)        # deltas join into one batch delta

The one exception is the fused local write ``ORMap.apply_assign``: exactly ``assign`` followed
by ``merge`` of its delta into the same state, done in one walk, returning the delta.

Laws (tested with Hypothesis): join is commutative, associative and idempotent; for every
mutator ``m``, ``s.join(m(s)) == m applied to s``; replicas that have merged the same deltas, in
any order and with duplicates, have equal digests; ``apply_assign`` leaves the same state and
returns the same delta as ``assign`` + ``merge``.

A mutator issues at most one dot, ``context.next_dot(replica_id)``; merge its delta before the
replica's next mutation, or two writes will share a dot.

Pure: no I/O, no clock (hybrid timestamps come in as arguments).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, ClassVar, Self, overload

from broker.crdt._atoms import (
    INT64_MAX,
    INT64_MIN,
    Atom,
    Element,
    validate_atom,
    validate_element,
    validate_key,
)
from broker.crdt._context import (
    _MEMO_LIMIT,
    CausalContext,
    Dot,
    _valid_ids,
    validate_replica_id,
)
from broker.crdt._stores import (
    CLASS_OF_KIND,
    DIGEST_SIZE,
    MAX_NESTING_DEPTH,
    CounterStore,
    Entry,
    FlagStore,
    Kind,
    KindStore,
    LWWStore,
    MapStore,
    MVStore,
    SetStore,
    Whole,
    canonical_bytes,
    check_timestamp,
    count_dots,
    counter_add,
    counter_contribution,
    dots_of,
    flag_disable,
    flag_enable,
    join_store,
    lww_assign,
    mv_assign,
    set_add,
    set_remove,
    value_of,
)
from broker.errors import (
    InvalidArgumentError,
    InvalidKeyError,
    KindMismatchError,
    NestingDepthError,
)

__all__ = [
    "Batch",
    "Causal",
    "EWFlag",
    "LWWRegister",
    "MVRegister",
    "ORMap",
    "ORSet",
    "PNCounter",
    "Path",
]

Path = Sequence[str]
"""Keys from a map down to a value; at most MAX_NESTING_DEPTH long."""

_PERSON = b"worknode-state1"


def _copy_entry(entry: Any) -> Any:
    t = type(entry)
    if t is MapStore:
        return MapStore({k: _copy_entry(v) for k, v in entry.items()})
    if t is SetStore:
        return SetStore(entry)
    if t is KindStore:
        return KindStore({k: _copy_entry(v) for k, v in entry.items()})
    if t is Whole:
        return Whole(_copy_entry(entry.store))
    return entry  # dot functions are immutable tuples


def _context_bytes(ctx: CausalContext) -> bytes:
    vv = ctx.version_vector
    parts = [f"{r}:{vv[r]}" for r in sorted(vv)]
    parts.append("|")
    parts.extend(f"{r}:{n}" for r, n in sorted(ctx.cloud))
    return ",".join(parts).encode()


class Causal:
    """A causal CRDT: ``store`` (the content) and ``context`` (every dot seen).

    ``is_delta`` marks a delta: its context covers only the dots of what it touches, so it
    can be merged in time proportional to its own size.
    """

    __slots__ = ("context", "is_delta", "store")
    KIND: ClassVar[Kind]
    _STORE: ClassVar[type]

    def __init__(
        self,
        store: Any = None,
        context: CausalContext | None = None,
        *,
        is_delta: bool = False,
    ) -> None:
        if store is not None and type(store) is not self._STORE:
            raise KindMismatchError(
                f"{type(self).__name__} holds a {self._STORE.__name__}, got {type(store).__name__}"
            )
        self.store: Any = store or None
        self.context = context if context is not None else CausalContext()
        self.is_delta = is_delta

    # -- lattice -------------------------------------------------------------------------

    def merge(self, other: Self) -> None:
        """In place: this state becomes ``self ⊔ other``. ``other`` is not modified."""
        if other is self:
            return
        if type(other) is not type(self):
            raise KindMismatchError(
                f"cannot join {type(other).__name__} into {type(self).__name__}"
            )
        keep = self.is_delta and other.is_delta
        if other.store is None and other.is_delta and other.context.empty():
            # The empty delta (bottom) is the identity of join: nothing to walk (a mutator
            # that only checks, such as a typed write's guard, returns it).
            self.is_delta = keep
            return
        self.store = join_store(
            self.store,
            other.store,
            self.context,
            other.context,
            not other.is_delta,
            keep,
        )
        self.context.merge(other.context)
        self.is_delta = keep

    def join(self, other: Self) -> Self:
        """A new state ``self ⊔ other``; neither input changes."""
        out = self.copy()
        out.merge(other)
        return out

    def copy(self) -> Self:
        """An independent copy (immutable leaves are shared)."""
        out = type(self).__new__(type(self))
        out.store = _copy_entry(self.store)
        out.context = self.context.copy()
        out.is_delta = self.is_delta
        return out

    # -- reading -------------------------------------------------------------------------

    def digest(self, key: bytes = b"") -> bytes:
        """Keyed BLAKE2b-256 of the logical content: store and context.

        Equal for replicas that have seen the same dots, whatever the delivery order.
        """
        h = hashlib.blake2b(digest_size=DIGEST_SIZE, key=key, person=_PERSON)
        h.update(canonical_bytes(self.store))
        h.update(_context_bytes(self.context))
        return h.digest()

    def metadata_size(self) -> int:
        """Dots held in the store plus context entries: what a replica keeps besides values."""
        return count_dots(self.store) + self.context.size()

    def value(self) -> Any:
        """The plain value a reader sees."""
        return value_of(self.store)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, Causal)
        return self.digest() == other.digest()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        tag = " delta" if self.is_delta else ""
        return f"<{type(self).__name__}{tag} {self.value()!r} {self.context!r}>"

    # -- helpers -------------------------------------------------------------------------

    def _delta(self, store: Any, dots: list[Dot], *, is_delta: bool = True) -> Self:
        out = type(self).__new__(type(self))
        out.store = store
        out.context = CausalContext.from_dots(dots)
        out.is_delta = is_delta
        return out

    def _clear(self) -> Self:
        # A full-state delta (not is_delta): its context covers every dot held, so merging it
        # removes all of them everywhere; writes concurrent with the clear survive.
        return self._delta(None, list(dots_of(self.store)), is_delta=False)


class LWWRegister(Causal):
    """Last-writer-wins register: the value with the greatest (hybrid time, replica id)."""

    __slots__ = ()
    KIND = Kind.LWW
    _STORE = LWWStore

    def assign(self, replica_id: str, value: Atom, ts: int) -> LWWRegister:
        """Delta setting the register to ``value`` at hybrid timestamp ``ts``."""
        rid = validate_replica_id(replica_id)
        store, removed = lww_assign(
            self.store, self.context.next_dot(rid), ts, validate_atom(value)
        )
        removed.append((store[0], store[1]))
        return self._delta(store, removed)


class MVRegister(Causal):
    """Multi-value register: ``value()`` is every concurrently written value, sorted."""

    __slots__ = ()
    KIND = Kind.MV
    _STORE = MVStore

    def assign(self, replica_id: str, value: Atom) -> MVRegister:
        """Delta replacing every value this replica has observed with ``value``."""
        rid = validate_replica_id(replica_id)
        store, removed = mv_assign(self.store, self.context.next_dot(rid), validate_atom(value))
        removed.append((store[0], store[1]))
        return self._delta(store, removed)


class PNCounter(Causal):
    """Counter supporting increments and decrements; one entry per replica."""

    __slots__ = ()
    KIND = Kind.COUNTER
    _STORE = CounterStore

    def increment(self, replica_id: str, amount: int = 1) -> PNCounter:
        """Delta adding ``amount`` (may be negative)."""
        rid = validate_replica_id(replica_id)
        store, removed = counter_add(self.store, self.context.next_dot(rid), _check_amount(amount))
        removed.append((store[0], store[1]))
        return self._delta(store, removed)

    def decrement(self, replica_id: str, amount: int = 1) -> PNCounter:
        """Delta subtracting ``amount``."""
        return self.increment(replica_id, -_check_amount(amount))


class ORSet(Causal):
    """Add-wins observed-remove set of ``str``, ``int`` or ``bytes`` elements."""

    __slots__ = ()
    KIND = Kind.SET
    _STORE = SetStore

    def add(self, replica_id: str, element: Element) -> ORSet:
        """Delta adding ``element``; wins over removes it has not observed."""
        dot = self.context.next_dot(validate_replica_id(replica_id))
        store, removed = set_add(self.store, dot, validate_element(element))
        removed.append(dot)
        return self._delta(store, removed)

    def remove(self, element: Element) -> ORSet:
        """Delta removing ``element`` as observed here (no dot is issued)."""
        store, removed = set_remove(self.store, validate_element(element))
        return self._delta(store, removed)

    def clear(self) -> ORSet:
        """Delta removing every element observed here."""
        return self._clear()

    def __contains__(self, element: object) -> bool:
        return bool(self.store and self.store.get(element))

    def value(self) -> frozenset[Element]:
        """The elements present."""
        return value_of(self.store) or frozenset()


class EWFlag(Causal):
    """Enable-wins flag (wire v2): on while an enable has not been observed by a disable."""

    __slots__ = ()
    KIND = Kind.FLAG
    _STORE = FlagStore

    def enable(self, replica_id: str) -> EWFlag:
        """Delta turning the flag on; wins over disables it has not observed."""
        dot = self.context.next_dot(validate_replica_id(replica_id))
        store, removed = flag_enable(self.store, dot)
        removed.append(dot)
        return self._delta(store, removed)

    def disable(self) -> EWFlag:
        """Delta turning the flag off as observed here (no dot is issued)."""
        _, removed = flag_disable(self.store, None)
        return self._delta(None, removed)

    def value(self) -> bool:
        """Whether the flag is on."""
        return bool(self.store)


def _check_amount(amount: object) -> int:
    if type(amount) is not int:
        raise InvalidArgumentError(f"counter amounts are int, got {type(amount).__name__}")
    validate_atom(amount)
    return amount


_new_object = object.__new__  # a delta is built field by field, without __init__'s checks
_known_keys: set[str] = set()  # memo of map keys already validated; bounded by _MEMO_LIMIT


def _check_key(key: object) -> None:
    """Validate a map key (raise InvalidKeyError) and remember it as valid."""
    validate_key(key)
    if len(_known_keys) >= _MEMO_LIMIT:
        _known_keys.clear()
    _known_keys.add(key)  # type: ignore[arg-type]


def _validate_path(path: Path) -> tuple[str, ...]:
    if isinstance(path, str):
        raise InvalidKeyError("a path is a sequence of keys, not a str; use (key,)")
    keys = path if type(path) is tuple else tuple(path)
    if not keys:
        raise InvalidKeyError("a path needs at least one key")
    if len(keys) > MAX_NESTING_DEPTH:
        raise NestingDepthError(
            f"path of {len(keys)} keys is deeper than MAX_NESTING_DEPTH={MAX_NESTING_DEPTH}"
        )
    known = _known_keys
    for k in keys:
        # Exact str already seen: valid (validity depends on the value only).
        if type(k) is not str or k not in known:
            _check_key(k)
    return keys


def _fast_checks(replica_id: str, path: Path) -> tuple[str, ...]:
    """Check a replica id and a path the way the mutators do, cheaply when seen before."""
    if type(replica_id) is not str or replica_id not in _valid_ids:
        validate_replica_id(replica_id)
    if type(path) is not tuple or not 0 < len(path) <= MAX_NESTING_DEPTH:
        return _validate_path(path)
    return path


def _pairs(dots: Sequence[Any]) -> Iterator[Dot]:
    """The dots of a flat dot tuple ``(r, n, r, n, ...)``."""
    for i in range(0, len(dots), 2):
        yield dots[i], dots[i + 1]


def _select(entry: Entry | None, cls: type) -> Any:
    """The part of a map entry that has kind ``cls`` (a name may hold several kinds)."""
    if entry is None:
        return None
    if type(entry) is cls:
        return entry
    if type(entry) is KindStore:
        return entry.get(cls.KIND)  # type: ignore[attr-defined]
    return None


class Batch:
    """The delta of one local write batch, built by joining each write's delta in place.

    ``ReplicationMachine.write`` joins many single-write deltas; the fused writes
    (``ORMap.apply_assign``, ``apply_increment``, ``apply_add`` with ``into``) write theirs
    straight into it instead of building a one-key map chain and joining it: the same delta
    (property-tested against joining), without a join walk and a context merge per write.

    Invariants: no map in the batch is shared (the join of a delta made elsewhere builds
    the batch's own maps), so maps are written in place. An entry is replaced in place
    only when a fused write of this batch made it (``_leaves``, by identity, objects kept
    alive here) and is still that object: a join that changes an entry stores a new one
    (tested: it may have put dots beside the batch's, such as a mutator's stale ones, which
    the join of the next write would keep). Then overwriting equals the join: the entry holds one
    writer's dots, all from this batch's fused writes at that path; the new write's delta
    holds one entry (its new dot) and its context covers every dot of the state's entry it
    replaces, which holds every dot this batch wrote there (each was written to the state
    too, and only a write at this path replaces it there). A set's element is replaced
    the same way (its other elements are not touched by an add).
    """

    __slots__ = ("_leaves", "_maps", "_prefix", "_state", "delta")

    def __init__(self) -> None:
        self.delta = ORMap(is_delta=True)
        self._leaves: dict[int, object] = {}
        self._prefix: tuple[str, ...] | None = None
        self._state: ORMap | None = None
        self._maps: tuple[MapStore, MapStore] | None = None

    def join(self, delta: ORMap) -> None:
        """Join a delta made elsewhere. The join builds the batch's own maps (it never takes
        a map of ``delta``), so writes in place never reach ``delta`` (tested); its entries
        are not the batch's own."""
        self._prefix = self._state = self._maps = None
        self.delta.merge(delta)

    def locate(
        self, state: ORMap, path: tuple[str, ...], cls: type
    ) -> tuple[MapStore, MapStore, str, Any] | None:
        """Where a fused write of ``cls`` at ``path`` goes, when it can be written here in
        place: ``(state's map, batch's map, last key, the state's entry)``, the batch's maps
        missing on the way made. None when it cannot (``state`` is a delta or lacks a map on
        the way, either side holds another kind, or the batch's entry there is not its
        own); then nothing was made. The maps of the last path prefix are remembered until
        the next ``join`` (fused writes never replace a map; the writes a batch joins may)."""
        prefix = path[:-1]
        m: Any
        bm: Any
        if prefix == self._prefix and state is self._state and self._maps is not None:
            m, bm = self._maps
        else:
            m = state.store
            if m is None or state.is_delta:
                return None
            known = _known_keys
            for k in prefix:
                if type(k) is not str or k not in known:
                    _check_key(k)
                m = m.get(k)
                if type(m) is not MapStore:
                    return None
            bm = None
        last = path[-1]
        old = m.get(last) if type(last) is str else None
        if old is None and (type(last) is not str or last not in _known_keys):
            _check_key(last)  # (a key the state holds was checked when it was written)
        if old is not None and type(old) is not cls:
            return None
        if bm is None:
            bm = self._batch_map(prefix)
            if bm is None:
                return None
            self._prefix, self._state, self._maps = prefix, state, (m, bm)
        cur = bm.get(last)
        if cur is not None and (type(cur) is not cls or self._leaves.get(id(cur)) is not cur):
            return None
        return m, bm, last, old

    def _batch_map(self, keys: tuple[str, ...]) -> MapStore | None:
        """The batch's map at ``keys``, made where missing; None (nothing made) when the
        batch holds another kind on the way."""
        dm: Any = self.delta.store
        i = 0
        if dm is None:
            dm = self.delta.store = MapStore()
        else:
            for k in keys:
                child = dm.get(k)
                if child is None:
                    break
                if type(child) is not MapStore:
                    return None
                dm = child
                i += 1
        for k in keys[i:]:
            child = dm[k] = MapStore()
            dm = child
        return dm  # type: ignore[no-any-return]

    def put(
        self, m: MapStore, key: str, entry: Any, rid: str, n: int, replaced: Iterable[Dot]
    ) -> None:
        """Store a write's ``entry`` (dot ``(rid, n)``, replacing ``replaced``) at ``key`` of
        ``m`` (from ``slot``)."""
        m[key] = entry
        self._leaves[id(entry)] = entry
        ctx = self.delta.context
        ctx.add((rid, n))
        for dot in replaced:
            ctx.add(dot)

    def add(
        self, m: MapStore, key: str, element: Element, dot: Dot, replaced: Sequence[Any] | None
    ) -> None:
        """Add ``element`` with ``dot`` to the set at ``key`` of ``m`` (from ``slot``);
        ``replaced``: its dots in the state (a flat dot tuple), which the add replaces."""
        cur: Any = m.get(key)
        if cur is None:
            cur = m[key] = SetStore()
            self._leaves[id(cur)] = cur
        cur[element] = dot
        ctx = self.delta.context
        ctx.add(dot)
        if replaced:
            for old in _pairs(replaced):
                ctx.add(old)


class ORMap(Causal):
    """Observed-remove map from ``str`` keys to any kind, maps included, nested to
    ``MAX_NESTING_DEPTH``. Each (key, kind) pair is an independent CRDT; removing a key
    removes what the remover observed, and updates concurrent with the remove survive."""

    __slots__ = ()
    KIND = Kind.MAP
    _STORE = MapStore

    # -- delta-mutators ------------------------------------------------------------------

    def assign(self, replica_id: str, path: Path, value: Atom, ts: int) -> ORMap:
        """Delta setting the last-writer-wins register at ``path``."""
        v = validate_atom(value)
        return self._update(
            replica_id, path, LWWStore, lambda cur, dot: lww_assign(cur, dot, ts, v)
        )

    @overload
    def apply_assign(
        self, replica_id: str, path: Path, value: Atom, ts: int, into: None = None
    ) -> ORMap: ...

    @overload
    def apply_assign(
        self, replica_id: str, path: Path, value: Atom, ts: int, into: Batch
    ) -> ORMap | None: ...

    def apply_assign(
        self, replica_id: str, path: Path, value: Atom, ts: int, into: Batch | None = None
    ) -> ORMap | None:
        """Set the last-writer-wins register at ``path`` here; return the delta to ship.

        ``into``: a batch the delta is joined into (see ``Batch``); None is then returned
        when it was written there directly, else the delta to join (``Batch.join``).

        The fused local write: the same state and delta as
        ``d = self.assign(replica_id, path, value, ts); self.merge(d)`` (property-tested),
        in one walk. The local join of a fresh assign delta is known without joining: the
        register's entries are exactly the dots the delta removes and its new dot is unseen
        here, so the join stores the new register and records the dot.

        Kind conflicts on the path, a map missing on the path (a first write under it) and
        delta states take the general route (``assign`` then ``merge``).
        """
        # Cheap checks for the usual argument types (ids and keys validated once are
        # remembered); anything else gets the full validation. Same order as assign (value,
        # replica id, path, timestamp), so the same error is raised for the same arguments.
        if type(value) is not int or not INT64_MIN <= value <= INT64_MAX:
            value = validate_atom(value)
        path = _fast_checks(replica_id, path)
        if into is not None:
            at = into.locate(self, path, LWWStore)
            if at is not None:
                m, bm, last, old = at
                if type(ts) is not int or not 0 <= ts <= INT64_MAX:
                    check_timestamp(ts)
                n = self.context.issue(replica_id)
                entry = LWWStore((replica_id, n, ts, value))
                m[last] = entry
                into.put(bm, last, entry, replica_id, n,
                         () if old is None else ((old[0], old[1]),) if len(old) == 4
                         else tuple(dots_of(old)))
                return None
        walk = self._fused_walk(path, LWWStore)
        if walk is None:
            return self._merged(self.assign(replica_id, path, value, ts))
        top, m, dm, last, old = walk
        if type(ts) is not int or not 0 <= ts <= INT64_MAX:
            check_timestamp(ts)
        # Checked and walked: nothing below raises, so the state is never left half-written.
        if old is None:
            dot, ctx = self.context.issue_delta(replica_id)
        elif len(old) == 4:
            dot, ctx = self.context.issue_delta(replica_id, ((old[0], old[1]),))
        else:
            dot, ctx = self.context.issue_delta(replica_id, tuple(dots_of(old)))
        m[last] = dm[last] = LWWStore((replica_id, dot[1], ts, value))
        return self._fused_delta(top, ctx)

    @overload
    def apply_increment(
        self, replica_id: str, path: Path, amount: int = 1, into: None = None
    ) -> ORMap: ...

    @overload
    def apply_increment(
        self, replica_id: str, path: Path, amount: int, into: Batch
    ) -> ORMap | None: ...

    def apply_increment(
        self, replica_id: str, path: Path, amount: int = 1, into: Batch | None = None
    ) -> ORMap | None:
        """Add ``amount`` to the counter at ``path`` here; return the delta to ship (``into``:
        as for ``apply_assign``).

        The fused local write for counters, as ``apply_assign`` is for registers: the same
        state and delta as ``increment`` then ``merge`` (property-tested). The join keeps the
        other replicas' entries and replaces this replica's with the new one.
        """
        if type(amount) is not int or not INT64_MIN <= amount <= INT64_MAX:
            amount = _check_amount(amount)
        path = _fast_checks(replica_id, path)
        at = into.locate(self, path, CounterStore) if into is not None else None
        if at is not None:
            m, bm, last, old = at
        else:
            walk = self._fused_walk(path, CounterStore)
            if walk is None:
                return self._merged(self.increment(replica_id, path, amount))
            top, m, dm, last, old = walk
        inc, dec, replaced, others = counter_contribution(old, replica_id, amount)
        if at is not None:
            n = self.context.issue(replica_id)
            entry = (replica_id, n, inc, dec)
            mine = CounterStore(entry)
            into.put(bm, last, mine, replica_id, n, replaced)  # type: ignore[union-attr]
        else:
            dot, ctx = self.context.issue_delta(replica_id, replaced)
            entry = (replica_id, dot[1], inc, dec)
            mine = dm[last] = CounterStore(entry)
        if others:
            others.append(entry)
            others.sort()  # entries in dot order, as joins leave them
            m[last] = CounterStore(x for e in others for x in e)
        else:
            m[last] = mine
        return None if at is not None else self._fused_delta(top, ctx)

    @overload
    def apply_add(
        self, replica_id: str, path: Path, element: Element, into: None = None
    ) -> ORMap: ...

    @overload
    def apply_add(
        self, replica_id: str, path: Path, element: Element, into: Batch
    ) -> ORMap | None: ...

    def apply_add(
        self, replica_id: str, path: Path, element: Element, into: Batch | None = None
    ) -> ORMap | None:
        """Add ``element`` to the set at ``path`` here; return the delta to ship (``into``: as
        for ``apply_assign``).

        The fused local write for sets: the same state and delta as ``add`` then ``merge``
        (property-tested). The join replaces the element's observed dots with the new dot.
        """
        element = validate_element(element)
        path = _fast_checks(replica_id, path)
        at = into.locate(self, path, SetStore) if into is not None else None
        if at is not None:
            m, bm, last, old = at
        else:
            walk = self._fused_walk(path, SetStore)
            if walk is None:
                return self._merged(self.add(replica_id, path, element))
            top, m, dm, last, old = walk
        dots = old.get(element) if old else None
        if at is not None:
            n = self.context.issue(replica_id)
            dot = (replica_id, n)
            into.add(bm, last, element, dot, dots)  # type: ignore[union-attr]
        else:
            dot, ctx = self.context.issue_delta(
                replica_id, list(_pairs(dots)) if dots else ())
            delta_set = SetStore()
            delta_set[element] = dot
            dm[last] = delta_set
        if old is None:
            fresh = SetStore()
            fresh[element] = dot
            m[last] = fresh
        else:
            old[element] = dot  # the state owns its stores: joins mutate them in place too
        return None if at is not None else self._fused_delta(top, ctx)

    def _fused_walk(
        self, path: tuple[str, ...], cls: type
    ) -> tuple[MapStore, MapStore, MapStore, str, Any] | None:
        """Walk a state down to the map holding ``path``'s last key, building the delta's
        one-key maps on the way: ``(delta top, state map, delta map, last key, entry)``.

        None when the fused route does not apply: a delta state, a map missing on the path,
        or another kind at any step (the caller then mutates and merges in general).
        """
        m: Any = self.store
        if m is None or self.is_delta:
            return None
        known = _known_keys
        top = dm = MapStore()
        last = path[-1]
        for k in path[:-1]:
            if type(k) is not str or k not in known:
                _check_key(k)
            m = m.get(k)
            if type(m) is not MapStore:
                return None
            child = MapStore()
            dm[k] = child
            dm = child
        old = m.get(last) if type(last) is str else None
        if old is None and (type(last) is not str or last not in known):
            _check_key(last)  # (a key the state holds was checked when it was written)
        if old is not None and type(old) is not cls:
            return None
        return top, m, dm, last, old

    def _fused_delta(self, store: MapStore, ctx: CausalContext) -> ORMap:
        out = _new_object(type(self))
        out.store = store
        out.context = ctx
        out.is_delta = True
        return out

    def _merged(self, delta: ORMap) -> ORMap:
        self.merge(delta)
        return delta

    def assign_multi(self, replica_id: str, path: Path, value: Atom) -> ORMap:
        """Delta setting the multi-value register at ``path``."""
        v = validate_atom(value)
        return self._update(replica_id, path, MVStore, lambda cur, dot: mv_assign(cur, dot, v))

    def increment(self, replica_id: str, path: Path, amount: int = 1) -> ORMap:
        """Delta adding ``amount`` to the counter at ``path``."""
        a = _check_amount(amount)
        return self._update(
            replica_id, path, CounterStore, lambda cur, dot: counter_add(cur, dot, a)
        )

    def add(self, replica_id: str, path: Path, element: Element) -> ORMap:
        """Delta adding ``element`` to the set at ``path``."""
        e = validate_element(element)
        return self._update(replica_id, path, SetStore, lambda cur, dot: set_add(cur, dot, e))

    def discard(self, replica_id: str, path: Path, element: Element) -> ORMap:
        """Delta removing ``element`` (as observed) from the set at ``path``."""
        e = validate_element(element)
        return self._update(
            replica_id, path, SetStore, lambda cur, _: set_remove(cur, e), needs_dot=False
        )

    def enable(self, replica_id: str, path: Path) -> ORMap:
        """Delta turning on the enable-wins flag at ``path`` (wire v2)."""
        return self._update(replica_id, path, FlagStore, flag_enable)

    def disable(self, path: Path) -> ORMap:
        """Delta turning off the flag at ``path`` as observed here (other kinds stay)."""
        keys = _validate_path(path)
        parent = self._walk(keys[:-1])
        cur = _select(parent.get(keys[-1]), FlagStore) if parent else None
        _, removed = flag_disable(cur, None)
        # Whole(None) makes the join visit this key; the context holds only the flag's
        # dots, so other kinds under the key are untouched.
        store: Any = Whole(None)
        for k in reversed(keys):
            store = MapStore({k: store})
        return self._delta(store, removed)

    def remove(self, path: Path) -> ORMap:
        """Delta removing the key at ``path`` (every kind under it) as observed here."""
        keys = _validate_path(path)
        parent = self._walk(keys[:-1])
        entry = parent.get(keys[-1]) if parent else None
        store: Any = Whole(None)
        for k in reversed(keys):
            store = MapStore({k: store})
        return self._delta(store, list(dots_of(entry, len(keys))))

    def clear(self) -> ORMap:
        """Delta removing every key observed here."""
        return self._clear()

    # -- reading -------------------------------------------------------------------------

    def get(self, path: Path, kind: Kind | None = None) -> Any:
        """The value at ``path`` (None if absent). With ``kind``, only that kind's value."""
        keys = _validate_path(path)
        parent = self._walk(keys[:-1])
        entry = parent.get(keys[-1]) if parent else None
        if kind is not None:
            entry = _select(entry, CLASS_OF_KIND[kind])
        return value_of(entry, len(keys))

    def value(self) -> dict[str, Any]:
        """The whole map as nested plain values."""
        return value_of(self.store) or {}

    def __contains__(self, key: object) -> bool:
        return bool(self.store) and key in self.store

    def __len__(self) -> int:
        return len(self.store) if self.store else 0

    # -- helpers -------------------------------------------------------------------------

    def _walk(self, keys: tuple[str, ...]) -> MapStore | None:
        cur: Any = self.store
        for k in keys:
            if not cur:
                return None
            cur = _select(cur.get(k), MapStore)
        return cur  # type: ignore[no-any-return]

    def _update(
        self, replica_id: str, path: Path, cls: type, fn: Any, *, needs_dot: bool = True
    ) -> ORMap:
        rid = validate_replica_id(replica_id)
        keys = _validate_path(path)
        parent = self._walk(keys[:-1])
        cur = _select(parent.get(keys[-1]), cls) if parent else None
        dot = self.context.next_dot(rid) if needs_dot else None
        store, removed = fn(cur, dot)
        for k in reversed(keys):
            m = MapStore()
            m[k] = store
            store = m
        if dot is not None:
            removed.append(dot)
        return self._delta(store, removed)
