"""A fast pure-Python reader of CRDT ``Document`` structs from unpacked Cap'n Proto words.

pycapnp costs ~0.2-1 us per field access and a 100-op batch reads ~1,500 fields; this reader
reads the same fields with ``struct.unpack_from`` at offsets generated from the schemas
(``_layouts``, written by ``gen_layouts``) and builds the same CRDT objects, with the same
validation, as ``_document.decode_document``.

Invariants:

- safe on any bytes: every pointer is bounds-checked against its segment, every struct and
  list read is charged to a traversal budget (``TRAVERSAL_FACTOR`` times the segment's words,
  as capnp's traversal limit does), maps nest at most ``MAX_NESTING_DEPTH`` (checked before
  recursing); only one segment is read (a far pointer, a capability pointer, a second segment
  is refused). Every failure is a ``CodecError`` subclass, never IndexError, struct.error,
  UnicodeDecodeError or RecursionError;
- it never guesses: what it does not handle (an unknown union member or kind kept opaque, a
  list encoding other than the one writers use, text with an inner NUL) raises
  ``FastPathError``, and so does every validation failure: the caller (``WireCodec``) then
  decodes with pycapnp, which gives the answer and its message. So the fast path may refuse
  more than pycapnp, never accept more; when it accepts, its result equals pycapnp's
  (``tests/unit/test_fast_codec.py``, ``tests/fuzz``: the differential check);
- ``unpack`` turns a packed stream into its words (pure Python; the hot path gets its words
  from pycapnp's checked copy instead, see ``WireCodec``, because unpacking in Python costs
  more than everything else here).

Pure: bytes in, objects out.
"""

from __future__ import annotations

import operator
import struct
from typing import Any, Final

from broker.codec._layouts import (
    CONTEXT_CLOUD_PTR,
    CONTEXT_DATA_WORDS,
    CONTEXT_POINTERS,
    CONTEXT_VERSIONS_PTR,
    DOCUMENT_CONTEXT_PTR,
    DOCUMENT_DATA_WORDS,
    DOCUMENT_DELTA_BIT,
    DOCUMENT_POINTERS,
    DOCUMENT_REPLICAS_PTR,
    DOCUMENT_ROOT_PTR,
    DOT_COUNTER,
    DOT_DATA_WORDS,
    DOT_POINTERS,
    DOT_REPLICA,
    ENTRY_DATA_WORDS,
    ENTRY_IS_ABSENT,
    ENTRY_IS_ELEMENTS,
    ENTRY_IS_ENTRIES,
    ENTRY_IS_ITEMS,
    ENTRY_ITEMS_PTR,
    ENTRY_KEY_PTR,
    ENTRY_KIND,
    ENTRY_POINTERS,
    ENTRY_WHICH,
    ENTRY_WHOLE_BIT,
    ENVELOPE_DATA_WORDS,
    ENVELOPE_DELTA_BATCH_PTR,
    ENVELOPE_IS_DELTA_BATCH,
    ENVELOPE_POINTERS,
    ENVELOPE_WHICH,
    ITEM_COUNTER,
    ITEM_DATA_WORDS,
    ITEM_PAYLOAD_PTR,
    ITEM_POINTERS,
    ITEM_REPLICA,
    PAYLOAD_COUNTER_DECREMENTS,
    PAYLOAD_COUNTER_INCREMENTS,
    PAYLOAD_DATA_WORDS,
    PAYLOAD_IS_COUNTER,
    PAYLOAD_IS_FLAG,
    PAYLOAD_IS_LWW,
    PAYLOAD_IS_MV,
    PAYLOAD_LWW_HLC,
    PAYLOAD_LWW_VALUE_PTR,
    PAYLOAD_MV_PTR,
    PAYLOAD_POINTERS,
    PAYLOAD_WHICH,
    SET_ELEMENT_DATA_WORDS,
    SET_ELEMENT_DOTS_PTR,
    SET_ELEMENT_POINTERS,
    SET_ELEMENT_VALUE_PTR,
    VALUE_BOOL_BIT,
    VALUE_DATA_PTR,
    VALUE_DATA_WORDS,
    VALUE_FLOAT,
    VALUE_INT,
    VALUE_IS_BOOL,
    VALUE_IS_DATA,
    VALUE_IS_FLOAT,
    VALUE_IS_INT,
    VALUE_IS_NULL,
    VALUE_IS_TEXT,
    VALUE_POINTERS,
    VALUE_TEXT_PTR,
    VALUE_WHICH,
)
from broker.crdt import (
    MAX_KIND,
    MAX_NESTING_DEPTH,
    Causal,
    CausalContext,
    Kind,
    validate_atom,
    validate_element,
    validate_replica_id,
)
from broker.crdt._atoms import INT64_MAX, MAX_KEY_BYTES
from broker.crdt._stores import (
    CounterStore,
    FlagStore,
    KindStore,
    LWWStore,
    MapStore,
    MVStore,
    SetStore,
    Whole,
)
from broker.errors import CodecError, MalformedMessageError, WorknodeError

__all__ = ["TRAVERSAL_FACTOR", "FastPathError", "read_document", "read_holder", "unpack"]

TRAVERSAL_FACTOR: Final = 8
"""Words a read may charge per word of the segment (overlapping pointers amplify reads)."""


class FastPathError(MalformedMessageError):
    """The fast reader refused the bytes (invalid, or a shape it leaves to pycapnp); the
    caller decodes them with pycapnp, whose answer is authoritative."""



def _layout(*fields: tuple[int, str]) -> Any:
    """``unpack_from`` of the fields at (byte offset, struct code), in offset order (the
    offsets come from ``_layouts``; the order is checked so a moved field fails at import)."""
    fmt, at = "<", 0
    for off, code in fields:
        if off < at:
            raise AssertionError(f"layout fields out of order at byte {off}")
        fmt += "x" * (off - at) + code
        at = off + struct.calcsize("<" + code)
    return struct.Struct(fmt).unpack_from


def _shape(data_words: int, pointers: int) -> int:
    """The upper half of a struct pointer (or list tag) to a struct of exactly this size."""
    return pointers << 16 | data_words


_II: Final = struct.Struct("<iI").unpack_from  # a pointer: signed low half, high half
_U16: Final = struct.Struct("<H").unpack_from
_F64: Final = struct.Struct("<d").unpack_from

_ITEM_BYTES: Final = 8 * (ITEM_DATA_WORDS + ITEM_POINTERS)
_ITEM_SHAPE: Final = _shape(ITEM_DATA_WORDS, ITEM_POINTERS)
_ITEM_PAYLOAD: Final = 8 * ITEM_DATA_WORDS + 8 * ITEM_PAYLOAD_PTR  # pointer's byte offset
_ITEM: Final = _layout(
    (ITEM_REPLICA, "I"), (ITEM_COUNTER, "Q"), (_ITEM_PAYLOAD, "iI")
)
_PAYLOAD_BYTES: Final = 8 * (PAYLOAD_DATA_WORDS + PAYLOAD_POINTERS)
_PAYLOAD_SHAPE: Final = _shape(PAYLOAD_DATA_WORDS, PAYLOAD_POINTERS)
_LWW_VALUE: Final = 8 * PAYLOAD_DATA_WORDS + 8 * PAYLOAD_LWW_VALUE_PTR
_MV_VALUE: Final = 8 * PAYLOAD_DATA_WORDS + 8 * PAYLOAD_MV_PTR
_PAYLOAD_LWW: Final = _layout(
    (PAYLOAD_LWW_HLC, "Q"), (PAYLOAD_WHICH, "H"), (_LWW_VALUE, "iI")
)
_PAYLOAD_MV: Final = _layout((PAYLOAD_WHICH, "H"), (_MV_VALUE, "iI"))
_PAYLOAD_COUNTER: Final = _layout(
    (PAYLOAD_COUNTER_INCREMENTS, "Q"), (PAYLOAD_WHICH, "H"),
    (PAYLOAD_COUNTER_DECREMENTS, "Q"),
)
_VALUE_BYTES: Final = 8 * (VALUE_DATA_WORDS + VALUE_POINTERS)
_VALUE_SHAPE: Final = _shape(VALUE_DATA_WORDS, VALUE_POINTERS)
_VALUE_TEXT: Final = 8 * VALUE_DATA_WORDS + 8 * VALUE_TEXT_PTR
_VALUE_DATA: Final = 8 * VALUE_DATA_WORDS + 8 * VALUE_DATA_PTR
_VALUE: Final = _layout((VALUE_WHICH, "H"), (VALUE_INT, "q"))
_DOT_BYTES: Final = 8 * (DOT_DATA_WORDS + DOT_POINTERS)
_DOT_SHAPE: Final = _shape(DOT_DATA_WORDS, DOT_POINTERS)
_DOT: Final = _layout((DOT_REPLICA, "I"), (DOT_COUNTER, "Q"))
_ENTRY_BYTES: Final = 8 * (ENTRY_DATA_WORDS + ENTRY_POINTERS)
_ENTRY_SHAPE: Final = _shape(ENTRY_DATA_WORDS, ENTRY_POINTERS)
_ENTRY_KEY: Final = 8 * ENTRY_DATA_WORDS + 8 * ENTRY_KEY_PTR
_ENTRY_LIST: Final = 8 * ENTRY_DATA_WORDS + 8 * ENTRY_ITEMS_PTR
_ENTRY: Final = _layout(
    (ENTRY_KIND, "H"), (ENTRY_WHOLE_BIT // 8, "B"), (ENTRY_WHICH, "H"),
    (_ENTRY_KEY, "iI"),
)
_WHOLE_MASK: Final = 1 << ENTRY_WHOLE_BIT % 8
_SET_ELEMENT_BYTES: Final = 8 * (SET_ELEMENT_DATA_WORDS + SET_ELEMENT_POINTERS)
_SET_ELEMENT_SHAPE: Final = _shape(SET_ELEMENT_DATA_WORDS, SET_ELEMENT_POINTERS)
_SET_ELEMENT_VALUE: Final = 8 * SET_ELEMENT_DATA_WORDS + 8 * SET_ELEMENT_VALUE_PTR
_SET_ELEMENT_DOTS: Final = 8 * SET_ELEMENT_DATA_WORDS + 8 * SET_ELEMENT_DOTS_PTR
_CONTEXT_SHAPE: Final = _shape(CONTEXT_DATA_WORDS, CONTEXT_POINTERS)
_CONTEXT_VERSIONS: Final = 8 * CONTEXT_DATA_WORDS + 8 * CONTEXT_VERSIONS_PTR
_CONTEXT_CLOUD: Final = 8 * CONTEXT_DATA_WORDS + 8 * CONTEXT_CLOUD_PTR
_DOCUMENT_SHAPE: Final = _shape(DOCUMENT_DATA_WORDS, DOCUMENT_POINTERS)
_DOCUMENT_PTRS: Final = 8 * DOCUMENT_DATA_WORDS
_DELTA_BIT: Final = DOCUMENT_DELTA_BIT
_ENVELOPE_SHAPE: Final = _shape(ENVELOPE_DATA_WORDS, ENVELOPE_POINTERS)
_CAUSAL: Final[dict[int, type[Causal]]] = {}  # filled lazily (import cycle with _document)
_K_LWW: Final = int(Kind.LWW)  # plain ints: compared in the loops
_K_MV: Final = int(Kind.MV)
_K_COUNTER: Final = int(Kind.COUNTER)
_K_SET: Final = int(Kind.SET)
_K_MAP: Final = int(Kind.MAP)
_K_FLAG: Final = int(Kind.FLAG)


_lt: Final = operator.lt
_KEY_CACHE: Final = 4096
_KEYS: dict[bytes, str] = {}
"""Map keys already checked (UTF-8 bytes -> str), bounded; only valid keys enter it."""
_DOT_STRUCT: Final = struct.Struct(
    "<" + "x" * DOT_REPLICA + "I" + "x" * (DOT_COUNTER - DOT_REPLICA - 4) + "Q"
    + "x" * (_DOT_BYTES - DOT_COUNTER - 8)
)
if _DOT_STRUCT.size != _DOT_BYTES or _DOT_STRUCT.unpack_from(_DOT_STRUCT.pack(1, 2)) != (1, 2):
    raise AssertionError("Dot layout changed: update _DOT_STRUCT")
_DOT_ITER: Final = _DOT_STRUCT.iter_unpack


def _fail(why: str) -> FastPathError:
    return FastPathError(f"fast reader: {why}")


def _text(m: bytes, p: int, lo: int, hi: int) -> str:
    """The text at the pointer word at byte ``p`` (``lo``/``hi`` its halves)."""
    if lo & 3 != 1 or hi & 7 != 2:
        if lo == 0 and hi == 0:
            return ""
        raise _fail("not a byte list where text was expected")
    start = p + 8 + 8 * (lo >> 2)
    end = start + (hi >> 3) - 1
    if start < 0 or end >= len(m) or end < start or m[end] != 0 or m.find(0, start, end) >= 0:
        raise _fail("text out of bounds, not NUL-terminated, or with an inner NUL")
    try:
        return m[start:end].decode("utf-8")
    except UnicodeDecodeError:
        raise _fail("text is not UTF-8") from None


def _data(m: bytes, p: int) -> bytes:
    lo, hi = _II(m, p)
    if lo & 3 != 1 or hi & 7 != 2:
        if lo == 0 and hi == 0:
            return b""
        raise _fail("not a byte list where data was expected")
    start = p + 8 + 8 * (lo >> 2)
    end = start + (hi >> 3)
    if start < 0 or end > len(m):
        raise _fail("data out of bounds")
    return m[start:end]


class _Reader:
    __slots__ = ("budget", "delta", "kinds", "m", "replicas", "size")

    def __init__(self, m: bytes, kinds: frozenset[int]) -> None:
        self.m = m
        self.size = len(m)
        self.budget = TRAVERSAL_FACTOR * (len(m) // 8) + 64
        self.kinds = kinds
        self.replicas: list[str] = []
        self.delta = False

    def charge(self, words: int) -> None:
        self.budget -= words
        if self.budget < 0:
            raise _fail("over the traversal limit")

    def struct(self, p: int, shape: int, nbytes: int) -> int:
        """The first byte of the struct of exactly ``shape`` the pointer at ``p`` points to
        (any other size, a null or a non-struct pointer is left to pycapnp)."""
        lo, hi = _II(self.m, p)
        if lo & 3 or hi != shape:
            raise _fail("not a struct pointer of the schema's size")
        a: int = p + 8 + 8 * (lo >> 2)
        if a < 0 or a + nbytes > self.size:
            raise _fail("struct pointer out of bounds")
        return a

    def structs(self, p: int, shape: int, stride: int) -> tuple[int, int]:
        """(first element, count) of the composite list of structs of exactly ``shape`` at
        pointer ``p``; (0, 0) when null."""
        m = self.m
        lo, hi = _II(m, p)
        if lo & 3 != 1 or hi & 7 != 7:
            if lo == 0 and hi == 0:
                return 0, 0
            raise _fail("not a composite struct list")
        tag = p + 8 + 8 * (lo >> 2)
        words = hi >> 3
        if tag < 0 or tag + 8 + 8 * words > self.size:
            raise _fail("struct list out of bounds")
        tlo, thi = _II(m, tag)
        count = tlo >> 2
        if tlo & 3 or count < 0 or (count and thi != shape) or count * stride > 8 * words:
            raise _fail("struct list tag not of the schema's size")
        self.charge(words + 1)
        return tag + 8, count

    def value(self, a: int) -> Any:
        m = self.m
        w, x = _VALUE(m, a)
        if w == VALUE_IS_INT:
            pass
        elif w == VALUE_IS_TEXT:
            p = a + _VALUE_TEXT
            x = _text(m, p, *_II(m, p))
        elif w == VALUE_IS_NULL:
            return None
        elif w == VALUE_IS_FLOAT:
            x = _F64(m, a + VALUE_FLOAT)[0]
        elif w == VALUE_IS_BOOL:
            b = VALUE_BOOL_BIT
            return bool(m[a + b // 8] >> b % 8 & 1)
        elif w == VALUE_IS_DATA:
            x = _data(m, a + _VALUE_DATA)
        else:
            raise _fail("a value of a newer type (kept opaque by pycapnp)")
        return validate_atom(x)

    def element(self, a: int) -> Any:
        m = self.m
        w, x = _VALUE(m, a)
        if w == VALUE_IS_TEXT:
            p = a + _VALUE_TEXT
            x = _text(m, p, *_II(m, p))
        elif w == VALUE_IS_DATA:
            x = _data(m, a + _VALUE_DATA)
        elif w != VALUE_IS_INT:
            raise _fail("set element of another type")
        return validate_element(x)

    def dots(self, p: int) -> list[tuple[str, int]]:
        """A sorted, unique list of dots (Dot structs) at pointer ``p`` (read in one
        ``unpack_from`` and checked with C-level passes: contexts hold many dots)."""
        start, count = self.structs(p, _DOT_SHAPE, _DOT_BYTES)
        if not count:
            return []
        if count == 1:
            r, n = _DOT(self.m, start)
            if not 1 <= n <= INT64_MAX or r >= len(self.replicas):
                raise _fail("bad dot")
            return [(self.replicas[r], n)]
        rs, ns = zip(*_DOT_ITER(self.m[start : start + _DOT_BYTES * count]), strict=True)
        if min(ns) < 1 or max(ns) > INT64_MAX or max(rs) >= len(self.replicas):
            raise _fail("bad dot")
        out = list(zip(map(self.replicas.__getitem__, rs), ns, strict=True))
        if not all(map(_lt, out, out[1:])):
            raise _fail("dots are not sorted and unique")
        return out

    def items(self, kind: int, p: int) -> Any:
        if kind == _K_LWW:
            cls: type = LWWStore
        elif kind == _K_MV:
            cls = MVStore
        elif kind == _K_COUNTER:
            cls = CounterStore
        elif kind == _K_FLAG and kind in self.kinds:
            cls = FlagStore
        elif kind not in self.kinds and kind <= MAX_KIND:
            raise _fail("a kind this version keeps opaque")
        else:
            raise _fail(f"kind {kind} does not hold items")
        m, size = self.m, self.size
        lo, hi = _II(m, p)  # the item list (``structs``, inlined: the hot path)
        if lo & 3 != 1 or hi & 7 != 7:
            if lo == 0 and hi == 0:
                return None
            raise _fail("not a composite struct list")
        tag = p + 8 + 8 * (lo >> 2)
        words = hi >> 3
        if tag < 0 or tag + 8 + 8 * words > size:
            raise _fail("struct list out of bounds")
        tlo, thi = _II(m, tag)
        count = tlo >> 2
        bad_tag = tlo & 3 or count < 0 or (count and thi != _ITEM_SHAPE)
        if bad_tag or count * _ITEM_BYTES > 8 * words:
            raise _fail("struct list tag not of the schema's size")
        if not count:
            return None
        start = tag + 8
        # Each item points to a payload, which may point to a value: at most these words.
        self.budget -= words + 1 + count * (_PAYLOAD_BYTES + _VALUE_BYTES) // 8
        if self.budget < 0:
            raise _fail("over the traversal limit")
        replicas = self.replicas
        nrep = len(replicas)
        out: list[Any] = []
        add = out.append
        prev: tuple[str, int] | None = None
        prev_counter_replica: str | None = None
        value = self.value
        for a in range(start, start + _ITEM_BYTES * count, _ITEM_BYTES):
            r, n, plo, phi = _ITEM(m, a)
            if not 1 <= n <= INT64_MAX or r >= nrep:
                raise _fail("bad item dot")
            rid = replicas[r]
            dot = (rid, n)
            if prev is not None and not prev < dot:
                raise _fail("items are not sorted by dot, or repeat a dot")
            prev = dot
            add(rid)
            add(n)
            if plo & 3 or phi != _PAYLOAD_SHAPE:
                raise _fail("payload pointer not of the schema's size")
            pp = a + _ITEM_PAYLOAD
            pa = pp + 8 + 8 * (plo >> 2)
            if pa < 0 or pa + _PAYLOAD_BYTES > size:
                raise _fail("payload out of bounds")
            if kind == _K_LWW:
                hlc, w, vlo, vhi = _PAYLOAD_LWW(m, pa)
                if w != PAYLOAD_IS_LWW:
                    raise _fail("LWW item without an lww payload")
                if hlc > INT64_MAX:
                    raise _fail("hybrid timestamp above 2**63 - 1")
                add(hlc)
                vp = pa + _LWW_VALUE
            elif kind == _K_MV:
                w, vlo, vhi = _PAYLOAD_MV(m, pa)
                if w != PAYLOAD_IS_MV:
                    raise _fail("MV item without an mv payload")
                vp = pa + _MV_VALUE
            elif kind == _K_FLAG:
                if _U16(m, pa + PAYLOAD_WHICH)[0] != PAYLOAD_IS_FLAG:
                    raise _fail("flag item without a flag payload")
                continue
            else:
                inc, w, dec = _PAYLOAD_COUNTER(m, pa)
                if w != PAYLOAD_IS_COUNTER:
                    raise _fail("counter item without a counter payload")
                if rid == prev_counter_replica:
                    raise _fail("a counter holds two entries of one replica")
                prev_counter_replica = rid
                if inc > INT64_MAX or dec > INT64_MAX:
                    raise _fail("counter contribution above 2**63 - 1")
                add(inc)
                add(dec)
                continue
            if vlo & 3 or vhi != _VALUE_SHAPE:
                raise _fail("value pointer not of the schema's size")
            va = vp + 8 + 8 * (vlo >> 2)
            if va < 0 or va + _VALUE_BYTES > size:
                raise _fail("value out of bounds")
            vw, x = _VALUE(m, va)
            # An Int64 read is always in range: validate_atom would pass it unchanged.
            add(x if vw == VALUE_IS_INT else value(va))
        return cls(out)

    def elements(self, p: int) -> SetStore | None:
        start, count = self.structs(p, _SET_ELEMENT_SHAPE, _SET_ELEMENT_BYTES)
        self.charge(count * _VALUE_BYTES // 8)
        out = SetStore()
        element, struct_at, dots, delta = self.element, self.struct, self.dots, self.delta
        for a in range(start, start + _SET_ELEMENT_BYTES * count, _SET_ELEMENT_BYTES):
            x = element(struct_at(a + _SET_ELEMENT_VALUE, _VALUE_SHAPE, _VALUE_BYTES))
            ds = dots(a + _SET_ELEMENT_DOTS)
            if not ds and not delta:
                raise _fail("a set element without dots in a full state")
            if x in out:
                prev = out[x]
                ds = sorted({*ds, *((prev[i], prev[i + 1]) for i in range(0, len(prev), 2))})
            # One dot (the commonest) is already the flat (replica, counter) tuple.
            out[x] = ds[0] if len(ds) == 1 else tuple(v for d in ds for v in d)
        return out or None

    def store(self, kind: int, w: int, p: int, depth: int) -> Any:
        """The store of an entry of ``kind`` whose union member is ``w``, its list at ``p``."""
        if kind == 0:
            if w != ENTRY_IS_ABSENT:
                raise _fail("an entry without a kind must be absent")
            return None
        if w == ENTRY_IS_ITEMS:
            return self.items(kind, p)
        if w == ENTRY_IS_ENTRIES:
            if kind != _K_MAP:
                raise _fail("map entries under another kind")
            return self.entries(p, depth)
        if w == ENTRY_IS_ELEMENTS:
            if kind != _K_SET:
                raise _fail("set elements under another kind")
            return self.elements(p)
        raise _fail("entry union member does not match its kind")

    def entries(self, p: int, depth: int) -> MapStore | None:
        if depth > MAX_NESTING_DEPTH:
            raise _fail("maps nest deeper than MAX_NESTING_DEPTH")
        m, size = self.m, self.size
        lo, hi = _II(m, p)  # the entry list (``structs``, inlined: the hot path)
        if lo & 3 != 1 or hi & 7 != 7:
            if lo == 0 and hi == 0:
                return None
            raise _fail("not a composite struct list")
        tag = p + 8 + 8 * (lo >> 2)
        words = hi >> 3
        if tag < 0 or tag + 8 + 8 * words > size:
            raise _fail("struct list out of bounds")
        tlo, thi = _II(m, tag)
        count = tlo >> 2
        bad_tag = tlo & 3 or count < 0 or (count and thi != _ENTRY_SHAPE)
        if bad_tag or count * _ENTRY_BYTES > 8 * words:
            raise _fail("struct list tag not of the schema's size")
        self.budget -= words + 1
        if self.budget < 0:
            raise _fail("over the traversal limit")
        start = tag + 8
        out = MapStore()
        prev: tuple[str, int] | None = None
        store, items, entries = self.store, self.items, self.entries
        keys, delta = _KEYS, self.delta
        for a in range(start, start + _ENTRY_BYTES * count, _ENTRY_BYTES):
            kind, wb, w, klo, khi = _ENTRY(m, a)
            # The key (``_text`` and ``validate_key``, inlined: the hot path). Strict UTF-8
            # decoding gives a str whose UTF-8 size is the byte count checked here.
            if klo & 3 != 1 or khi & 7 != 2:
                raise _fail("map key is not a byte list")
            ks = a + _ENTRY_KEY + 8 + 8 * (klo >> 2)
            ke = ks + (khi >> 3) - 1
            if ks < 0 or ke >= size or m[ke] != 0 or not 0 < ke - ks <= MAX_KEY_BYTES:
                raise _fail("map key out of bounds, empty, too long or not NUL-terminated")
            raw = m[ks:ke]
            key = keys.get(raw)  # field names repeat: each is checked once
            if key is None:
                if 0 in raw:
                    raise _fail("map key with an inner NUL")
                key = raw.decode("utf-8")  # UnicodeDecodeError: see ``_guard``
                if len(keys) >= _KEY_CACHE:
                    keys.clear()
                keys[raw] = key
            if prev is not None and not prev < (key, kind):
                raise _fail("map entries are not sorted by (key, kind)")
            prev = (key, kind)
            whole = wb & _WHOLE_MASK != 0
            if whole and not delta:
                raise _fail("a Whole marker in a full state")
            if w == ENTRY_IS_ENTRIES and kind == _K_MAP:
                inner_store: Any = entries(a + _ENTRY_LIST, depth + 1)
            elif w == ENTRY_IS_ITEMS and kind:
                inner_store = items(kind, a + _ENTRY_LIST)
            else:
                inner_store = store(kind, w, a + _ENTRY_LIST, depth + 1)
            if inner_store is None and not whole:
                raise _fail("empty store under a key")
            cur: Any = out.get(key)
            if cur is None:
                out[key] = Whole(inner_store) if whole else inner_store
                continue
            cur_whole = type(cur) is Whole
            if cur_whole != whole or inner_store is None or (cur_whole and cur.store is None):
                raise _fail("inconsistent entries under a key")
            inner = cur.store if cur_whole else cur
            ks = inner if type(inner) is KindStore else KindStore({inner.KIND: inner})
            ks[inner_store.KIND] = inner_store
            out[key] = Whole(ks) if whole else ks
        return out or None

    def document(self, p: int, expect: type[Causal] | None) -> Causal:
        m = self.m
        a = self.struct(p, _DOCUMENT_SHAPE, 8 * (DOCUMENT_DATA_WORDS + DOCUMENT_POINTERS))
        pa = a + _DOCUMENT_PTRS
        rp = pa + 8 * DOCUMENT_REPLICAS_PTR
        lo, hi = _II(m, rp)
        replicas: list[str] = []
        if lo or hi:
            if lo & 3 != 1 or hi & 7 != 6:
                raise _fail("replica table is not a pointer list")
            start, count = rp + 8 + 8 * (lo >> 2), hi >> 3
            if start < 0 or start + 8 * count > self.size:
                raise _fail("replica table out of bounds")
            self.charge(count + 1)
            for q in range(start, start + 8 * count, 8):
                replicas.append(validate_replica_id(_text(m, q, *_II(m, q))))
        if len(set(replicas)) != len(replicas):
            raise _fail("replica table repeats an id")
        self.replicas = replicas
        b = _DELTA_BIT
        delta = self.delta = bool(m[a + b // 8] >> b % 8 & 1)
        ra = self.struct(pa + 8 * DOCUMENT_ROOT_PTR, _ENTRY_SHAPE, _ENTRY_BYTES)
        kind, wb, w, klo, khi = _ENTRY(m, ra)
        cls = _causal().get(kind)
        if cls is None or kind not in self.kinds:
            raise _fail("document root of a kind not readable here")
        if expect is not None and cls is not expect:
            raise _fail("document of another CRDT than expected")
        if wb & _WHOLE_MASK or _text(m, ra + _ENTRY_KEY, klo, khi):
            raise _fail("a document root has no key and no Whole marker")
        if kind == _K_MAP and w != ENTRY_IS_ENTRIES:
            raise _fail("a map document root must hold entries")
        store = self.store(kind, w, ra + _ENTRY_LIST, 1)
        ca = self.struct(
            pa + 8 * DOCUMENT_CONTEXT_PTR, _CONTEXT_SHAPE,
            8 * (CONTEXT_DATA_WORDS + CONTEXT_POINTERS),
        )
        vv: dict[str, int] = {}
        for r, n in self.dots(ca + _CONTEXT_VERSIONS):
            if r in vv:
                raise _fail("version vector repeats a replica")
            vv[r] = n
        cloud = self.dots(ca + _CONTEXT_CLOUD)
        return cls(store, CausalContext(vv, cloud), is_delta=delta)


def _causal() -> dict[int, type[Causal]]:
    if not _CAUSAL:
        from broker.codec._document import CAUSAL_OF_KIND

        _CAUSAL.update(CAUSAL_OF_KIND)
    return _CAUSAL


def _segment(data: bytes) -> bytes:
    """The one segment of an unpacked message (with its segment table)."""
    if len(data) < 8:
        raise _fail("message shorter than its segment table")
    count, size = _II(data, 0)
    if count != 0:
        raise _fail("a multi-segment message (left to pycapnp)")
    if len(data) != 8 + 8 * size or size == 0:
        raise _fail("segment size does not match the message")
    return data[8:]


def _guard(fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except CodecError:
        raise
    except WorknodeError as exc:  # content validation (keys, values, ids)
        raise _fail(f"{type(exc).__name__}: {exc}") from exc
    except (IndexError, struct.error, ValueError, OverflowError, RecursionError) as exc:
        # Defense in depth: every access above is bounds-checked first.
        raise _fail(f"{type(exc).__name__}: {exc}") from exc


def read_document(
    message: bytes, kinds: frozenset[int], expect: type[Causal] | None = None
) -> Causal:
    """The CRDT of an unpacked single-segment message whose root is a ``Document``."""

    def run() -> Causal:
        r = _Reader(_segment(message), kinds)
        return r.document(0, expect)

    return _guard(run)  # type: ignore[no-any-return]


def read_holder(
    segment: bytes, kinds: frozenset[int], expect: type[Causal] | None = None
) -> Causal:
    """The CRDT of the ``deltaBatch`` of the ``Envelope`` at the root of ``segment`` (one
    segment, no table: what ``WireCodec``'s checked copy gives)."""

    def run() -> Causal:
        r = _Reader(segment, kinds)
        a = r.struct(0, _ENVELOPE_SHAPE, 8 * (ENVELOPE_DATA_WORDS + ENVELOPE_POINTERS))
        if _U16(segment, a + ENVELOPE_WHICH)[0] != ENVELOPE_IS_DELTA_BATCH:
            raise _fail("holder without a document")
        return r.document(a + 8 * ENVELOPE_DATA_WORDS + 8 * ENVELOPE_DELTA_BATCH_PTR, expect)

    return _guard(run)  # type: ignore[no-any-return]


_POP: Final = [bin(t).count("1") for t in range(256)]
_SCATTER: Final = [
    struct.Struct("<" + "".join("B" if t >> b & 1 else "x" for b in range(8))).pack
    for t in range(256)
]


def unpack(data: bytes) -> bytes:
    """The words of the packed stream ``data``; FastPathError if it ends mid-word."""
    out: list[bytes] = []
    add = out.append
    i, n = 0, len(data)
    pop, scatter = _POP, _SCATTER
    while i < n:
        t = data[i]
        i += 1
        if t == 0:
            if i >= n:
                raise _fail("packed stream ends in a zero run")
            add(bytes(8 * (1 + data[i])))
            i += 1
        elif t == 0xFF:
            if i + 9 > n:
                raise _fail("packed stream ends in a word")
            add(data[i : i + 8])
            raw = 8 * data[i + 8]
            i += 9
            if i + raw > n:
                raise _fail("packed stream ends in a raw run")
            add(data[i : i + raw])
            i += raw
        else:
            k = pop[t]
            if i + k > n:
                raise _fail("packed stream ends in a word")
            add(scatter[t](*data[i : i + k]))
            i += k
    return b"".join(out)
