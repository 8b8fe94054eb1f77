"""CRDT field types of a kind, and a field's schema as data.

A kind's fields are ordinary type annotations carrying a CRDT marker (``Annotated``), so
pydantic validates them and mypy checks them::

    title: LWW[str] = ""          # last-writer-wins register of str
    status: MV[str]               # multi-value register: reads as the tuple of live values
    total: Counter                # PN-counter: reads as int, written as an increment
    tags: ORSet[str]              # add-wins set: reads as frozenset, written as elements added
    paid: Flag                    # enable-wins flag: reads as bool
    address: Address              # a nested KindModel: an OR-map of its own fields

``FieldSpec`` is what a field is, as data: its CRDT, the value types it holds, its default
and (for maps) its fields. It is what a schema stores and what compatibility compares; a
service builds a model back from it (``python_type``), so it can read a kind it was not
built with.

Pure: no I/O, no clock.
"""

from __future__ import annotations

import enum
import types
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

from broker.crdt import INT64_MAX, INT64_MIN, Atom
from broker.kinds._errors import KindDefinitionError

__all__ = [
    "LWW",
    "MV",
    "VALUE_TYPES",
    "Counter",
    "Crdt",
    "CrdtMarker",
    "FieldSpec",
    "Flag",
    "ORSet",
    "bottom_of",
    "value_spec",
]

T = TypeVar("T")


class Crdt(enum.Enum):
    """The CRDT of a kind's field. Values are schema constants: never rename."""

    LWW = "lww"
    MV = "mv"
    COUNTER = "counter"
    SET = "set"
    FLAG = "flag"
    MAP = "map"


@dataclass(frozen=True, slots=True)
class CrdtMarker:
    """The ``Annotated`` metadata that says which CRDT a field is."""

    crdt: Crdt


LWW = Annotated[T, CrdtMarker(Crdt.LWW)]
"""A last-writer-wins register of ``T``."""
MV = Annotated[tuple[T, ...], CrdtMarker(Crdt.MV)]
"""A multi-value register of ``T``: reads as every live concurrent value (sorted); a write
sets one value."""
Counter = Annotated[int, CrdtMarker(Crdt.COUNTER)]
"""A PN-counter: reads as its total; a write adds an amount (negative to subtract)."""
ORSet = Annotated[frozenset[T], CrdtMarker(Crdt.SET)]
"""An add-wins set of ``T`` (``str``, ``int`` or ``bytes``): a write adds elements."""
Flag = Annotated[bool, CrdtMarker(Crdt.FLAG)]
"""An enable-wins flag: a write of True enables, False disables (as observed)."""

VALUE_TYPES: dict[str, type] = {
    "null": type(None), "bool": bool, "int": int, "float": float, "str": str, "bytes": bytes,
}
"""Value-type tokens a schema names, and their Python types (the atoms worknode stores)."""
_TOKEN_OF = {v: k for k, v in VALUE_TYPES.items()}
_ELEMENT_TYPES = frozenset({"int", "str", "bytes"})
_JSON_SCALARS = (type(None), bool, int, float, str)


@dataclass(frozen=True, slots=True)
class FieldSpec:
    """One field as data: its CRDT, value types (sorted tokens of ``VALUE_TYPES``), the
    literal values it is limited to (``enum``, empty for any), its default and, for a map,
    its fields (sorted by name)."""

    crdt: Crdt
    types: tuple[str, ...] = ()
    enum: tuple[Atom, ...] = ()
    default: Atom = None
    has_default: bool = False
    fields: tuple[tuple[str, FieldSpec], ...] = ()

    def field(self, name: str) -> FieldSpec | None:
        """The map field ``name`` (None if absent or not a map)."""
        for n, spec in self.fields:
            if n == name:
                return spec
        return None

    def value_type(self) -> Any:
        """The Python type of one value (an element, for a set): a union or a Literal."""
        if self.enum:
            return Literal[self.enum]
        parts = [VALUE_TYPES[t] for t in self.types]
        if len(parts) == 1:
            return parts[0]
        return Union[tuple(parts)]  # noqa: UP007 -- built at run time from data

    def to_json(self) -> dict[str, Any]:
        """The JSON form stored in a schema."""
        out: dict[str, Any] = {"crdt": self.crdt.value}
        if self.types:
            out["types"] = list(self.types)
        if self.enum:
            out["enum"] = list(self.enum)
        if self.has_default:
            out["default"] = self.default
        if self.fields:
            out["fields"] = {n: s.to_json() for n, s in self.fields}
        return out

    @classmethod
    def from_json(cls, data: Any, where: str = "field") -> FieldSpec:
        """Parse ``to_json``'s form; raises KindDefinitionError naming ``where``."""
        if not isinstance(data, dict):
            raise KindDefinitionError(f"{where}: not an object")
        try:
            crdt = Crdt(data.get("crdt"))
        except ValueError:
            raise KindDefinitionError(f"{where}: unknown crdt {data.get('crdt')!r}") from None
        types_ = data.get("types", [])
        if not isinstance(types_, list) or any(t not in VALUE_TYPES for t in types_):
            raise KindDefinitionError(f"{where}: unknown value types {types_!r}")
        enum_ = data.get("enum", [])
        if not isinstance(enum_, list) or any(type(v) not in _JSON_SCALARS for v in enum_):
            raise KindDefinitionError(f"{where}: enum must be a list of JSON scalars")
        fields = data.get("fields", {})
        if not isinstance(fields, dict):
            raise KindDefinitionError(f"{where}: fields must be an object")
        default = data.get("default")
        if type(default) not in _JSON_SCALARS:
            raise KindDefinitionError(f"{where}: default must be a JSON scalar")
        return cls(
            crdt, tuple(sorted(types_)), tuple(enum_), default, "default" in data,
            tuple(sorted((str(n), cls.from_json(s, f"{where}.{n}")) for n, s in fields.items())),
        )


def bottom_of(crdt: Crdt) -> Any:
    """What a field of ``crdt`` reads as before anything was written (LWW and maps have
    none: their default comes from the model)."""
    return {Crdt.MV: (), Crdt.COUNTER: 0, Crdt.SET: frozenset(), Crdt.FLAG: False}.get(crdt)


def value_spec(annotation: Any, where: str) -> tuple[tuple[str, ...], tuple[Atom, ...]]:
    """``(type tokens, literal values)`` of a value annotation: atoms, unions of them, and
    ``Literal`` s of JSON scalars. Raises KindDefinitionError for anything else."""
    origin = get_origin(annotation)
    if origin is Literal:
        values = get_args(annotation)
        if any(type(v) not in _JSON_SCALARS for v in values):
            raise KindDefinitionError(f"{where}: Literal values must be JSON scalars")
        return tuple(sorted({_TOKEN_OF[type(v)] for v in values})), tuple(values)
    if origin is Union or origin is types.UnionType:
        tokens: set[str] = set()
        for arg in get_args(annotation):
            t, e = value_spec(arg, where)
            if e:
                raise KindDefinitionError(f"{where}: a Literal inside a union is not supported")
            tokens.update(t)
        return tuple(sorted(tokens)), ()
    if annotation in _TOKEN_OF:
        return (_TOKEN_OF[annotation],), ()
    raise KindDefinitionError(
        f"{where}: value type {annotation!r} is not one worknode stores "
        f"({', '.join(VALUE_TYPES)}, unions and Literals of them)"
    )


def element_check(tokens: tuple[str, ...], where: str) -> None:
    """Refuse set element types other than str, int and bytes."""
    if not tokens or not set(tokens) <= _ELEMENT_TYPES:
        raise KindDefinitionError(f"{where}: set elements must be str, int or bytes")


INT64_RANGE = (INT64_MIN, INT64_MAX)
"""The range of every stored int."""
