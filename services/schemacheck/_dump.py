"""Subprocess worker: parse schema directories with pycapnp and print what the checker compares.

Run as ``python -m services.schemacheck._dump [-I PATH ...] DIR [DIR ...]``. For each
directory, in order, it loads every ``DIR/*.capnp`` with one fresh ``capnp.SchemaParser``
(imports resolve against ``DIR`` itself, each ``-I`` path, and pycapnp's bundled
``/capnp/*.capnp``), walks every node reachable from those
files — nested nodes, group nodes, implicit method parameter and result structs — and prints
one JSON line ``{"dir": ..., "ok": true, "dump": {...}}``.

Invariants:

- pycapnp is imported only here, never in the checking process: a schema error inside the
  parser terminates this interpreter (a C++ exception escapes and ``abort()`` runs), and the
  parent maps that to an error message.
- Each line is flushed before the next directory starts, so after a crash the first directory
  without a line is the one that crashed; the parent resumes with the ones after it.
- The dump holds plain JSON only: ids as ``0x`` hex strings, types as canonical strings
  (``List(struct:0x...)``), defaults as canonical values that compare equal exactly when the
  default bits on the wire are equal (floats by their hex form, data as hex, struct values as
  ``{ordinal: value}`` holding only fields whose value differs from the field's own default).
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["dump_directory", "main"]

NO_DISCRIMINANT = 0xFFFF
"""``discriminantValue`` of a field that is not a union member."""

_PRIMITIVES = {
    "void": "Void", "bool": "Bool", "int8": "Int8", "int16": "Int16", "int32": "Int32",
    "int64": "Int64", "uint8": "UInt8", "uint16": "UInt16", "uint32": "UInt32",
    "uint64": "UInt64", "float32": "Float32", "float64": "Float64", "text": "Text",
    "data": "Data",
}
_POINTER_KINDS = {"text", "data", "list", "struct", "interface", "anyPointer"}
_UNCONSTRAINED = {
    "anyKind": "AnyPointer", "struct": "AnyStruct", "list": "AnyList",
    "capability": "Capability",
}


def _hex(value: int) -> str:
    return f"0x{value:016x}"


def _type_str(t: Any) -> str:
    which = str(t.which())
    if which in _PRIMITIVES:
        return _PRIMITIVES[which]
    if which == "list":
        return f"List({_type_str(t.list.elementType)})"
    if which in ("enum", "struct", "interface"):
        ref = getattr(t, which)
        return f"{which}:{_hex(ref.typeId)}{_brand_str(ref.brand)}"
    if which == "anyPointer":
        ap = t.anyPointer
        kind = str(ap.which())
        if kind == "unconstrained":
            return _UNCONSTRAINED.get(str(ap.unconstrained.which()), "AnyPointer")
        if kind == "parameter":
            return f"param:{_hex(ap.parameter.scopeId)}#{ap.parameter.parameterIndex}"
        return f"methodParam#{ap.implicitMethodParameter.parameterIndex}"
    return f"?{which}"


def _brand_str(brand: Any) -> str:
    scopes = []
    for scope in brand.scopes:
        if str(scope.which()) == "bind":
            binds = ",".join(
                _type_str(b.type) if str(b.which()) == "type" else "_" for b in scope.bind
            )
        else:
            binds = "inherit"
        scopes.append(f"{_hex(scope.scopeId)}={binds}")
    return f"<{';'.join(scopes)}>" if scopes else ""


class _Renderer:
    """Turns pycapnp readers of default values into canonical JSON values."""

    def __init__(self, capnp: Any) -> None:
        lib = capnp.lib.capnp
        self._struct = lib._DynamicStructReader
        self._list = lib._DynamicListReader
        self._enum = lib._DynamicEnum

    def value(self, v: Any) -> Any:
        if isinstance(v, bool | int | str) or v is None:
            return v
        if isinstance(v, float):
            return {"float": v.hex()}
        if isinstance(v, bytes):
            return {"data": v.hex()}
        if isinstance(v, self._enum):
            return int(v.raw)
        if isinstance(v, self._struct):
            return self.struct(v)
        if isinstance(v, self._list):
            return [self.value(x) for x in v]
        return {"opaque": type(v).__name__}

    def struct(self, reader: Any) -> dict[str, Any]:
        schema = reader.schema
        node = schema.node.struct
        out: dict[str, Any] = {}
        active = str(reader.which()) if node.discriminantCount else None
        for f in node.fields:
            name = f.name
            if f.discriminantValue != NO_DISCRIMINANT:
                if name != active:
                    continue
                if f.discriminantValue:
                    out[f"which@{node.discriminantOffset}"] = f.discriminantValue
            if str(f.which()) == "group":
                out.update(self.struct(reader._get(name)))
                continue
            kind = str(f.slot.type.which())
            key = str(f.ordinal.explicit)
            if kind == "void":
                continue
            if kind in _POINTER_KINDS:
                if reader._has(name):
                    out[key] = self.value(reader._get(name))
                continue
            value = reader._get(name)
            if kind == "enum" and isinstance(value, str):
                value = schema.fields[name].schema.enumerants[value]
            rendered = self.value(value)
            if rendered != self.value(getattr(f.slot.defaultValue, kind)):
                out[key] = rendered
        return out

    def default(self, field: Any, field_schema: Any) -> Any:
        dv = field.slot.defaultValue
        kind = str(dv.which())
        if kind in ("void", "interface", "anyPointer"):
            return None
        if kind == "list":
            return self.value(dv.list.as_list(field_schema))
        if kind == "struct":
            return self.value(dv.struct.as_struct(field_schema))
        return self.value(getattr(dv, kind))


class _Walker:
    def __init__(self, capnp: Any) -> None:
        self.render = _Renderer(capnp)
        self.nodes: dict[str, dict[str, Any]] = {}

    def walk(self, schema: Any, file: str) -> None:
        node = schema.node
        key = _hex(node.id)
        if key in self.nodes:
            return
        kind = str(node.which())
        prefix = node.displayNamePrefixLength
        display = node.displayName
        out: dict[str, Any] = {
            "id": key,
            "displayName": display,
            "name": display[prefix:],
            "qualname": display.split(":", 1)[1] if ":" in display else display,
            "file": file,
            "kind": kind,
            "scopeId": _hex(node.scopeId),
            "parameters": [p.name for p in node.parameters],
        }
        self.nodes[key] = out
        for nested in node.nestedNodes:
            self.walk(schema.get_nested(nested.name), file)
        if kind == "struct":
            out["struct"] = self._struct(schema, file)
        elif kind == "enum":
            out["enum"] = {"enumerants": [e.name for e in node.enum.enumerants]}
        elif kind == "interface":
            iface = schema.as_interface()
            methods = []
            for m in node.interface.methods:
                methods.append({
                    "name": m.name,
                    "param": _hex(m.paramStructType),
                    "result": _hex(m.resultStructType),
                })
                pyschema = iface.methods[m.name]
                for sub in (pyschema.param_type, pyschema.result_type):
                    if sub.node.scopeId == 0:  # implicit "(a :T) -> (b :U)" structs
                        self.walk(sub, file)
            out["interface"] = {
                "methods": methods,
                "superclasses": [_hex(s.id) for s in node.interface.superclasses],
            }

    def _struct(self, schema: Any, file: str) -> dict[str, Any]:
        node = schema.node
        s = node.struct
        pystruct = schema.as_struct()
        fields = []
        for f in s.fields:
            entry: dict[str, Any] = {
                "name": f.name,
                "codeOrder": f.codeOrder,
                "ordinal": f.ordinal.explicit if str(f.ordinal.which()) == "explicit" else None,
                "discriminantValue": f.discriminantValue,
            }
            field_schema = pystruct.fields[f.name]
            if str(f.which()) == "group":
                entry["group"] = _hex(f.group.typeId)
                self.walk(field_schema.schema, file)
            else:
                kind = str(f.slot.type.which())
                needs_schema = kind in ("list", "struct")
                entry["slot"] = {
                    "offset": f.slot.offset,
                    "type": _type_str(f.slot.type),
                    "pointer": kind in _POINTER_KINDS,
                    "default": self.render.default(
                        f, field_schema.schema if needs_schema else None
                    ),
                    "hadExplicitDefault": bool(f.slot.hadExplicitDefault),
                }
            fields.append(entry)
        return {
            "dataWordCount": s.dataWordCount,
            "pointerCount": s.pointerCount,
            "discriminantCount": s.discriminantCount,
            "discriminantOffset": s.discriminantOffset,
            "isGroup": bool(s.isGroup),
            "fields": fields,
        }


def dump_directory(directory: Path, imports: Sequence[Path] = ()) -> dict[str, Any]:
    """Parse every ``*.capnp`` file of ``directory`` and describe all of their nodes;
    ``imports`` are more directories ``import "/x.capnp"`` searches, after ``directory``.

    Must run in a disposable process: invalid schemas abort the interpreter.
    """
    capnp = importlib.import_module("capnp")
    bundled = os.path.dirname(os.path.dirname(os.path.abspath(str(capnp.__file__))))
    parser = capnp.SchemaParser()
    search = [str(directory), *map(str, imports), bundled]
    walker = _Walker(capnp)
    files: dict[str, dict[str, Any]] = {}
    for path in sorted(directory.glob("*.capnp")):
        module = parser.load(str(path), imports=search)
        node = module.schema.node
        files[path.name] = {"id": _hex(node.id)}
        walker.walk(module.schema, path.name)
    for info in files.values():
        info["nodes"] = []
    for key, n in walker.nodes.items():
        if n["kind"] != "file" and n["file"] in files:
            files[n["file"]]["nodes"].append(key)
    return {"files": files, "nodes": walker.nodes}


def main(argv: list[str]) -> int:
    """Dump each directory in ``argv`` as one JSON line on stdout; see the module docstring."""
    imports: list[Path] = []
    dirs: list[str] = []
    args = iter(argv)
    for arg in args:
        if arg == "-I":
            imports.append(Path(next(args)))
        else:
            dirs.append(arg)
    for arg in dirs:
        try:
            dump = dump_directory(Path(arg), imports)
            line: dict[str, Any] = {"dir": arg, "ok": True, "dump": dump}
        except Exception as exc:  # pycapnp raises KjException, OSError...: report, go on
            line = {"dir": arg, "ok": False, "error": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(line, sort_keys=True) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
