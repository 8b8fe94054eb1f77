"""Writes on a worknode tree as values: what a replica applies with the fused local writes.

A ``TreeOp`` is data (which worknode, which field, what value), so a writer can build many
cheaply and a replica applies each in one step (``Tree.apply_*``: the mutator and its local
merge in one walk) instead of mutating and then joining the delta back. Arbitrary writes stay
possible as mutator functions ``(tree, replica_id, ts) -> delta``.

Pure: no I/O, no clock (the replica passes the hybrid timestamp in).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

from broker.crdt._atoms import INT64_MAX, INT64_MIN, Atom, Element
from broker.crdt._causal import Batch, ORMap, Path
from broker.crdt._tree import ROOT_ID, Tree

__all__ = ["Add", "Assign", "Create", "Increment", "Move", "TreeOp", "coalesce"]

W = TypeVar("W")


class TreeOp:
    """A write on a tree; ``apply`` changes the tree and returns the delta to ship.

    Like a mutator, it raises (leaving the tree unchanged) for invalid input.
    """

    __slots__ = ()

    def apply(self, tree: Tree, replica_id: str, ts: int) -> ORMap:
        raise NotImplementedError

    def apply_into(self, tree: Tree, replica_id: str, ts: int, into: Batch) -> ORMap | None:
        """``apply`` with the delta joined into ``into``: None when written there directly,
        else the delta, for the caller to join (``Batch.join``)."""
        return self.apply(tree, replica_id, ts)


@dataclass(frozen=True, slots=True)
class Assign(TreeOp):
    """Set a last-writer-wins field of worknode ``node``."""

    node: str
    path: Path
    value: Atom

    def apply(self, tree: Tree, replica_id: str, ts: int) -> ORMap:
        return tree.apply_assign(replica_id, self.node, self.path, self.value, ts)

    def apply_into(self, tree: Tree, replica_id: str, ts: int, into: Batch) -> ORMap | None:
        if type(self) is not Assign:  # a subclass may wrap ``apply``: keep what it does
            return self.apply(tree, replica_id, ts)
        return tree.assign_into(into, replica_id, self.node, self.path, self.value, ts)


@dataclass(frozen=True, slots=True)
class Increment(TreeOp):
    """Add ``amount`` (negative to subtract) to a counter field of worknode ``node``."""

    node: str
    path: Path
    amount: int = 1

    def apply(self, tree: Tree, replica_id: str, ts: int) -> ORMap:
        return tree.apply_increment(replica_id, self.node, self.path, self.amount)

    def apply_into(self, tree: Tree, replica_id: str, ts: int, into: Batch) -> ORMap | None:
        if type(self) is not Increment:  # a subclass may wrap ``apply``: keep what it does
            return self.apply(tree, replica_id, ts)
        return tree.increment_into(into, replica_id, self.node, self.path, self.amount)


@dataclass(frozen=True, slots=True)
class Add(TreeOp):
    """Add ``element`` to a set field of worknode ``node``."""

    node: str
    path: Path
    element: Element

    def apply(self, tree: Tree, replica_id: str, ts: int) -> ORMap:
        return tree.apply_add(replica_id, self.node, self.path, self.element)

    def apply_into(self, tree: Tree, replica_id: str, ts: int, into: Batch) -> ORMap | None:
        if type(self) is not Add:  # a subclass may wrap ``apply``: keep what it does
            return self.apply(tree, replica_id, ts)
        return tree.add_into(into, replica_id, self.node, self.path, self.element)


@dataclass(frozen=True, slots=True)
class Create(TreeOp):
    """Create worknode ``node`` under ``parent``."""

    node: str
    parent: str = ROOT_ID

    def apply(self, tree: Tree, replica_id: str, ts: int) -> ORMap:
        return tree.apply_create(replica_id, self.node, self.parent, ts)


@dataclass(frozen=True, slots=True)
class Move(TreeOp):
    """Move worknode ``node`` under ``parent``."""

    node: str
    parent: str

    def apply(self, tree: Tree, replica_id: str, ts: int) -> ORMap:
        return tree.apply_move(replica_id, self.node, self.parent, ts)


def coalesce(writes: Sequence[W]) -> Iterator[tuple[W | Increment, int]]:
    """``(write, how many writes it stands for)``: runs of consecutive ``Increment`` s of one
    counter become one increment of their sum; every other write stands for itself.

    A run of increments is one increment by the run's total: the same state and the same
    delta as their join, with one dot instead of one per increment (fewer dots to store,
    encode and decode). A run ends at an amount that is not a valid int64 (that write then
    stands alone, to fail by itself) or where the sum would leave int64; if the sum is
    refused as a whole (the counter would overflow), the caller replays the run one by one.
    """
    i, n = 0, len(writes)
    while i < n:
        w = writes[i]
        if not isinstance(w, Increment) or not _amount_ok(w.amount):
            yield w, 1
            i += 1
            continue
        total, j = w.amount, i + 1
        while j < n:
            x = writes[j]
            if (
                not isinstance(x, Increment) or x.node != w.node or x.path != w.path
                or not _amount_ok(x.amount) or not INT64_MIN <= total + x.amount <= INT64_MAX
            ):
                break
            total += x.amount
            j += 1
        yield (w if j == i + 1 else Increment(w.node, w.path, total)), j - i
        i = j


def _amount_ok(amount: object) -> bool:
    return type(amount) is int and INT64_MIN <= amount <= INT64_MAX
