"""STRONG keys: a deterministic state machine over a totally ordered log, kept as CRDT entries.

A subject may declare worknode ids STRONG (``strong_prefixes``: an id starting with one of
them). Their state changes only through the subject's STRONG log (a JetStream stream, see
``broker.strong``), which every replica applies in the log's order:

- A writer applies its op to its state of the key at the version it read (the stream
  sequence of the key's last entry) *as the author* ``STRONG_AUTHOR`` — not as itself: its
  one new dot is ``(STRONG_AUTHOR, m)``, ``m`` above every dot the key holds — and publishes
  the key's whole new entry (``strong_entry``), signed, with a compare-and-set on that
  version. The log refuses it if the key moved on (``ConflictError``).
- Every replica, applying entry ``seq``, renames the new dot to ``(STRONG_AUTHOR, seq)`` and
  puts the entry in place of the key's (``stamp``), marking ``1..seq`` seen. Because the
  compare-and-set held, the key was exactly as the writer saw it, so the entry means the
  same thing everywhere; because the dot is the log's sequence, every replica names the
  write alike.
- Each entry holds its key's whole state, so the stream keeps only the last entry of each
  key (``max_msgs_per_subject`` 1): the stream is its own snapshot (a replica that replays it
  from the start gets every key's last state; the superseded entries it skips are marked
  seen), and it never grows past one entry per STRONG worknode. Entries that write nothing (fences,
  refused entries, entries gone from the stream) only mark their sequence seen, so the
  context of ``STRONG_AUTHOR`` is always ``1..applied`` and nothing else (``next_dot`` of the
  author is ``applied + 1`` on every replica).
- Nothing else touches a STRONG key: local EVENTUAL/LOCAL writes to one are refused, and
  every document joined from a peer (deltas, catch-up answers, evidence, repairs) is joined
  without STRONG keys and without claims of ``STRONG_AUTHOR`` dots (``without_strong``). So a
  STRONG key's state on a replica is a function of the log prefix it applied: two replicas
  at the same log position agree on it, whatever else they received, and a Byzantine peer
  cannot change it by a document — only by writing to the log, as its key may.

STRONG writes are therefore deltas with a total order on top (the design's three-mode
consistency); the rest of the subject merges by the usual join. Pure: no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Final

from broker.crdt import CausalContext, ORMap, Tree
from broker.crdt._ops import Add, Assign, Create, Increment, Move, TreeOp
from broker.crdt._stores import KindStore, MapStore, SetStore, Whole, dots_of
from broker.errors import InvalidArgumentError

__all__ = [
    "STRONG_AUTHOR",
    "is_strong",
    "stamp",
    "strong_entry",
    "strong_entry_problem",
    "without_strong",
]

Dot = tuple[str, int]

STRONG_AUTHOR: Final = "_strong"
"""The author of every STRONG write's dot: the log, not its writer (the writer is the
envelope's signer). No node may take this id."""


def is_strong(key: str, prefixes: Iterable[str]) -> bool:
    """Whether worknode ``key`` is STRONG under ``prefixes`` ("" declares every key)."""
    return any(key.startswith(p) for p in prefixes)


def _op_delta(tree: Tree, op: TreeOp, ts: int) -> tuple[str, ORMap]:
    author = STRONG_AUTHOR
    if isinstance(op, Assign):
        return op.node, tree.assign(author, op.node, op.path, op.value, ts)
    if isinstance(op, Increment):
        return op.node, tree.increment(author, op.node, op.path, op.amount)
    if isinstance(op, Add):
        return op.node, tree.add(author, op.node, op.path, op.element)
    if isinstance(op, Create):
        return op.node, tree.create(author, op.node, op.parent, ts)
    if isinstance(op, Move):
        return op.node, tree.move(author, op.node, op.parent, ts)
    raise InvalidArgumentError(
        f"a STRONG write is an Assign, Increment, Add, Create or Move, not {type(op).__name__}"
    )


def strong_entry(tree: Tree, op: TreeOp, ts: int) -> tuple[str, ORMap]:
    """``(key, entry)``: ``op`` applied to ``tree``'s state of its worknode as
    ``STRONG_AUTHOR`` writes it, as the log carries it — the key's whole new entry, with
    exactly the dots it holds — without changing ``tree`` (the log's order decides whether
    and where it applies). Raises what the op raises for invalid input (nothing changed)."""
    key, delta = _op_delta(tree, op, ts)
    if len(list(dots_of(delta.store))) != 1:
        # The log names each write by its one new dot: a write that adds none (an
        # increment by 0) writes nothing.
        raise InvalidArgumentError(f"a STRONG write to {key!r} that changes nothing")
    store = tree.state.store
    mine = store.get(key) if store else None
    after = ORMap(
        MapStore({key: mine}) if mine is not None else None,
        CausalContext.from_dots(dots_of(mine)) if mine is not None else CausalContext(),
        is_delta=True,
    ).copy()  # a join works in place: never on the tree's own entry
    after.merge(delta)
    entry = after.store.get(key) if after.store else None
    if entry is None:
        raise InvalidArgumentError(f"a STRONG write to {key!r} that leaves it empty")
    return key, ORMap(MapStore({key: entry}), CausalContext.from_dots(dots_of(entry)),
                      is_delta=True)


def strong_entry_problem(entry: ORMap, key: str, seq: int) -> str | None:
    """Why log entry ``entry`` (for worknode ``key``, at sequence ``seq``) cannot apply, or
    None. It must hold ``key``'s entry alone, under dots of ``STRONG_AUTHOR`` only: its new
    one (the highest, once) and the rest below ``seq`` (writes the log ordered before it).
    Anything else is a forged or corrupt entry: every replica refuses it alike."""
    store = entry.store
    if not store or set(store.keys()) != {key}:
        return "foreign_key"
    dots = list(dots_of(store))
    if not dots or any(r != STRONG_AUTHOR for r, _ in dots):
        return "foreign_dot"
    top = max(n for _, n in dots)
    rest = [n for _, n in dots if n != top]
    if len(rest) != len(dots) - 1 or any(n >= seq for n in rest):
        return "dot_range"
    return None


def stamp(entry: ORMap, key: str, seq: int) -> Any:
    """``key``'s entry in log entry ``entry`` (checked by ``strong_entry_problem``) with its
    new dot renamed ``(STRONG_AUTHOR, seq)``: the write's name on every replica. The replica
    puts it in place of the key's entry (not joined: a dot of an earlier write it holds may
    be one this replica marked seen without applying, when the stream had dropped that
    superseded entry)."""
    assert entry.store is not None
    dots = list(dots_of(entry.store))
    top = max(dots, key=lambda d: d[1])
    return _restamp(entry.store[key], top, (STRONG_AUTHOR, seq))


def _restamp(entry: Any, old: Dot, new: Dot) -> Any:
    t = type(entry)
    if t is MapStore:
        out = MapStore()
        for k, child in entry.items():
            out[k] = _restamp(child, old, new)
        return out
    if t is Whole:
        return entry if entry.store is None else Whole(_restamp(entry.store, old, new))
    if t is KindStore:
        kinds = KindStore()
        for kind, store in entry.items():
            kinds[kind] = _restamp(store, old, new)
        return kinds
    if t is SetStore:
        elements = SetStore()
        for element, ds in entry.items():
            elements[element] = tuple(_swap(list(ds), 2, old, new))
        return elements
    if entry is None:
        return None
    return t(_swap(list(entry), entry.STRIDE, old, new))


def _swap(flat: list[Any], stride: int, old: Dot, new: Dot) -> list[Any]:
    for i in range(0, len(flat), stride):
        if flat[i] == old[0] and flat[i + 1] == old[1]:
            flat[i], flat[i + 1] = new
    return flat


def without_strong(doc: ORMap, prefixes: tuple[str, ...]) -> ORMap:
    """``doc`` (from a peer) without STRONG keys and without claims of ``STRONG_AUTHOR``
    dots: a STRONG key changes only by the log (see the module doc). ``doc`` itself when it
    has neither."""
    if not prefixes:
        return doc
    store = doc.store
    drop = [k for k in store if is_strong(k, prefixes)] if store else []
    ctx = doc.context
    claims = STRONG_AUTHOR in ctx._vv or STRONG_AUTHOR in ctx._cloud
    if not drop and not claims:
        return doc
    if drop:
        assert store is not None
        kept = MapStore()
        for k, v in store.items():
            if k not in drop:
                kept[k] = v
        store = kept
    if claims:
        vv = {r: n for r, n in ctx._vv.items() if r != STRONG_AUTHOR}
        cloud = [(r, k) for r, ks in ctx._cloud.items() if r != STRONG_AUTHOR for k in ks]
        ctx = CausalContext(vv, cloud)
    return ORMap(store, ctx, is_delta=doc.is_delta)
