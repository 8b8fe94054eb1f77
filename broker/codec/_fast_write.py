"""A fast pure-Python writer of CRDT ``Document`` messages, word for word what pycapnp writes.

``_document.encode_document`` fills a pycapnp builder (~0.5-1 us per field set); this module
writes the same words with ``struct.pack_into`` at the offsets generated from the schemas
(``_layouts``), allocating every struct, list and text in the order that encoder allocates
them (pycapnp's message builder allocates sequentially in its first segment), so the segment
is byte-identical to the one pycapnp builds.

Invariants:

- ``write_document(state)`` equals ``encode_document(schema, state).to_segments()[0]`` for
  every state the current encoder writes in one first segment (``FIRST_SEGMENT_WORDS``);
  ``tests/unit/test_fast_codec.py`` and ``tests.fuzz._documents`` check it;
- what it does not write (opaque stores and values, which pycapnp copies from their holder
  structs; a document larger than the first segment; a kind this version does not know)
  raises ``FastPathError``, and the caller encodes with pycapnp.

Pure: objects in, bytes out.
"""

from __future__ import annotations

import struct
from typing import Any, Final

from broker.codec._document import FIRST_SEGMENT_WORDS, _parts
from broker.codec._fast import FastPathError
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
    ENTRY_ENTRIES_PTR,
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
    VALUE_IS_TEXT,
    VALUE_POINTERS,
    VALUE_TEXT_PTR,
    VALUE_WHICH,
)
from broker.crdt import Causal, Kind
from broker.crdt._atoms import encode_atom
from broker.crdt._stores import (
    CounterStore,
    FlagStore,
    LWWStore,
    MapStore,
    MVStore,
    OpaqueStore,
    SetStore,
)

__all__ = ["FAST_LIMIT", "write_document"]

_PTR: Final = struct.Struct("<iI").pack_into
_U16: Final = struct.Struct("<H").pack_into
_U32: Final = struct.Struct("<I").pack_into
_U64: Final = struct.Struct("<Q").pack_into
_I64: Final = struct.Struct("<q").pack_into
_F64: Final = struct.Struct("<d").pack_into
_DOT: Final = struct.Struct("<I4xQ").pack_into
if (DOT_REPLICA, DOT_COUNTER) != (0, 8):  # the combined format above assumes these
    raise AssertionError("Dot layout changed: update _DOT")

_ENTRY_W: Final = ENTRY_DATA_WORDS + ENTRY_POINTERS
_ITEM_W: Final = ITEM_DATA_WORDS + ITEM_POINTERS
_PAYLOAD_W: Final = PAYLOAD_DATA_WORDS + PAYLOAD_POINTERS
_VALUE_W: Final = VALUE_DATA_WORDS + VALUE_POINTERS
_DOT_W: Final = DOT_DATA_WORDS + DOT_POINTERS
_SET_ELEMENT_W: Final = SET_ELEMENT_DATA_WORDS + SET_ELEMENT_POINTERS
_K_LWW: Final = int(Kind.LWW)
_K_MV: Final = int(Kind.MV)
_K_COUNTER: Final = int(Kind.COUNTER)
_K_SET: Final = int(Kind.SET)
_K_MAP: Final = int(Kind.MAP)
_K_FLAG: Final = int(Kind.FLAG)
FAST_LIMIT: Final = 8 * FIRST_SEGMENT_WORDS  # bytes: pycapnp's first segment
_ONE_KINDS: Final = frozenset({_K_LWW, _K_COUNTER})  # one-entry stores written by template
_KEY_AT: Final = 8 * ENTRY_DATA_WORDS + 8 * ENTRY_KEY_PTR  # in an entry: its key's pointer
_ITEMS_AT: Final = 8 * ENTRY_DATA_WORDS + 8 * ENTRY_ITEMS_PTR
# Zero bytes after a text of n bytes (n & 7 of them past whole words): its NUL, then to a word.
_PAD: Final = tuple(bytes(8 - r) for r in range(8))
# Stores that are one kind under a map name (``_parts`` of them: one row, not whole).
_PLAIN_KIND: Final = {
    cls: int(cls.KIND) for cls in (LWWStore, MVStore, CounterStore, FlagStore, SetStore, MapStore)
}


class _Writer:
    """One segment, allocated as pycapnp's builder allocates: sequentially."""

    __slots__ = ("buf", "ids", "index", "kinds")

    def __init__(self, kinds: frozenset[int]) -> None:
        self.buf = bytearray(8)  # the root pointer
        self.kinds = kinds
        self.index: dict[str, int] = {}
        self.ids: list[str] = []

    def rx(self, rid: str) -> int:
        i = self.index.get(rid)
        if i is None:
            i = self.index[rid] = len(self.ids)
            self.ids.append(rid)
        return i

    def struct(self, p: int, dw: int, pc: int) -> int:
        """Allocate a struct, point the pointer at byte ``p`` to it; its first byte."""
        buf = self.buf
        a = len(buf)
        buf += bytes(8 * (dw + pc))
        _PTR(buf, p, (a - p - 8) >> 1, dw | pc << 16)  # offset in words << 2
        return a

    def structs(self, p: int, n: int, dw: int, pc: int) -> int:
        """Allocate a composite list of ``n`` structs; its first element's first byte."""
        buf = self.buf
        tag = len(buf)
        words = n * (dw + pc)
        buf += bytes(8 + 8 * words)
        _PTR(buf, p, (tag - p - 8) >> 1 | 1, 7 | words << 3)
        _PTR(buf, tag, n << 2, dw | pc << 16)
        return tag + 8

    def text(self, p: int, s: str) -> None:
        b = s.encode("utf-8")
        buf = self.buf
        a = len(buf)
        n = len(b) + 1
        buf += b
        buf += bytes(8 * ((n + 7) // 8) - len(b))
        _PTR(buf, p, (a - p - 8) >> 1 | 1, 2 | n << 3)

    def data(self, p: int, b: bytes) -> None:
        buf = self.buf
        a = len(buf)
        n = len(b)
        buf += b
        buf += bytes(8 * ((n + 7) // 8) - n)
        _PTR(buf, p, (a - p - 8) >> 1 | 1, 2 | n << 3)

    def value(self, p: int, v: Any) -> None:
        """A Value struct (allocated at pointer ``p``) holding atom ``v``."""
        a = self.struct(p, VALUE_DATA_WORDS, VALUE_POINTERS)
        buf = self.buf
        t = type(v)
        if v is None:
            return  # the null member: discriminant 0, nothing set
        if t is bool:
            _U16(buf, a + VALUE_WHICH, VALUE_IS_BOOL)
            if v:
                buf[a + VALUE_BOOL_BIT // 8] |= 1 << VALUE_BOOL_BIT % 8
        elif t is int:
            _U16(buf, a + VALUE_WHICH, VALUE_IS_INT)
            _I64(buf, a + VALUE_INT, v)
        elif t is float:
            _U16(buf, a + VALUE_WHICH, VALUE_IS_FLOAT)
            _F64(buf, a + VALUE_FLOAT, v)
        elif t is str:
            _U16(buf, a + VALUE_WHICH, VALUE_IS_TEXT)
            self.text(a + 8 * VALUE_DATA_WORDS + 8 * VALUE_TEXT_PTR, v)
        elif t is bytes:
            _U16(buf, a + VALUE_WHICH, VALUE_IS_DATA)
            self.data(a + 8 * VALUE_DATA_WORDS + 8 * VALUE_DATA_PTR, v)
        else:  # an OpaqueAtom: pycapnp copies it from its holder struct
            raise FastPathError("fast writer: an opaque value")

    def one(self, e: int, kind: int, one: tuple[bytes, Any, int], item: Any) -> None:
        """Entry ``e``'s items (its ``which`` set): the one entry ``item`` of a register or a
        writer's counter. Its list, item, payload and value are allocated back to back in a
        fixed layout, written from ``one``'s template (built and checked by this writer's
        general path at import), then ``item``'s fields."""
        buf = self.buf
        template, pack, at = one
        tag = len(buf)
        buf += template
        p = e + _ITEMS_AT
        _PTR(buf, p, (tag - p - 8) >> 1 | 1, 7 | _ITEM_W << 3)
        _ITEM_RC(buf, tag + _T_ITEM_RC, self.rx(item[0]), item[1])
        if kind == _K_LWW:
            _U64(buf, tag + _T_LWW_HLC, item[2])
            if pack is not None:
                pack(buf, tag + at, item[3])
            elif at:
                self.text(tag + at, item[3])
        else:
            _U64(buf, tag + _T_INCREMENTS, item[2])
            _U64(buf, tag + _T_DECREMENTS, item[3])

    def store(self, e: int, kind: int, store: Any) -> None:
        """Fill entry ``e`` (key/kind/whole already set) with ``store``, as
        ``_document._encode_store`` does."""
        buf = self.buf
        ptrs = e + 8 * ENTRY_DATA_WORDS
        if isinstance(store, OpaqueStore) or (kind not in self.kinds and kind != 0):
            raise FastPathError("fast writer: an opaque or unknown kind")
        if kind == 0:
            _U16(buf, e + ENTRY_WHICH, ENTRY_IS_ABSENT)
        elif kind == _K_MAP:
            rows = []
            plain = _PLAIN_KIND
            for key in sorted(store):
                v = store[key]
                pk = plain.get(type(v))
                if pk is not None:  # one kind under the name (the usual case): _parts inlined
                    rows.append((key, pk, False, v))
                else:
                    for k, whole, inner in _parts(v):
                        rows.append((key, k, whole, inner))
            _U16(buf, e + ENTRY_WHICH, ENTRY_IS_ENTRIES)
            first = self.structs(
                ptrs + 8 * ENTRY_ENTRIES_PTR, len(rows), ENTRY_DATA_WORDS, ENTRY_POINTERS
            )
            one_of, kinds = _ONE.get, self.kinds
            for i, (key, k, whole, inner) in enumerate(rows):
                c = first + 8 * _ENTRY_W * i
                # The key's text (``text`` inlined).
                kb = key.encode("utf-8")
                a = len(buf)
                p = c + _KEY_AT
                buf += kb
                buf += _PAD[len(kb) & 7]
                _PTR(buf, p, (a - p - 8) >> 1 | 1, 2 | (len(kb) + 1) << 3)
                _U16(buf, c + ENTRY_KIND, k)
                if whole:
                    buf[c + ENTRY_WHOLE_BIT // 8] |= 1 << ENTRY_WHOLE_BIT % 8
                one = None
                if k in _ONE_KINDS and len(inner) == 4 and k in kinds:  # one entry, stride 4
                    one = one_of((k, type(inner[3]) if k == _K_LWW else None))
                if one is None:
                    self.store(c, k, inner)
                else:
                    _U16(buf, c + ENTRY_WHICH, ENTRY_IS_ITEMS)
                    self.one(c, k, one, inner)
        elif kind == _K_SET:
            els = sorted(((encode_atom(x), x, ds) for x, ds in store.items()), key=lambda r: r[0])
            _U16(buf, e + ENTRY_WHICH, ENTRY_IS_ELEMENTS)
            first = self.structs(
                ptrs + 8 * ENTRY_ITEMS_PTR, len(els), SET_ELEMENT_DATA_WORDS, SET_ELEMENT_POINTERS
            )
            rx = self.rx
            for i, (_, x, ds) in enumerate(els):
                el = first + 8 * _SET_ELEMENT_W * i + 8 * SET_ELEMENT_DATA_WORDS
                self.value(el + 8 * SET_ELEMENT_VALUE_PTR, x)
                pairs = sorted((ds[j], ds[j + 1]) for j in range(0, len(ds), 2))
                d0 = self.structs(
                    el + 8 * SET_ELEMENT_DOTS_PTR, len(pairs), DOT_DATA_WORDS, DOT_POINTERS
                )
                buf = self.buf
                for j, (r, n) in enumerate(pairs):
                    _DOT(buf, d0 + 8 * _DOT_W * j, rx(r), n)
        else:
            stride = store.STRIDE if store is not None else 1
            n_items = len(store) // stride if store is not None else 0
            _U16(buf, e + ENTRY_WHICH, ENTRY_IS_ITEMS)
            if n_items == 1:
                one = _ONE.get((kind, type(store[3]) if kind == _K_LWW else None))
                if one is not None:
                    self.one(e, kind, one, store)
                    return
            first = self.structs(
                ptrs + 8 * ENTRY_ITEMS_PTR, n_items, ITEM_DATA_WORDS, ITEM_POINTERS
            )
            rx = self.rx
            item_ptr = 8 * ITEM_DATA_WORDS + 8 * ITEM_PAYLOAD_PTR
            value_at = 8 * PAYLOAD_DATA_WORDS
            for i in range(n_items):
                o = i * stride
                it = first + 8 * _ITEM_W * i
                buf = self.buf
                _U32(buf, it + ITEM_REPLICA, rx(store[o]))
                _U64(buf, it + ITEM_COUNTER, store[o + 1])
                pa = self.struct(it + item_ptr, PAYLOAD_DATA_WORDS, PAYLOAD_POINTERS)
                if kind == _K_LWW:
                    _U16(buf, pa + PAYLOAD_WHICH, PAYLOAD_IS_LWW)
                    _U64(buf, pa + PAYLOAD_LWW_HLC, store[o + 2])
                    self.value(pa + value_at + 8 * PAYLOAD_LWW_VALUE_PTR, store[o + 3])
                elif kind == _K_MV:
                    _U16(buf, pa + PAYLOAD_WHICH, PAYLOAD_IS_MV)
                    self.value(pa + value_at + 8 * PAYLOAD_MV_PTR, store[o + 2])
                elif kind == _K_COUNTER:
                    _U16(buf, pa + PAYLOAD_WHICH, PAYLOAD_IS_COUNTER)
                    _U64(buf, pa + PAYLOAD_COUNTER_INCREMENTS, store[o + 2])
                    _U64(buf, pa + PAYLOAD_COUNTER_DECREMENTS, store[o + 3])
                elif kind == _K_FLAG:
                    _U16(buf, pa + PAYLOAD_WHICH, PAYLOAD_IS_FLAG)
                else:
                    raise FastPathError("fast writer: a kind without a payload writer")


def write_document(
    state: Causal, kinds: frozenset[int], *, limit: int | None = FAST_LIMIT
) -> bytes:
    """The one segment pycapnp's ``encode_document`` builds for ``state`` (no segment
    table); ``FastPathError`` where pycapnp must write it (see module doc). ``limit=None``:
    also a state past pycapnp's first segment, in one segment (the same words pycapnp would
    have spread over several: for a store record, never for wire bytes)."""
    w = _Writer(kinds)
    doc = w.struct(0, DOCUMENT_DATA_WORDS, DOCUMENT_POINTERS)
    dp = doc + 8 * DOCUMENT_DATA_WORDS
    root = w.struct(dp + 8 * DOCUMENT_ROOT_PTR, ENTRY_DATA_WORDS, ENTRY_POINTERS)
    kind = int(state.KIND)
    _U16(w.buf, root + ENTRY_KIND, kind)
    store = state.store
    if store is None and kind == _K_MAP:
        store = MapStore()
    elif store is None and kind == _K_SET:
        store = SetStore()
    w.store(root, kind, store)
    ctx = state.context
    vv = ctx.version_vector
    c = w.struct(dp + 8 * DOCUMENT_CONTEXT_PTR, CONTEXT_DATA_WORDS, CONTEXT_POINTERS)
    cp = c + 8 * CONTEXT_DATA_WORDS
    first = w.structs(cp + 8 * CONTEXT_VERSIONS_PTR, len(vv), DOT_DATA_WORDS, DOT_POINTERS)
    rx = w.rx
    for i, r in enumerate(sorted(vv)):
        _DOT(w.buf, first + 8 * _DOT_W * i, rx(r), vv[r])
    clouds = ctx._cloud  # replica -> counters: sorted by replica then counter, as ctx.cloud
    first = w.structs(cp + 8 * CONTEXT_CLOUD_PTR, sum(map(len, clouds.values())),
                      DOT_DATA_WORDS, DOT_POINTERS)
    buf = w.buf
    i = first
    for r in sorted(clouds):
        x = rx(r)
        for n in sorted(clouds[r]):
            _DOT(buf, i, x, n)
            i += 8 * _DOT_W
    if state.is_delta:
        w.buf[doc + DOCUMENT_DELTA_BIT // 8] |= 1 << DOCUMENT_DELTA_BIT % 8
    buf = w.buf
    reps = len(buf)
    buf += bytes(8 * len(w.ids))
    _PTR(buf, dp + 8 * DOCUMENT_REPLICAS_PTR, (reps - dp - 8 * DOCUMENT_REPLICAS_PTR - 8) >> 1
         | 1, 6 | len(w.ids) << 3)
    for i, r in enumerate(w.ids):
        w.text(reps + 8 * i, r)
    if limit is not None and len(w.buf) > limit:
        raise FastPathError("fast writer: larger than pycapnp's first segment")
    return bytes(w.buf)


# Offsets in a one-entry template (from its list's tag word): the item's replica index and
# counter (packed together: the bytes between them are zero), the LWW hlc, the counter's
# increments and decrements, the value's fields.
_T_ITEM: Final = 8
_T_PAYLOAD: Final = _T_ITEM + 8 * _ITEM_W
_T_VALUE: Final = _T_PAYLOAD + 8 * _PAYLOAD_W
_T_ITEM_RC: Final = _T_ITEM + min(ITEM_REPLICA, ITEM_COUNTER)
_T_LWW_HLC: Final = _T_PAYLOAD + PAYLOAD_LWW_HLC
_T_INCREMENTS: Final = _T_PAYLOAD + PAYLOAD_COUNTER_INCREMENTS
_T_DECREMENTS: Final = _T_PAYLOAD + PAYLOAD_COUNTER_DECREMENTS
_ITEM_RC: Final = struct.Struct(f"<I{ITEM_COUNTER - ITEM_REPLICA - 4}xQ").pack_into
if ITEM_COUNTER < ITEM_REPLICA + 4:  # the combined format above assumes this order
    raise AssertionError("Item layout changed: update _ITEM_RC")


def _one_entry_templates() -> tuple[
    dict[tuple[int, type | None], tuple[bytes, Any, int]], list[tuple[int, Any, bytes]]
]:
    """For a one-entry store of each kind (and LWW value type) written by template: its
    bytes (list tag, item, payload, value: allocated back to back), the packer of its value
    and the value field's offset, or None and the offset of its text pointer (0: none); and
    the samples the general path wrote, to check the templates against (at import)."""
    out: dict[tuple[int, type | None], tuple[bytes, Any, int]] = {}
    checks: list[tuple[int, Any, bytes]] = []
    text_at = _T_VALUE + 8 * VALUE_DATA_WORDS + 8 * VALUE_TEXT_PTR
    specs: list[tuple[int, type | None, Any, Any, int]] = [
        (_K_LWW, int, -(2**62) + 12345, _I64, _T_VALUE + VALUE_INT),
        (_K_LWW, float, -1.5e300, _F64, _T_VALUE + VALUE_FLOAT),
        (_K_LWW, type(None), None, None, 0),
        (_K_LWW, str, "", None, text_at),
        (_K_COUNTER, None, None, None, 0),
    ]
    for kind, vtype, sample, pack, at in specs:
        if kind == _K_LWW:
            entry: Any = LWWStore(("r", 7, 2**40 + 3, sample))
            size = _T_VALUE + 8 * _VALUE_W
        else:
            entry = CounterStore(("r", 7, 2**40 + 3, 2**33 + 5))
            size = _T_PAYLOAD + 8 * _PAYLOAD_W
        general = _write_entry(kind, entry)
        out[(kind, vtype)] = (general[8 * (1 + _ENTRY_W):][:size], pack, at)
        checks.append((kind, entry, general))
    return out, checks


def _write_entry(kind: int, entry: Any) -> bytes:
    w = _Writer(frozenset({kind}))
    w.store(w.struct(0, ENTRY_DATA_WORDS, ENTRY_POINTERS), kind, entry)
    return bytes(w.buf)


_ONE: Final[dict[tuple[int, type | None], tuple[bytes, Any, int]]] = {}
_templates, _checks = _one_entry_templates()  # built by the general path (_ONE empty)
_ONE.update(_templates)
for _kind, _entry, _general in _checks:  # the template path writes what the general path did
    if _write_entry(_kind, _entry) != _general:
        raise AssertionError(f"one-entry template of kind {_kind} differs")
del _templates, _checks
