"""Encode and decode CRDT states and deltas as Cap'n Proto ``Document`` structs.

Invariants:

- ``decode(encode(x))`` has the same content (and digest) as ``x`` for every state and delta
  the CRDT core can build, nested to ``MAX_NESTING_DEPTH``;
- encoding is deterministic: map entries sorted by (key, kind), set elements by canonical
  element bytes, dots by (replica id, counter); the replica table in order of first use;
- decoding validates everything the core relies on (sorted unique dots, known replica indexes,
  valid keys and values, kinds matching their content, markers only in deltas, depth) and
  raises a ``CodecError`` subclass otherwise; it never returns a state the core could not
  have built;
- a dot-function store of a kind this wire version does not know is decoded as an
  ``OpaqueStore``: its dots join by the usual rule and each payload is kept as the exact
  Cap'n Proto struct it arrived as, so re-encoding passes it on unchanged;
- a ``Value`` of a union member this wire version does not know (a register's value, a set
  element) is decoded as an ``OpaqueAtom`` holding the exact struct: it costs nothing else in
  the batch, joins like any value, and re-encoding passes it on unchanged.

Pure: bytes in, objects out. The caller maps pycapnp's exceptions (see ``_limits``).
"""

from __future__ import annotations

from typing import Any, Final

import capnp

from broker.codec._schema import WireSchema
from broker.crdt import (
    MAX_KIND,
    MAX_NESTING_DEPTH,
    MAX_VALUE_BYTES,
    Causal,
    CausalContext,
    EWFlag,
    Kind,
    LWWRegister,
    MVRegister,
    ORMap,
    ORSet,
    PNCounter,
    validate_atom,
    validate_element,
    validate_key,
    validate_replica_id,
)
from broker.crdt._atoms import INT64_MAX, OpaqueAtom, encode_atom
from broker.crdt._stores import (
    CounterStore,
    FlagStore,
    KindStore,
    LWWStore,
    MapStore,
    MVStore,
    OpaqueStore,
    SetStore,
    Whole,
    opaque_store_class,
)
from broker.errors import (
    CodecError,
    InvalidArgumentError,
    MalformedMessageError,
    MessageTooDeepError,
    NestingDepthError,
    UnsupportedContentError,
)

__all__ = ["CAUSAL_OF_KIND", "decode_document", "encode_document"]

CAUSAL_OF_KIND: Final[dict[int, type[Causal]]] = {
    Kind.LWW: LWWRegister,
    Kind.MV: MVRegister,
    Kind.COUNTER: PNCounter,
    Kind.SET: ORSet,
    Kind.MAP: ORMap,
    Kind.FLAG: EWFlag,
}

_NO_KIND: Final = 0
_MAX_OPAQUE_BYTES: Final = MAX_VALUE_BYTES + 64
"""An opaque value's packed holder: the value bound of every known type, plus framing."""
FIRST_SEGMENT_WORDS: Final = 8192
"""Words (8 bytes) in a new message's first segment: 64 KiB, enough for most batches."""


# ------------------------------------------------------------------------------------------
# encoding


class _Replicas:
    """Replica id -> index table, in order of first use."""

    __slots__ = ("ids", "index")

    def __init__(self) -> None:
        self.index: dict[str, int] = {}
        self.ids: list[str] = []

    def __call__(self, rid: str) -> int:
        i = self.index.get(rid)
        if i is None:
            i = self.index[rid] = len(self.ids)
            self.ids.append(rid)
        return i


def _put_value(parent: Any, name: str, v: Any, holder: Any) -> None:
    """Set ``parent``'s Value field ``name`` to atom ``v``. An ``OpaqueAtom`` is copied back
    from the holder struct it was kept in (a ``SetElement``, copied by field assignment)."""
    if type(v) is OpaqueAtom:
        setattr(parent, name, holder.from_bytes_packed(v.raw).value)
    else:
        _set_value(parent.init(name), v)


def _set_value(b: Any, v: Any) -> None:
    t = type(v)
    if v is None:
        b.null = None
    elif t is bool:
        b.bool = v
    elif t is int:
        b.int = v
    elif t is float:
        b.float = v
    elif t is str:
        b.text = v
    else:
        b.data = v


def _parts(entry: Any) -> list[tuple[int, bool, Any]]:
    """(kind, whole, store) rows of one map entry, sorted by kind."""
    whole = type(entry) is Whole
    inner = entry.store if whole else entry
    if inner is None:
        return [(_NO_KIND, True, None)]
    if type(inner) is KindStore:
        return [(int(k), whole, inner[k]) for k in sorted(inner)]
    return [(int(inner.KIND), whole, inner)]


def _encode_store(
    b: Any,
    kind: int,
    store: Any,
    rx: _Replicas,
    item_struct: Any,
    kinds: frozenset[int],
    holder: Any,
) -> None:
    """Fill entry builder ``b`` (key/kind/whole already set) with ``store``'s content."""
    if kind not in kinds and kind != _NO_KIND and not isinstance(store, OpaqueStore):
        raise UnsupportedContentError(
            f"kind {kind} needs a newer wire version than this codec's "
        )
    if kind == _NO_KIND:
        b.absent = None
    elif kind == Kind.MAP:
        rows = []
        for key in sorted(store):
            for k, whole, inner in _parts(store[key]):
                rows.append((key, k, whole, inner))
        lst = b.init("entries", len(rows))
        for i, (key, k, whole, inner) in enumerate(rows):
            e = lst[i]
            e.key = key
            e.kind = k
            if whole:
                e.whole = True
            _encode_store(e, k, inner, rx, item_struct, kinds, holder)
    elif kind == Kind.SET:
        els = sorted(((encode_atom(x), x, ds) for x, ds in store.items()), key=lambda r: r[0])
        lst = b.init("elements", len(els))
        for i, (_, x, ds) in enumerate(els):
            e = lst[i]
            _put_value(e, "value", x, holder)
            pairs = sorted((ds[j], ds[j + 1]) for j in range(0, len(ds), 2))
            dl = e.init("dots", len(pairs))
            for j, (r, n) in enumerate(pairs):
                d = dl[j]
                d.replica = rx(r)
                d.counter = n
    else:
        stride = store.STRIDE if store is not None else 1
        n_items = len(store) // stride if store is not None else 0
        lst = b.init("items", n_items)
        for i in range(n_items):
            o = i * stride
            it = lst[i]
            it.replica = rx(store[o])
            it.counter = store[o + 1]
            if kind == Kind.LWW:
                p = it.init("payload").init("lww")
                p.hlc = store[o + 2]
                _put_value(p, "value", store[o + 3], holder)
            elif kind == Kind.MV:
                _put_value(it.init("payload"), "mv", store[o + 2], holder)
            elif kind == Kind.COUNTER:
                p = it.init("payload").init("counter")
                p.increments = store[o + 2]
                p.decrements = store[o + 3]
            elif kind == Kind.FLAG and not isinstance(store, OpaqueStore):
                it.init("payload").flag = None
            else:  # an opaque payload: copied back as the struct it arrived as
                it.payload = item_struct.from_bytes_packed(store[o + 2]).payload


def encode_document(schema: WireSchema, state: Causal) -> Any:
    """A ``Document`` builder holding ``state`` (a state or a delta)."""
    rx = _Replicas()
    # One first segment large enough for typical batches: single-segment messages skip the
    # reader's multi-segment pre-check (``_packed``) and pack a little smaller.
    doc = schema.crdt.Document.new_message(num_first_segment_words=FIRST_SEGMENT_WORDS)
    root = doc.init("root")
    kind = int(state.KIND)
    root.kind = kind
    store = state.store
    item_struct = schema.crdt.Item
    if store is None and kind == Kind.MAP:
        store = MapStore()
    elif store is None and kind == Kind.SET:
        store = SetStore()
    _encode_store(root, kind, store, rx, item_struct, schema.kinds, schema.crdt.SetElement)
    ctx = state.context
    vv = ctx.version_vector
    c = doc.init("context")
    vl = c.init("versions", len(vv))
    for i, r in enumerate(sorted(vv)):
        d = vl[i]
        d.replica = rx(r)
        d.counter = vv[r]
    cloud = sorted(ctx.cloud)
    cl = c.init("cloud", len(cloud))
    for i, (r, n) in enumerate(cloud):
        d = cl[i]
        d.replica = rx(r)
        d.counter = n
    if state.is_delta:
        doc.delta = True
    reps = doc.init("replicas", len(rx.ids))
    for i, r in enumerate(rx.ids):
        reps[i] = r
    return doc


# ------------------------------------------------------------------------------------------
# decoding


# Reading a field by name (``reader.key``) costs pycapnp a schema lookup by string: ~4x the
# time of ``_get_by_field`` with the field looked up once, and ``which()`` builds an enum
# where ``_which_str()`` returns the member's name (measured with pycapnp 2.2: 1.7 us vs
# 0.44 us a field, 1.35 us vs 0.23 us a union tag). Decoding reads ~15 fields per entry.
_READER: Final[Any] = capnp.lib.capnp._DynamicStructReader
_GET: Final[Any] = _READER._get_by_field
_WHICH: Final[Any] = _READER._which_str


class _Fields:
    """The fields the decoder reads in its loops, looked up once per schema."""

    __slots__ = (
        "e_entries", "e_items", "e_key", "e_kind", "e_whole", "i_counter", "i_payload",
        "i_replica", "l_hlc", "l_value", "p_lww", "values",
    )

    def __init__(self, schema: WireSchema) -> None:
        crdt = schema.crdt
        e = crdt.Entry.schema.fields
        self.e_key, self.e_kind, self.e_whole = e["key"], e["kind"], e["whole"]
        self.e_items, self.e_entries = e["items"], e["entries"]
        i = crdt.Item.schema.fields
        self.i_replica, self.i_counter, self.i_payload = i["replica"], i["counter"], i["payload"]
        self.p_lww = crdt.Payload.schema.fields["lww"]
        lww = self.p_lww.schema.fields
        self.l_hlc, self.l_value = lww["hlc"], lww["value"]
        self.values = dict(crdt.Value.schema.fields)


_FIELDS: dict[int, tuple[WireSchema, _Fields]] = {}  # the schema kept: its id stays its own


def _fields(schema: WireSchema) -> _Fields:
    found = _FIELDS.get(id(schema))
    if found is None or found[0] is not schema:
        found = _FIELDS[id(schema)] = (schema, _Fields(schema))
    return found[1]


class _Decoder:
    __slots__ = ("bad_keys", "delta", "f", "replicas", "schema")

    def __init__(
        self,
        schema: WireSchema,
        replicas: list[str],
        delta: bool,
        bad_keys: list[tuple[str, str]] | None = None,
    ) -> None:
        self.schema = schema
        self.replicas = replicas
        self.delta = delta
        self.f = _fields(schema)
        self.bad_keys = bad_keys

    def replica(self, index: int) -> str:
        try:
            return self.replicas[index]  # UInt32 on the wire: never negative
        except IndexError:
            raise MalformedMessageError(
                f"replica index {index} out of range (table has {len(self.replicas)})"
            ) from None

    def dot(self, d: Any) -> tuple[str, int]:
        n = d.counter
        if not 1 <= n <= INT64_MAX:
            raise MalformedMessageError(f"dot counter {n} outside [1, 2**63)")
        return self.replica(d.replica), n

    def item_dot(self, it: Any) -> tuple[str, int]:
        """``dot`` of an ``Item`` (fields read by reference: the hot path)."""
        f = self.f
        n = _GET(it, f.i_counter)
        if not 1 <= n <= INT64_MAX:
            raise MalformedMessageError(f"dot counter {n} outside [1, 2**63)")
        return self.replica(_GET(it, f.i_replica)), n

    def dots(self, lst: Any) -> list[tuple[str, int]]:
        """Dots of a list, which must be sorted and unique (hot: contexts hold many)."""
        replicas = self.replicas
        out: list[tuple[str, int]] = []
        prev: tuple[str, int] | None = None
        try:
            for d in lst:
                n = d.counter
                if not 1 <= n <= INT64_MAX:
                    raise MalformedMessageError(f"dot counter {n} outside [1, 2**63)")
                dot = (replicas[d.replica], n)
                if prev is not None and not prev < dot:
                    raise MalformedMessageError("dots are not sorted and unique")
                out.append(dot)
                prev = dot
        except IndexError:
            raise MalformedMessageError("replica index out of range") from None
        return out

    def _opaque(self, v: Any) -> OpaqueAtom:
        """A Value of a member this version does not know, copied by field assignment into a
        holder (that copy raises, not aborts, on out-of-bounds pointers)."""
        holder = self.schema.crdt.SetElement.new_message()
        holder.value = v
        raw: bytes = holder.to_bytes_packed()
        if len(raw) > _MAX_OPAQUE_BYTES:  # the bound every known value type has
            raise MalformedMessageError(
                f"a value of a newer type is {len(raw)} bytes, over {_MAX_OPAQUE_BYTES}"
            )
        return OpaqueAtom(raw)

    def value(self, v: Any) -> Any:
        try:
            w = _WHICH(v)
        except capnp.KjException:  # a union member a newer release added
            return self._opaque(v)
        if w == "null":
            return None
        field = self.f.values.get(w)
        x = getattr(v, w) if field is None else _GET(v, field)
        if w == "data":
            x = bytes(x)
        try:
            return validate_atom(x)
        except InvalidArgumentError as exc:
            raise MalformedMessageError(f"invalid value: {exc}") from exc
        except ValueError as exc:  # ValueTooLargeError is a BoundsError, not InvalidArgument
            raise MalformedMessageError(f"invalid value: {exc}") from exc

    def element(self, v: Any) -> Any:
        try:
            w = _WHICH(v)
        except capnp.KjException:  # a union member a newer release added
            return self._opaque(v)
        if w not in ("int", "text", "data"):
            raise MalformedMessageError(f"set elements are text, int or data, not {w}")
        x = getattr(v, w)
        return validate_element(bytes(x) if w == "data" else x)

    def items(self, kind: int, lst: Any) -> Any:
        n = len(lst)
        if kind == Kind.LWW:
            cls: type = LWWStore
        elif kind == Kind.MV:
            cls = MVStore
        elif kind == Kind.COUNTER:
            cls = CounterStore
        elif kind == Kind.FLAG and kind in self.schema.kinds:
            cls = FlagStore
        elif kind not in self.schema.kinds and kind <= MAX_KIND:
            cls = opaque_store_class(kind)
        else:
            raise MalformedMessageError(f"kind {kind} does not hold items")
        out: list[Any] = []
        prev: tuple[str, int] | None = None
        prev_counter_replica: str | None = None
        f = self.f
        for i in range(n):
            it = lst[i]
            dot = self.item_dot(it)
            if prev is not None and not prev < dot:
                raise MalformedMessageError("items are not sorted by dot, or repeat a dot")
            prev = dot
            out.extend(dot)
            p = _GET(it, f.i_payload)
            if issubclass(cls, OpaqueStore):
                # Kept as the exact struct it arrived as (unknown members and fields too).
                # Copy it into a holder message by field assignment: unlike as_builder()
                # and total_size, that copy raises (not aborts) on out-of-bounds pointers.
                holder = self.schema.crdt.Item.new_message()
                holder.payload = p
                out.append(holder.to_bytes_packed())
                continue
            w = _WHICH(p)
            if kind == Kind.LWW:
                if w != "lww":
                    raise MalformedMessageError(f"LWW item carries a {w} payload")
                lww = _GET(p, f.p_lww)
                hlc = _GET(lww, f.l_hlc)
                if hlc > INT64_MAX:
                    raise MalformedMessageError("hybrid timestamp above 2**63 - 1")
                out.append(hlc)
                out.append(self.value(_GET(lww, f.l_value)))
            elif kind == Kind.MV:
                if w != "mv":
                    raise MalformedMessageError(f"MV item carries a {w} payload")
                out.append(self.value(p.mv))
            elif kind == Kind.FLAG:
                if w != "flag":
                    raise MalformedMessageError(f"flag item carries a {w} payload")
            else:
                if w != "counter":
                    raise MalformedMessageError(f"counter item carries a {w} payload")
                if dot[0] == prev_counter_replica:
                    raise MalformedMessageError("a counter holds two entries of one replica")
                prev_counter_replica = dot[0]
                inc, dec = p.counter.increments, p.counter.decrements
                if inc > INT64_MAX or dec > INT64_MAX:
                    raise MalformedMessageError("counter contribution above 2**63 - 1")
                out.append(inc)
                out.append(dec)
        return cls(out) if out else None

    def elements(self, lst: Any) -> SetStore | None:
        # Any order is read (the encoder sorts by canonical bytes; a reader that keeps an
        # element of a newer type opaque cannot place it where its writer did), and an
        # element written twice has the union of its dots: an older reader keeps two opaque
        # encodings of one newer value apart, and a newer reader must still read what it
        # relays instead of refusing the whole state.
        out = SetStore()
        for e in lst:
            x = self.element(e.value)
            ds = self.dots(e.dots)
            if not ds and not self.delta:
                raise MalformedMessageError("a set element without dots in a full state")
            if x in out:
                prev = out[x]
                ds = sorted({*ds, *((prev[i], prev[i + 1]) for i in range(0, len(prev), 2))})
            out[x] = tuple(v for d in ds for v in d)
        return out or None

    def store(self, e: Any, kind: int, depth: int) -> Any:
        w = _WHICH(e)
        if kind == _NO_KIND:
            if w != "absent":
                raise MalformedMessageError("an entry without a kind must be absent")
            return None
        if w == "items":
            return self.items(kind, _GET(e, self.f.e_items))
        if w == "elements":
            if kind != Kind.SET:
                raise MalformedMessageError(f"kind {kind} does not hold set elements")
            return self.elements(e.elements)
        if w == "entries":
            if kind != Kind.MAP:
                raise MalformedMessageError(f"kind {kind} does not hold map entries")
            return self.entries(_GET(e, self.f.e_entries), depth)
        raise MalformedMessageError(f"kind {kind} entry is {w}")

    def entries(self, lst: Any, depth: int) -> MapStore | None:
        if depth > MAX_NESTING_DEPTH:
            raise MessageTooDeepError(
                f"maps nest deeper than MAX_NESTING_DEPTH={MAX_NESTING_DEPTH}"
            )
        out = MapStore()
        prev: tuple[str, int] | None = None
        f = self.f
        for e in lst:
            try:
                key = validate_key(_GET(e, f.e_key))
            except InvalidArgumentError as exc:
                raise MalformedMessageError(f"invalid map key: {exc}") from exc
            kind = _GET(e, f.e_kind)
            if prev is not None and not prev < (key, kind):
                raise MalformedMessageError("map entries are not sorted by (key, kind)")
            prev = (key, kind)
            whole = _GET(e, f.e_whole)
            if whole and not self.delta:
                raise MalformedMessageError("a Whole marker in a full state")
            try:
                try:
                    store = self.store(e, kind, depth + 1)
                except capnp.KjException as exc:  # a bad pointer below this key
                    text = str(exc).split("\n", 1)[0].split("failed: ", 1)[-1][:200]
                    raise MalformedMessageError(f"not valid Cap'n Proto: {text}") from exc
            except CodecError as exc:
                # Name the key at fault (outermost last: "under key 'a': under key 'b': ...").
                msg = f"under key {key!r}: {exc}"
                if depth == 1 and self.bad_keys is not None:
                    self.bad_keys.append((key, msg))
                    continue
                raise type(exc)(msg) from exc
            if store is None and not whole:
                raise MalformedMessageError(f"empty store under key {key!r}")
            cur: Any = out.get(key)
            if cur is None:
                out[key] = Whole(store) if whole else store
                continue
            # A second kind under the same key.
            cur_whole = type(cur) is Whole
            if cur_whole != whole or store is None or (cur_whole and cur.store is None):
                raise MalformedMessageError(f"inconsistent entries under key {key!r}")
            inner = cur.store if cur_whole else cur
            ks = inner if type(inner) is KindStore else KindStore({_kind_of(inner): inner})
            ks[_kind_of(store)] = store
            out[key] = Whole(ks) if whole else ks
        return out or None


def _kind_of(store: Any) -> Any:
    return store.KIND


def decode_document(
    schema: WireSchema,
    doc: Any,
    expect: type[Causal] | None = None,
    bad_keys: list[tuple[str, str]] | None = None,
) -> Causal:
    """The CRDT a ``Document`` reader holds; raises a ``CodecError`` subclass if invalid,
    naming the map keys down to the entry at fault.

    ``bad_keys``: instead of raising for a top-level key whose content is invalid, skip that
    key and append ``(key, reason)`` (used to load a stored state whose one key is bad without
    refusing the whole node). Structural faults (order, replica table, context) still raise.
    pycapnp exceptions raised while reading are left to the caller to map.
    """
    if not isinstance(doc, _READER):
        doc = doc.as_reader()  # a builder: the fast field reads below take readers
    try:
        replicas = [validate_replica_id(r) for r in doc.replicas]
    except InvalidArgumentError as exc:
        raise MalformedMessageError(f"invalid replica id: {exc}") from exc
    if len(set(replicas)) != len(replicas):
        raise MalformedMessageError("replica table repeats an id")
    delta = doc.delta
    dec = _Decoder(schema, replicas, delta, bad_keys)
    root = doc.root
    kind = root.kind
    cls = CAUSAL_OF_KIND.get(kind)
    if cls is None or kind not in schema.kinds:
        raise UnsupportedContentError(f"document root of kind {kind} is not readable here")
    if expect is not None and cls is not expect:
        raise MalformedMessageError(f"expected a {expect.__name__}, got a {cls.__name__}")
    if root.whole or root.key:
        raise MalformedMessageError("a document root has no key and no Whole marker")
    try:
        if kind == Kind.MAP:
            if root.which() != "entries":
                raise MalformedMessageError("a map document root must hold entries")
            store = dec.entries(root.entries, 1)
        else:
            store = dec.store(root, kind, 1)
    except NestingDepthError as exc:
        raise MessageTooDeepError(str(exc)) from exc
    c = doc.context
    vv: dict[str, int] = {}
    for d in c.versions:
        r, n = dec.dot(d)
        if r in vv:
            raise MalformedMessageError("version vector repeats a replica")
        vv[r] = n
    ctx = CausalContext(vv, dec.dots(c.cloud))
    return cls(store, ctx, is_delta=delta)
