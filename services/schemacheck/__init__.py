"""Cap'n Proto schema compatibility checker (``worknode schema check``).

Compares ``schemas/*.capnp`` with every frozen release under ``schemas/releases/vN/`` and every
release with each later one, in the spirit of ``buf breaking`` and a schema registry in
FULL_TRANSITIVE mode. pycapnp runs only in the ``_dump`` worker subprocess; the comparison in
``_compare`` is pure Python.
"""

from services.schemacheck._check import (
    CURRENT_LABEL,
    CheckReport,
    SchemaLoadError,
    check,
    check_snapshots,
    dump_directories,
    find_releases,
    load_snapshots,
)
from services.schemacheck._cli import schema
from services.schemacheck._compare import (
    RULES,
    Snapshot,
    Violation,
    compare,
    merge,
    missing_ids,
    transitive_pairs,
)

__all__ = [
    "CURRENT_LABEL",
    "RULES",
    "CheckReport",
    "SchemaLoadError",
    "Snapshot",
    "Violation",
    "check",
    "check_snapshots",
    "compare",
    "dump_directories",
    "find_releases",
    "load_snapshots",
    "merge",
    "missing_ids",
    "schema",
    "transitive_pairs",
]
