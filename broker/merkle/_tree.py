"""An incrementally maintained Merkle tree over ``(key, digest)`` items, in a shape fixed by
the protocol (fan-out and depth both sides agree on).

Invariants every method keeps:

- a node's value depends only on the set of ``(key, digest)`` items whose leaf lies under it
  and on the cluster secret: never on insertion order, on the history of updates and deletes
  that reached the set, or on whether the tree was built at once or item by item;
- every node's value is the sum mod 2**256 of its children's values, and a leaf's value is
  the sum mod 2**256 of its items' hashes. So the root is the sum of all item hashes: it
  depends on the set of items and the secret only, not even on the shape;
- a write touches exactly ``depth + 1`` node values (one per level), never a rebuild;
- an empty subtree has value 0 and is not stored: memory grows with the items, not with the
  number of leaves the shape allows.

Hashes (all BLAKE2b keyed with the cluster secret, each with its own personalization, so the
leaf choice and the item hash are independent functions):

- a key's leaf is the first ``log2(fanout) * depth`` bits of H_leaf(key): without the secret
  no one can pick keys that pile into one leaf;
- an item's hash is H_item(len(key) || key || digest), with the UTF-8 key's length as 4
  big-endian bytes; 256 bits, read as a big-endian integer.

Why a modular sum, not XOR, to combine item hashes: XOR cancels pairs (an item counted twice
vanishes, and two leaves that both gained the same stray item look unchanged), and XOR is
linear over GF(2), so anyone who learns ~257 item hashes finds a colliding subset by Gaussian
elimination. A sum keeps a duplicated item visible (2h != 0) and finding equal subset sums is
a generalized-birthday problem, infeasible without the secret because item hashes cannot be
computed. (A holder of the secret could run Wagner's algorithm against a 256-bit sum; the
secret must stay within the cluster, which writes the data anyway.)

Why inner nodes are sums of their children rather than keyed hashes of them: a write then
costs its item hashes and ``depth + 1`` integer additions, while rehashing ``fanout``
children on each level costs ``depth`` extra hashes of ``32 * fanout`` bytes. Measured at
100k keys, fan-out 16, depth 4, a prototype of that design sustained 0.15-0.2x the change
rate of this one (``bench/merkle_bench.py``, ``bench/results/merkle.md``). Collision
resistance is unchanged: a collision of sums at any node is a collision of item-hash sums,
which the leaf level already has to resist. And a sum lets a reader check a reply: a parent
must equal the sum of the children a replica sends for it.

Pure: no I/O, no clock, no randomness.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from typing import Final, TypeAlias

from broker.errors import InvalidArgumentError

__all__ = [
    "DEFAULT_DEPTH",
    "DEFAULT_FANOUT",
    "DIGEST_SIZE",
    "HASH_SIZE",
    "MAX_LEAF_BITS",
    "MAX_SECRET_BYTES",
    "MIN_SECRET_BYTES",
    "MerkleTree",
    "Prefix",
    "validate_shape",
]

Prefix: TypeAlias = tuple[int, ...]
"""A node's path from the root: one digit in ``range(fanout)`` per level; ``()`` is the root."""

DEFAULT_FANOUT: Final = 16
DEFAULT_DEPTH: Final = 4
"""16**4 = 65,536 leaves: about 1.5 items per leaf at 100k keys, 15 at 1M."""

HASH_SIZE: Final = 32
"""Bytes of a node value (big-endian integer below 2**256)."""

DIGEST_SIZE: Final = 32
"""Bytes of an item digest (the content digest of a key's state, computed elsewhere)."""

MAX_LEAF_BITS: Final = 32
"""Upper bound on ``log2(fanout) * depth``: at most 2**32 leaves."""

MIN_SECRET_BYTES: Final = 16
MAX_SECRET_BYTES: Final = 64  # BLAKE2b's key limit

_MOD_MASK: Final = (1 << (8 * HASH_SIZE)) - 1
_LEAF_HASH_BYTES: Final = 8
_PERSON_LEAF: Final = b"wn-merkle-leaf"
_PERSON_ITEM: Final = b"wn-merkle-item"
_ZERO: Final = bytes(HASH_SIZE)


def validate_shape(fanout: object, depth: object) -> int:
    """Check a tree shape and return the bits per digit (``log2(fanout)``).

    ``fanout`` must be a power of two from 2 to 256 and ``depth`` at least 1, with at most
    ``2**MAX_LEAF_BITS`` leaves. Raises InvalidArgumentError otherwise.
    """
    if type(fanout) is not int or fanout < 2 or fanout > 256 or fanout & (fanout - 1):
        raise InvalidArgumentError(f"fanout must be a power of two in [2, 256], got {fanout!r}")
    if type(depth) is not int or depth < 1:
        raise InvalidArgumentError(f"depth must be an int >= 1, got {depth!r}")
    bits = fanout.bit_length() - 1
    if bits * depth > MAX_LEAF_BITS:
        raise InvalidArgumentError(
            f"fanout {fanout} and depth {depth} give 2**{bits * depth} leaves; "
            f"the bound is 2**{MAX_LEAF_BITS}"
        )
    return bits


def _validate_secret(key: object) -> bytes:
    if not isinstance(key, bytes) or not MIN_SECRET_BYTES <= len(key) <= MAX_SECRET_BYTES:
        raise InvalidArgumentError(
            f"the cluster secret must be {MIN_SECRET_BYTES}-{MAX_SECRET_BYTES} bytes"
        )
    return key


def _encode_key(key: object) -> bytes:
    if not isinstance(key, str):
        raise InvalidArgumentError(f"item keys are str, got {type(key).__name__}")
    try:
        return key.encode()
    except UnicodeEncodeError as exc:
        raise InvalidArgumentError(f"item key {key!r} is not encodable as UTF-8") from exc


def _check_digest(digest: object) -> bytes:
    if not isinstance(digest, bytes) or len(digest) != DIGEST_SIZE:
        raise InvalidArgumentError(f"a digest is {DIGEST_SIZE} bytes, got {digest!r}")
    return digest


class MerkleTree:
    """A sum-combined Merkle tree over ``(key, digest)`` items, maintained incrementally.

    ``key`` is the cluster secret every replica shares; ``fanout`` and ``depth`` fix the
    shape (``fanout ** depth`` leaves), which both sides of a reconciliation must agree on.
    Node values are 32-byte big-endian integers; see the module docstring for the rules.
    """

    __slots__ = (
        "_bits",
        "_count",
        "_depth",
        "_fanout",
        "_item_base",
        "_leaf_base",
        "_leaf_shift",
        "_leaves",
        "_levels",
        "_path",
    )

    def __init__(
        self, key: bytes, *, fanout: int = DEFAULT_FANOUT, depth: int = DEFAULT_DEPTH
    ) -> None:
        secret = _validate_secret(key)
        self._bits = validate_shape(fanout, depth)
        self._fanout = fanout
        self._depth = depth
        self._leaf_shift = 8 * _LEAF_HASH_BYTES - self._bits * depth
        # Keyed BLAKE2b pays for the key block on construction; copying a keyed prototype
        # costs half as much as constructing one per call.
        self._leaf_base = hashlib.blake2b(
            digest_size=_LEAF_HASH_BYTES, key=secret, person=_PERSON_LEAF
        )
        self._item_base = hashlib.blake2b(digest_size=HASH_SIZE, key=secret, person=_PERSON_ITEM)
        # _levels[l] maps the index of a level-l node (its digits read in base fanout) to its
        # value; zero values are absent. _levels[0] holds the root at index 0.
        self._levels: list[dict[int, int]] = [{} for _ in range(depth + 1)]
        self._path = self._levels[::-1]  # leaf level first: the order a write walks
        # leaf index -> {key: digest}; never holds an empty dict
        self._leaves: dict[int, dict[str, bytes]] = {}
        self._count = 0

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        items: Iterable[tuple[str, bytes]],
        *,
        key: bytes,
        fanout: int = DEFAULT_FANOUT,
        depth: int = DEFAULT_DEPTH,
    ) -> MerkleTree:
        """Build a tree from ``(key, digest)`` pairs in one pass (the cold start).

        Equal to inserting the items one by one, in any order. A key given twice raises
        InvalidArgumentError.
        """
        tree = cls(key, fanout=fanout, depth=depth)
        leaf_base, item_base, shift = tree._leaf_base, tree._item_base, tree._leaf_shift
        leaves = tree._leaves
        sums: dict[int, int] = {}
        count = 0
        for k, digest in items:
            kb = _encode_key(k)
            _check_digest(digest)
            h = leaf_base.copy()
            h.update(kb)
            leaf = int.from_bytes(h.digest(), "big") >> shift
            h = item_base.copy()
            h.update(len(kb).to_bytes(4, "big") + kb + digest)
            sums[leaf] = sums.get(leaf, 0) + int.from_bytes(h.digest(), "big")
            bucket = leaves.get(leaf)
            if bucket is None:
                leaves[leaf] = {k: digest}
            elif k in bucket:
                raise InvalidArgumentError(f"key {k!r} given twice")
            else:
                bucket[k] = digest
            count += 1
        tree._count = count
        bits = tree._bits
        level = sums
        for nodes in tree._path:
            nodes.update(level)
            parent: dict[int, int] = {}
            for i, v in level.items():
                p = i >> bits
                parent[p] = parent.get(p, 0) + v
            level = parent
        return tree

    # -- writes ------------------------------------------------------------------------------

    def update(self, key: str, old_digest: bytes | None, new_digest: bytes | None) -> None:
        """Change ``key`` from ``old_digest`` to ``new_digest`` (None: absent).

        Insert is ``(None, d)``, change ``(d1, d2)``, delete ``(d, None)``. ``old_digest``
        must be the digest the tree holds for ``key`` (a compare-and-set), else
        InvalidArgumentError and nothing changes. Touches ``depth + 1`` node values.
        """
        if old_digest is not None:
            _check_digest(old_digest)
        self._write(key, new_digest, old_digest, True)

    def set(self, key: str, digest: bytes) -> bytes | None:
        """Insert or change ``key``'s digest; return the digest it replaced (None if new)."""
        if digest is None:
            raise InvalidArgumentError("set() takes a digest; use remove() to delete")
        return self._write(key, digest, None, False)

    def remove(self, key: str) -> bytes | None:
        """Delete ``key``; return its digest, or None (and change nothing) if it is absent."""
        return self._write(key, None, None, False)

    def _write(
        self, key: str, new: bytes | None, expect: bytes | None, check: bool
    ) -> bytes | None:
        """Set ``key`` to ``new`` (None deletes); return the digest it held before.

        With ``check``, refuse unless the key held ``expect``. One function on purpose: this
        is the hot path, and each Python call level costs about as much as a dict update.
        """
        if type(key) is not str:
            _encode_key(key)  # raises
        try:
            kb = key.encode()
        except UnicodeEncodeError:
            kb = _encode_key(key)  # raises
        if new is not None and (type(new) is not bytes or len(new) != DIGEST_SIZE):
            _check_digest(new)  # raises
        h = self._leaf_base.copy()
        h.update(kb)
        leaf = int.from_bytes(h.digest(), "big") >> self._leaf_shift
        leaves = self._leaves
        bucket = leaves.get(leaf)
        current = bucket.get(key) if bucket is not None else None
        if check and current != expect:
            raise InvalidArgumentError(
                f"stale update of {key!r}: the tree holds "
                f"{current.hex() if current else None}, not {expect.hex() if expect else None}"
            )
        if new == current:
            return current
        # Node values are kept as exact (unreduced) sums of item hashes, reduced mod 2**256
        # only when read: one operation less per level, and a value is 0 when its subtree is
        # empty (and otherwise only if every item hash in it is 0: probability 2**-256 each).
        prefix = len(kb).to_bytes(4, "big") + kb
        delta = 0
        if current is not None:
            h = self._item_base.copy()
            h.update(prefix + current)
            delta = -int.from_bytes(h.digest(), "big")
        if new is not None:
            h = self._item_base.copy()
            h.update(prefix + new)
            delta += int.from_bytes(h.digest(), "big")
            if bucket is None:
                leaves[leaf] = {key: new}
            else:
                bucket[key] = new
            if current is None:
                self._count += 1
        else:
            assert bucket is not None  # current is not None, so the key sits in a bucket
            del bucket[key]
            if not bucket:
                del leaves[leaf]
            self._count -= 1
        bits = self._bits
        index = leaf
        for nodes in self._path:
            value = nodes.get(index, 0) + delta
            if value:
                nodes[index] = value
            else:
                nodes.pop(index, None)
            index >>= bits
        return current

    def _leaf_of(self, kb: bytes) -> int:
        h = self._leaf_base.copy()
        h.update(kb)
        return int.from_bytes(h.digest(), "big") >> self._leaf_shift

    def _item_hash(self, kb: bytes, digest: bytes) -> int:
        h = self._item_base.copy()
        h.update(len(kb).to_bytes(4, "big") + kb + digest)
        return int.from_bytes(h.digest(), "big")

    # -- reads -------------------------------------------------------------------------------

    @property
    def fanout(self) -> int:
        """Children per inner node."""
        return self._fanout

    @property
    def depth(self) -> int:
        """Level of the leaves (the root is level 0)."""
        return self._depth

    @property
    def leaf_count(self) -> int:
        """Number of leaves the shape allows: ``fanout ** depth``."""
        return 1 << (self._bits * self._depth)

    def count(self) -> int:
        """Number of items held."""
        return self._count

    def __len__(self) -> int:
        return self._count

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.get(key) is not None

    def get(self, key: str) -> bytes | None:
        """The digest held for ``key``, or None."""
        bucket = self._leaves.get(self._leaf_of(_encode_key(key)))
        return bucket.get(key) if bucket is not None else None

    def items(self) -> Iterator[tuple[str, bytes]]:
        """Every ``(key, digest)`` held, in no particular order."""
        for bucket in self._leaves.values():
            yield from bucket.items()

    def path(self, key: str) -> Prefix:
        """The prefix of the leaf ``key`` belongs to (``depth`` digits)."""
        return self._digits(self._leaf_of(_encode_key(key)), self._depth)

    def root(self) -> bytes:
        """The root value: 32 bytes, the sum of all item hashes; all zeros when empty."""
        return (self._levels[0].get(0, 0) & _MOD_MASK).to_bytes(HASH_SIZE, "big")

    def node(self, prefix: Prefix) -> bytes:
        """The value of the node at ``prefix`` (``()`` is the root); zeros for an empty one."""
        level, index = self._index(prefix, self._depth)
        return (self._levels[level].get(index, 0) & _MOD_MASK).to_bytes(HASH_SIZE, "big")

    def children(self, prefix: Prefix) -> list[bytes]:
        """The values of the ``fanout`` children of the inner node at ``prefix``, in order."""
        level, index = self._index(prefix, self._depth - 1)
        nodes = self._levels[level + 1]
        first = index << self._bits
        return [
            (nodes[i] & _MOD_MASK).to_bytes(HASH_SIZE, "big") if i in nodes else _ZERO
            for i in range(first, first + self._fanout)
        ]

    def leaf_items(self, prefix: Prefix) -> list[tuple[str, bytes]]:
        """The ``(key, digest)`` items under ``prefix``, sorted by key.

        ``prefix`` is normally a leaf (``depth`` digits); a shorter one lists its whole
        subtree.
        """
        level, index = self._index(prefix, self._depth)
        if level == self._depth:
            bucket = self._leaves.get(index)
            return sorted(bucket.items()) if bucket else []
        shift = self._bits * (self._depth - level)
        lo, hi = index << shift, (index + 1) << shift
        if hi - lo <= len(self._leaves):
            found = [self._leaves[i] for i in range(lo, hi) if i in self._leaves]
        else:
            found = [b for i, b in self._leaves.items() if lo <= i < hi]
        return sorted(item for bucket in found for item in bucket.items())

    def child_hashes(self, prefixes: Iterable[Prefix]) -> dict[Prefix, bytes]:
        """Answer a node request: the values of all children of each inner ``prefix``."""
        out: dict[Prefix, bytes] = {}
        for prefix in prefixes:
            for digit, value in enumerate(self.children(prefix)):
                out[(*prefix, digit)] = value
        return out

    def leaves(self, prefixes: Iterable[Prefix]) -> dict[Prefix, list[tuple[str, bytes]]]:
        """Answer a leaf request: the sorted items under each ``prefix``."""
        return {prefix: self.leaf_items(prefix) for prefix in prefixes}

    def _index(self, prefix: object, max_level: int) -> tuple[int, int]:
        if not isinstance(prefix, tuple) or len(prefix) > max_level:
            raise InvalidArgumentError(
                f"a prefix here is a tuple of at most {max_level} digits, got {prefix!r}"
            )
        index = 0
        for digit in prefix:
            if type(digit) is not int or not 0 <= digit < self._fanout:
                raise InvalidArgumentError(
                    f"prefix digits lie in [0, {self._fanout}), got {prefix!r}"
                )
            index = (index << self._bits) | digit
        return len(prefix), index

    def _digits(self, index: int, level: int) -> Prefix:
        mask = self._fanout - 1
        bits = self._bits
        return tuple((index >> (bits * (level - 1 - i))) & mask for i in range(level))

    def __repr__(self) -> str:
        return (
            f"MerkleTree(count={self._count}, fanout={self._fanout}, depth={self._depth}, "
            f"root={self.root().hex()[:16]}...)"
        )
