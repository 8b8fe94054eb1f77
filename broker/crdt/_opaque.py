"""Opaque stores: CRDT kinds a reader's wire version does not know, kept and passed on.

During a rolling upgrade a node on an older release receives stores of kinds added later.
Every kind is a *dot function* on the wire (dot -> payload), so the old node can still join
such a store by the dot rule (a dot survives if both sides hold it, or one holds it and the
other's context has not seen it) without understanding its payloads, and pass each payload on
exactly as it arrived. That keeps the old node's causal context honest: it never claims to have
seen a dot whose content it dropped, so a newer node joining the old node's state loses nothing.

Entries are ``(replica, counter, payload bytes)``; ``KIND`` is the wire kind number. One
subclass per kind number, so two unknown kinds under one map key stay apart.

Pure: no I/O.
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar

from broker.crdt._context import CausalContext
from broker.crdt._stores import _JOIN, _DotFun, _join_fun

__all__ = ["OpaqueStore", "OpaqueValue", "opaque_store_class"]


class OpaqueStore(_DotFun):
    """A dot-function store of unknown kind ``KIND``: entries ``(replica, counter, payload)``
    where ``payload`` is the payload's wire bytes, kept unchanged."""

    __slots__ = ()
    STRIDE = 3
    KIND: ClassVar[int]  # type: ignore[assignment]


class OpaqueValue(tuple[int, int]):
    """What ``value()`` shows for an opaque store: ``(kind number, number of dots)``."""

    __slots__ = ()

    @property
    def kind(self) -> int:
        """The wire kind number this release does not know."""
        return self[0]


@functools.cache
def opaque_store_class(kind: int) -> type[OpaqueStore]:
    """The ``OpaqueStore`` subclass for wire kind number ``kind`` (one class per number)."""
    cls = type(f"OpaqueStore{kind}", (OpaqueStore,), {"__slots__": (), "KIND": kind})

    def join(
        a: Any, b: Any, ca: CausalContext, cb: CausalContext, full: bool, keep: bool, depth: int
    ) -> Any:
        return _join_fun(cls, a, b, ca, cb)

    _JOIN[cls] = join
    return cls
