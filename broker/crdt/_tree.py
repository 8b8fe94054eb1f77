"""The worknode tree: one per subject, stored as an OR-map.

Layout of the underlying ``ORMap`` (this is also what travels on the wire)::

    {node_id: {"parent": LWW register holding the parent's id,
               "fields": OR-map of the worknode's CRDT fields}}

The root (``ROOT_ID``) is implicit: it always exists, has no record, and cannot be moved or
deleted. Children are *derived* from parent registers rather than kept in a second OR-set:
one source of truth means a worknode can never be listed under two parents.

Read rule (deterministic, so every replica that has merged the same deltas shows the same
tree, and no reader ever sees a cycle):

1. A worknode is visible iff its record is non-empty. A record without a parent register
   (a field written concurrently with the worknode's deletion survives, add-wins) hangs
   under the root.
2. Parent edges are applied in the order of the winning parent write's
   ``(hybrid time, replica id, node id)``, oldest first. An edge whose parent is not visible
   (deleted concurrently) attaches the worknode to the root instead; an edge that would close
   a cycle with the edges applied before it is the later concurrent move and is ignored: the
   worknode attaches to the root. This is the spirit of Kleppmann et al.'s replicated move
   operation (later conflicting moves lose), reading only the last move of each worknode.

Deleting a worknode removes its subtree as observed by the deleter; children created
concurrently elsewhere survive and attach to the root by rule 2.

Pure: no I/O, no clock.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any, Final

from broker.crdt._atoms import Atom, Element
from broker.crdt._causal import Batch, ORMap, Path
from broker.crdt._context import _MEMO_LIMIT, Dot
from broker.crdt._stores import (
    MAX_NESTING_DEPTH,
    KindStore,
    LWWStore,
    MapStore,
    Whole,
    dots_of,
    value_of,
)
from broker.errors import (
    InvalidNodeIdError,
    NestingDepthError,
    TreeError,
    UnknownNodeError,
)

__all__ = ["MAX_FIELD_DEPTH", "MAX_NODE_ID_LENGTH", "ROOT_ID", "Tree", "validate_node_id"]

ROOT_ID: Final = "root"
MAX_NODE_ID_LENGTH: Final = 128
MAX_FIELD_DEPTH: Final = MAX_NESTING_DEPTH - 2
"""Field paths nest this deep: the tree itself uses two of the document's map levels."""

_PARENT = "parent"
_FIELDS = "fields"
_NODE_ID = re.compile(rf"[A-Za-z0-9_-]{{1,{MAX_NODE_ID_LENGTH}}}")


_valid_node_ids: set[str] = set()  # memo of ids already checked (the root excluded)


def validate_node_id(node_id: object, *, allow_root: bool = False) -> str:
    """Return ``node_id`` if valid (a subject-safe token), else raise InvalidNodeIdError."""
    if type(node_id) is str and node_id in _valid_node_ids:
        return node_id
    if not isinstance(node_id, str) or _NODE_ID.fullmatch(node_id) is None:
        raise InvalidNodeIdError(
            f"invalid worknode id {node_id!r}: need 1-{MAX_NODE_ID_LENGTH} characters "
            "from [A-Za-z0-9_-]"
        )
    if node_id == ROOT_ID and not allow_root:
        raise InvalidNodeIdError(f"{ROOT_ID!r} is the implicit root and is reserved")
    if type(node_id) is str and node_id != ROOT_ID:
        if len(_valid_node_ids) >= _MEMO_LIMIT:
            _valid_node_ids.clear()
        _valid_node_ids.add(node_id)
    return node_id


def _parent_claim(record: Any) -> tuple[int, str, str]:
    """``(hlc, writer, parent_id)`` of the winning parent write, or a root claim."""
    if type(record) is not MapStore:
        return (-1, "", ROOT_ID)
    reg = record.get(_PARENT)
    if type(reg) is KindStore:
        reg = reg.get(LWWStore.KIND)
    if type(reg) is not LWWStore:
        return (-1, "", ROOT_ID)
    best = max(reg.entries(), key=lambda e: (e[2], e[0]))
    parent = best[3]
    return (best[2], best[0], parent if isinstance(parent, str) else ROOT_ID)


class Tree:
    """A tree of worknodes over one ``ORMap`` state. Mutators return ``ORMap`` deltas."""

    __slots__ = ("state",)

    def __init__(self, state: ORMap | None = None) -> None:
        self.state = state if state is not None else ORMap()

    def merge(self, delta: ORMap) -> None:
        """Join a delta (or another replica's state) into this tree."""
        self.state.merge(delta)

    # -- reading -------------------------------------------------------------------------

    def parents(self) -> dict[str, str]:
        """``{node_id: resolved parent id}`` for every visible worknode (see module doc)."""
        store = self.state.store or {}
        claims = sorted(
            ((*_parent_claim(rec), nid) for nid, rec in store.items()),
        )
        resolved: dict[str, str] = {}
        for _, _, parent, nid in claims:
            if parent != ROOT_ID and (parent not in store or self._reaches(resolved, parent, nid)):
                parent = ROOT_ID
            resolved[nid] = parent
        return resolved

    @staticmethod
    def _reaches(resolved: dict[str, str], start: str, target: str) -> bool:
        """Whether ``target`` is ``start`` or an ancestor of it in the edges applied so far."""
        cur: str | None = start
        steps = 0
        while cur is not None and cur != ROOT_ID:
            if cur == target:
                return True
            cur = resolved.get(cur)
            steps += 1
            if steps > len(resolved) + 1:  # unreachable while edges stay acyclic; a guard
                return True
        return False

    def nodes(self) -> frozenset[str]:
        """Ids of the visible worknodes (the root excluded)."""
        return frozenset(self.state.store or ())

    def __contains__(self, node_id: object) -> bool:
        return node_id == ROOT_ID or (bool(self.state.store) and node_id in self.state.store)

    def parent(self, node_id: str) -> str:
        """The resolved parent of a visible worknode."""
        self._require(node_id)
        return self.parents()[node_id]

    def children(self, node_id: str) -> list[str]:
        """Sorted ids of the worknodes whose resolved parent is ``node_id``."""
        if node_id not in self:
            raise UnknownNodeError(f"no worknode {node_id!r}")
        return sorted(n for n, p in self.parents().items() if p == node_id)

    def descendants(self, node_id: str) -> list[str]:
        """``node_id``'s subtree below it, breadth first."""
        kids: dict[str, list[str]] = {}
        for n, p in sorted(self.parents().items()):
            kids.setdefault(p, []).append(n)
        out: list[str] = []
        frontier = [node_id]
        while frontier:
            nxt = [c for n in frontier for c in kids.get(n, ())]
            out.extend(nxt)
            frontier = nxt
        return out

    def fields(self, node_id: str) -> dict[str, Any]:
        """A worknode's fields as plain values."""
        self._require(node_id)
        rec = self.state.store[node_id]
        fields = rec.get(_FIELDS) if type(rec) is MapStore else None
        if type(fields) is KindStore:
            fields = fields.get(MapStore.KIND)
        return value_of(fields, 3) or {}

    def walk(self) -> Iterator[tuple[int, str]]:
        """``(depth, node_id)`` for every visible worknode, depth first, children sorted."""
        kids: dict[str, list[str]] = {}
        for n, p in sorted(self.parents().items()):
            kids.setdefault(p, []).append(n)
        stack = [(1, n) for n in reversed(kids.get(ROOT_ID, []))]
        while stack:
            depth, n = stack.pop()
            yield depth, n
            stack.extend((depth + 1, c) for c in reversed(kids.get(n, [])))

    # -- delta-mutators ------------------------------------------------------------------

    def create(self, replica_id: str, node_id: str, parent: str, ts: int) -> ORMap:
        """Delta creating worknode ``node_id`` under ``parent``."""
        validate_node_id(node_id)
        if node_id in self:
            raise TreeError(f"worknode {node_id!r} exists; move it instead")
        self._require(parent, allow_root=True)
        return self.state.assign(replica_id, (node_id, _PARENT), parent, ts)

    def move(self, replica_id: str, node_id: str, new_parent: str, ts: int) -> ORMap:
        """Delta moving ``node_id`` under ``new_parent``.

        Refused if, as observed here, ``new_parent`` is ``node_id`` or one of its
        descendants. Concurrent moves elsewhere can still conflict; reads resolve that.
        """
        self._require(node_id)
        self._require(new_parent, allow_root=True)
        if new_parent == node_id or new_parent in self.descendants(node_id):
            raise TreeError(f"moving {node_id!r} under {new_parent!r} would form a cycle")
        return self.state.assign(replica_id, (node_id, _PARENT), new_parent, ts)

    def delete(self, node_id: str) -> ORMap:
        """Delta deleting ``node_id`` and its subtree, as observed here."""
        self._require(node_id)
        doomed = [node_id, *self.descendants(node_id)]
        store = self.state.store
        dots: list[Dot] = []
        delta_store = MapStore()
        for n in doomed:
            dots.extend(dots_of(store[n], 2))
            delta_store[n] = Whole(None)
        return self.state._delta(delta_store, dots)

    def assign(self, replica_id: str, node_id: str, path: Path, value: Atom, ts: int) -> ORMap:
        """Delta setting a last-writer-wins field."""
        return self.state.assign(replica_id, self._field_path(node_id, path), value, ts)

    # -- fused local writes: the mutator and its merge here in one step ---------------------

    def apply_create(self, replica_id: str, node_id: str, parent: str, ts: int) -> ORMap:
        """``create`` merged here; returns its delta."""
        validate_node_id(node_id)
        if node_id in self:
            raise TreeError(f"worknode {node_id!r} exists; move it instead")
        self._require(parent, allow_root=True)
        return self.state.apply_assign(replica_id, (node_id, _PARENT), parent, ts)

    def apply_move(self, replica_id: str, node_id: str, new_parent: str, ts: int) -> ORMap:
        """``move`` merged here; returns its delta."""
        d = self.move(replica_id, node_id, new_parent, ts)
        self.state.merge(d)
        return d

    def apply_assign(
        self, replica_id: str, node_id: str, path: Path, value: Atom, ts: int
    ) -> ORMap:
        """``assign`` merged here, in one walk; returns its delta."""
        return self.state.apply_assign(replica_id, self._field_path(node_id, path), value, ts)

    def apply_increment(
        self, replica_id: str, node_id: str, path: Path, amount: int = 1
    ) -> ORMap:
        """``increment`` merged here, in one walk; returns its delta."""
        return self.state.apply_increment(replica_id, self._field_path(node_id, path), amount)

    def apply_add(self, replica_id: str, node_id: str, path: Path, element: Element) -> ORMap:
        """``add`` merged here, in one walk; returns its delta."""
        return self.state.apply_add(replica_id, self._field_path(node_id, path), element)

    def assign_into(
        self, into: Batch, replica_id: str, node_id: str, path: Path, value: Atom, ts: int
    ) -> ORMap | None:
        """``apply_assign`` with its delta joined into ``into``: None when written there
        directly, else the delta to join (``Batch.join``)."""
        return self.state.apply_assign(
            replica_id, self._field_path(node_id, path), value, ts, into)

    def increment_into(
        self, into: Batch, replica_id: str, node_id: str, path: Path, amount: int
    ) -> ORMap | None:
        """``apply_increment`` joined into ``into`` (as ``assign_into``)."""
        return self.state.apply_increment(
            replica_id, self._field_path(node_id, path), amount, into)

    def add_into(
        self, into: Batch, replica_id: str, node_id: str, path: Path, element: Element
    ) -> ORMap | None:
        """``apply_add`` joined into ``into`` (as ``assign_into``)."""
        return self.state.apply_add(replica_id, self._field_path(node_id, path), element, into)

    def assign_multi(self, replica_id: str, node_id: str, path: Path, value: Atom) -> ORMap:
        """Delta setting a multi-value field."""
        return self.state.assign_multi(replica_id, self._field_path(node_id, path), value)

    def increment(self, replica_id: str, node_id: str, path: Path, amount: int = 1) -> ORMap:
        """Delta adding ``amount`` to a counter field."""
        return self.state.increment(replica_id, self._field_path(node_id, path), amount)

    def add(self, replica_id: str, node_id: str, path: Path, element: Element) -> ORMap:
        """Delta adding ``element`` to a set field."""
        return self.state.add(replica_id, self._field_path(node_id, path), element)

    def discard(self, replica_id: str, node_id: str, path: Path, element: Element) -> ORMap:
        """Delta removing ``element`` from a set field."""
        return self.state.discard(replica_id, self._field_path(node_id, path), element)

    def remove_field(self, node_id: str, path: Path) -> ORMap:
        """Delta removing a field (every kind under its name) as observed."""
        return self.state.remove(self._field_path(node_id, path))

    # -- helpers -------------------------------------------------------------------------

    def _require(self, node_id: str, *, allow_root: bool = False) -> None:
        validate_node_id(node_id, allow_root=allow_root)
        if node_id not in self:
            raise UnknownNodeError(f"no worknode {node_id!r}")

    def _field_path(self, node_id: str, path: Path) -> tuple[str, ...]:
        self._require(node_id)
        if isinstance(path, str):
            path = (path,)
        if len(path) > MAX_FIELD_DEPTH:
            raise NestingDepthError(
                f"field path of {len(path)} keys is deeper than MAX_FIELD_DEPTH={MAX_FIELD_DEPTH}"
            )
        return (node_id, _FIELDS, *path)
