"""Deterministic migrations: changes a lens cannot express (a split, a computed field), made
so that every replica that runs one independently writes the same dots.

A migration is a pure function from a worknode's stored fields (plain values, as
``Tree.fields`` shows them) to the registers it sets. Its writes carry a *fixed* author and
timestamp instead of the running replica's (the Automerge trick):

- the author is ``mig<migration id hash>-<hash of worknode, field and value>``, and it
  writes once: replicas that compute the same value for a field write the same dot
  ``(author, 1)`` with the same value, so their deltas are equal and joining them is
  idempotent. A replica that computed another value (it saw other data) writes under
  another author; running the migration again once its data agrees replaces that entry (a
  field holding only this migration's entries is rewritten) with the agreed one;
- the timestamp is 0: a migrated value is the oldest possible write, so any application
  write (of any version, before or after) wins over it;
- a field is only written while it holds nothing or only this migration's earlier entries,
  and a worknode whose outputs this replica already wrote is skipped: running a migration
  again writes nothing new, and a value an application wrote is never overwritten.

The migration's delta is joined on each replica locally (``Replica.apply_repair``: durable,
not published): a dot belongs to its signer on the wire, and an author no node holds the key
of must never be sent as a write. Every replica runs it; none needs another's result.

Cost: each value written adds one writer id to the causal context (its version vector), so
a migration's metadata grows with the fields it writes: fine for thousands of worknodes,
heavy for millions (no compaction of migration authors yet).

Pure: no I/O, no clock.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from broker.crdt import Atom, ORMap, Tree, validate_atom
from broker.crdt._stores import KindStore, LWWStore, MapStore
from broker.errors import WorknodeError
from broker.kinds._errors import KindValidationError
from broker.kinds._model import FIELDS_KEY, KIND_FIELD, _map_in

__all__ = ["Migration", "MigrationBatch"]

Compute = Callable[[Mapping[str, Any]], Mapping[str, Atom]]
"""A worknode's stored fields -> ``{field (dotted path): value}`` of the registers to set."""


@dataclass(frozen=True)
class MigrationBatch:
    """One batch of a migration run: its delta, how many worknodes it wrote, and progress
    (worknodes looked at so far, of ``total``)."""

    delta: ORMap
    written: int
    done: int
    total: int


@dataclass(frozen=True)
class Migration:
    """A deterministic migration of kind ``kind``'s worknodes to ``version``; ``name``
    tells migrations of one version apart. ``compute`` must depend on its argument alone."""

    kind: str
    version: int
    name: str
    compute: Compute

    @property
    def id(self) -> str:
        """``kind@version/name``."""
        return f"{self.kind}@{self.version}/{self.name}"

    @property
    def prefix(self) -> str:
        """The start of every author id of this migration."""
        return "mig" + hashlib.blake2b(self.id.encode(), digest_size=5).hexdigest() + "-"

    def author(self, node: str, path: tuple[str, ...], value: Atom) -> str:
        """The fixed author of writing ``value`` to ``path`` of ``node``: equal writes, equal
        author (each author writes once: its one dot is ``(author, 1)``)."""
        text = json.dumps([node, list(path), _jsonable(value)], sort_keys=True,
                          separators=(",", ":"))
        return self.prefix + hashlib.blake2b(text.encode(), digest_size=12).hexdigest()

    def node_delta(self, tree: Tree, node: str) -> ORMap | None:
        """The migration's delta for one worknode (None: nothing to write)."""
        record: Any = (tree.state.store or {}).get(node)
        fields = _map_in(record, (FIELDS_KEY,), (), {})
        if fields is None or _register(fields.get(KIND_FIELD)) != self.kind:
            return None
        try:
            wanted = self.compute(tree.fields(node))
            outputs = sorted((tuple(k.split(".")), validate_atom(v)) for k, v in wanted.items())
        except WorknodeError as exc:
            raise KindValidationError(f"migration {self.id} on {node}: {exc}",
                                      field="", reason=str(exc)) from None
        except Exception as exc:  # the application's function: whatever it raises
            raise KindValidationError(
                f"migration {self.id} on {node}: {type(exc).__name__}: {exc}",
                field="", reason=f"{type(exc).__name__}: {exc}") from None
        out: ORMap | None = None
        context = tree.state.context
        for path, value in outputs:
            author = self.author(node, path, value)
            if context.max_counter(author) or not self._writable(fields, path):
                continue  # written (or seen) here already; or an application's value
            # One author per write, so the delta depends on nothing but (node, path, value)
            # and what it replaces here: replicas agreeing on a value write the same dot.
            delta = tree.state.assign(author, (node, FIELDS_KEY, *path), value, 0)
            if out is None:
                out = delta
            else:
                out.merge(delta)
        return out

    def _writable(self, fields: MapStore, path: tuple[str, ...]) -> bool:
        parent = _map_in(fields, path[:-1], (), {})
        entry = parent.get(path[-1]) if parent is not None else None
        if entry is None:
            return True
        if type(entry) is not LWWStore:
            return False
        return all(e[0].startswith(self.prefix) for e in entry.entries())

    def batches(self, tree: Tree, batch_size: int = 1000) -> Iterator[MigrationBatch]:
        """The migration over every worknode of the tree, ``batch_size`` worknodes a batch,
        in id order (for progress on large subjects)."""
        nodes = sorted(tree.nodes())
        batch_size = max(1, batch_size)
        for start in range(0, len(nodes), batch_size):
            out = ORMap(is_delta=True)
            written = 0
            for node in nodes[start:start + batch_size]:
                delta = self.node_delta(tree, node)
                if delta is not None:
                    out.merge(delta)
                    written += 1
            yield MigrationBatch(out, written, min(start + batch_size, len(nodes)), len(nodes))

    def delta(self, tree: Tree) -> ORMap:
        """The whole migration's delta (every batch joined)."""
        out = ORMap(is_delta=True)
        for batch in self.batches(tree):
            out.merge(batch.delta)
        return out


def _register(entry: Any) -> Any:
    if type(entry) is KindStore:
        entry = entry.get(LWWStore.KIND)
    if type(entry) is not LWWStore:
        return None
    return max(entry.entries(), key=lambda e: (e[2], e[0]))[3]


def _jsonable(value: Atom) -> Any:
    if isinstance(value, bytes):
        return {"bytes": value.hex()}
    if isinstance(value, float):
        return {"float": repr(value)}
    return value
