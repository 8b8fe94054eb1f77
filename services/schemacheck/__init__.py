"""Cap'n Proto schema compatibility checker (``worknode schema check``).

Compares ``schemas/*.capnp`` with every frozen release under ``schemas/releases/vN/`` and every
release with each later one, in the spirit of ``buf breaking`` and a schema registry in
FULL_TRANSITIVE mode; or any two schema directories (``worknode schema check OLD NEW``).
pycapnp runs only in the ``_dump`` worker subprocess; the comparison in ``_compare`` is pure
Python. Rule ids and the struct evolution table live in ``_rules``; the frozen-release
history rule in ``_frozen``.
"""

from services.schemacheck._check import (
    CURRENT_LABEL,
    EXIT_BREAKING,
    EXIT_INCOMPLETE,
    EXIT_LINT,
    EXIT_OK,
    CheckReport,
    SchemaLoadError,
    check,
    check_directories,
    check_snapshots,
    dump_directories,
    find_releases,
    load_snapshots,
)
from services.schemacheck._cli import schema
from services.schemacheck._compare import (
    Snapshot,
    Violation,
    compare,
    merge,
    missing_ids,
    release_range,
    transitive_pairs,
)
from services.schemacheck._frozen import (
    FREEZES,
    FrozenHistoryError,
    is_shallow,
    post_freeze_commits,
)
from services.schemacheck._rules import (
    CLOSED,
    EXTENSIBLE,
    RULES,
    STRUCT_EVOLUTION,
    Rule,
    closed_structs,
    evolution,
    union_only_structs,
)

__all__ = [
    "CLOSED",
    "CURRENT_LABEL",
    "EXIT_BREAKING",
    "EXIT_INCOMPLETE",
    "EXIT_LINT",
    "EXIT_OK",
    "EXTENSIBLE",
    "FREEZES",
    "RULES",
    "STRUCT_EVOLUTION",
    "CheckReport",
    "FrozenHistoryError",
    "Rule",
    "SchemaLoadError",
    "Snapshot",
    "Violation",
    "check",
    "check_directories",
    "check_snapshots",
    "closed_structs",
    "compare",
    "dump_directories",
    "evolution",
    "find_releases",
    "is_shallow",
    "load_snapshots",
    "merge",
    "missing_ids",
    "post_freeze_commits",
    "release_range",
    "schema",
    "transitive_pairs",
    "union_only_structs",
]
