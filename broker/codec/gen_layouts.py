"""Generate ``broker/codec/_layouts.py``: the struct layouts the fast codec reads and writes.

    python -m broker.codec.gen_layouts [--check]

Every offset comes from pycapnp's introspection of the shipped schemas (the compiled
``schema.node`` of each struct), never typed by hand: data words, pointer counts, each field's
byte offset (bit offset for a Bool) or pointer index, union discriminant offsets and member
numbers. ``--check`` exits 1 when the checked-in module differs from what the schemas give
(CI runs it through ``tests/unit/test_fast_codec.py``).

The fast codec assumes every field's default is zero (Cap'n Proto stores fields XOR their
default); the generator refuses a schema with an explicit default instead of emitting a layout
the fast codec would misread.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any, Final

from broker.codec._schema import CURRENT_VERSION, load_schema

__all__ = ["OUT", "STRUCTS", "render"]

OUT: Final = Path(__file__).with_name("_layouts.py")

STRUCTS: Final = (
    ("crdt", "Value"),
    ("crdt", "Dot"),
    ("crdt", "Context"),
    ("crdt", "Payload"),
    ("crdt", "Item"),
    ("crdt", "SetElement"),
    ("crdt", "Entry"),
    ("crdt", "Document"),
    ("envelope", "SignedEnvelope"),
    ("envelope", "Envelope"),
)
"""The structs on the replication hot path, in output order."""

_BYTES: Final = {
    "int8": 1, "uint8": 1, "int16": 2, "uint16": 2, "int32": 4, "uint32": 4,
    "int64": 8, "uint64": 8, "float32": 4, "float64": 8,
}
_POINTER_TYPES: Final = frozenset({"text", "data", "list", "struct", "anyPointer", "interface"})


def _snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).upper()


def _fields(node: Any, prefix: str, lines: list[str], groups: Any) -> None:
    """Constants of ``node``'s fields (recursing into groups, which share the parent's
    sections); union members get ``IS_`` discriminant numbers."""
    st = node.struct
    if st.discriminantCount:
        lines.append(f"{prefix}_WHICH: Final = {2 * st.discriminantOffset}  # byte offset, UInt16")
    for f in st.fields:
        name = f"{prefix}_{_snake(f.name)}"
        if f.discriminantValue != 0xFFFF:
            lines.append(f"{prefix}_IS_{_snake(f.name)}: Final = {f.discriminantValue}")
        if f.which() == "group":
            _fields(groups(f.group.typeId), name, lines, groups)
            continue
        slot = f.slot
        t = slot.type.which()
        if slot.hadExplicitDefault:
            raise SystemExit(f"{name}: explicit default values are not supported by the fast codec")
        if t == "void":
            continue
        if t == "bool":
            lines.append(f"{name}_BIT: Final = {slot.offset}  # Bool: bit offset in data")
        elif t in _BYTES:
            lines.append(f"{name}: Final = {slot.offset * _BYTES[t]}  # {t}: byte offset")
        elif t in _POINTER_TYPES:
            lines.append(f"{name}_PTR: Final = {slot.offset}  # {t}: pointer index")
        else:  # enums and the like: not on the hot path's structs
            raise SystemExit(f"{name}: type {t} is not supported by the fast codec")


def render(version: int = CURRENT_VERSION) -> str:
    """The text of ``_layouts.py`` for wire ``version``'s schemas."""
    schema = load_schema(version)
    lines = [
        '"""Struct layouts of the hot-path Cap\'n Proto structs (GENERATED: do not edit).',
        "",
        "Written by ``python -m broker.codec.gen_layouts`` from the schemas of wire version "
        f"{version};",
        "``tests/unit/test_fast_codec.py`` fails when this file differs from what the schemas "
        "give.",
        "Offsets: data fields in bytes from the data section's start (Bool: in bits), pointer "
        "fields",
        "by index in the pointer section, ``_WHICH`` the discriminant's byte offset, ``_IS_*`` "
        "the",
        'union member numbers. Every default is zero (the generator refuses others)."""',
        "",
        "from typing import Final",
        "",
        f"WIRE_VERSION: Final = {version}",
    ]
    by_id: dict[int, Any] = {}
    for mod, name in STRUCTS:
        st = getattr(getattr(schema, mod), name).schema
        by_id[st.node.id] = st

    def groups(type_id: int) -> Any:
        for mod, name in STRUCTS:
            st = getattr(getattr(schema, mod), name).schema
            for f in st.node.struct.fields:
                if f.which() == "group" and f.group.typeId == type_id:
                    return st.fields[f.name].schema.node
        raise SystemExit(f"group {type_id:#x} not found")

    for mod, name in STRUCTS:
        node = getattr(getattr(schema, mod), name).schema.node
        prefix = _snake(name)
        lines += [
            "",
            f"# {mod}.capnp {name} @{node.id:#x}",
            f"{prefix}_DATA_WORDS: Final = {node.struct.dataWordCount}",
            f"{prefix}_POINTERS: Final = {node.struct.pointerCount}",
        ]
        _fields(node, prefix, lines, groups)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write (or with ``--check`` compare) ``_layouts.py``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--check", action="store_true", help="compare, do not write")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is stale: run python -m broker.codec.gen_layouts", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
