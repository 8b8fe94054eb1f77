"""Reconciliation of two Merkle trees as a pure state machine: events in, requests out.

Everything that decides what to ask next lives here; the healer only moves requests and
answers between this object and two replicas. Rules:

- the roots (with item counts and, optionally, version vectors) come in first. Equal roots
  and equal counts end the reconciliation with no request: version vectors are reported, not
  trusted, because a lost delta, a restored backup or bit rot leaves vectors equal while the
  items differ, and two replicas can have seen different dots yet hold the same items;
- a root may come with the values of the top ``k`` levels below it (``RootInfo.levels``,
  every node of those levels, packed): when both sides sent ``k`` levels, the descent starts
  at level ``k`` and saves ``k`` round trips (two levels of fan-out 16 are 272 values, 2 KB
  at 8 bytes a value). When only one side sent them, one round asks the other side alone
  for level ``k``, and the descent goes on from there;
- otherwise each round asks both sides, in one request per side, for the children of every
  node whose values differed in the previous round, and descends only where the children
  differ. Once the differing nodes are leaves, one last round asks for their items. So a
  reconciliation issues at most ``depth + 1 - k`` request rounds after the roots, whatever
  the number of differing nodes;
- the last round may ask for the leaves' item digests alone, cut to a few low bytes, instead
  of ``(key, digest)`` items: keys are most of a leaf's bytes, and only the few unmatched
  items need one. The result then names unmatched items per side (``Diff.left_items``),
  which the replicas resolve to keys when asked for their states;
- every round goes exactly one level down (but the one that fetches the top levels a side
  did not send), so the machine ends after at most ``depth + 1`` rounds even when a side
  answers inconsistently (a concurrent write changed a subtree between
  rounds). It never retries: a node that differed but whose children (or leaf items) turn
  out equal is reported in ``Diff.inconsistent``, and the caller decides whether to run
  another reconciliation;
- answers must be well formed (exactly the children or leaves asked for, node values as
  non-empty bytes, items as ``(str, bytes)``, no key twice on one side): anything else is a
  protocol error from the replica and raises InvalidArgumentError. Node values are compared
  as opaque bytes, so a transport may send them truncated (``width`` bytes, the low-order
  ones: ``MerkleTree.level_values``) as long as both sides truncate alike; a missed
  difference then shows as unequal (full, 32-byte) roots afterwards, and the caller runs
  again with full values. An answer may be a mapping ``{child prefix: value}`` or the packed
  form: the children of every asked prefix, in order, ``width`` bytes each.

Pure: no I/O, no clock.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeAlias

from broker.errors import InvalidArgumentError
from broker.merkle._tree import (
    DEFAULT_DEPTH,
    DEFAULT_FANOUT,
    HASH_SIZE,
    TREE_SCHEME,
    MerkleTree,
    Prefix,
    validate_shape,
)

__all__ = [
    "Diff",
    "LeafRequest",
    "NodeRequest",
    "Reconciliation",
    "Request",
    "RootInfo",
    "Side",
    "diff",
    "digits",
    "node_answer",
]


def digits(index: int, level: int, bits: int) -> Prefix:
    """The prefix of the level-``level`` node with index ``index`` (``bits`` per digit)."""
    mask = (1 << bits) - 1
    return tuple((index >> (bits * (level - 1 - i))) & mask for i in range(level))


class Side(enum.Enum):
    """Which of the two replicas a request is for or an answer came from."""

    LEFT = "left"
    RIGHT = "right"


@dataclass(frozen=True)
class RootInfo:
    """What a replica reports first about its tree: root, item count, shape, version vector,
    and optionally the values of the top levels.

    ``fanout`` and ``depth`` travel with the root so that a reconciliation of trees with
    different shapes is refused instead of comparing unrelated nodes; ``scheme`` likewise
    (``TREE_SCHEME``: how item values are defined). ``version_vector`` maps replica ids to
    counters (absent entries count as 0) or is None when unknown. ``levels[l - 1]`` holds
    the values of every level-``l`` node, in index order, ``width`` bytes each (levels
    ``1..len(levels)``; empty: none sent).
    """

    root: bytes
    count: int
    fanout: int = DEFAULT_FANOUT
    depth: int = DEFAULT_DEPTH
    version_vector: Mapping[str, int] | None = field(default=None, compare=False)
    levels: tuple[bytes, ...] = field(default=(), compare=False)
    width: int = field(default=HASH_SIZE, compare=False)
    scheme: int = TREE_SCHEME

    def __post_init__(self) -> None:
        if not isinstance(self.root, bytes) or not self.root:
            raise InvalidArgumentError(f"a root is non-empty bytes, got {self.root!r}")
        if type(self.count) is not int or self.count < 0:
            raise InvalidArgumentError(f"an item count is an int >= 0, got {self.count!r}")
        validate_shape(self.fanout, self.depth)
        vv = self.version_vector
        if vv is not None and not all(
            isinstance(r, str) and type(n) is int and n >= 0 for r, n in vv.items()
        ):
            raise InvalidArgumentError("a version vector maps str to int >= 0")
        if type(self.width) is not int or not 1 <= self.width <= HASH_SIZE:
            raise InvalidArgumentError(f"a value width lies in [1, {HASH_SIZE}]")
        if type(self.scheme) is not int or self.scheme < 0:
            raise InvalidArgumentError(f"a tree scheme is an int >= 0, got {self.scheme!r}")
        if not isinstance(self.levels, tuple) or len(self.levels) >= self.depth:
            raise InvalidArgumentError("top levels are a tuple of fewer than depth levels")
        for level, values in enumerate(self.levels, start=1):
            if not isinstance(values, bytes) or len(values) != self.width * self.fanout**level:
                raise InvalidArgumentError(
                    f"level {level} holds {self.fanout**level} values of {self.width} bytes"
                )

    @classmethod
    def of(
        cls,
        tree: MerkleTree,
        version_vector: Mapping[str, int] | None = None,
        *,
        levels: int = 0,
        width: int = HASH_SIZE,
    ) -> RootInfo:
        """The root info of a local tree, with its top ``levels`` levels ``width`` wide."""
        top = tuple(
            tree.level_values(level, range(tree.fanout**level), width)
            for level in range(1, levels + 1)
        )
        return cls(
            tree.root(), tree.count(), tree.fanout, tree.depth, version_vector, top, width
        )


@dataclass(frozen=True)
class NodeRequest:
    """Ask ``side`` for the values of all ``fanout`` children of each prefix in ``prefixes``.

    Answer with ``Reconciliation.receive_nodes(side, {child_prefix: value})`` holding exactly
    those children (``MerkleTree.child_hashes`` produces it).
    """

    side: Side
    prefixes: tuple[Prefix, ...]


@dataclass(frozen=True)
class LeafRequest:
    """Ask ``side`` for the ``(key, digest)`` items of each leaf in ``prefixes``.

    Answer with ``Reconciliation.receive_leaves(side, {leaf_prefix: items})`` holding exactly
    those leaves (``MerkleTree.leaves`` produces it).
    """

    side: Side
    prefixes: tuple[Prefix, ...]


Request: TypeAlias = NodeRequest | LeafRequest
"""A request the healer must send to one replica."""


@dataclass(frozen=True)
class Diff:
    """The outcome of a reconciliation: which keys must move, and what it cost.

    ``only_left``/``only_right`` name keys one side holds and the other lacks; ``different``
    names keys both hold with different digests. All three are sorted. ``round_trips`` counts
    request rounds after the roots (both sides are asked in parallel within a round; add one
    for the root fetch). ``nodes_compared`` counts node pairs compared, the roots included;
    ``items_compared`` counts distinct keys compared in leaves. ``inconsistent`` lists nodes
    whose values differed although what the sides then sent below them did not: a write
    landed during the reconciliation. ``vectors_equal`` is None unless both sides sent a
    version vector.

    When the leaves came as item digests without keys (``receive_leaf_digests``), the keys
    are not known yet: ``left_items``/``right_items`` list each side's unmatched items as
    ``(leaf prefix, digest as sent)``, sorted, and the three key tuples stay empty; the
    replicas name the keys when asked for those items' states.
    """

    only_left: tuple[str, ...]
    only_right: tuple[str, ...]
    different: tuple[str, ...]
    round_trips: int
    nodes_compared: int
    items_compared: int
    inconsistent: tuple[Prefix, ...] = ()
    vectors_equal: bool | None = None
    left_items: tuple[tuple[Prefix, bytes], ...] = ()
    right_items: tuple[tuple[Prefix, bytes], ...] = ()

    @property
    def keys(self) -> tuple[str, ...]:
        """Every key whose state must move in some direction, sorted."""
        return tuple(sorted((*self.only_left, *self.only_right, *self.different)))

    @property
    def in_sync(self) -> bool:
        """True when nothing differed and nothing changed under the reconciliation."""
        return not (
            self.only_left or self.only_right or self.different or self.inconsistent
            or self.left_items or self.right_items
        )


def _vectors_equal(a: Mapping[str, int] | None, b: Mapping[str, int] | None) -> bool | None:
    if a is None or b is None:
        return None
    return {r: n for r, n in a.items() if n} == {r: n for r, n in b.items() if n}


class Reconciliation:
    """Drive one reconciliation of two trees; see the module docstring for the rules.

    Use::

        rec = Reconciliation(left_info, right_info)
        while not rec.done:
            for req in rec.next_requests():
                ...fetch from req.side, then rec.receive_nodes(...) or rec.receive_leaves(...)
        diff = rec.result()

    Answers of one round may arrive in any order; the round ends when both sides answered.
    """

    def __init__(self, left: RootInfo, right: RootInfo) -> None:
        if not isinstance(left, RootInfo) or not isinstance(right, RootInfo):
            raise InvalidArgumentError("a reconciliation starts from two RootInfo")
        if (left.fanout, left.depth) != (right.fanout, right.depth):
            raise InvalidArgumentError(
                f"tree shapes differ: fanout/depth {left.fanout}/{left.depth} on the left, "
                f"{right.fanout}/{right.depth} on the right"
            )
        if left.scheme != right.scheme:
            raise InvalidArgumentError(
                f"tree schemes differ: {left.scheme} on the left, {right.scheme} on the right"
            )
        self._fanout = left.fanout
        self._depth = left.depth
        self._bits = self._fanout.bit_length() - 1
        self._width = left.width if left.width == right.width else HASH_SIZE
        self._vectors_equal = _vectors_equal(left.version_vector, right.version_vector)
        self._round_trips = 0
        self._nodes_compared = 1
        self._items_compared = 0
        self._inconsistent: list[Prefix] = []
        self._only_left: list[str] = []
        self._only_right: list[str] = []
        self._different: list[str] = []
        # prefixes (all of one level) whose values differ: the parents of the next round
        self._frontier: tuple[Prefix, ...] = ()
        self._pending: dict[Side, Request] = {}
        self._node_answers: dict[Side, Mapping[Prefix, bytes] | bytes] = {}
        self._leaf_answers: dict[Side, dict[Prefix, dict[str, bytes]]] = {}
        self._digest_answers: dict[Side, dict[Prefix, list[bytes]]] = {}
        self._left_items: list[tuple[Prefix, bytes]] = []
        self._right_items: list[tuple[Prefix, bytes]] = []
        self._result: Diff | None = None
        self._top = {Side.LEFT: left.levels, Side.RIGHT: right.levels}
        self._filling: Side | None = None
        sent = [side for side in Side if self._top[side]]
        if left.root == right.root and left.count == right.count:
            self._finish()
        elif left.width != right.width or not sent:
            self._advance(((),))
        elif len(sent) == 2 and len(left.levels) == len(right.levels):
            self._start_below(left.levels, right.levels)
        else:
            # One side sent fewer levels (or none): ask it alone for the deepest level the
            # other sent, then start there.
            have = max(Side, key=lambda side: len(self._top[side]))
            lacking = Side.RIGHT if have is Side.LEFT else Side.LEFT
            level = len(self._top[have])
            self._filling = lacking
            self._round_trips += 1
            parents = tuple(
                digits(i, level - 1, self._bits) for i in range(self._fanout ** (level - 1))
            )
            self._frontier = parents
            self._pending = {lacking: NodeRequest(lacking, parents)}

    def _start_below(self, left: tuple[bytes, ...], right: tuple[bytes, ...]) -> None:
        """Start the descent at the deepest level both sides sent, where values differ."""
        level = len(left)
        a, b, w = left[-1], right[-1], self._width
        differing = [
            digits(i, level, self._bits)
            for i in range(self._fanout**level)
            if a[i * w : (i + 1) * w] != b[i * w : (i + 1) * w]
        ]
        self._nodes_compared += sum(self._fanout**lv for lv in range(1, level + 1))
        if not differing:
            self._inconsistent.append(())
        self._advance(tuple(differing))

    @property
    def width(self) -> int:
        """Bytes per node value in this reconciliation's answers (the packed form)."""
        return self._width

    # -- state -------------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        """True once the result is known; no request is outstanding then."""
        return self._result is not None

    def next_requests(self) -> list[Request]:
        """The requests of the current round still waiting for an answer (empty when done).

        Calling it again returns the same requests until they are answered.
        """
        return [self._pending[s] for s in Side if s in self._pending]

    def result(self) -> Diff:
        """The reconciliation's outcome. Raises InvalidArgumentError before ``done``."""
        if self._result is None:
            raise InvalidArgumentError("the reconciliation is not done: answer next_requests()")
        return self._result

    # -- events ------------------------------------------------------------------------------

    def receive_nodes(self, side: Side, nodes: Mapping[Prefix, bytes] | bytes) -> None:
        """Feed ``side``'s answer to its NodeRequest: ``{child_prefix: value}``, or the packed
        form (the children of every asked prefix in order, ``width`` bytes each)."""
        request = self._expect(side, NodeRequest)
        if isinstance(nodes, bytes):
            expected = len(request.prefixes) * self._fanout * self._width
            if len(nodes) != expected:
                raise InvalidArgumentError(
                    f"the {side.value} side must answer exactly the children of the prefixes "
                    f"asked: {expected} bytes, got {len(nodes)}"
                )
        else:
            wanted = {(*p, d) for p in request.prefixes for d in range(self._fanout)}
            if not isinstance(nodes, Mapping) or nodes.keys() != wanted:
                raise InvalidArgumentError(
                    f"the {side.value} side must answer exactly the children of the prefixes "
                    "asked"
                )
            for value in nodes.values():
                if not isinstance(value, bytes) or not value:
                    raise InvalidArgumentError(f"a node value is non-empty bytes, got {value!r}")
        del self._pending[side]
        if self._filling is side:
            self._fill(side, request.prefixes, nodes)
            return
        self._node_answers[side] = nodes
        if not self._pending:
            self._compare_nodes(request.prefixes)

    def _fill(
        self, side: Side, parents: tuple[Prefix, ...], nodes: Mapping[Prefix, bytes] | bytes
    ) -> None:
        """The lacking side's level arrived: start the descent below the top levels."""
        self._filling = None
        other = Side.RIGHT if side is Side.LEFT else Side.LEFT
        if isinstance(nodes, bytes):
            packed = nodes
        else:
            w = self._width
            packed = b"".join(
                nodes[(*p, d)][-w:].rjust(w, b"\0") for p in parents for d in range(self._fanout)
            )
        theirs = self._top[other]
        mine = (*theirs[:-1], packed)  # only the deepest level is compared
        if side is Side.LEFT:
            self._start_below(mine, theirs)
        else:
            self._start_below(theirs, mine)

    def receive_leaves(
        self, side: Side, leaves: Mapping[Prefix, Sequence[tuple[str, bytes]]]
    ) -> None:
        """Feed ``side``'s answer to its LeafRequest: ``{leaf_prefix: [(key, digest), ...]}``."""
        request = self._expect(side, LeafRequest)
        if not isinstance(leaves, Mapping) or leaves.keys() != set(request.prefixes):
            raise InvalidArgumentError(
                f"the {side.value} side must answer exactly the leaves asked"
            )
        seen: set[str] = set()
        parsed: dict[Prefix, dict[str, bytes]] = {}
        for prefix in request.prefixes:
            items = leaves[prefix]
            for item in items:
                if (
                    not isinstance(item, tuple)
                    or len(item) != 2
                    or not isinstance(item[0], str)
                    or not isinstance(item[1], bytes)
                ):
                    raise InvalidArgumentError(f"a leaf item is (str, bytes), got {item!r}")
            found = dict(items)
            if len(found) != len(items) or not seen.isdisjoint(found):
                raise InvalidArgumentError(f"the {side.value} side sent a key twice")
            seen.update(found)
            parsed[prefix] = found
        if self._digest_answers:
            raise InvalidArgumentError("both sides answer a leaf round in the same form")
        self._leaf_answers[side] = parsed
        del self._pending[side]
        if not self._pending:
            self._compare_leaves(request.prefixes)

    def receive_leaf_digests(self, side: Side, leaves: Mapping[Prefix, Sequence[bytes]]) -> None:
        """Feed ``side``'s answer to its LeafRequest as item digests alone (cut to the same
        low bytes on both sides): ``{leaf_prefix: [digest, ...]}``. Both sides of a round
        answer in the same form. Items are compared as multisets per leaf; the result names
        unmatched items, not keys (``Diff.left_items``)."""
        request = self._expect(side, LeafRequest)
        if not isinstance(leaves, Mapping) or leaves.keys() != set(request.prefixes):
            raise InvalidArgumentError(
                f"the {side.value} side must answer exactly the leaves asked"
            )
        parsed: dict[Prefix, list[bytes]] = {}
        for prefix in request.prefixes:
            digests = leaves[prefix]
            if isinstance(digests, (bytes, str)) or not all(
                isinstance(d, bytes) and d for d in digests
            ):
                raise InvalidArgumentError("leaf item digests are non-empty bytes")
            parsed[prefix] = list(digests)
        self._digest_answers[side] = parsed
        del self._pending[side]
        if not self._pending:
            self._compare_leaf_digests(request.prefixes)

    # -- transitions -------------------------------------------------------------------------

    def _expect(self, side: Side, kind: type[Request]) -> Request:
        if not isinstance(side, Side):
            raise InvalidArgumentError(f"side is a Side, got {side!r}")
        request = self._pending.get(side)
        if not isinstance(request, kind):
            raise InvalidArgumentError(
                f"no {kind.__name__} is waiting for an answer from the {side.value} side"
            )
        return request

    def _advance(self, frontier: tuple[Prefix, ...]) -> None:
        """Ask for the level below ``frontier`` (nodes that differed), or finish."""
        self._frontier = frontier
        if not frontier:
            self._finish()
            return
        self._round_trips += 1
        kind: type[Request] = NodeRequest if len(frontier[0]) < self._depth else LeafRequest
        self._pending = {side: kind(side, frontier) for side in Side}

    def _compare_nodes(self, parents: tuple[Prefix, ...]) -> None:
        left = self._node_answers.pop(Side.LEFT)
        right = self._node_answers.pop(Side.RIGHT)
        if isinstance(left, bytes) != isinstance(right, bytes):
            left, right = self._as_mapping(parents, left), self._as_mapping(parents, right)
        differing: list[Prefix] = []
        fanout = self._fanout
        if isinstance(left, bytes) and isinstance(right, bytes):
            w = self._width
            span = fanout * w
            for n, parent in enumerate(parents):
                base = n * span
                if left[base : base + span] == right[base : base + span]:
                    self._inconsistent.append(parent)
                    continue
                for digit in range(fanout):
                    at = base + digit * w
                    if left[at : at + w] != right[at : at + w]:
                        differing.append((*parent, digit))
        else:
            assert not isinstance(left, bytes)
            assert not isinstance(right, bytes)
            for parent in parents:
                found = False
                for digit in range(fanout):
                    child = (*parent, digit)
                    if left[child] != right[child]:
                        differing.append(child)
                        found = True
                if not found:
                    self._inconsistent.append(parent)
        self._nodes_compared += len(parents) * fanout
        self._advance(tuple(differing))

    def _as_mapping(
        self, parents: tuple[Prefix, ...], nodes: Mapping[Prefix, bytes] | bytes
    ) -> Mapping[Prefix, bytes]:
        if not isinstance(nodes, bytes):
            return nodes
        w, fanout = self._width, self._fanout
        return {
            (*parent, digit): nodes[(n * fanout + digit) * w : (n * fanout + digit + 1) * w]
            for n, parent in enumerate(parents)
            for digit in range(fanout)
        }

    def _compare_leaves(self, prefixes: tuple[Prefix, ...]) -> None:
        left = self._leaf_answers.pop(Side.LEFT)
        right = self._leaf_answers.pop(Side.RIGHT)
        for prefix in prefixes:
            lhs, rhs = left[prefix], right[prefix]
            self._items_compared += len(lhs.keys() | rhs.keys())
            if lhs == rhs:
                self._inconsistent.append(prefix)
                continue
            for key, digest in lhs.items():
                other = rhs.get(key)
                if other is None:
                    self._only_left.append(key)
                elif other != digest:
                    self._different.append(key)
            self._only_right.extend(key for key in rhs if key not in lhs)
        self._advance(())

    def _compare_leaf_digests(self, prefixes: tuple[Prefix, ...]) -> None:
        if self._leaf_answers:
            raise InvalidArgumentError("both sides answer a leaf round in the same form")
        left = self._digest_answers.pop(Side.LEFT)
        right = self._digest_answers.pop(Side.RIGHT)
        left_items, right_items = self._left_items, self._right_items
        compared = 0
        for prefix in prefixes:
            lhs, rhs = left[prefix], right[prefix]
            compared += max(len(lhs), len(rhs))
            # Multisets per leaf; the common shapes (a side empty, one item each) without
            # building counters: dense differences make these most leaves.
            if not lhs or not rhs:
                if not lhs and not rhs:
                    self._inconsistent.append(prefix)
                left_items.extend([(prefix, d) for d in lhs])
                right_items.extend([(prefix, d) for d in rhs])
                continue
            if len(lhs) == 1 and len(rhs) == 1:
                if lhs[0] == rhs[0]:
                    self._inconsistent.append(prefix)
                else:
                    left_items.append((prefix, lhs[0]))
                    right_items.append((prefix, rhs[0]))
                continue
            lc, rc = Counter(lhs), Counter(rhs)
            if lc == rc:
                self._inconsistent.append(prefix)
                continue
            left_items.extend((prefix, d) for d in (lc - rc).elements())
            right_items.extend((prefix, d) for d in (rc - lc).elements())
        self._items_compared += compared
        self._advance(())

    def _finish(self) -> None:
        self._pending = {}
        self._result = Diff(
            only_left=tuple(sorted(self._only_left)),
            only_right=tuple(sorted(self._only_right)),
            different=tuple(sorted(self._different)),
            round_trips=self._round_trips,
            nodes_compared=self._nodes_compared,
            items_compared=self._items_compared,
            inconsistent=tuple(self._inconsistent),
            vectors_equal=self._vectors_equal,
            left_items=tuple(sorted(self._left_items)),
            right_items=tuple(sorted(self._right_items)),
        )


def diff(
    left: MerkleTree,
    right: MerkleTree,
    *,
    left_vector: Mapping[str, int] | None = None,
    right_vector: Mapping[str, int] | None = None,
    levels: int = 0,
    width: int = HASH_SIZE,
    item_width: int = 0,
) -> Diff:
    """Reconcile two local trees by driving a :class:`Reconciliation` against them, with the
    top ``levels`` levels sent along with the roots and node values ``width`` bytes wide;
    with ``item_width``, leaves answer with item digests alone, cut to that many low bytes."""
    rec = Reconciliation(
        RootInfo.of(left, left_vector, levels=levels, width=width),
        RootInfo.of(right, right_vector, levels=levels, width=width),
    )
    trees = {Side.LEFT: left, Side.RIGHT: right}
    while not rec.done:
        for request in rec.next_requests():
            tree = trees[request.side]
            if isinstance(request, NodeRequest):
                rec.receive_nodes(request.side, node_answer(tree, request.prefixes, width))
            elif item_width:
                leaves = tree.leaves(request.prefixes)
                rec.receive_leaf_digests(
                    request.side,
                    {p: [d[-item_width:] for _, d in items] for p, items in leaves.items()},
                )
            else:
                rec.receive_leaves(request.side, tree.leaves(request.prefixes))
    return rec.result()


def node_answer(tree: MerkleTree, prefixes: Sequence[Prefix], width: int = HASH_SIZE) -> bytes:
    """The packed answer to a node request: the children of each prefix, in order, each value
    truncated to its low ``width`` bytes."""
    if not prefixes:
        return b""
    level = len(prefixes[0])
    if level >= tree.depth or any(len(p) != level for p in prefixes):
        raise InvalidArgumentError("a node request names inner nodes of one level")
    bits, fanout = tree.fanout.bit_length() - 1, tree.fanout
    indices: list[int] = []
    for prefix in prefixes:
        index = 0
        for digit in prefix:
            if type(digit) is not int or not 0 <= digit < fanout:
                raise InvalidArgumentError(f"prefix digits lie in [0, {fanout}), got {prefix!r}")
            index = (index << bits) | digit
        first = index << bits
        indices.extend(range(first, first + fanout))
    return tree.level_values(level + 1, indices, width)
