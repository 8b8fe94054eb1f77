"""Struct layouts of the hot-path Cap'n Proto structs (GENERATED: do not edit).

Written by ``python -m broker.codec.gen_layouts`` from the schemas of wire version 3;
``tests/unit/test_fast_codec.py`` fails when this file differs from what the schemas give.
Offsets: data fields in bytes from the data section's start (Bool: in bits), pointer fields
by index in the pointer section, ``_WHICH`` the discriminant's byte offset, ``_IS_*`` the
union member numbers. Every default is zero (the generator refuses others)."""

from typing import Final

WIRE_VERSION: Final = 3

# crdt.capnp Value @0xb7475cf08e0785ca
VALUE_DATA_WORDS: Final = 2
VALUE_POINTERS: Final = 1
VALUE_WHICH: Final = 0  # byte offset, UInt16
VALUE_IS_NULL: Final = 0
VALUE_IS_BOOL: Final = 1
VALUE_BOOL_BIT: Final = 16  # Bool: bit offset in data
VALUE_IS_INT: Final = 2
VALUE_INT: Final = 8  # int64: byte offset
VALUE_IS_FLOAT: Final = 3
VALUE_FLOAT: Final = 8  # float64: byte offset
VALUE_IS_TEXT: Final = 4
VALUE_TEXT_PTR: Final = 0  # text: pointer index
VALUE_IS_DATA: Final = 5
VALUE_DATA_PTR: Final = 0  # data: pointer index

# crdt.capnp Dot @0x9683ee0cc86303c4
DOT_DATA_WORDS: Final = 2
DOT_POINTERS: Final = 0
DOT_REPLICA: Final = 0  # uint32: byte offset
DOT_COUNTER: Final = 8  # uint64: byte offset

# crdt.capnp Context @0xc2b78efa0406729f
CONTEXT_DATA_WORDS: Final = 0
CONTEXT_POINTERS: Final = 2
CONTEXT_VERSIONS_PTR: Final = 0  # list: pointer index
CONTEXT_CLOUD_PTR: Final = 1  # list: pointer index

# crdt.capnp Payload @0xae1158c0a4dd688d
PAYLOAD_DATA_WORDS: Final = 3
PAYLOAD_POINTERS: Final = 1
PAYLOAD_WHICH: Final = 8  # byte offset, UInt16
PAYLOAD_IS_LWW: Final = 0
PAYLOAD_LWW_HLC: Final = 0  # uint64: byte offset
PAYLOAD_LWW_VALUE_PTR: Final = 0  # struct: pointer index
PAYLOAD_IS_MV: Final = 1
PAYLOAD_MV_PTR: Final = 0  # struct: pointer index
PAYLOAD_IS_COUNTER: Final = 2
PAYLOAD_COUNTER_INCREMENTS: Final = 0  # uint64: byte offset
PAYLOAD_COUNTER_DECREMENTS: Final = 16  # uint64: byte offset
PAYLOAD_IS_FLAG: Final = 3

# crdt.capnp Item @0xb9cf401c11916738
ITEM_DATA_WORDS: Final = 2
ITEM_POINTERS: Final = 1
ITEM_REPLICA: Final = 0  # uint32: byte offset
ITEM_COUNTER: Final = 8  # uint64: byte offset
ITEM_PAYLOAD_PTR: Final = 0  # struct: pointer index

# crdt.capnp SetElement @0xc8cc41a9c1db0c1c
SET_ELEMENT_DATA_WORDS: Final = 0
SET_ELEMENT_POINTERS: Final = 2
SET_ELEMENT_VALUE_PTR: Final = 0  # struct: pointer index
SET_ELEMENT_DOTS_PTR: Final = 1  # list: pointer index

# crdt.capnp Entry @0xdf4f8360903a2f38
ENTRY_DATA_WORDS: Final = 1
ENTRY_POINTERS: Final = 2
ENTRY_WHICH: Final = 4  # byte offset, UInt16
ENTRY_KEY_PTR: Final = 0  # text: pointer index
ENTRY_KIND: Final = 0  # uint16: byte offset
ENTRY_WHOLE_BIT: Final = 16  # Bool: bit offset in data
ENTRY_IS_ITEMS: Final = 0
ENTRY_ITEMS_PTR: Final = 1  # list: pointer index
ENTRY_IS_ELEMENTS: Final = 1
ENTRY_ELEMENTS_PTR: Final = 1  # list: pointer index
ENTRY_IS_ENTRIES: Final = 2
ENTRY_ENTRIES_PTR: Final = 1  # list: pointer index
ENTRY_IS_ABSENT: Final = 3

# crdt.capnp Document @0xa59a13c7b0678d26
DOCUMENT_DATA_WORDS: Final = 1
DOCUMENT_POINTERS: Final = 3
DOCUMENT_REPLICAS_PTR: Final = 0  # list: pointer index
DOCUMENT_CONTEXT_PTR: Final = 1  # struct: pointer index
DOCUMENT_ROOT_PTR: Final = 2  # struct: pointer index
DOCUMENT_DELTA_BIT: Final = 0  # Bool: bit offset in data

# envelope.capnp SignedEnvelope @0xc0a78eff05c3711e
SIGNED_ENVELOPE_DATA_WORDS: Final = 0
SIGNED_ENVELOPE_POINTERS: Final = 3
SIGNED_ENVELOPE_SIGNER_PTR: Final = 0  # text: pointer index
SIGNED_ENVELOPE_SIGNATURE_PTR: Final = 1  # data: pointer index
SIGNED_ENVELOPE_BODY_PTR: Final = 2  # data: pointer index

# envelope.capnp Envelope @0x8bc669ccd882f137
ENVELOPE_DATA_WORDS: Final = 3
ENVELOPE_POINTERS: Final = 4
ENVELOPE_WHICH: Final = 2  # byte offset, UInt16
ENVELOPE_VERSION: Final = 0  # uint16: byte offset
ENVELOPE_WRITER_PTR: Final = 0  # text: pointer index
ENVELOPE_SUBJECT_PTR: Final = 1  # text: pointer index
ENVELOPE_HLC: Final = 8  # uint64: byte offset
ENVELOPE_SEQUENCE: Final = 16  # uint64: byte offset
ENVELOPE_IS_DELTA_BATCH: Final = 0
ENVELOPE_DELTA_BATCH_PTR: Final = 2  # struct: pointer index
ENVELOPE_IS_STATE: Final = 1
ENVELOPE_STATE_PTR: Final = 2  # struct: pointer index
ENVELOPE_TRACE_ID_PTR: Final = 3  # data: pointer index
ENVELOPE_IS_DELTA_BATCH_ZLIB: Final = 2
ENVELOPE_DELTA_BATCH_ZLIB_PTR: Final = 2  # data: pointer index
ENVELOPE_IS_STATE_ZLIB: Final = 3
ENVELOPE_STATE_ZLIB_PTR: Final = 2  # data: pointer index
