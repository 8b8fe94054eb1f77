"""A fast pure-Python reader of CRDT ``Document`` structs from unpacked Cap'n Proto words.

pycapnp costs ~0.2-1 us per field access and a 100-op batch reads ~1,500 fields; this reader
reads the same fields with ``struct.unpack_from`` at offsets generated from the schemas
(``_layouts``, written by ``gen_layouts``) and builds the same CRDT objects, with the same
validation, as ``_document.decode_document``.

Invariants:

- safe on any bytes: every pointer is bounds-checked against its segment, every struct and
  list read is charged to a traversal budget (``TRAVERSAL_FACTOR`` times the segment's words,
  as capnp's traversal limit does; texts and data by their words, before they are decoded;
  a map key is not, being at most 257 bytes), maps nest at most
  ``MAX_NESTING_DEPTH`` (checked before recursing); only one segment is read (a far
  pointer, a capability pointer, a second segment is refused). Every failure is a
  ``CodecError`` subclass, never IndexError, struct.error, UnicodeDecodeError or
  RecursionError;
- it never guesses: what it does not handle (an unknown union member or kind kept opaque, a
  list encoding other than the one writers use, text with an inner NUL) raises
  ``FastPathError``, and so does every validation failure: the caller (``WireCodec``) then
  decodes with pycapnp, which gives the answer and its message. So the fast path may refuse
  more than pycapnp, never accept more; when it accepts, its result equals pycapnp's
  (``tests/unit/test_fast_codec.py``, ``tests/fuzz``: the differential check);
- pointers point forward only: a pointer's offset is read unsigned, so a negative one reads
  as past the segment's end and is refused (pycapnp's copies, which the hot path reads, never
  hold one; a message that does is decoded by pycapnp);
- the commonest shapes are read in fewer, wider reads, each checked word for word against
  the layout pycapnp's copy writes (an int register: ``_REGISTER``; a path's last map:
  ``_PATH``, else ``_Reader.one``; a one-entry counter: ``_COUNTER``; a set element's one
  dot: ``_ONE_DOT``); any other layout of the same content takes the general path, which
  makes the same checks one struct at a time. Lists are read with ``iter_unpack`` (one C
  call per list), dots as columns of words (``dot_rows``), and a context is built with
  ``CausalContext.from_parts``;
- wide lists of one shape (a map's entries under short keys, each an int register, a path
  ending in one, or a one-entry counter; a set's short texts with one dot each) are read
  as columns (``_Reader.columns``, ``element_columns``): the structural words of the list
  and of what it points to (every pointer at the exact offset pycapnp's copy gives it, so
  nothing is shared or read twice) are compared with their only allowed values (in one
  masked big-int compare, or column by column for lists of ``_COLUMNS_AT`` bytes and more:
  ``_fits``), the fields that vary are read as columns of words (memoryview casts:
  little-endian hosts only), checked by C-level passes (extremes, counts, sortedness), and
  the stores built by ``map``/``zip``. Anything else (another layout, a value out of
  range, a repeated key) returns None there and the loops read the list, and decide;
  the traversal charges are the loops' to the word;
- ``unpack`` turns a packed stream into its words (pure Python; the hot path gets its words
  from pycapnp's checked copy instead, see ``WireCodec``, because unpacking in Python costs
  more than everything else here).

Pure: bytes in, objects out.
"""

from __future__ import annotations

import operator
import struct
import sys
from array import array
from itertools import repeat
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
from broker.crdt._atoms import INT64_MAX, MAX_KEY_BYTES, MAX_VALUE_BYTES
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


def _row(size: int, *fields: tuple[int, str]) -> struct.Struct:
    """A ``struct.Struct`` of the fields at (byte offset, code) padded to ``size`` bytes: one
    list element, read with ``iter_unpack`` over the whole list (one C call per list)."""
    fmt, at = "<", 0
    for off, code in fields:
        if off < at:
            raise AssertionError(f"layout fields out of order at byte {off}")
        fmt += "x" * (off - at) + code
        at = off + struct.calcsize("<" + code)
    if at > size:
        raise AssertionError("layout fields past the struct's end")
    return struct.Struct(fmt + "x" * (size - at))


# Pointers are read with both halves unsigned: a negative offset (the sign bit of the low
# half) then reads as over 2**29 words ahead, past the end of any segment, and is refused by
# the same upper-bound check as any other out-of-bounds pointer (pycapnp's copies, which the
# hot path reads, only point forward). So no lower-bound checks are needed below.
_UU: Final = struct.Struct("<II").unpack_from
_U16: Final = struct.Struct("<H").unpack_from
_F64: Final = struct.Struct("<d").unpack_from
_WORD: Final = struct.Struct("<Q").pack  # a word's bytes

_ITEM_BYTES: Final = 8 * (ITEM_DATA_WORDS + ITEM_POINTERS)
_ITEM_SHAPE: Final = _shape(ITEM_DATA_WORDS, ITEM_POINTERS)
_ITEM_PAYLOAD: Final = 8 * ITEM_DATA_WORDS + 8 * ITEM_PAYLOAD_PTR  # pointer's byte offset
_ITEM_STRUCT: Final = _row(
    _ITEM_BYTES, (ITEM_REPLICA, "I"), (ITEM_COUNTER, "Q"), (_ITEM_PAYLOAD, "II")
)
_ITEM: Final = _ITEM_STRUCT.unpack_from
_ITEM_ROWS: Final = _ITEM_STRUCT.iter_unpack
_PAYLOAD_BYTES: Final = 8 * (PAYLOAD_DATA_WORDS + PAYLOAD_POINTERS)
_PAYLOAD_SHAPE: Final = _shape(PAYLOAD_DATA_WORDS, PAYLOAD_POINTERS)
_LWW_VALUE: Final = 8 * PAYLOAD_DATA_WORDS + 8 * PAYLOAD_LWW_VALUE_PTR
_MV_VALUE: Final = 8 * PAYLOAD_DATA_WORDS + 8 * PAYLOAD_MV_PTR
_PAYLOAD_LWW: Final = _layout(
    (PAYLOAD_LWW_HLC, "Q"), (PAYLOAD_WHICH, "H"), (_LWW_VALUE, "II")
)
_PAYLOAD_MV: Final = _layout((PAYLOAD_WHICH, "H"), (_MV_VALUE, "II"))
_PAYLOAD_COUNTER: Final = _layout(
    (PAYLOAD_COUNTER_INCREMENTS, "Q"), (PAYLOAD_WHICH, "H"),
    (PAYLOAD_COUNTER_DECREMENTS, "Q"),
)
_VALUE_BYTES: Final = 8 * (VALUE_DATA_WORDS + VALUE_POINTERS)
_VALUE_SHAPE: Final = _shape(VALUE_DATA_WORDS, VALUE_POINTERS)
_VALUE_TEXT: Final = 8 * VALUE_DATA_WORDS + 8 * VALUE_TEXT_PTR
_VALUE_DATA: Final = 8 * VALUE_DATA_WORDS + 8 * VALUE_DATA_PTR
_VALUE: Final = _layout((VALUE_WHICH, "H"), (VALUE_INT, "q"))
_VALUE_AND_TEXT: Final = _layout((VALUE_WHICH, "H"), (VALUE_INT, "q"), (_VALUE_TEXT, "II"))
_DOT_BYTES: Final = 8 * (DOT_DATA_WORDS + DOT_POINTERS)
_DOT_SHAPE: Final = _shape(DOT_DATA_WORDS, DOT_POINTERS)
_DOT_STRUCT: Final = _row(_DOT_BYTES, (DOT_REPLICA, "I"), (DOT_COUNTER, "Q"))
_DOT_ROWS: Final = _DOT_STRUCT.iter_unpack
# A dot list read as columns of 64-bit words (``dot_rows``): the replica in the low half of
# one word, the counter the whole of another.
_DOT_WORDS: Final = _DOT_BYTES // 8
_DOT_R_WORD: Final = DOT_REPLICA // 8
_DOT_N_WORD: Final = DOT_COUNTER // 8
_DOT_R_MASK: Final = 0xFFFFFFFF
if DOT_REPLICA % 8 or DOT_COUNTER % 8 or _DOT_R_WORD == _DOT_N_WORD:
    raise AssertionError("Dot layout changed: dot_rows reads whole words")
_NATIVE_COLUMNS: Final = sys.byteorder == "little"  # memoryview casts are native-endian
# A list of exactly one Dot: its tag word and the dot, in one read (a set element's dots).
_ONE_DOT: Final = _layout((0, "II"), (8 + DOT_REPLICA, "I"), (8 + DOT_COUNTER, "Q"))
_ONE_DOT_TAG: Final = 1 << 2  # a struct-list tag of one element
_ONE_DOT_HI: Final = (_DOT_BYTES // 8) << 3 | 7  # a composite list pointer of one Dot's words
_ENTRY_BYTES: Final = 8 * (ENTRY_DATA_WORDS + ENTRY_POINTERS)
_ENTRY_SHAPE: Final = _shape(ENTRY_DATA_WORDS, ENTRY_POINTERS)
_ENTRY_KEY: Final = 8 * ENTRY_DATA_WORDS + 8 * ENTRY_KEY_PTR
_ENTRY_LIST: Final = 8 * ENTRY_DATA_WORDS + 8 * ENTRY_ITEMS_PTR
_ENTRY_STRUCT: Final = _row(
    _ENTRY_BYTES, (ENTRY_KIND, "H"), (ENTRY_WHOLE_BIT // 8, "B"), (ENTRY_WHICH, "H"),
    *sorted([(_ENTRY_KEY, "II"), (_ENTRY_LIST, "II")]),
)
if _ENTRY_KEY > _ENTRY_LIST:
    raise AssertionError("Entry layout changed: the key pointer must come first")
_ENTRY: Final = _ENTRY_STRUCT.unpack_from
_KEY_AT: Final = _ENTRY_KEY + 8  # + 8 * offset: the key's first byte, from the entry's
_LIST_AT: Final = _ENTRY_LIST + 8  # + 8 * offset: the list's tag, from the entry's first byte
# A list of exactly one Entry: its pointer's upper half, its tag, and both in one read.
_ONE_ENTRY_HI: Final = (_ENTRY_BYTES // 8) << 3 | 7
_ONE_ENTRY_TAG: Final = _ENTRY_SHAPE << 32 | 1 << 2
_ONE_ENTRY: Final = _layout(
    (0, "Q"), (8 + ENTRY_KIND, "H"), (8 + ENTRY_WHOLE_BIT // 8, "B"), (8 + ENTRY_WHICH, "H"),
    *sorted([(8 + _ENTRY_KEY, "II"), (8 + _ENTRY_LIST, "II")]),
)
_ONE_ENTRY_WORDS: Final = 1 + _ENTRY_BYTES // 8  # what ``entries`` charges for such a list
_ENTRY_ROWS: Final = _ENTRY_STRUCT.iter_unpack
_WHOLE_MASK: Final = 1 << ENTRY_WHOLE_BIT % 8
# A register of one entry holding an Int64, as pycapnp's copy lays it out: the item list's
# tag, the item, its payload, the payload's value, each right after the other (every pointer
# offset 0). Read in one ``unpack_from``, its structural words compared at once; any other
# layout takes the general path (``items``), which reads the same fields one struct at a time.
_REG_PAYLOAD: Final = 8 + _ITEM_BYTES
_REG_VALUE: Final = _REG_PAYLOAD + _PAYLOAD_BYTES
_REGISTER_BYTES: Final = _REG_VALUE + _VALUE_BYTES
_REGISTER: Final = _layout(
    (0, "Q"), (8 + ITEM_REPLICA, "I"), (8 + ITEM_COUNTER, "Q"), (8 + _ITEM_PAYLOAD, "Q"),
    (_REG_PAYLOAD + PAYLOAD_LWW_HLC, "Q"), (_REG_PAYLOAD + PAYLOAD_WHICH, "H"),
    (_REG_PAYLOAD + _LWW_VALUE, "Q"), (_REG_VALUE + VALUE_WHICH, "H"),
    (_REG_VALUE + VALUE_INT, "q"),
)
_INT_REGISTER: Final = (
    _ITEM_SHAPE << 32 | 1 << 2,  # the tag: one item
    _PAYLOAD_SHAPE << 32,  # the item's payload pointer: offset 0 (right after the item)
    PAYLOAD_IS_LWW,
    _VALUE_SHAPE << 32,  # the payload's value pointer: offset 0
    VALUE_IS_INT,
)
_ONE_ITEM_HI: Final = (_ITEM_BYTES // 8) << 3 | 7  # a composite list pointer of one item's words
_REGISTER_WORDS: Final = 1 + (_ITEM_BYTES + _PAYLOAD_BYTES + _VALUE_BYTES) // 8  # as ``items``
_PATH_WORDS: Final = _ONE_ENTRY_WORDS + _REGISTER_WORDS  # a one-entry list holding a register
# A map of one entry holding an int register under a key of at most 7 bytes (a path's last
# step, ``a/b = 1``), as pycapnp's copy lays it out: the entry list's tag, the entry, its
# key's one word, then the register (``_REGISTER``). Read in one ``unpack_from`` in
# ``entries``, its structural words compared at once (``_PATH_SHAPE``); any other layout
# goes to ``one`` and ``entries``, which make the same checks in more reads.
_PATH_KEY: Final = 8 + _ENTRY_BYTES  # the key's byte offset from the tag
_PATH_REG: Final = _PATH_KEY + 8
_PATH_BYTES: Final = _PATH_REG + _REGISTER_BYTES
_PATH: Final = _layout(
    (0, "Q"), (8 + ENTRY_KIND, "H"), (8 + ENTRY_WHOLE_BIT // 8, "B"), (8 + ENTRY_WHICH, "H"),
    (8 + _ENTRY_KEY, "II"), (8 + _ENTRY_LIST, "Q"),
    (_PATH_REG, "Q"), (_PATH_REG + 8 + ITEM_REPLICA, "I"), (_PATH_REG + 8 + ITEM_COUNTER, "Q"),
    (_PATH_REG + 8 + _ITEM_PAYLOAD, "Q"), (_PATH_REG + _REG_PAYLOAD + PAYLOAD_LWW_HLC, "Q"),
    (_PATH_REG + _REG_PAYLOAD + PAYLOAD_WHICH, "H"), (_PATH_REG + _REG_PAYLOAD + _LWW_VALUE, "Q"),
    (_PATH_REG + _REG_VALUE + VALUE_WHICH, "H"), (_PATH_REG + _REG_VALUE + VALUE_INT, "q"),
)
_PATH_SHAPE: Final = (
    _ONE_ENTRY_TAG,
    int(Kind.LWW),
    0,  # the Whole marker's byte: no marker (and no stray bit: else the general path)
    ENTRY_IS_ITEMS,
    # the key pointer's lower half: offset 1 (after the list pointer)
    1 << 2 | 1,
    # the list pointer: offset 1 (after the key's word), one item
    _ONE_ITEM_HI << 32 | 1 << 2 | 1,
    *_INT_REGISTER,
)
_PATH_KEY_HI: Final = frozenset(n << 3 | 2 for n in range(2, 9))  # a 1-7 byte key's text
# A counter of one entry as pycapnp's copy lays it out: the item list's tag, the item, its
# payload right after it. Read in one ``unpack_from`` in ``entries`` (else ``items``).
_COUNTER_BYTES: Final = 8 + _ITEM_BYTES + _PAYLOAD_BYTES
_COUNTER: Final = _layout(
    (0, "Q"), (8 + ITEM_REPLICA, "I"), (8 + ITEM_COUNTER, "Q"), (8 + _ITEM_PAYLOAD, "Q"),
    (_REG_PAYLOAD + PAYLOAD_COUNTER_INCREMENTS, "Q"), (_REG_PAYLOAD + PAYLOAD_WHICH, "H"),
    (_REG_PAYLOAD + PAYLOAD_COUNTER_DECREMENTS, "Q"),
)
_COUNTER_SHAPE: Final = (_INT_REGISTER[0], _INT_REGISTER[1], PAYLOAD_IS_COUNTER)
_SET_ELEMENT_BYTES: Final = 8 * (SET_ELEMENT_DATA_WORDS + SET_ELEMENT_POINTERS)
_SET_ELEMENT_SHAPE: Final = _shape(SET_ELEMENT_DATA_WORDS, SET_ELEMENT_POINTERS)
_SET_ELEMENT_VALUE: Final = 8 * SET_ELEMENT_DATA_WORDS + 8 * SET_ELEMENT_VALUE_PTR
_SET_ELEMENT_DOTS: Final = 8 * SET_ELEMENT_DATA_WORDS + 8 * SET_ELEMENT_DOTS_PTR
if _SET_ELEMENT_VALUE > _SET_ELEMENT_DOTS:
    raise AssertionError("SetElement layout changed: the value pointer must come first")
_SET_ELEMENT_ROWS: Final = _row(
    _SET_ELEMENT_BYTES, (_SET_ELEMENT_VALUE, "II"), (_SET_ELEMENT_DOTS, "II")
).iter_unpack
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
_WORD_KEY_CACHE: Final = 1 << 16
_WORD_KEYS: dict[int, str] = {}
"""Map keys of at most 7 bytes already checked, by their text's word (as an int), bounded
(``_WORD_KEY_CACHE``: a few MB at most; a subject whose writes cycle through more short
keys than ``_KEY_CACHE``, such as 10,000 fields or worknodes, missed a smaller cache on
every key); only valid keys enter it, each with the upper half of its text pointer
(``_KEY_HI``, by the key: its UTF-8 size): a word is its key only with that length
(``columns``; a word has one valid length, up to its first NUL)."""
_KEY_HI: dict[str, int] = {}


_MASKS_CACHED: Final = 16  # list sizes whose masks are kept, per shape
_MASKS_CACHED_UP_TO: Final = 256  # entries: bigger lists' masks are built for each list
if _NATIVE_COLUMNS and array("I").itemsize != 4:  # pragma: no cover
    raise AssertionError("columns need 32-bit array items")


class _Columns:
    """A list of map entries of one shape, read as columns (``_Reader.columns``): every
    entry a key of at most 7 bytes (one word) and the same kind of store, laid out as
    pycapnp's copy lays it out: the entries, then each entry's key word and store (``body``
    bytes), entry after entry, ``words`` words each.

    ``mask``/``pattern``: one entry's words, with the bytes of the fields that vary cleared
    in ``mask``, and the only value each other byte may have (tags, pointers,
    discriminants, and the unused bytes beside them, zero as a writer leaves them) in
    ``pattern``; a byte out of pattern leaves the list to the loop in ``entries``. The fields
    that vary are read as columns: ``cols`` (replica, counter, and two more: hlc and value,
    or increments and decrements), at word indexes in an entry's words; ``key``: an inner
    key's word (a path's), its text pointer's upper half at 32-bit index ``key_hi``."""

    __slots__ = ("cache", "checked", "cols", "data", "hi", "key", "key_hi", "mask", "one",
                 "pattern", "signed", "words")

    def __init__(
        self, kind: int, which: int, hi: int, body: int,
        fixed: list[tuple[int, str, int]], free: list[tuple[int, int]],
        cols: tuple[int, int, int, int], signed: bool, key: int = -1, key_hi: int = -1,
    ) -> None:
        # Offsets (``fixed``, ``free``, ``cols``, ``key``, ``key_hi``) are bytes from the
        # store's first byte, which follows the entry's key word.
        self.words = 1 + body // 8
        self.data = struct.unpack(
            "<Q", _row(8, (ENTRY_KIND, "H"), (ENTRY_WHICH, "H")).pack(kind, which)
        )[0]  # the entry's data word (no Whole marker, nothing else set)
        self.hi = hi
        size = 8 * self.words
        pattern = bytearray(size)
        mask = bytearray(b"\xff" * size)
        mask[0:8] = bytes(8)  # the key's word
        for off, code, value in fixed:
            struct.pack_into("<" + code, pattern, 8 + off, value)
        for off, n in free:
            mask[8 + off : 8 + off + n] = bytes(n)
        if any(p & ~k & 0xFF for p, k in zip(pattern, mask, strict=True)):
            raise AssertionError("a fixed field overlaps a varying one")
        for off in (*cols, key):
            # A column is a whole word: its varying bytes, and fixed zeros (which read as
            # themselves) beside them.
            if off != -1 and (off % 8 or any(pattern[8 + off : 16 + off])):
                raise AssertionError("a column is not a whole word")
        self.mask, self.pattern = bytes(mask), bytes(pattern)
        # One entry's run, as ints: a list whose first run is not of the shape is left to
        # the loop before its masks are built.
        self.one = int.from_bytes(mask, "little"), int.from_bytes(pattern, "little")
        self.cols = tuple(1 + c // 8 for c in cols)
        self.signed = signed  # the last column is an Int64
        self.key = -1 if key == -1 else 1 + key // 8
        self.key_hi = -1 if key_hi == -1 else 2 + key_hi // 4
        self.cache: dict[int, tuple[int, int]] = {}
        self.checked: dict[int, _Checks] = {}

    def first(self, m: bytes, end: int) -> bool:
        """Whether the first run of a list (at byte ``end``) is of the shape."""
        mask, pattern = self.one
        return int.from_bytes(memoryview(m)[end : end + 8 * self.words], "little") & mask == (
            pattern
        )

    def layout(self, count: int) -> list[tuple[int, str, int, int, int]]:
        """The fixed fields of each entry of a list of ``count`` (see ``_list_layout``)."""
        return [
            (0, "Q", self.data, -1, 0),
            (_ENTRY_KEY, "I", 1, _ENTRY_KEY, 0),
            (_ENTRY_LIST, "I", 1, _ENTRY_LIST, 8),
            (_ENTRY_LIST + 4, "I", self.hi, -1, 0),
        ]

    def checks(self, count: int) -> _Checks:
        """``masks`` as column compares (``_list_checks``; cached as ``masks`` are)."""
        got = self.checked.get(count)
        if got is None:
            if len(self.checked) >= _MASKS_CACHED:
                self.checked.clear()
            got = _list_checks(
                count, _ENTRY_BYTES, self.words, self.layout(count), self.mask, self.pattern
            )
            if count <= _MASKS_CACHED_UP_TO:
                self.checked[count] = got
        return got

    def masks(self, count: int) -> tuple[int, int]:
        """(mask, pattern) of the words of a list of ``count`` such entries and of their
        keys and stores after it, as little-endian ints (cached): each entry's data word and
        pointers (their offsets included: entry i's key pointer points to the i-th run of
        ``words`` words after the list, its list pointer to the word after that key; only
        the key's size varies) and the structural bytes of each run."""
        got = self.cache.get(count)
        if got is None:
            if len(self.cache) >= _MASKS_CACHED:
                self.cache.clear()
            got = _list_layout(
                count, _ENTRY_BYTES, self.words, self.layout(count), self.mask, self.pattern
            )
            if count <= _MASKS_CACHED_UP_TO:  # (a few KiB each; bounded memory)
                self.cache[count] = got
        return got


def _list_layout(
    count: int, stride: int, words: int, fields: list[tuple[int, str, int, int, int]],
    mask: bytes, pattern: bytes,
) -> tuple[int, int]:
    """(mask, pattern) as ints of a list of ``count`` structs of ``stride`` bytes followed by
    one run of ``words`` words (``mask``/``pattern``) for each. ``fields``: each struct's
    fixed 32- or 64-bit fields (byte offset, code, value, and when it is a pointer to the
    struct's run, the pointer's byte offset and its target's byte offset in the run: the
    value is then the pointer's tag bits, its offset added); every other byte of the
    structs varies. Built with C-level array slice assignments (no Python per struct)."""
    per = stride // 4
    head = array("I", bytes(stride * count))
    hmask = array("I", bytes(stride * count))
    ones = array("I", [0xFFFFFFFF]) * count
    end = stride * count
    for off, code, value, ptr, target in fields:
        i = off // 4
        if ptr != -1:  # offset of struct j's pointer: first + step * j
            first = value | (end + target - (ptr + 8)) // 8 << 2
            step = (8 * words - stride) // 8 << 2
            head[i::per] = array("I", range(first, first + step * count, step))
            hmask[i::per] = ones
        else:
            for k in range(struct.calcsize("<" + code) // 4):
                head[i + k :: per] = array("I", [value >> 32 * k & 0xFFFFFFFF]) * count
                hmask[i + k :: per] = ones
    return (
        int.from_bytes(hmask.tobytes() + mask * count, "little"),
        int.from_bytes(head.tobytes() + pattern * count, "little"),
    )


_Checks = tuple[tuple[bool, int, int, int, "array[int]"], ...]
"""Column compares (``_list_checks``): (64-bit, start, stop, step, the column's values)."""


def _list_checks(
    count: int, stride: int, words: int, fields: list[tuple[int, str, int, int, int]],
    mask: bytes, pattern: bytes,
) -> _Checks:
    """What ``_list_layout`` compares at once, as compares of columns (``_fits``): every
    fixed 32-bit half of the structs and of their runs, as a column of its ``count``
    values (two halves of a word both fixed: one column of words). A column compare costs
    about as much as a big int's few words: wide lists cost less so (see ``_COLUMNS_AT``).
    Every byte of ``mask``'s 32-bit halves is fixed, or none is (checked)."""
    halves: dict[int, tuple[int, int]] = {}  # 32-bit index in the struct -> first, step
    end = stride * count
    for off, code, value, ptr, target in fields:
        i = off // 4
        if ptr != -1:
            step = (8 * words - stride) // 8 << 2  # struct j's offset: first + step * j
            halves[i] = (value | (end + target - (ptr + 8)) // 8 << 2, step)
            if halves[i][0] + step * count > 0xFFFFFFFF:  # (never: the list is in bounds)
                raise OverflowError("pointer offsets past 32 bits")
        else:
            for k in range(struct.calcsize("<" + code) // 4):
                halves[i + k] = (value >> 32 * k & 0xFFFFFFFF, 0)
    checks: list[tuple[bool, int, int, int, array[int]]] = []
    for i in range(0, stride // 4, 2):
        lo, hi = halves.get(i), halves.get(i + 1)
        if lo is not None and hi is not None:  # (each column built C-level: no Python per entry)
            first, step = lo[0] | hi[0] << 32, lo[1] + (hi[1] << 32)
            checks.append((True, i // 2, end // 8, stride // 8, _column("Q", first, step, count)))
        elif lo is not None or hi is not None:
            j = i if lo is not None else i + 1
            checks.append((False, j, end // 4, stride // 4, _column("I", *halves[j], count)))
    for w in range(words):
        fixed = []
        for h in range(2):
            m = mask[8 * w + 4 * h : 8 * w + 4 * h + 4]
            if m not in (b"\xff" * 4, bytes(4)):
                raise AssertionError("a 32-bit half partly fixed")
            fixed.append(m == b"\xff" * 4)
        value = int.from_bytes(pattern[8 * w : 8 * w + 8], "little")
        if all(fixed):
            checks.append((True, end // 8 + w, 1 << 62, words, array("Q", [value]) * count))
        elif any(fixed):
            h = fixed.index(True)
            checks.append((
                False, end // 4 + 2 * w + h, 1 << 62, 2 * words,
                array("I", [value >> 32 * h & 0xFFFFFFFF]) * count,
            ))
    return tuple(checks)


def _column(code: str, first: int, step: int, count: int) -> array[int]:
    """The column ``first, first + step, ...`` of ``count`` values (C-level)."""
    if not step:
        return array(code, [first]) * count
    return array(code, range(first, first + step * count, step))


def _fits(whole: memoryview, checks: _Checks) -> bool:
    """Whether the words of ``whole`` pass the column compares ``checks``."""
    q, d = whole.cast("Q"), whole.cast("I")
    for wide, start, stop, step, want in checks:
        if (q if wide else d)[start:stop:step] != want:
            return False
    return True


def _register_fields(at: int) -> tuple[list[tuple[int, str, int]], list[tuple[int, int]]]:
    """The fixed and varying fields of an int register's words (``_REGISTER``) at ``at``."""
    fixed = [
        (at, "Q", _INT_REGISTER[0]), (at + 8 + _ITEM_PAYLOAD, "Q", _INT_REGISTER[1]),
        (at + _REG_PAYLOAD + PAYLOAD_WHICH, "H", _INT_REGISTER[2]),
        (at + _REG_PAYLOAD + _LWW_VALUE, "Q", _INT_REGISTER[3]),
        (at + _REG_VALUE + VALUE_WHICH, "H", _INT_REGISTER[4]),
    ]
    free = [
        (at + 8 + ITEM_REPLICA, 4), (at + 8 + ITEM_COUNTER, 8),
        (at + _REG_PAYLOAD + PAYLOAD_LWW_HLC, 8), (at + _REG_VALUE + VALUE_INT, 8),
    ]
    return fixed, free


def _register_cols(at: int) -> tuple[int, int, int, int]:
    return (at + 8 + ITEM_REPLICA, at + 8 + ITEM_COUNTER, at + _REG_PAYLOAD + PAYLOAD_LWW_HLC,
            at + _REG_VALUE + VALUE_INT)


_REGISTERS: Final = _Columns(
    _K_LWW, ENTRY_IS_ITEMS, _ONE_ITEM_HI, _REGISTER_BYTES, *_register_fields(0),
    _register_cols(0), True,
)
_PATHS: Final = _Columns(
    _K_MAP, ENTRY_IS_ENTRIES, _ONE_ENTRY_HI, _PATH_BYTES,
    [
        (0, "Q", _PATH_SHAPE[0]), (8 + ENTRY_KIND, "H", _PATH_SHAPE[1]),
        (8 + ENTRY_WHICH, "H", _PATH_SHAPE[3]), (8 + _ENTRY_KEY, "I", _PATH_SHAPE[4]),
        (8 + _ENTRY_LIST, "Q", _PATH_SHAPE[5]), *_register_fields(_PATH_REG)[0],
    ],
    [(8 + _ENTRY_KEY + 4, 4), (_PATH_KEY, 8), *_register_fields(_PATH_REG)[1]],
    _register_cols(_PATH_REG), True, _PATH_KEY, 8 + _ENTRY_KEY + 4,
)
_COUNTERS: Final = _Columns(
    _K_COUNTER, ENTRY_IS_ITEMS, _ONE_ITEM_HI, _COUNTER_BYTES,
    [
        (0, "Q", _COUNTER_SHAPE[0]), (8 + _ITEM_PAYLOAD, "Q", _COUNTER_SHAPE[1]),
        (_REG_PAYLOAD + PAYLOAD_WHICH, "H", _COUNTER_SHAPE[2]),
    ],
    [
        (8 + ITEM_REPLICA, 4), (8 + ITEM_COUNTER, 8),
        (_REG_PAYLOAD + PAYLOAD_COUNTER_INCREMENTS, 8),
        (_REG_PAYLOAD + PAYLOAD_COUNTER_DECREMENTS, 8),
    ],
    (8 + ITEM_REPLICA, 8 + ITEM_COUNTER, _REG_PAYLOAD + PAYLOAD_COUNTER_INCREMENTS,
     _REG_PAYLOAD + PAYLOAD_COUNTER_DECREMENTS), False,
)
_SHAPES: Final = {c.data: c for c in (_REGISTERS, _PATHS, _COUNTERS)}
_COLUMNS_AT = 2048  # bytes: a list's words compared column by column from this size (below it
# one big-int compare costs less)
_COLUMNS_MIN: Final = 8  # fewer entries: the loop costs less than the columns' set-up
_KEY_AT_WORD: Final = _ENTRY_KEY // 4  # the key pointer's lower half, in 32-bit units
_LIST_AT_WORD: Final = _ENTRY_LIST // 4
if _ENTRY_BYTES % 8 or _ENTRY_KEY % 8 or _ENTRY_LIST % 8:
    raise AssertionError("Entry layout changed: columns reads whole words")
# A set's elements read as columns (``_Reader.element_columns``): every element a text of at
# most 7 bytes with one dot, laid out as pycapnp's copy lays it out: the elements, then each
# element's value, its text's one word, its dot list (tag and dot), element after element.
_ELEMENT_TEXT: Final = _VALUE_BYTES  # the text's word, from the value's first byte
_ELEMENT_DOTS: Final = _ELEMENT_TEXT + 8  # the dot list's tag
_ELEMENT_WORDS: Final = (_ELEMENT_DOTS + 8 + _DOT_BYTES) // 8


def _element_layout() -> tuple[bytes, bytes]:
    size = 8 * _ELEMENT_WORDS
    pattern = bytearray(size)
    mask = bytearray(b"\xff" * size)
    struct.pack_into("<H", pattern, VALUE_WHICH, VALUE_IS_TEXT)
    struct.pack_into("<I", pattern, _VALUE_TEXT, 1)  # the text right after the value
    struct.pack_into("<Q", pattern, _ELEMENT_DOTS, _DOT_SHAPE << 32 | _ONE_DOT_TAG)
    for off, n in [
        (_VALUE_TEXT + 4, 4), (_ELEMENT_TEXT, 8), (_ELEMENT_DOTS + 8 + DOT_REPLICA, 4),
        (_ELEMENT_DOTS + 8 + DOT_COUNTER, 8),
    ]:
        mask[off : off + n] = bytes(n)
    if any(p & ~k & 0xFF for p, k in zip(pattern, mask, strict=True)) or any(
        pattern[_ELEMENT_DOTS + 8 + DOT_REPLICA : _ELEMENT_DOTS + 16 + DOT_REPLICA]
    ) or (_ELEMENT_DOTS + 8 + DOT_REPLICA) % 8 or (_ELEMENT_DOTS + 8 + DOT_COUNTER) % 8:
        raise AssertionError("SetElement layout changed: element_columns reads whole words")
    return bytes(mask), bytes(pattern)


_ELEMENT_MASK, _ELEMENT_PATTERN = _element_layout()
_ELEMENT_ONE: Final = (
    int.from_bytes(_ELEMENT_MASK, "little"), int.from_bytes(_ELEMENT_PATTERN, "little")
)
_ELEMENT_MASKS: dict[int, tuple[int, int]] = {}  # by element count, as ints (bounded)
_ELEMENT_CHECKS: dict[int, _Checks] = {}  # the same, as column compares (bounded)


def _element_fields() -> list[tuple[int, str, int, int, int]]:
    """The fixed fields of each element of a list read by ``element_columns``."""
    return [
        (_SET_ELEMENT_VALUE, "I", 0, _SET_ELEMENT_VALUE, 0),
        (_SET_ELEMENT_VALUE + 4, "I", _VALUE_SHAPE, -1, 0),
        (_SET_ELEMENT_DOTS, "I", 1, _SET_ELEMENT_DOTS, _ELEMENT_DOTS),
        (_SET_ELEMENT_DOTS + 4, "I", _ONE_DOT_HI, -1, 0),
    ]


_TEXT_HI: Final = [(n + 1) << 3 | 2 for n in range(8)]  # a text pointer's upper half, by size
_ELEMENT_R: Final = (_ELEMENT_DOTS + 8 + DOT_REPLICA) // 8
_ELEMENT_N: Final = (_ELEMENT_DOTS + 8 + DOT_COUNTER) // 8
_ELEMENT_HI: Final = (_VALUE_TEXT + 4) // 4
_ELEMENT_PTRS: Final = _SET_ELEMENT_BYTES // 4  # 32-bit halves per element
if _SET_ELEMENT_VALUE % 8 or _SET_ELEMENT_DOTS % 8 or _ELEMENT_TEXT % 8:
    raise AssertionError("SetElement layout changed: element_columns reads whole words")


def _column_keys(words: list[int], his: list[int]) -> list[str] | None:
    """The map keys of one-word texts (``words``, their pointers' upper halves ``his``), or
    None if one is not such a key (then the loop in ``entries`` reads it, and refuses it if
    it is invalid). A word is looked up with the length its key was checked with."""
    keys = list(map(_WORD_KEYS.get, words))
    if not all(keys):  # (a key is never empty: a None, not in the cache)
        for w, hi in zip(words, his, strict=True):
            if w not in _WORD_KEYS:
                if hi not in _PATH_KEY_HI:
                    return None
                key = _new_key(w.to_bytes(8, "little")[: hi >> 3])
                if len(_WORD_KEYS) >= _WORD_KEY_CACHE:
                    _WORD_KEYS.clear()
                    _KEY_HI.clear()
                _WORD_KEYS[w] = key
                _KEY_HI[key] = hi
        keys = list(map(_WORD_KEYS.get, words))
        if not all(keys):  # the cache was cleared meanwhile
            return None
    found: list[str] = keys  # type: ignore[assignment]  # (no None: see above)
    if list(map(_KEY_HI.get, found)) != his:  # (a str's hash is cached: cheaper by key)
        return None
    return found


def _replica_column(col: memoryview, count: int, replicas: list[str]) -> Any:
    """The replica ids of a column of ``count`` replica indexes (as words, each checked to
    be below 2**32 by the list's layout): an iterator, or None if one is out of the
    table. One compare when a single replica wrote them all, the commonest case."""
    r = col[0]
    if col == array("Q", [r]) * count:
        return repeat(replicas[r], count) if r < len(replicas) else None
    rs = col.tolist()
    return map(replicas.__getitem__, rs) if max(rs) < len(replicas) else None


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
    if end < start or end >= len(m) or m[end] != 0 or m.find(0, start, end) >= 0:
        raise _fail("text out of bounds, not NUL-terminated, or with an inner NUL")
    try:
        return m[start:end].decode("utf-8")
    except UnicodeDecodeError:
        raise _fail("text is not UTF-8") from None


def _new_key(raw: bytes) -> str:
    """The map key of ``raw`` (its UTF-8 bytes and NUL, not in the cache yet), checked as
    ``validate_key`` checks it, and cached. A str decoded strictly from UTF-8 has the UTF-8
    size checked here."""
    if not 1 < len(raw) <= MAX_KEY_BYTES + 1:
        raise _fail("map key empty or too long")
    if raw[-1] or raw.find(0, 0, -1) >= 0:
        raise _fail("map key not NUL-terminated, or with an inner NUL")
    key = raw[:-1].decode("utf-8")  # UnicodeDecodeError: see ``_guard``
    if len(_KEYS) >= _KEY_CACHE:
        _KEYS.clear()
    _KEYS[raw] = key
    return key


def _data(m: bytes, p: int) -> bytes:
    lo, hi = _UU(m, p)
    if lo & 3 != 1 or hi & 7 != 2:
        if lo == 0 and hi == 0:
            return b""
        raise _fail("not a byte list where data was expected")
    start = p + 8 + 8 * (lo >> 2)
    end = start + (hi >> 3)
    if end > len(m):
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
        lo, hi = _UU(self.m, p)
        if lo & 3 or hi != shape:
            raise _fail("not a struct pointer of the schema's size")
        a: int = p + 8 + 8 * (lo >> 2)
        if a + nbytes > self.size:
            raise _fail("struct pointer out of bounds")
        return a

    def structs(self, p: int, lo: int, hi: int, shape: int, stride: int) -> tuple[int, int]:
        """(first element, count) of the composite list of structs of exactly ``shape`` at
        the pointer at ``p`` (``lo``/``hi`` its halves); (0, 0) when null. Charges the
        list's words to the budget."""
        if lo & 3 != 1 or hi & 7 != 7:
            if lo == 0 and hi == 0:
                return 0, 0
            raise _fail("not a composite struct list")
        tag = p + 8 + 8 * (lo >> 2)
        words = hi >> 3
        if tag + 8 + 8 * words > self.size:
            raise _fail("struct list out of bounds")
        tlo, thi = _UU(self.m, tag)
        count = tlo >> 2
        if tlo & 3 or count * stride > 8 * words or (count and thi != shape):
            raise _fail("struct list tag not of the schema's size")
        self.budget -= words + 1
        if self.budget < 0:
            raise _fail("over the traversal limit")
        return tag + 8, count

    def value(self, a: int) -> Any:
        """The atom of the ``Value`` struct at byte ``a`` (validated as ``validate_atom``)."""
        m = self.m
        w, x = _VALUE(m, a)
        if w == VALUE_IS_INT:
            return x  # an Int64 read is always in range
        if w == VALUE_IS_TEXT:
            p = a + _VALUE_TEXT
            lo, hi = _UU(m, p)
            self.charge(hi >> 6)  # its words, before decoding (shared pointers amplify)
            x = _text(m, p, lo, hi)
        elif w == VALUE_IS_NULL:
            return None
        elif w == VALUE_IS_FLOAT:
            x = _F64(m, a + VALUE_FLOAT)[0]
        elif w == VALUE_IS_BOOL:
            b = VALUE_BOOL_BIT
            return bool(m[a + b // 8] >> b % 8 & 1)
        elif w == VALUE_IS_DATA:
            self.charge(_UU(m, a + _VALUE_DATA)[1] >> 6)
            x = _data(m, a + _VALUE_DATA)
        else:
            raise _fail("a value of a newer type (kept opaque by pycapnp)")
        return validate_atom(x)

    def element(self, a: int) -> Any:
        """The set element of the ``Value`` struct at byte ``a`` (as ``validate_element``)."""
        m = self.m
        w, x = _VALUE(m, a)
        if w == VALUE_IS_TEXT:
            p = a + _VALUE_TEXT
            lo, hi = _UU(m, p)
            self.charge(hi >> 6)  # its words, before decoding (shared pointers amplify)
            if lo & 3 == 1 and hi & 7 == 2:
                # ``_text`` inlined (set elements are mostly text); a str's UTF-8 size is the
                # byte count checked here, so ``validate_element`` would pass it unchanged.
                s = p + 8 + 8 * (lo >> 2)
                e = s + (hi >> 3) - 1
                if not s <= e < len(m) or m[e] or e - s > MAX_VALUE_BYTES:
                    raise _fail("text out of bounds, not NUL-terminated or too long")
                raw = m[s:e]
                if 0 in raw:
                    raise _fail("text with an inner NUL")
                return raw.decode("utf-8")  # UnicodeDecodeError: see ``_guard``
            x = _text(m, p, lo, hi)
        elif w == VALUE_IS_DATA:
            self.charge(_UU(m, a + _VALUE_DATA)[1] >> 6)
            x = _data(m, a + _VALUE_DATA)
        elif w != VALUE_IS_INT:
            raise _fail("set element of another type")
        return validate_element(x)

    def dot_rows(
        self, p: int, lo: int, hi: int
    ) -> tuple[int | list[int], list[int], set[int] | None]:
        """The replica indexes and counters of the sorted, unique list of dots (Dot
        structs) at the pointer at ``p``: (the one replica index of every dot, as an int,
        the counters, and their set when more than one) when one replica made them all, the
        commonest case (a context's dots), else (each dot's replica index, the counters,
        None). Read as columns of words (one C call each, no tuple per dot) and checked with
        C-level passes."""
        start, count = self.structs(p, lo, hi, _DOT_SHAPE, _DOT_BYTES)
        if not count:
            return [], [], None
        if _NATIVE_COLUMNS:
            q = memoryview(self.m)[start : start + _DOT_BYTES * count].cast("Q")
            ns: list[int] = q[_DOT_N_WORD::_DOT_WORDS].tolist()
            rq = q[_DOT_R_WORD::_DOT_WORDS]
            w0 = rq[0]
            one = rq == array("Q", [w0]) * count  # one compare, no list, when one replica
            rw: list[int] = [] if one else rq.tolist()
        else:  # pragma: no cover - big-endian hosts
            rows = list(_DOT_ROWS(self.m[start : start + _DOT_BYTES * count]))
            ns = [n for _, n in rows]
            rw = [r for r, _ in rows]
            w0 = rw[0]
            one = rw.count(w0) == count
        nrep = len(self.replicas)
        if one:
            # One replica: sorted and unique = the counters rise (sorted, no repeat).
            r = w0 & _DOT_R_MASK
            if r >= nrep or ns[0] < 1 or ns[-1] > INT64_MAX:
                raise _fail("bad dot")
            if count == 1:
                return r, ns, None
            # Sorted, and as many distinct counters as dots: they rise.
            unique = set(ns)
            if len(unique) != count or sorted(ns) != ns:
                raise _fail("dots are not sorted and unique")
            return r, ns, unique
        rs = [w & _DOT_R_MASK for w in rw]
        if min(ns) < 1 or max(ns) > INT64_MAX or max(rs) >= nrep:
            raise _fail("bad dot")
        pairs = list(zip(map(self.replicas.__getitem__, rs), ns, strict=True))
        if not all(map(_lt, pairs, pairs[1:])):
            raise _fail("dots are not sorted and unique")
        return rs, ns, None

    def dots(self, p: int, lo: int, hi: int) -> list[tuple[str, int]]:
        """The sorted, unique list of dots at the pointer at ``p``, as (replica, counter)."""
        rs, ns, _ = self.dot_rows(p, lo, hi)
        if isinstance(rs, int):
            rid = self.replicas[rs]
            return [(rid, n) for n in ns]
        return list(zip(map(self.replicas.__getitem__, rs), ns, strict=True))

    def items(self, kind: int, p: int, lo: int, hi: int) -> Any:
        """The dot-function store of ``kind`` in the item list at the pointer at ``p``."""
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
        # The item list (``structs``, inlined: the hot path).
        if lo & 3 != 1 or hi & 7 != 7:
            if lo == 0 and hi == 0:
                return None
            raise _fail("not a composite struct list")
        tag = p + 8 + 8 * (lo >> 2)
        words = hi >> 3
        if tag + 8 + 8 * words > size:
            raise _fail("struct list out of bounds")
        tlo, thi = _UU(m, tag)
        count = tlo >> 2
        if tlo & 3 or count * _ITEM_BYTES > 8 * words or (count and thi != _ITEM_SHAPE):
            raise _fail("struct list tag not of the schema's size")
        if not count:
            return None
        # Each item points to a payload, which may point to a value: at most these words.
        self.budget -= words + 1 + count * (_PAYLOAD_BYTES + _VALUE_BYTES) // 8
        if self.budget < 0:
            raise _fail("over the traversal limit")
        replicas = self.replicas
        nrep = len(replicas)
        a = tag + 8
        if count == 1 and kind == _K_LWW:
            # One register entry, the commonest store: read straight through (the loop
            # below does the same reads and checks).
            r, n, plo, phi = _ITEM(m, a)
            if not 1 <= n <= INT64_MAX or r >= nrep:
                raise _fail("bad item dot")
            if plo & 3 or phi != _PAYLOAD_SHAPE:
                raise _fail("payload pointer not of the schema's size")
            pa = a + _ITEM_PAYLOAD + 8 + 8 * (plo >> 2)
            if pa + _PAYLOAD_BYTES > size:
                raise _fail("payload out of bounds")
            hlc, w, vlo, vhi = _PAYLOAD_LWW(m, pa)
            if w != PAYLOAD_IS_LWW or hlc > INT64_MAX:
                raise _fail("LWW item without an lww payload, or its timestamp above 2**63 - 1")
            if vlo & 3 or vhi != _VALUE_SHAPE:
                raise _fail("value pointer not of the schema's size")
            va = pa + _LWW_VALUE + 8 + 8 * (vlo >> 2)
            if va + _VALUE_BYTES > size:
                raise _fail("value out of bounds")
            vw, x = _VALUE(m, va)
            return LWWStore((replicas[r], n, hlc, x if vw == VALUE_IS_INT else self.value(va)))
        out: list[Any] = []
        add = out.append
        prev: tuple[str, int] | None = None
        prev_counter_replica: str | None = None
        value = self.value
        for r, n, plo, phi in _ITEM_ROWS(m[a : a + _ITEM_BYTES * count]):
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
            pa = a + _ITEM_PAYLOAD + 8 + 8 * (plo >> 2)
            a += _ITEM_BYTES
            if pa + _PAYLOAD_BYTES > size:
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
            if va + _VALUE_BYTES > size:
                raise _fail("value out of bounds")
            vw, x = _VALUE(m, va)
            add(x if vw == VALUE_IS_INT else value(va))
        return cls(out)

    def elements(self, p: int, lo: int, hi: int) -> SetStore | None:
        """The set store in the element list at the pointer at ``p``."""
        m, size = self.m, self.size
        start, count = self.structs(p, lo, hi, _SET_ELEMENT_SHAPE, _SET_ELEMENT_BYTES)
        if not count:
            return None
        self.charge(count * _VALUE_BYTES // 8)
        if count >= _COLUMNS_MIN and hi >> 3 == _SET_ELEMENT_BYTES // 8 * count and (
            _NATIVE_COLUMNS
        ):
            got = self.element_columns(m, start, count)
            if got is not None:
                return got
        out = SetStore()
        replicas, delta, element = self.replicas, self.delta, self.element
        nrep = len(replicas)
        flat: tuple[Any, ...]
        a = start
        rows = _SET_ELEMENT_ROWS(m[start : start + _SET_ELEMENT_BYTES * count])
        single = 0
        for vlo, vhi, dlo, dhi in rows:
            if vlo & 3 or vhi != _VALUE_SHAPE:
                raise _fail("not a struct pointer of the schema's size")
            va = a + _SET_ELEMENT_VALUE + 8 + 8 * (vlo >> 2)
            if va + _VALUE_BYTES > size:
                raise _fail("struct pointer out of bounds")
            vw, x, tlo, thi = _VALUE_AND_TEXT(m, va)
            if vw == VALUE_IS_TEXT and tlo & 3 == 1 and thi & 7 == 2:
                # ``element`` inlined for text, the commonest element: the same checks.
                self.budget -= thi >> 6  # its words, before decoding (as ``element``)
                if self.budget < 0:
                    raise _fail("over the traversal limit")
                ts = va + _VALUE_TEXT + 8 + 8 * (tlo >> 2)
                te = ts + (thi >> 3) - 1
                if not ts <= te < size or m[te] or te - ts > MAX_VALUE_BYTES:
                    raise _fail("text out of bounds, not NUL-terminated or too long")
                raw = m[ts:te]
                if 0 in raw:
                    raise _fail("text with an inner NUL")
                x = raw.decode("utf-8")  # UnicodeDecodeError: see ``_guard``
            elif vw != VALUE_IS_INT:
                x = element(va)
            dp = a + _SET_ELEMENT_DOTS
            a += _SET_ELEMENT_BYTES
            # One dot, the commonest (``dots`` inlined for it): a list of one Dot's words
            # (its traversal charge is made after the loop, as ``entries`` does).
            if dlo & 3 == 1 and dhi == _ONE_DOT_HI:
                tag = dp + 8 + 8 * (dlo >> 2)
                if tag + 8 + _DOT_BYTES > size:
                    raise _fail("struct list out of bounds")
                tlo, thi, r, n = _ONE_DOT(m, tag)
                if tlo == _ONE_DOT_TAG and thi == _DOT_SHAPE:
                    single += 1
                    if not 1 <= n <= INT64_MAX or r >= nrep:
                        raise _fail("bad dot")
                    flat = (replicas[r], n)
                    if out.setdefault(x, flat) is not flat:
                        self.merge_dots(out, x, [flat])
                    continue
            ds = self.dots(dp, dlo, dhi)
            if not ds and not delta:
                raise _fail("a set element without dots in a full state")
            flat = ds[0] if len(ds) == 1 else tuple(v for d in ds for v in d)
            if out.setdefault(x, flat) is not flat:
                self.merge_dots(out, x, ds)
        self.budget -= single * (1 + _DOT_BYTES // 8)  # the one-dot lists (see above)
        if self.budget < 0:
            raise _fail("over the traversal limit")
        return out

    def element_columns(self, m: bytes, at: int, count: int) -> SetStore | None:
        """The set of the ``count`` elements from byte ``at`` if each is a text of at most 7
        bytes with one dot, laid out as pycapnp's copy lays them out (``_ELEMENT_MASK``);
        else None, and the loop of ``elements`` reads them (and refuses what is invalid).
        The checks of that loop on whole columns, as ``columns`` makes them."""
        end = at + _SET_ELEMENT_BYTES * count
        words = _ELEMENT_WORDS
        stop = end + 8 * words * count
        if stop > self.size:
            return None
        whole = memoryview(m)[at:stop]
        wide = stop - at >= _COLUMNS_AT
        if count not in (_ELEMENT_CHECKS if wide else _ELEMENT_MASKS) and (
            int.from_bytes(memoryview(m)[end : end + 8 * words], "little") & _ELEMENT_ONE[0]
            != _ELEMENT_ONE[1]
        ):
            return None  # the first element is not of the shape: masks are not built
        if wide:
            checks = _ELEMENT_CHECKS.get(count)
            if checks is None:
                if len(_ELEMENT_CHECKS) >= _MASKS_CACHED:
                    _ELEMENT_CHECKS.clear()
                checks = _list_checks(
                    count, _SET_ELEMENT_BYTES, words, _element_fields(), _ELEMENT_MASK,
                    _ELEMENT_PATTERN,
                )
                if count <= _MASKS_CACHED_UP_TO:
                    _ELEMENT_CHECKS[count] = checks
            if not _fits(whole, checks):
                return None
        else:
            got = _ELEMENT_MASKS.get(count)
            if got is None:
                if len(_ELEMENT_MASKS) >= _MASKS_CACHED:
                    _ELEMENT_MASKS.clear()
                got = _list_layout(
                    count, _SET_ELEMENT_BYTES, words, _element_fields(), _ELEMENT_MASK,
                    _ELEMENT_PATTERN,
                )
                if count <= _MASKS_CACHED_UP_TO:
                    _ELEMENT_MASKS[count] = got
            if int.from_bytes(whole, "little") & got[0] != got[1]:
                return None
        region = whole[end - at :]
        c = region.cast("Q")
        his = region.cast("I")[_ELEMENT_HI :: 2 * words].tolist()
        # The texts: each word without its NUL padding, as long as its pointer says, with
        # no NUL inside (a NUL at the end would be stripped: the sizes then differ).
        raw = list(map(
            bytes.rstrip, map(_WORD, c[_ELEMENT_TEXT // 8 :: words].tolist()), repeat(b"\0")
        ))
        if list(map(_TEXT_HI.__getitem__, map(len, raw))) != his or 0 in b"".join(raw):
            return None
        try:
            texts = list(map(bytes.decode, raw))
        except UnicodeDecodeError:
            return None
        ns: list[int] = region.cast("q")[_ELEMENT_N::words].tolist()  # (as ``columns``)
        if min(ns) < 1:
            return None
        rids = _replica_column(c[_ELEMENT_R::words], count, self.replicas)
        if rids is None:
            return None
        out = SetStore(zip(texts, zip(rids, ns, strict=True), strict=True))
        if len(out) != count:  # an element listed twice: the loop merges their dots
            return None
        # What the loop charges: each text's words, each one-dot list.
        # (a text's words: its size // 8, so 1 for the 8-byte ones, 7 bytes and the NUL).
        self.budget -= his.count(_TEXT_HI[7]) + count * (1 + _DOT_BYTES // 8)
        if self.budget < 0:
            raise _fail("over the traversal limit")
        return out

    @staticmethod
    def merge_dots(out: SetStore, x: Any, ds: list[tuple[str, int]]) -> None:
        """An element listed twice: its dots are the union of both lists' (as pycapnp's
        decoder builds them)."""
        prev = out[x]
        ds = sorted({*ds, *((prev[i], prev[i + 1]) for i in range(0, len(prev), 2))})
        out[x] = ds[0] if len(ds) == 1 else tuple(v for d in ds for v in d)

    def store(self, kind: int, w: int, p: int, lo: int, hi: int, depth: int) -> Any:
        """The store of an entry of ``kind`` whose union member is ``w``, its list the
        pointer at ``p`` (``lo``/``hi`` its halves)."""
        if kind == 0:
            if w != ENTRY_IS_ABSENT:
                raise _fail("an entry without a kind must be absent")
            return None
        if w == ENTRY_IS_ITEMS:
            return self.items(kind, p, lo, hi)
        if w == ENTRY_IS_ENTRIES:
            if kind != _K_MAP:
                raise _fail("map entries under another kind")
            return self.entries(p, lo, hi, depth)
        if w == ENTRY_IS_ELEMENTS:
            if kind != _K_SET:
                raise _fail("set elements under another kind")
            return self.elements(p, lo, hi)
        raise _fail("entry union member does not match its kind")

    def entries(self, p: int, lo: int, hi: int, depth: int) -> MapStore | None:
        """The map store in the entry list at the pointer at ``p`` (``lo``/``hi`` its
        halves), at nesting level ``depth``."""
        if depth > MAX_NESTING_DEPTH:
            raise _fail("maps nest deeper than MAX_NESTING_DEPTH")
        m, size = self.m, self.size
        # The entry list (``structs``, inlined: the hot path).
        if lo & 3 != 1 or hi & 7 != 7:
            if lo == 0 and hi == 0:
                return None
            raise _fail("not a composite struct list")
        tag = p + 8 + 8 * (lo >> 2)
        words = hi >> 3
        if tag + 8 + 8 * words > size:
            raise _fail("struct list out of bounds")
        tlo, thi = _UU(m, tag)
        count = tlo >> 2
        if tlo & 3 or count * _ENTRY_BYTES > 8 * words or (count and thi != _ENTRY_SHAPE):
            raise _fail("struct list tag not of the schema's size")
        self.budget -= words + 1
        if self.budget < 0:
            raise _fail("over the traversal limit")
        if count >= _COLUMNS_MIN and 8 * words == _ENTRY_BYTES * count and _NATIVE_COLUMNS:
            got = self.columns(m, tag + 8, count, depth)
            if got is not None:
                return got
        a = tag + 8 - _ENTRY_BYTES  # the entry's first byte, moved on first in the loop
        out = MapStore()
        prev, prev_kind = "", 0  # keys are never empty: "" sorts before every key
        items, keys, replicas = self.items, _KEYS, self.replicas
        nrep = len(replicas)
        registers = paths = 0
        paths_ok = depth < MAX_NESTING_DEPTH  # a path's map is one level deeper
        rows = _ENTRY_ROWS(m[tag + 8 : tag + 8 + _ENTRY_BYTES * count])
        for kind, wb, w, klo, khi, llo, lhi in rows:
            a += _ENTRY_BYTES
            # The key (``_text`` and ``validate_key``, inlined: the hot path). It is read
            # with its NUL: a key in the cache has been checked (``_new_key``), so a hit
            # needs no other check.
            if klo & 3 != 1 or khi & 7 != 2:
                raise _fail("map key is not a byte list")
            ks = a + _KEY_AT + 8 * (klo >> 2)
            ke = ks + (khi >> 3)
            if ke > size:
                raise _fail("map key out of bounds")
            raw = m[ks:ke]
            key = keys.get(raw)  # field names repeat: each is checked once
            if key is None:
                key = _new_key(raw)
            if kind == _K_LWW and lhi == _ONE_ITEM_HI and llo & 3 == 1 and w == ENTRY_IS_ITEMS:
                # A register of one Int64 entry laid out as pycapnp's copy lays it out (see
                # ``_REGISTER``): one read, the checks of ``items`` (its traversal charge is
                # made after the loop: the list's size bounds the work until then).
                tag = a + _LIST_AT + 8 * (llo >> 2)
                if tag + _REGISTER_BYTES <= size:
                    tw, r, n, pw, hlc, which, vw, vwhich, x = _REGISTER(m, tag)
                    if (tw, pw, which, vw, vwhich) == _INT_REGISTER:
                        if not 0 < n <= INT64_MAX or hlc > INT64_MAX or r >= nrep:
                            raise _fail("bad item dot, or a timestamp above 2**63 - 1")
                        registers += 1
                        inner: Any = LWWStore((replicas[r], n, hlc, x))
                    else:
                        inner = items(kind, a + _ENTRY_LIST, llo, lhi)
                else:
                    inner = items(kind, a + _ENTRY_LIST, llo, lhi)
            elif w == ENTRY_IS_ENTRIES and kind == _K_MAP:
                inner = None
                if lhi == _ONE_ENTRY_HI and llo & 3 == 1:  # a map of one entry (a path)
                    tag = a + _LIST_AT + 8 * (llo >> 2)
                    if paths_ok and tag + _PATH_BYTES <= size:
                        # Its last step, an int register under a short key (``_PATH``):
                        # one read, the checks of ``one`` (the charge: after the loop).
                        tw, ik, iwb, iw, iklo, ikhi, ilp, rtw, r, n, pw, hlc, which, vw, \
                            vwhich, x = _PATH(m, tag)
                        if (
                            tw, ik, iwb, iw, iklo, ilp, rtw, pw, which, vw, vwhich
                        ) == _PATH_SHAPE and ikhi in _PATH_KEY_HI:
                            if not 0 < n <= INT64_MAX or hlc > INT64_MAX or r >= nrep:
                                raise _fail("bad item dot, or a timestamp above 2**63 - 1")
                            raw = m[tag + _PATH_KEY : tag + _PATH_KEY + (ikhi >> 3)]
                            ikey = keys.get(raw)
                            if ikey is None:
                                ikey = _new_key(raw)
                            paths += 1
                            inner = MapStore({ikey: LWWStore((replicas[r], n, hlc, x))})
                    if inner is None:
                        inner = self.one(m, size, tag, depth + 1)
                if inner is None:
                    inner = self.entries(a + _ENTRY_LIST, llo, lhi, depth + 1)
            elif kind == _K_COUNTER and lhi == _ONE_ITEM_HI and llo & 3 == 1 and (
                w == ENTRY_IS_ITEMS
            ):
                # A counter of one entry laid out as pycapnp's copy lays it out (see
                # ``_COUNTER``): one read, the checks of ``items`` (charged after the loop).
                tag = a + _LIST_AT + 8 * (llo >> 2)
                inner = None
                if tag + _COUNTER_BYTES <= size:
                    tw, r, n, pw, inc, which, dec = _COUNTER(m, tag)
                    if (tw, pw, which) == _COUNTER_SHAPE:
                        if not 0 < n <= INT64_MAX or r >= nrep or (
                            inc > INT64_MAX or dec > INT64_MAX
                        ):
                            raise _fail("bad item dot, or a contribution above 2**63 - 1")
                        registers += 1
                        inner = CounterStore((replicas[r], n, inc, dec))
                if inner is None:
                    inner = items(kind, a + _ENTRY_LIST, llo, lhi)
            elif w == ENTRY_IS_ITEMS and kind:
                inner = items(kind, a + _ENTRY_LIST, llo, lhi)
            else:
                inner = self.store(kind, w, a + _ENTRY_LIST, llo, lhi, depth + 1)
            if prev < key and not wb & _WHOLE_MASK and inner is not None:
                out[key] = inner  # the commonest entry: a new key, no marker, a store
            else:
                # Sorted by (key, kind): a key repeats only as the previous entry's key.
                if key < prev or (key == prev and kind <= prev_kind):
                    raise _fail("map entries are not sorted by (key, kind)")
                self.put(out, key, inner, wb & _WHOLE_MASK != 0, key == prev)
            prev, prev_kind = key, kind
        if registers or paths:
            self.budget -= registers * _REGISTER_WORDS + paths * _PATH_WORDS
            if self.budget < 0:
                raise _fail("over the traversal limit")
        return out or None

    def columns(self, m: bytes, at: int, count: int, depth: int) -> MapStore | None:
        """The map of the ``count`` entries from byte ``at`` if they have one of the shapes
        read as columns (``_Columns``: short keys, each an int register, a path's int
        register or a one-entry counter), laid out as pycapnp's copy lays them out; else
        None, and the loop of ``entries`` reads them (and refuses what is invalid). The
        checks of that loop, on whole columns (C-level passes, no Python per entry): every
        entry's data word, pointers (each at the offset the layout gives), and the
        structural bytes of its words are compared at once; keys are looked up by their
        word; dots, timestamps and counters are range-checked by their extremes."""
        end = at + _ENTRY_BYTES * count
        rows = memoryview(m)[at:end]
        shape = _SHAPES.get(rows[:8].cast("Q")[0])
        if shape is None:
            return None
        if shape is _PATHS and depth >= MAX_NESTING_DEPTH:
            return None
        words = shape.words
        stop = end + 8 * words * count
        if stop > self.size:
            return None
        # A size seen first: a list whose first run is not of the shape is left to the loop
        # before its checks are built (``first``).
        whole = memoryview(m)[at:stop]
        if stop - at >= _COLUMNS_AT:
            checks = shape.checked.get(count)
            if checks is None:
                if not shape.first(m, end):
                    return None
                checks = shape.checks(count)
            if not _fits(whole, checks):
                return None
        else:
            got = shape.cache.get(count)
            if got is None:
                if not shape.first(m, end):
                    return None
                got = shape.masks(count)
            if int.from_bytes(whole, "little") & got[0] != got[1]:
                return None
        region = whole[end - at :]
        c = region.cast("Q")
        keys = _column_keys(
            c[::words].tolist(), rows.cast("I")[_KEY_AT_WORD + 1 :: _ENTRY_BYTES // 4].tolist()
        )
        if keys is None or sorted(keys) != keys:
            return None
        # Dots, timestamps and counters read signed: a word above 2**63 - 1 reads negative,
        # so one pass (min) checks each column's range.
        signed = region.cast("q")
        ir, iN, ia, ib = shape.cols
        ns: list[int] = signed[iN::words].tolist()
        xs: list[int] = signed[ia::words].tolist()
        ys: list[int] = signed[ib::words].tolist()
        if min(ns) < 1 or min(xs) < 0 or (not shape.signed and min(ys) < 0):
            return None
        rids = _replica_column(c[ir::words], count, self.replicas)
        if rids is None:
            return None
        if shape is _PATHS:
            kc = c[shape.key :: words]
            hc = region.cast("I")[shape.key_hi :: 2 * words]
            k0, h0 = kc[0], hc[0]
            if kc == array("Q", [k0]) * count and hc == array("I", [h0]) * count:
                inner = _column_keys([k0], [h0])  # one name under every path
                wrap: Any = repeat(inner and (inner[0],), count)
            else:
                inner = _column_keys(kc.tolist(), hc.tolist())
                wrap = zip(inner or (), strict=True)
            if inner is None:
                return None
            charge = _PATH_WORDS * count
            stores: Any = map(
                MapStore.fromkeys, wrap, map(LWWStore, zip(rids, ns, xs, ys, strict=True))
            )
        elif shape is _REGISTERS:
            charge = _REGISTER_WORDS * count
            stores = map(LWWStore, zip(rids, ns, xs, ys, strict=True))
        else:
            charge = _REGISTER_WORDS * count
            stores = map(CounterStore, zip(rids, ns, xs, ys, strict=True))
        out = MapStore(zip(keys, stores, strict=True))
        if len(out) != count:  # a key repeats
            return None
        self.budget -= charge
        if self.budget < 0:
            raise _fail("over the traversal limit")
        return out

    def one(self, m: bytes, size: int, tag: int, depth: int) -> MapStore | None:
        """The map at the entry list whose tag is at byte ``tag``, if it is one entry
        holding an int register or another such map (a path: ``a/b/c = 1``), laid out as
        pycapnp's copy lays it out (tag, entry, key, the entry's list right after); else
        None, and ``entries`` reads it (and refuses what is invalid). The reads and checks
        of ``entries``, without its loop (``m`` and ``size``: the reader's)."""
        if depth > MAX_NESTING_DEPTH or tag + 8 + _ENTRY_BYTES > size:
            return None
        tw, kind, wb, w, klo, khi, llo, lhi = _ONE_ENTRY(m, tag)
        if tw != _ONE_ENTRY_TAG or wb & _WHOLE_MASK or klo & 3 != 1 or khi & 7 != 2:
            return None
        a = tag + 8
        ks = a + _KEY_AT + 8 * (klo >> 2)
        ke = ks + (khi >> 3)
        if ke > size or llo & 3 != 1:
            return None
        raw = m[ks:ke]
        key = _KEYS.get(raw)
        if key is None:
            key = _new_key(raw)
        lt = a + _LIST_AT + 8 * (llo >> 2)
        if kind == _K_LWW and w == ENTRY_IS_ITEMS and lhi == _ONE_ITEM_HI:
            if lt + _REGISTER_BYTES > size:
                return None
            tw, r, n, pw, hlc, which, vw, vwhich, x = _REGISTER(m, lt)
            replicas = self.replicas
            if (tw, pw, which, vw, vwhich) != _INT_REGISTER or not 0 < n <= INT64_MAX or (
                hlc > INT64_MAX or r >= len(replicas)
            ):
                return None
            inner: Any = LWWStore((replicas[r], n, hlc, x))
            self.budget -= _PATH_WORDS
        elif kind == _K_MAP and w == ENTRY_IS_ENTRIES and lhi == _ONE_ENTRY_HI:
            inner = self.one(m, size, lt, depth + 1)
            if inner is None:
                return None
            self.budget -= _ONE_ENTRY_WORDS
        else:
            return None
        if self.budget < 0:
            raise _fail("over the traversal limit")
        return MapStore({key: inner})

    def put(self, out: MapStore, key: str, inner: Any, whole: bool, repeat: bool) -> None:
        """Store an entry that is not the common case: a ``Whole`` marker, an empty store
        (refused unless marked), or a key's second kind (``KindStore``)."""
        if whole and not self.delta:
            raise _fail("a Whole marker in a full state")
        if inner is None and not whole:
            raise _fail("empty store under a key")
        if not repeat:
            out[key] = Whole(inner) if whole else inner
            return
        cur: Any = out[key]
        cur_whole = type(cur) is Whole
        if cur_whole != whole or inner is None or (cur_whole and cur.store is None):
            raise _fail("inconsistent entries under a key")
        first = cur.store if cur_whole else cur
        ks = first if type(first) is KindStore else KindStore({first.KIND: first})
        ks[inner.KIND] = inner
        out[key] = Whole(ks) if whole else ks

    def document(self, p: int, expect: type[Causal] | None) -> Causal:
        m = self.m
        a = self.struct(p, _DOCUMENT_SHAPE, 8 * (DOCUMENT_DATA_WORDS + DOCUMENT_POINTERS))
        pa = a + _DOCUMENT_PTRS
        rp = pa + 8 * DOCUMENT_REPLICAS_PTR
        lo, hi = _UU(m, rp)
        replicas: list[str] = []
        if lo or hi:
            if lo & 3 != 1 or hi & 7 != 6:
                raise _fail("replica table is not a pointer list")
            start, count = rp + 8 + 8 * (lo >> 2), hi >> 3
            if start + 8 * count > self.size:
                raise _fail("replica table out of bounds")
            self.charge(count + 1)
            for q in range(start, start + 8 * count, 8):
                lo, hi = _UU(m, q)
                self.charge(hi >> 6)  # its words, before decoding (shared pointers amplify)
                replicas.append(validate_replica_id(_text(m, q, lo, hi)))
        if len(set(replicas)) != len(replicas):
            raise _fail("replica table repeats an id")
        self.replicas = replicas
        b = _DELTA_BIT
        delta = self.delta = bool(m[a + b // 8] >> b % 8 & 1)
        ra = self.struct(pa + 8 * DOCUMENT_ROOT_PTR, _ENTRY_SHAPE, _ENTRY_BYTES)
        kind, wb, w, klo, khi, llo, lhi = _ENTRY(m, ra)
        cls = _causal().get(kind)
        if cls is None or kind not in self.kinds:
            raise _fail("document root of a kind not readable here")
        if expect is not None and cls is not expect:
            raise _fail("document of another CRDT than expected")
        if wb & _WHOLE_MASK or _text(m, ra + _ENTRY_KEY, klo, khi):
            raise _fail("a document root has no key and no Whole marker")
        if kind == _K_MAP and w != ENTRY_IS_ENTRIES:
            raise _fail("a map document root must hold entries")
        store = self.store(kind, w, ra + _ENTRY_LIST, llo, lhi, 1)
        ca = self.struct(
            pa + 8 * DOCUMENT_CONTEXT_PTR, _CONTEXT_SHAPE,
            8 * (CONTEXT_DATA_WORDS + CONTEXT_POINTERS),
        )
        vp, cp = ca + _CONTEXT_VERSIONS, ca + _CONTEXT_CLOUD
        rs, ns, _ = self.dot_rows(vp, *_UU(m, vp))
        vv: dict[str, int]
        if isinstance(rs, int):
            if len(ns) > 1:
                raise _fail("version vector repeats a replica")
            vv = {replicas[rs]: ns[0]}
        else:
            vv = dict(zip(map(replicas.__getitem__, rs), ns, strict=True))
            if len(vv) != len(ns):
                raise _fail("version vector repeats a replica")
        rs, ns, unique = self.dot_rows(cp, *_UU(m, cp))
        cloud: dict[str, set[int]] = {}
        if isinstance(rs, int):  # one replica's dots: one set
            cloud[replicas[rs]] = set(ns) if unique is None else unique
        else:
            for r, n in zip(rs, ns, strict=True):
                rid = replicas[r]
                if rid in cloud:
                    cloud[rid].add(n)
                else:
                    cloud[rid] = {n}
        return cls(store, CausalContext.from_parts(vv, cloud), is_delta=delta)


def _causal() -> dict[int, type[Causal]]:
    if not _CAUSAL:
        from broker.codec._document import CAUSAL_OF_KIND

        _CAUSAL.update(CAUSAL_OF_KIND)
    return _CAUSAL


def _segment(data: bytes) -> bytes:
    """The one segment of an unpacked message (with its segment table)."""
    if len(data) < 8:
        raise _fail("message shorter than its segment table")
    count, size = _UU(data, 0)
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
