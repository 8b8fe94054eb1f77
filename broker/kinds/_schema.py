"""A kind's schema as data: what the registry stores, and what a service that was not built
with a kind loads to read and write it.

``KindSchema`` holds the kind's name, version, parent, field specs (CRDT, value types,
defaults, nested maps), the lens from the version before and the model's JSON Schema (for
tools; the field specs are what is checked). ``to_json`` is canonical (sorted keys, no
spaces): equal schemas are equal text, so the registry's add-only set holds each once.
``to_model`` builds a ``KindModel`` back from the data.

Pure: no I/O, no clock.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Annotated, Any, Final

from pydantic import create_model

from broker.crdt import INT64_MAX, validate_node_id
from broker.errors import InvalidArgumentError
from broker.kinds._errors import KindDefinitionError, LensError, SchemaFormatError
from broker.kinds._fields import Crdt, CrdtMarker, FieldSpec, check_field_name
from broker.kinds._lens import LensOp, lens_from_json, lens_to_json
from broker.kinds._model import KindInfo, KindModel

__all__ = ["SCHEMA_FORMAT", "KindSchema"]

SCHEMA_FORMAT: Final = 1
"""The version of the stored schema text; a reader refuses (skips) any other."""


@dataclass(frozen=True)
class KindSchema:
    """One version of a kind, as data."""

    name: str
    version: int
    fields: tuple[tuple[str, FieldSpec], ...]
    parent: str | None = None
    lens: tuple[LensOp, ...] = ()
    json_schema: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def ref(self) -> str:
        """``name@version``."""
        return f"{self.name}@{self.version}"

    @classmethod
    def of_model(cls, model: type[KindModel]) -> KindSchema:
        """The schema of a kind model (raises KindDefinitionError for a nested shape)."""
        info = model.__kind__
        if info is None:
            raise KindDefinitionError(f"{model.__name__} is not a kind (no kind= argument)")
        return cls(info.name, info.version, model.__shape__, info.parent, info.lens,
                   model.model_json_schema())

    def to_json(self) -> str:
        """Canonical JSON text (what the registry stores)."""
        return json.dumps({
            "format": SCHEMA_FORMAT,
            "name": self.name,
            "version": self.version,
            "parent": self.parent,
            "fields": {n: s.to_json() for n, s in self.fields},
            "lens": lens_to_json(self.lens),
            "jsonSchema": self.json_schema,
        }, sort_keys=True, separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str | bytes) -> KindSchema:
        """Parse ``to_json``'s text; raises SchemaFormatError for anything else."""
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise SchemaFormatError(f"kind schema is not JSON: {exc}") from None
        except RecursionError:  # a forged text nesting arrays deeper than the parser goes
            raise SchemaFormatError("kind schema is not JSON: nested too deep") from None
        if not isinstance(data, dict):
            raise SchemaFormatError("kind schema is not a JSON object")
        if data.get("format") != SCHEMA_FORMAT:
            raise SchemaFormatError(f"kind schema format {data.get('format')!r} is not "
                                    f"{SCHEMA_FORMAT}")
        name, version, parent = data.get("name"), data.get("version"), data.get("parent")
        try:
            name = validate_node_id(name)
        except InvalidArgumentError as exc:
            raise SchemaFormatError(f"kind schema name: {exc}") from None
        if type(version) is not int or not 1 <= version <= INT64_MAX:
            raise SchemaFormatError(f"kind schema {name}: version must be a positive int")
        if parent is not None and not isinstance(parent, str):
            raise SchemaFormatError(f"kind schema {name}: parent must be text")
        fields, json_schema = data.get("fields"), data.get("jsonSchema", {})
        if not isinstance(fields, dict) or not isinstance(json_schema, dict):
            raise SchemaFormatError(f"kind schema {name}: fields must be an object")
        try:
            specs = tuple(sorted((check_field_name(n, name),
                                  FieldSpec.from_json(s, f"{name}.{n:.40}"))
                                 for n, s in fields.items()))
            lens = lens_from_json(data.get("lens", []))
        except (KindDefinitionError, LensError) as exc:
            raise SchemaFormatError(f"kind schema {name}@{version}: {exc}") from None
        return cls(name, version, specs, parent, lens, json_schema)

    def to_model(self) -> type[KindModel]:
        """A ``KindModel`` of this schema, built at run time."""
        model: type[KindModel] = create_model(
            f"{_camel(self.name)}V{self.version}", __base__=KindModel,
            __cls_kwargs__={"kind": self.name, "version": self.version, "lens": self.lens},
            **_definitions(self.fields, self.name),
        )
        model.__kind__ = KindInfo(self.name, self.version, self.parent, self.lens)
        return model


def _camel(name: str) -> str:
    return "".join(p[:1].upper() + p[1:] for p in name.replace("-", "_").split("_")) or "Kind"


def _definitions(shape: tuple[tuple[str, FieldSpec], ...], owner: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, spec in shape:
        if spec.crdt is Crdt.MAP:
            nested = create_model(f"{_camel(owner)}{_camel(name)}", __base__=KindModel,
                                  **_definitions(spec.fields, f"{owner}_{name}"))
            out[name] = (nested, nested())
            continue
        marker = CrdtMarker(spec.crdt)
        value = spec.value_type()
        if spec.crdt is Crdt.LWW:
            out[name] = (Annotated[value, marker], spec.default if spec.has_default else ...)
        elif spec.crdt is Crdt.MV:
            out[name] = (Annotated[tuple[value, ...], marker], ())  # type: ignore[valid-type]
        elif spec.crdt is Crdt.SET:
            out[name] = (Annotated[frozenset[value], marker], frozenset())  # type: ignore[valid-type]
        elif spec.crdt is Crdt.COUNTER:
            out[name] = (Annotated[int, marker], 0)
        else:
            out[name] = (Annotated[bool, marker], False)
    return out
