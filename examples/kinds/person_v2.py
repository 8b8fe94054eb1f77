"""Kind ``person``, version 2: ``total`` renamed ``amount`` (a lens) and ``name`` split into
``first`` and ``last`` (new fields filled by a deterministic migration: no lens splits a
value). Version 1 services keep reading and writing ``name`` and ``total``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from broker.kinds import (
    LWW,
    AddField,
    Counter,
    KindModel,
    Migration,
    ORSet,
    RemoveField,
    RenameField,
)


class PersonV2(KindModel, kind="person", version=2, lens=[
    RenameField(("total",), "amount"),
    AddField(("first",), ""),
    AddField(("last",), ""),
    RemoveField(("name",), ""),
]):
    """A person, version 2."""

    first: LWW[str] = ""
    last: LWW[str] = ""
    amount: Counter = 0
    tags: ORSet[str] = frozenset()


def split_name(fields: Mapping[str, Any]) -> dict[str, Any]:
    """``name`` "Ada Lovelace" -> first "Ada", last "Lovelace" (nothing without a name)."""
    name = fields.get("name")
    if not isinstance(name, str) or not name:
        return {}
    first, _, last = name.partition(" ")
    return {"first": first, "last": last}


SPLIT_NAME = Migration("person", 2, "split-name", split_name)
"""Every replica runs it on its own state; they write the same dots and converge."""
