"""Loading the Cap'n Proto wire contract, one isolated parser per wire version.

Each wire version is read from its own schema files with its own ``capnp.SchemaParser``: an
"old node" decodes with the frozen ``schemas/releases/v1`` files, never with the current ones,
so compatibility tests exercise the bytes an old release would really see.

Invariant: only the schema files shipped in ``schemas/`` are ever loaded in-process (a broken
schema aborts the interpreter in pycapnp; the compatibility checker parses candidate schemas in
a subprocess).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from types import ModuleType
from typing import Final

import capnp

from schemas import CURRENT_DIR, CURRENT_VERSION, release_dir

__all__ = [
    "CURRENT_VERSION",
    "KINDS_BY_VERSION",
    "OLDEST_VERSION",
    "SUPPORTED_VERSIONS",
    "WireSchema",
    "load_schema",
]

OLDEST_VERSION: Final = 1
"""The oldest wire version this code reads and can write."""

SUPPORTED_VERSIONS: Final = tuple(range(OLDEST_VERSION, CURRENT_VERSION + 1))

KINDS_BY_VERSION: Final[dict[int, frozenset[int]]] = {
    1: frozenset({1, 2, 3, 4, 5}),
    2: frozenset({1, 2, 3, 4, 5, 6}),
    3: frozenset({1, 2, 3, 4, 5, 6}),  # v3 added healer fields only
}
"""CRDT kind numbers each wire version knows; any other kind is kept opaque."""


@dataclass(frozen=True, slots=True)
class WireSchema:
    """The loaded schema modules of one wire version."""

    version: int
    crdt: ModuleType
    envelope: ModuleType
    rpc: ModuleType
    healer: ModuleType

    @property
    def kinds(self) -> frozenset[int]:
        """CRDT kind numbers this version knows."""
        return KINDS_BY_VERSION[self.version]


@functools.cache
def load_schema(version: int = CURRENT_VERSION) -> WireSchema:
    """The schema of wire ``version``, from its frozen release files (cached)."""
    if version not in SUPPORTED_VERSIONS:
        raise ValueError(f"wire version {version} is not one of {SUPPORTED_VERSIONS}")
    directory = CURRENT_DIR if version == CURRENT_VERSION else release_dir(version)
    parser = capnp.SchemaParser()
    mods = {
        name: parser.load(str(directory / f"{name}.capnp"), imports=[str(directory)])
        for name in ("crdt", "envelope", "rpc", "healer")
    }
    return WireSchema(version, mods["crdt"], mods["envelope"], mods["rpc"], mods["healer"])
