"""What golden vectors must cover, computed from each release's schemas, and what they do.

- ``message_types(v)``: the structs that travel as a message of their own: every struct no
  other struct holds as a field, plus ``crdt.Document`` (a packed document is also a message:
  durable records, zlib bodies, ``.doc`` vectors).
- ``added_fields(v)``: every field (union members and groups included) of the structs
  reachable from those messages that release ``v`` added; for v1, all of them.
- ``fields_set(schema, raw, struct)``: the fields a packed message sets (non-default, or the
  active union member), following ``SignedEnvelope.body`` into the ``Envelope`` and a zlib
  member into its ``Document``.

Names are ``module.Struct.field`` (``healer.RootReply.levels``, ``crdt.Payload.lww.hlc``).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from typing import Any

from broker.codec import load_schema
from broker.codec._schema import WireSchema

__all__ = ["MODULES", "added_fields", "all_fields", "fields_set", "message_types"]

MODULES = ("crdt", "envelope", "rpc", "healer")
EXTRA_MESSAGES = frozenset({"crdt.Document"})
"""Messages that are also held as fields (so the rule above would miss them)."""


def _name(schema: Any) -> str:
    """``module.Qual.Name`` of a struct schema (``crdt.capnp:Payload.lww`` ->
    ``crdt.Payload.lww``)."""
    file, _, qual = schema.node.displayName.partition(":")
    return f"{file.rsplit('/', 1)[-1].removesuffix('.capnp')}.{qual}"


def _structs(version: int) -> dict[str, Any]:
    """Every top-level and nested struct of release ``version``, by name."""
    ws = load_schema(version)
    out: dict[str, Any] = {}

    def walk(parent: Any) -> None:
        for nested in parent.schema.node.nestedNodes:
            child = getattr(parent, nested.name)
            if str(child.schema.node.which()) == "struct":
                out[_name(child.schema)] = child.schema
                walk(child)

    for module in MODULES:
        walk(getattr(ws, module))
    return out


def _field_types(schema: Any) -> Iterator[tuple[str, Any, Any]]:
    """(name, field node, field schema) of a struct schema's fields."""
    for f in schema.node.struct.fields:
        yield f.name, f, schema.fields[f.name]


def _struct_of(f: Any, fs: Any) -> Any | None:
    """The struct schema a field holds (directly or as a list element), or a group's."""
    if str(f.which()) == "group":
        return fs.schema
    t = f.slot.type
    kind = str(t.which())
    if kind == "struct":
        return fs.schema
    if kind == "list" and str(t.list.elementType.which()) == "struct":
        return fs.schema.elementType
    return None


def message_types(version: int) -> set[str]:
    """The message types of release ``version`` (see the module docstring)."""
    structs = _structs(version)
    held = set()
    for schema in structs.values():
        for _, f, fs in _field_types(schema):
            inner = _struct_of(f, fs)
            if inner is not None and str(f.which()) != "group":
                held.add(_name(inner))
    return (set(structs) - held) | EXTRA_MESSAGES


def all_fields(version: int) -> set[str]:
    """Every field of every struct reachable from release ``version``'s messages."""
    structs = _structs(version)
    out: set[str] = set()
    seen: set[str] = set()

    def walk(schema: Any) -> None:
        name = _name(schema)
        if name in seen:
            return
        seen.add(name)
        for fname, f, fs in _field_types(schema):
            out.add(f"{name}.{fname}")
            inner = _struct_of(f, fs)
            if inner is not None:
                walk(inner)

    for message in sorted(message_types(version)):
        walk(structs[message])
    return out


def added_fields(version: int) -> set[str]:
    """The fields release ``version`` added (for the oldest release: all of its fields)."""
    before = all_fields(version - 1) if version > 1 else set()
    return all_fields(version) - before


def fields_set(schema: WireSchema, raw: bytes, struct: str) -> set[str]:
    """The fields the packed message ``raw`` of ``struct`` (``envelope.SignedEnvelope``)
    sets, at any depth."""
    module, _, name = struct.partition(".")
    reader = getattr(getattr(schema, module), name).from_bytes_packed(
        raw, traversal_limit_in_words=1 << 26)
    out: set[str] = set()
    _walk(schema, reader, out)
    return out


def _walk(ws: WireSchema, reader: Any, out: set[str]) -> None:
    schema = reader.schema
    name = _name(schema)
    node = schema.node.struct
    active = str(reader.which()) if node.discriminantCount else None
    for f in node.fields:
        fname = f.name
        if f.discriminantValue != 0xFFFF and fname != active:
            continue
        key = f"{name}.{fname}"
        if str(f.which()) == "group":
            out.add(key)
            _walk(ws, reader._get(fname), out)
            continue
        kind = str(f.slot.type.which())
        if kind == "void":
            if f.discriminantValue != 0xFFFF:
                out.add(key)
            continue
        if kind in ("text", "data", "list", "struct", "anyPointer", "interface"):
            if not reader._has(fname):
                continue
            out.add(key)
            value = reader._get(fname)
            if key == "envelope.SignedEnvelope.body":
                _walk(ws, ws.envelope.Envelope.from_bytes_packed(bytes(value)), out)
            elif key in ("envelope.Envelope.deltaBatchZlib", "envelope.Envelope.stateZlib"):
                _walk(ws, ws.crdt.Document.from_bytes_packed(zlib.decompress(bytes(value))),
                      out)
            elif kind == "struct":
                _walk(ws, value, out)
            elif kind == "list" and str(f.slot.type.list.elementType.which()) == "struct":
                for item in value:
                    _walk(ws, item, out)
            continue
        value = reader._get(fname)
        default = getattr(f.slot.defaultValue, kind)
        if kind == "enum":
            value = getattr(value, "raw", value)
            if isinstance(value, str):
                value = schema.fields[fname].schema.enumerants[value]
        if value != default:
            out.add(key)

