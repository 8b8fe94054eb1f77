"""The sequential model of a subject's tree, computed from the ACKNOWLEDGED writes alone.

It never calls a CRDT mutator or join: causality comes from the simulator's ghost histories
(``seen``: the ids of the writes whose effects the writer's replica had joined when it wrote,
tracked by the simulator beside the bytes, never read from a causal context). Rules, from the
documented semantics of the kinds:

- a dotted write ``w`` is **dead** iff some acknowledged write ``r`` with ``w`` in
  ``r.seen`` removes it: a worknode delete covering ``w``'s worknode, a field removal whose
  path is a prefix of ``w``'s, a later assignment of the same LWW/MV register or parent, a
  later enable or a disable of the same flag, a later add or a discard of the same element,
  a later increment of the same counter by the same writer (one entry per writer);
- a **counter** is the sum over writers of the cumulative amount of their live increment:
  an increment carries its writer's previous increment's cumulative amount unless the writer
  had seen that one removed when it wrote (a removal observed there resets the entry);
- an **LWW register** shows the live write with the highest ``(hlc, writer)``; an **MV
  register** the values of its live writes; a **set** the elements with a live add; a **flag**
  is on iff an enable is live;
- **tree**: a worknode is visible iff a dotted write under it is live; ``value()`` is
  ``{node: {"parent": ..., "fields": {...}}}`` with empty sets, off flags and empty maps
  absent. Cycles and parents are checked on the replica (``tree_problems``).

The model is independent of the CRDT code, so a wrong join (a counter counting a writer
twice, a lost write) shows as a difference.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from broker.crdt import ROOT_ID, Tree

__all__ = ["Write", "expected_value", "normal", "tree_problems"]

PARENT = ("parent",)


@dataclass(frozen=True, slots=True)
class Write:
    """One acknowledged write: ``path`` is the full document path ``(node, "fields", ...)`` or
    ``(node, "parent")``; ``kind`` one of lww, mv, inc, add, discard, enable, disable,
    rmfield, delete; ``arg`` the value, amount, element, or (delete) the doomed node ids."""

    wid: int
    writer: str
    kind: str
    path: tuple[str, ...]
    arg: Any
    hlc: int
    seen: frozenset[int]

    def short(self) -> str:
        """One line for a history."""
        return f"#{self.wid} {self.writer} {self.kind} {'/'.join(self.path)} {self.arg!r}"


def _kills(r: Write, w: Write) -> bool:
    """Whether ``r`` (having seen ``w``) removes ``w``'s entry."""
    if r.kind == "delete":
        return w.path[0] in r.arg
    if r.kind == "rmfield":
        return w.path[: len(r.path)] == r.path
    if r.path != w.path:
        return False
    if w.kind == "lww":
        return r.kind == "lww"
    if w.kind == "mv":
        return r.kind == "mv"
    if w.kind == "enable":
        return r.kind in ("enable", "disable")
    if w.kind == "add":
        return r.kind in ("add", "discard") and r.arg == w.arg
    if w.kind == "inc":
        return r.kind == "inc" and r.writer == w.writer
    return False


_DOTTED = frozenset({"lww", "mv", "inc", "add", "enable"})
_REMOVERS = frozenset({"delete", "rmfield", "discard", "disable"})


def expected_value(writes: Iterable[Write]) -> dict[str, Any]:
    """The tree's ``value()`` (normal form) the acknowledged ``writes`` imply."""
    ws = list(writes)
    removers = [r for r in ws if r.kind in _REMOVERS]
    by_path: dict[tuple[str, ...], list[Write]] = defaultdict(list)
    for w in ws:
        by_path[w.path].append(w)

    def removed_by(w: Write, among: Iterable[Write]) -> bool:
        return any(w.wid in r.seen and _kills(r, w) for r in among)

    dead: set[int] = set()
    for w in ws:
        if w.kind not in _DOTTED:
            continue
        if removed_by(w, removers) or removed_by(
            w, (x for x in by_path[w.path] if x is not w and x.kind not in _REMOVERS)
        ):
            dead.add(w.wid)
    out: dict[str, Any] = {}

    def put(path: tuple[str, ...], value: Any) -> None:
        cur = out
        for p in path[:-1]:
            cur = cur.setdefault(p, {})
        cur[path[-1]] = value

    for path, group in sorted(by_path.items()):
        live = [w for w in group if w.kind in _DOTTED and w.wid not in dead]
        if not live:
            continue
        kind = live[0].kind
        if kind == "lww":
            put(path, max(live, key=lambda w: (w.hlc, w.writer)).arg)
        elif kind == "mv":
            put(path, tuple(sorted(w.arg for w in live)))
        elif kind == "add":
            put(path, frozenset(w.arg for w in live))
        elif kind == "enable":
            put(path, True)
        elif kind == "inc":
            put(path, sum(_cumulative(w, group, removers) for w in live))
    result: dict[str, Any] = normal(out)
    return result


def _cumulative(w: Write, group: list[Write], removers: list[Write]) -> int:
    """The amount ``w``'s counter entry holds: its own plus, while its writer had not seen the
    previous one removed, the previous one's cumulative amount."""
    mine = sorted(
        (x for x in group if x.kind == "inc" and x.writer == w.writer), key=lambda x: x.wid
    )
    total = 0
    prev: Write | None = None
    for x in mine:
        if x.wid > w.wid:
            break
        if prev is not None and any(
            r.wid in x.seen and prev.wid in r.seen and _kills(r, prev) for r in removers
        ):
            total = 0  # the writer had seen its entry removed: the new entry starts afresh
        total += x.arg
        prev = x
    return total


def normal(value: Any) -> Any:
    """Normal form: empty sets, off flags, empty maps dropped; MV tuples sorted."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            n = normal(v)
            if n is None or n is False or n == {} or n == frozenset() or n == ():
                continue
            out[k] = n
        return out
    if isinstance(value, tuple):
        return tuple(sorted(value, key=repr))
    return value


def tree_problems(tree: Tree) -> list[str]:
    """Tree invariants on a replica: one parent each, visible or the root, no cycle."""
    parents = tree.parents()
    out = []
    for nid, p in sorted(parents.items()):
        if p != ROOT_ID and p not in parents:
            out.append(f"{nid} hangs under invisible {p}")
        seen = {nid}
        cur = p
        while cur != ROOT_ID:
            if cur in seen:
                out.append(f"cycle through {nid}")
                break
            seen.add(cur)
            cur = parents.get(cur, ROOT_ID)
    return out
