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

from pydantic import BaseModel

from broker.crdt import INT64_MAX, INT64_MIN, MAX_FIELD_DEPTH, Atom, validate_atom, validate_key
from broker.errors import InvalidArgumentError
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
    "check_field_name",
    "fits",
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
    def from_json(cls, data: Any, where: str = "field", depth: int = 1) -> FieldSpec:
        """Parse ``to_json``'s form; raises KindDefinitionError naming ``where``.

        Only specs a model could have are accepted (the text may come from any peer):
        whatever this returns, ``KindSchema.to_model`` builds a model of."""
        if depth > MAX_FIELD_DEPTH:
            raise KindDefinitionError(f"{where}: maps nest deeper than {MAX_FIELD_DEPTH}")
        if not isinstance(data, dict):
            raise KindDefinitionError(f"{where}: not an object")
        try:
            crdt = Crdt(data.get("crdt"))
        except (TypeError, ValueError):
            raise KindDefinitionError(f"{where}: unknown crdt {data.get('crdt')!r:.40}") from None
        types_ = data.get("types", [])
        if (not isinstance(types_, list) or any(t not in VALUE_TYPES for t in types_)
                or len(set(types_)) != len(types_)):
            raise KindDefinitionError(f"{where}: unknown value types {types_!r:.80}")
        enum_ = data.get("enum", [])
        if not isinstance(enum_, list) or any(type(v) not in _JSON_SCALARS for v in enum_):
            raise KindDefinitionError(f"{where}: enum must be a list of JSON scalars")
        fields = data.get("fields", {})
        if not isinstance(fields, dict):
            raise KindDefinitionError(f"{where}: fields must be an object")
        default = data.get("default")
        if type(default) not in _JSON_SCALARS:
            raise KindDefinitionError(f"{where}: default must be a JSON scalar")
        spec = cls(
            crdt, tuple(sorted(types_)), tuple(enum_), default, "default" in data,
            tuple(sorted((check_field_name(n, where),
                          cls.from_json(s, f"{where}.{n:.40}", depth + 1))
                         for n, s in fields.items())),
        )
        spec.check(where)
        return spec

    def check(self, where: str) -> None:
        """Refuse a spec no model has: value types that do not fit its CRDT, an enum of
        other types, fields on a non-map, a default a field of its CRDT cannot have or
        that is not one of its values."""
        crdt = self.crdt
        if crdt is Crdt.MAP:
            if self.types or self.enum or self.has_default:
                raise KindDefinitionError(f"{where}: a map has fields only")
            return
        if self.fields:
            raise KindDefinitionError(f"{where}: a {crdt.value} field has no fields")
        if crdt in (Crdt.COUNTER, Crdt.FLAG):
            want = ("int",) if crdt is Crdt.COUNTER else ("bool",)
            if self.types != want or self.enum:
                raise KindDefinitionError(f"{where}: a {crdt.value} holds {want[0]} values")
        elif not self.types:
            raise KindDefinitionError(f"{where}: no value types")
        if self.enum and tuple(sorted({_TOKEN_OF[type(v)] for v in self.enum})) != self.types:
            raise KindDefinitionError(f"{where}: the enum's values are not of its types")
        if crdt is Crdt.SET:
            element_check(self.types, where)
        if self.has_default:
            if crdt is not Crdt.LWW:
                raise KindDefinitionError(f"{where}: a {crdt.value} field has no default")
            if not fits(self, self.default):
                raise KindDefinitionError(
                    f"{where}: default {self.default!r:.40} is not one of its values")
            try:
                validate_atom(self.default)
            except InvalidArgumentError as exc:
                raise KindDefinitionError(f"{where}: default: {exc}") from None


def fits(spec: FieldSpec, value: Any) -> bool:
    """Whether ``value`` is one of the values of a register of ``spec``."""
    if spec.enum:
        return any(type(v) is type(value) and v == value for v in spec.enum)
    token = _TOKEN_OF.get(type(value))
    # an int is a float's value too (pydantic's strict float takes it: ``price: LWW[float]
    # = 0`` is an ordinary default)
    return token in spec.types or (token == "int" and "float" in spec.types)


def check_field_name(name: Any, where: str) -> str:
    """``name`` if a kind's field may be called that: a map key that is a Python identifier,
    not private (``_``) and not a pydantic model's attribute; else KindDefinitionError."""
    try:
        validate_key(name)
    except InvalidArgumentError as exc:  # its text may quote a key of any size: cut it
        raise KindDefinitionError(f"{where}: {exc!s:.120}") from None
    if not name.isidentifier() or name.startswith("_") or hasattr(BaseModel, name):
        raise KindDefinitionError(f"{where}: {name!r:.40} cannot name a field (an identifier "
                                  "not starting with _ nor naming a pydantic attribute)")
    return str(name)


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
