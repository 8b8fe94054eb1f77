"""Typed worknode kinds: pydantic models over CRDT fields, schemas stored as data, lenses
between versions, and deterministic migrations.

Pure: no asyncio, nats, sqlite3 or clock reads (time and identity come in as arguments).
"""

from broker.kinds._compat import RULES, Finding, Rule, check_all, check_new
from broker.kinds._errors import (
    IncompatibleKindError,
    KindDefinitionError,
    KindError,
    KindReadError,
    KindValidationError,
    LensError,
    SchemaFormatError,
    UnknownKindError,
)
from broker.kinds._fields import LWW, MV, Counter, Crdt, FieldSpec, Flag, ORSet
from broker.kinds._lens import (
    AddField,
    Convert,
    Head,
    Hoist,
    LensOp,
    Plunge,
    RemoveField,
    RenameField,
    Wrap,
    lens_from_json,
    lens_to_json,
    map_path,
    translate_document,
    translate_fields,
)
from broker.kinds._migration import Migration, MigrationBatch
from broker.kinds._model import KIND_FIELD, KindInfo, KindModel, KindView, Write, conflicts_of
from broker.kinds._registry import REGISTRY_KIND, Registry
from broker.kinds._schema import SCHEMA_FORMAT, KindSchema

__all__ = [
    "KIND_FIELD",
    "LWW",
    "MV",
    "REGISTRY_KIND",
    "RULES",
    "SCHEMA_FORMAT",
    "AddField",
    "Convert",
    "Counter",
    "Crdt",
    "FieldSpec",
    "Finding",
    "Flag",
    "Head",
    "Hoist",
    "IncompatibleKindError",
    "KindDefinitionError",
    "KindError",
    "KindInfo",
    "KindModel",
    "KindReadError",
    "KindSchema",
    "KindValidationError",
    "KindView",
    "LensError",
    "LensOp",
    "Migration",
    "MigrationBatch",
    "ORSet",
    "Plunge",
    "Registry",
    "RemoveField",
    "RenameField",
    "Rule",
    "SchemaFormatError",
    "UnknownKindError",
    "Wrap",
    "Write",
    "check_all",
    "check_new",
    "conflicts_of",
    "lens_from_json",
    "lens_to_json",
    "map_path",
    "translate_document",
    "translate_fields",
]
