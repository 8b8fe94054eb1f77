"""An incrementally maintained Merkle tree over ``(key, digest)`` items, in a shape fixed by
the protocol (fan-out and depth both sides agree on).

Invariants every method keeps:

- a node's value depends only on the set of ``(key, digest)`` items whose leaf lies under it
  and on the cluster secret: never on insertion order, on the history of updates and deletes
  that reached the set, or on whether the tree was built at once or item by item;
- every node's value is the sum mod 2**256 of its children's values, and a leaf's value is
  the sum mod 2**256 of its items' values. So the root is the sum of all item values: it
  depends on the set of items only, not even on the shape;
- a write touches exactly ``depth + 1`` node values (one per level), never a rebuild;
- an empty subtree has value 0 and is not stored: memory grows with the items, not with the
  number of leaves the shape allows.

Hashes and values (scheme 2, ``TREE_SCHEME``):

- a key's leaf is the first ``log2(fanout) * depth`` bits of H_leaf(key), BLAKE2b keyed with
  the cluster secret: without the secret no one can pick keys that pile into one leaf;
- an item's value is its digest read as a 256-bit big-endian integer. The digest must be a
  keyed hash (a MAC) that binds the key and the content, as ``broker.repair.item_digest``
  computes it (BLAKE2b keyed with the cluster secret over ``len(key) || key || content``):
  it already is a pseudo-random function of the item that no one without the secret can
  compute, so hashing it once more (scheme 1 did: H_item(len || key || digest)) bought no
  collision resistance and cost a second hash per item, half of a cold build's time.

Why a modular sum, not XOR, to combine item values: XOR cancels pairs (an item counted twice
vanishes, and two leaves that both gained the same stray item look unchanged), and XOR is
linear over GF(2), so anyone who learns ~257 item values finds a colliding subset by Gaussian
elimination. A sum keeps a duplicated item visible (2h != 0) and finding equal subset sums is
a generalized-birthday problem, infeasible without the secret because item values cannot be
computed. (A holder of the secret could run Wagner's algorithm against a 256-bit sum; the
secret must stay within the cluster, which writes the data anyway.) A sum also does not
depend on the order items arrive in, so a cold build can add them in any order (numpy, by
32-bit limbs), and its low bits are a sum too: a value truncated to its low ``w`` bytes on
the wire is the sum of the children's truncated values mod ``2**(8w)``.

Why inner nodes are sums of their children rather than keyed hashes of them: a write then
costs ``depth + 1`` integer additions, while rehashing ``fanout`` children on each level
costs ``depth`` extra hashes of ``32 * fanout`` bytes. Measured at 100k keys, fan-out 16,
depth 4, a prototype of that design sustained 0.15-0.2x the change rate of this one
(``bench/merkle_bench.py``, ``bench/results/merkle.md``). Collision resistance is unchanged: a
collision of sums at any node is a collision of item-value sums, which the leaf level already
has to resist. And a sum lets a reader check a reply: a parent must equal the sum of the
children a replica sends for it.

Storage: the node sums per level, and the items of each leaf. A cold build keeps its items
as arrays sorted by leaf (a slice per leaf); writes go to a small per-leaf overlay
(``{key: digest}``, None marking a removed built item) and never copy a leaf's slice, so the
first write to a leaf costs what any other write costs: the built digest of a key is found
by bisecting the build's sorted 64-bit leaf hashes (listed at the first write after a build:
a build that is only read never pays for the list). Reads of a leaf
merge its slice with its overlay. A change of an existing key's digest costs one leaf hash and
``depth + 1`` additions.

Pure: no I/O, no clock, no randomness. numpy only speeds up the cold build.
"""

from __future__ import annotations

import hashlib
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Sequence
from operator import itemgetter
from typing import Final, TypeAlias

import numpy as np

from broker.errors import InvalidArgumentError

__all__ = [
    "DEFAULT_DEPTH",
    "DEFAULT_FANOUT",
    "DIGEST_SIZE",
    "HASH_SIZE",
    "MAX_LEAF_BITS",
    "MAX_SECRET_BYTES",
    "MIN_SECRET_BYTES",
    "TREE_SCHEME",
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
"""Bytes of an item digest (a keyed hash of a key and its state, computed elsewhere)."""

TREE_SCHEME: Final = 2
"""How item values are defined (module doc). Trees of different schemes never compare equal,
so replicas report it with their root and a healer reconciles only equal schemes."""

MAX_LEAF_BITS: Final = 32
"""Upper bound on ``log2(fanout) * depth``: at most 2**32 leaves."""

MIN_SECRET_BYTES: Final = 16
MAX_SECRET_BYTES: Final = 64  # BLAKE2b's key limit

_MOD_MASK: Final = (1 << (8 * HASH_SIZE)) - 1
_LEAF_HASH_BYTES: Final = 8
_PERSON_LEAF: Final = b"wn-merkle-leaf"
_ZERO: Final = bytes(HASH_SIZE)
_LIMBS: Final = HASH_SIZE // 4  # 32-bit limbs of a digest in the cold build
_UNSET: Final = b""  # "not in the overlay": never a digest (digests are DIGEST_SIZE bytes)


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


def _limb_sums_to_ints(sums: np.ndarray) -> list[int]:
    """Rows of 32-bit-limb sums (most significant limb first, each below 2**64) as exact
    Python integers."""
    rows = sums.shape[0]
    if not rows:
        return []
    # Propagate carries so every limb fits 32 bits; one extra limb on top takes the overflow.
    norm = np.zeros((rows, _LIMBS + 1), dtype=np.uint64)
    norm[:, 1:] = sums
    low = np.uint64(0xFFFFFFFF)
    for j in range(_LIMBS, 0, -1):
        carry = norm[:, j] >> np.uint64(32)
        norm[:, j] &= low
        norm[:, j - 1] += carry
    raw = norm.astype(">u4").tobytes()
    width = 4 * (_LIMBS + 1)
    from_bytes = int.from_bytes
    return [from_bytes(raw[i : i + width], "big") for i in range(0, rows * width, width)]


class MerkleTree:
    """A sum-combined Merkle tree over ``(key, digest)`` items, maintained incrementally.

    ``key`` is the cluster secret every replica shares; ``fanout`` and ``depth`` fix the
    shape (``fanout ** depth`` leaves), which both sides of a reconciliation must agree on.
    Node values are 32-byte big-endian integers; see the module docstring for the rules.
    """

    __slots__ = (
        "_base_digests",
        "_base_first",
        "_base_hashes",
        "_base_keys",
        "_base_leaves",
        "_base_rows",
        "_base_starts",
        "_bits",
        "_buckets",
        "_count",
        "_depth",
        "_fanout",
        "_leaf_base",
        "_leaf_shift",
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
        # _levels[l] maps the index of a level-l node (its digits read in base fanout) to its
        # value, an exact (unreduced) sum; zero values are absent. _levels[0] holds the root.
        self._levels: list[dict[int, int]] = [{} for _ in range(depth + 1)]
        self._path = self._levels[::-1]  # leaf level first: the order a write walks
        self._count = 0
        # Leaf membership: the last cold build's keys, ``_base_rows`` listing their positions
        # sorted by leaf (leaf ``_base_leaves[i]`` owns the keys at positions
        # ``_base_rows[_base_starts[i]:_base_starts[i + 1]]``), and per leaf an overlay of
        # the writes since (``_buckets``: ``{key: digest}``, None for a removed built key;
        # a key not built is absent from the overlay once removed). ``_base_hashes`` holds the
        # built keys' 64-bit leaf hashes in the order of ``_base_rows`` (ascending). Both are
        # memoryviews of the build's numpy arrays: indexing one gives a Python int, so
        # bisect works on them directly and no list of a million ints is ever made.
        self._base_keys: list[str] = []
        self._base_digests: list[bytes] = []
        self._base_hashes: Sequence[int] = []
        # When leaves are few next to the items (at most 4 per item), ``_base_first[leaf]`` is
        # the position of the leaf's first item in those arrays (one entry per leaf, and one
        # past the end): a write finds a leaf's slice without a search. Empty otherwise.
        self._base_first: Sequence[int] = []
        self._base_rows: Sequence[int] = []
        self._base_leaves: list[int] = []
        self._base_starts: list[int] = [0]
        self._buckets: dict[int, dict[str, bytes | None]] = {}

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
        InvalidArgumentError. One keyed hash per key (its leaf); the sums are added by numpy.
        """
        tree = cls(key, fanout=fanout, depth=depth)
        pairs = items if isinstance(items, list) else list(items)
        n = len(pairs)
        if not n:
            return tree
        keys = list(map(itemgetter(0), pairs))
        digests = list(map(itemgetter(1), pairs))
        if not set(map(type, digests)) <= {bytes} or set(map(len, digests)) != {DIGEST_SIZE}:
            for d in digests:
                _check_digest(d)  # raises
        copy = tree._leaf_base.copy
        encode = str.encode  # refuses a key that is not a str (TypeError): the type check
        raw = bytearray()
        extend = raw.extend
        try:
            # A plain loop: measured ~10% cheaper than map() over a nested function, and this
            # loop is most of a cold build (one keyed hash per key).
            for k in keys:
                h = copy()
                h.update(encode(k))
                extend(h.digest())
        except (TypeError, UnicodeEncodeError):
            for k in keys:
                _encode_key(k)  # raises with the offending key
            raise
        full = np.frombuffer(raw, dtype=">u8").astype(np.uint64)
        # Sorting by the whole 64-bit leaf hash sorts by leaf (its top bits) and puts a key
        # given twice next to itself: equal hashes are compared as keys (distinct keys share
        # a 64-bit hash with probability about n**2 / 2**65).
        order = np.argsort(full)
        full = full[order]
        same = np.flatnonzero(full[1:] == full[:-1])
        if same.size:
            runs: dict[int, list[str]] = {}
            for i in {*same.tolist(), *(same + 1).tolist()}:
                runs.setdefault(int(full[i]), []).append(keys[int(order[i])])
            for run in runs.values():
                if len(set(run)) != len(run):
                    dup = next(k for k in run if run.count(k) > 1)
                    raise InvalidArgumentError(f"key {dup!r} given twice")
        leaf = (full >> np.uint64(tree._leaf_shift)).astype(np.int64)
        if tree.leaf_count <= 4 * n:
            first = np.searchsorted(leaf, np.arange(tree.leaf_count + 1, dtype=np.int64))
            tree._base_first = first.data
        # Digests as rows of native 32-bit limbs, most significant first (an "S32" array
        # copies the bytes without a join; every digest was checked to be 32 bytes).
        limbs = np.array(digests, dtype=f"S{DIGEST_SIZE}").view(">u4").astype(np.uint32)
        sums = np.take(limbs.reshape(n, _LIMBS), order, axis=0)
        # Level by level up from the leaves: runs of equal indices, summed limb-wise (each
        # limb sum stays below 2**32 * n, far below 2**64).
        index = leaf
        for level, nodes in enumerate(tree._path):
            starts = np.flatnonzero(np.concatenate(([True], index[1:] != index[:-1])))
            sums = np.add.reduceat(sums, starts, axis=0, dtype=np.uint64)
            index = index[starts]
            if level == 0:
                tree._base_leaves = index.tolist()
                tree._base_starts = [*starts.tolist(), n]
            nodes.update(zip(index.tolist(), _limb_sums_to_ints(sums), strict=True))
            index = index >> tree._bits
        tree._base_keys = keys
        tree._base_digests = digests
        tree._base_hashes = full.data
        tree._base_rows = order.data
        tree._count = n
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
        if new is not None and (type(new) is not bytes or len(new) != DIGEST_SIZE):
            _check_digest(new)  # raises
        try:
            kb = key.encode()
        except UnicodeEncodeError:
            kb = _encode_key(key)  # raises
        h = self._leaf_base.copy()
        h.update(kb)
        full = int.from_bytes(h.digest(), "big")
        leaf = full >> self._leaf_shift
        bucket = self._buckets.get(leaf)
        if bucket is None:
            bucket = self._buckets[leaf] = {}
        current = bucket.get(key, _UNSET)
        if current == _UNSET:  # not written since the build: the built digest, if any
            row = self._built_row(key, full)
            current = None if row is None else self._base_digests[row]
        if check and current != expect:
            raise InvalidArgumentError(
                f"stale update of {key!r}: the tree holds "
                f"{current.hex() if current else None}, not {expect.hex() if expect else None}"
            )
        if new == current:
            return current
        # Node values are kept as exact (unreduced) sums of item values, reduced mod 2**256
        # only when read: one operation less per level, and a value is 0 when its subtree is
        # empty (and otherwise only if every item value in it is 0: probability 2**-256 each).
        if new is None:
            assert current is not None  # new != current
            delta = -int.from_bytes(current, "big")
            if self._built_row(key, full) is not None:
                bucket[key] = None  # hides the built item
            else:
                del bucket[key]  # never built: nothing to hide
            self._count -= 1
        else:
            delta = int.from_bytes(new, "big")
            if current is None:
                self._count += 1
            else:
                delta -= int.from_bytes(current, "big")
            bucket[key] = new
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

    def _built_row(self, key: str, full: int) -> int | None:
        """The position of ``key`` (whose 64-bit leaf hash is ``full``) in the last cold
        build's ``_base_keys``, or None if it was not built."""
        # The leaf's slice first, then the hash within its few items: each step of a search
        # over a million entries is a cache miss, and a leaf holds about n / leaves items.
        leaf = full >> self._leaf_shift
        first = self._base_first
        if first:
            start, end = first[leaf], first[leaf + 1]
        else:
            leaves = self._base_leaves
            i = bisect_left(leaves, leaf)
            if i == len(leaves) or leaves[i] != leaf:
                return None
            start, end = self._base_starts[i], self._base_starts[i + 1]
        hashes = self._base_hashes
        j = bisect_left(hashes, full, start, end)
        rows = self._base_rows
        while j < end and hashes[j] == full:  # distinct keys may share a 64-bit hash
            row = rows[j]
            if self._base_keys[row] == key:
                return row
            j += 1
        return None

    def _base_range(self, leaf: int) -> list[int]:
        """Positions (in ``_base_keys``) of the cold build's keys in ``leaf``."""
        leaves = self._base_leaves
        i = bisect_left(leaves, leaf)
        if i < len(leaves) and leaves[i] == leaf:
            return list(self._base_rows[self._base_starts[i] : self._base_starts[i + 1]])
        return []

    def _base_slice(self, leaf: int) -> dict[str, bytes]:
        keys, digests = self._base_keys, self._base_digests
        return {keys[j]: digests[j] for j in self._base_range(leaf)}

    def _leaf(self, leaf: int) -> dict[str, bytes]:
        """The items of ``leaf``: its built slice with its overlay applied (a new dict)."""
        items = self._base_slice(leaf)
        bucket = self._buckets.get(leaf)
        if bucket:
            for key, digest in bucket.items():
                if digest is None:
                    del items[key]
                else:
                    items[key] = digest
        return items

    def _leaf_indices(self) -> Iterable[int]:
        return {*self._base_leaves, *self._buckets}

    def _leaf_of(self, kb: bytes) -> int:
        h = self._leaf_base.copy()
        h.update(kb)
        return int.from_bytes(h.digest(), "big") >> self._leaf_shift

    def _item_hash(self, kb: bytes, digest: bytes) -> int:
        """An item's value (scheme 2: the digest itself; ``kb`` is bound by the digest)."""
        return int.from_bytes(digest, "big")

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
        h = self._leaf_base.copy()
        h.update(_encode_key(key))
        full = int.from_bytes(h.digest(), "big")
        bucket = self._buckets.get(full >> self._leaf_shift)
        digest = _UNSET if bucket is None else bucket.get(key, _UNSET)
        if digest != _UNSET:
            return digest
        row = self._built_row(key, full)
        return None if row is None else self._base_digests[row]

    def items(self) -> Iterator[tuple[str, bytes]]:
        """Every ``(key, digest)`` held, in no particular order."""
        for leaf in self._leaf_indices():
            yield from self._leaf(leaf).items()

    def path(self, key: str) -> Prefix:
        """The prefix of the leaf ``key`` belongs to (``depth`` digits)."""
        return self._digits(self._leaf_of(_encode_key(key)), self._depth)

    def leaf_index(self, key: str) -> int:
        """The index of ``key``'s leaf (its path read in base ``fanout``)."""
        return self._leaf_of(_encode_key(key))

    def root(self) -> bytes:
        """The root value: 32 bytes, the sum of all item values; all zeros when empty."""
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

    def level_values(self, level: int, indices: Iterable[int], width: int = HASH_SIZE) -> bytes:
        """The values of the level-``level`` nodes at ``indices``, each truncated to its low
        ``width`` bytes (big-endian), concatenated in the order given.

        The wire form of node values: low-order truncation keeps the sums, so a parent's
        truncated value is the sum of its children's mod ``2**(8 * width)``.
        """
        if type(level) is not int or not 0 <= level <= self._depth:
            raise InvalidArgumentError(f"level lies in [0, {self._depth}], got {level!r}")
        if type(width) is not int or not 1 <= width <= HASH_SIZE:
            raise InvalidArgumentError(f"a value width lies in [1, {HASH_SIZE}], got {width!r}")
        nodes = self._levels[level]
        mask = (1 << (8 * width)) - 1
        get = nodes.get
        return b"".join([(get(i, 0) & mask).to_bytes(width, "big") for i in indices])

    def leaf_items(self, prefix: Prefix) -> list[tuple[str, bytes]]:
        """The ``(key, digest)`` items under ``prefix``, sorted by key.

        ``prefix`` is normally a leaf (``depth`` digits); a shorter one lists its whole
        subtree.
        """
        level, index = self._index(prefix, self._depth)
        return self.leaf_range_items(index << (self._bits * (self._depth - level)),
                                     (index + 1) << (self._bits * (self._depth - level)))

    def leaf_digests(self, leaf: int) -> list[bytes]:
        """The item digests of leaf number ``leaf`` (0 <= leaf < leaf_count), in key order."""
        if type(leaf) is not int or not 0 <= leaf < self.leaf_count:
            raise InvalidArgumentError(f"leaf lies in [0, {self.leaf_count}), got {leaf!r}")
        items = self._leaf(leaf)
        if len(items) < 2:
            return list(items.values())
        return [items[k] for k in sorted(items)]

    def leaf_range_items(self, lo: int, hi: int) -> list[tuple[str, bytes]]:
        """The items of the leaves with index in ``[lo, hi)``, sorted by key."""
        if hi - lo == 1:
            return sorted(self._leaf(lo).items())
        a, b = bisect_left(self._base_leaves, lo), bisect_left(self._base_leaves, hi)
        leaves = {*self._base_leaves[a:b], *(i for i in self._buckets if lo <= i < hi)}
        return sorted(item for i in leaves for item in self._leaf(i).items())

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
