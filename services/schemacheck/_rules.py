"""The checker's rule ids and the evolution table: the one place both are written down.

``RULES`` lists every rule id ``worknode schema check`` can report, what it refuses and why
(the README's rule table is checked against it). ``STRUCT_EVOLUTION`` says which structs may
grow; ``evolution`` reads it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Literal

__all__ = [
    "BREAKING",
    "CLOSED",
    "CONTENT_FILE_ID",
    "DEFAULT_EVOLUTION",
    "EXTENSIBLE",
    "LINT",
    "RULES",
    "STRUCT_EVOLUTION",
    "UNION_MEMBERS",
    "Rule",
    "closed_structs",
    "evolution",
    "union_only_structs",
]

BREAKING: Final = "breaking"
"""A finding that breaks a reader of some release: exit code 1."""
LINT: Final = "lint"
"""A finding that breaks nothing yet but makes the next edit risky: shown with ``--lint``."""


@dataclass(frozen=True)
class Rule:
    """One rule: whether it is breaking or lint, what edit it refuses, and why."""

    kind: Literal["breaking", "lint"]
    refuses: str
    why: str


RULES: Mapping[str, Rule] = {
    "FILE_REMOVED": Rule(BREAKING, "a schema file of an older release is missing",
                         "its types and their ids are gone for every reader that knew them"),
    "FILE_ID_CHANGED": Rule(BREAKING, "a file's @0x id changed",
                            "the ids of undeclared nested nodes derive from it"),
    "ID_CHANGED": Rule(BREAKING, "a struct, enum or interface kept its name but got another id",
                       "ids identify types in generic brands, RPC calls and registries"),
    "NODE_RENAMED": Rule(BREAKING, "a type was renamed without an explicit id, so its "
                         "derived id changed",
                         "the id is part of the contract; declare the old @0x id on the "
                         "new name"),
    "NODE_REMOVED": Rule(BREAKING, "a struct, enum or interface of an older release is "
                         "missing (by id)", "older writers still send it"),
    "KIND_CHANGED": Rule(BREAKING, "a node changed kind (struct, enum, interface, const...)",
                         "the encodings of different kinds are unrelated"),
    "GENERIC_PARAMETERS_CHANGED": Rule(
        BREAKING, "generic parameters removed, or added without every user binding them",
        "an unbound parameter reads as AnyPointer: the field's type is lost"),
    "STRUCT_LAYOUT_SHRUNK": Rule(BREAKING, "a struct's data word or pointer count decreased",
                                 "older readers look for fields past the new end"),
    "FIELD_REMOVED": Rule(BREAKING, "a field ordinal of an older release is missing",
                          "its bits would be reused by the next field added"),
    "ORDINAL_CHANGED": Rule(BREAKING, "a field name now has another ordinal",
                            "ordinals, not names, select the bits"),
    "TYPE_CHANGED": Rule(BREAKING, "a field's type changed (element types, type ids, generic "
                         "bindings included; List(T) to List(struct whose @0 is T) allowed)",
                         "the same bits would be read as another type"),
    "OFFSET_CHANGED": Rule(BREAKING, "a field's data or pointer offset changed",
                           "readers would look for it elsewhere"),
    "DEFAULT_CHANGED": Rule(BREAKING, "a field's default value changed",
                            "defaults are XORed into the wire value: every stored value "
                            "changes meaning"),
    "UNION_MEMBERSHIP_CHANGED": Rule(
        BREAKING, "a field moved into or out of a union, or its discriminant value or the "
        "union's discriminant location changed",
        "the discriminant decides which member the bits belong to"),
    "GROUP_CHANGED": Rule(BREAKING, "a field moved out of a group, or into or between groups "
                          "that already existed (wrapping in a new plain group is allowed)",
                          "Cap'n Proto only guarantees a move into a new group"),
    "CLOSED_STRUCT_EXTENDED": Rule(BREAKING, "a field (or union member) was added to a struct "
                                   "the evolution table marks closed",
                                   "readers of a closed struct do not carry unknown fields "
                                   "through every relay path"),
    "ENUMERANT_REMOVED": Rule(BREAKING, "an enumerant ordinal of an older release is missing",
                              "older writers still send its number"),
    "ENUMERANT_ORDINAL_CHANGED": Rule(BREAKING, "an enumerant name now has another ordinal",
                                      "the number on the wire changes meaning"),
    "METHOD_REMOVED": Rule(BREAKING, "a method ordinal of an older release is missing",
                           "older clients still call it"),
    "METHOD_ORDINAL_CHANGED": Rule(BREAKING, "a method name now has another ordinal",
                                   "calls select methods by ordinal"),
    "METHOD_PARAM_TYPE_CHANGED": Rule(BREAKING, "a method's parameter struct changed (id or "
                                      "its fields)", "older clients send the old struct"),
    "METHOD_RESULT_TYPE_CHANGED": Rule(BREAKING, "a method's result struct changed (id or its "
                                       "fields)", "older clients read the old struct"),
    "SUPERCLASS_REMOVED": Rule(BREAKING, "an interface no longer extends one of its "
                               "superclasses", "clients call the superclass methods on it"),
    "ID_MISSING": Rule(LINT, "a file, struct, enum or interface has no explicit @0x id in "
                       "its source", "a later rename or move would change its derived id"),
}
"""Every rule id the checker reports, in the README's order."""

CLOSED: Final = "closed"
"""A closed struct: the checker refuses any addition (readers do not carry unknown fields)."""
EXTENSIBLE: Final = "extensible"
"""An extensible struct: new fields and union members at the next ordinal are allowed."""
UNION_MEMBERS: Final = "union-members"
"""A struct whose union may grow (new members at the next ordinal) and nothing else: no new
field beside the union, none inside an existing member's group."""

DEFAULT_EVOLUTION: Final = EXTENSIBLE
"""Every struct not named in ``STRUCT_EVOLUTION``: the checker's behaviour before the table."""

STRUCT_EVOLUTION: Mapping[int, str] = {
    0x9683EE0CC86303C4: CLOSED,  # crdt.capnp Dot: "Frozen" in its schema comment
    0xB9CF401C11916738: CLOSED,  # crdt.capnp Item: "Frozen" in its schema comment
    0xC2B78EFA0406729F: CLOSED,  # crdt.capnp Context
    0xC8CC41A9C1DB0C1C: CLOSED,  # crdt.capnp SetElement
    0xDF4F8360903A2F38: CLOSED,  # crdt.capnp Entry
    0xA59A13C7B0678D26: CLOSED,  # crdt.capnp Document
    0xB7475CF08E0785CA: UNION_MEMBERS,  # crdt.capnp Value: older readers keep it opaque
    0xAE1158C0A4DD688D: UNION_MEMBERS,  # crdt.capnp Payload: a new kind, kept opaque
    0xDD62CDBA33AD5778: CLOSED,  # rpc.capnp Argument: a client passing results on rebuilds it
}
CONTENT_FILE_ID: Final = 0x910D7BB9102DF3E4
"""worknode's ``crdt.capnp`` (by file id, so other projects' schemas checked with the
``OLD_DIR NEW_DIR`` form are not concerned): replicated content. A struct declared there that
``STRUCT_EVOLUTION`` does not list is closed: a reader that knows a type rebuilds it from its
own objects (a struct a newer ``Value`` member carries, say), so a field added to it later
would be dropped on relay."""
"""Which structs may grow, by struct id (ids survive renames); unlisted ones are
``DEFAULT_EVOLUTION``. This is the only place the checker learns the rule; the README's
"Evolution rules" state the same, and tests/unit/test_future_schema.py proves the readers
honour it.

The rule: a struct is extensible only if every relay path (delta, catch-up state, heal
repair, snapshot) carries what an older reader does not know through unchanged. Replicated
content is rebuilt by older readers from their own objects, so the content structs are
closed (``CLOSED_STRUCT_EXTENDED`` refuses any new field or union member), except the two
unions whose unknown members an older reader keeps whole: ``Value`` (kept as an opaque value)
and ``Payload`` (a new CRDT kind, kept as an opaque store). The other structs (envelope
header, healer and RPC messages) travel point to point and are never relayed: additions are
allowed, and an older reader ignores them.
"""


def evolution(struct_id: int) -> str:
    """``CLOSED`` or ``EXTENSIBLE`` for the struct with ``struct_id``."""
    return STRUCT_EVOLUTION.get(struct_id, DEFAULT_EVOLUTION)


def union_only_structs() -> frozenset[int]:
    """The ids ``STRUCT_EVOLUTION`` marks ``UNION_MEMBERS``."""
    return frozenset(k for k, v in STRUCT_EVOLUTION.items() if v == UNION_MEMBERS)


def closed_structs() -> frozenset[int]:
    """The ids ``STRUCT_EVOLUTION`` marks ``CLOSED``."""
    return frozenset(k for k, v in STRUCT_EVOLUTION.items() if v == CLOSED)
