"""MerkleTree: node values depend only on the set of (key, digest), incremental maintenance
equals a rebuild, the secret keys every hash, and bad input is refused."""

from __future__ import annotations

import hashlib
import itertools
from collections import Counter
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.errors import InvalidArgumentError
from broker.merkle import DIGEST_SIZE, HASH_SIZE, MerkleTree, Prefix

SECRET = b"s" * 32
OTHER_SECRET = b"t" * 32
SMALL = {"fanout": 4, "depth": 3}  # 64 leaves: small enough to compare every node

keys = st.text(min_size=0, max_size=6)


def digest_of(n: int) -> bytes:
    return hashlib.blake2b(str(n).encode(), digest_size=DIGEST_SIZE).digest()


# Digests are keyed hashes by contract (the tree adds them as they are): pseudo-random values.
digests = st.integers(0, 2**40).map(digest_of)
item_sets = st.dictionaries(keys, digests, max_size=40)


def all_prefixes(fanout: int, depth: int) -> list[Prefix]:
    return [p for level in range(depth + 1) for p in itertools.product(range(fanout), repeat=level)]


def snapshot(tree: MerkleTree) -> dict[Prefix, bytes]:
    """Every node value of a small tree."""
    return {p: tree.node(p) for p in all_prefixes(tree.fanout, tree.depth)}


def leaf_snapshot(tree: MerkleTree) -> dict[Prefix, list[tuple[str, bytes]]]:
    leaves = itertools.product(range(tree.fanout), repeat=tree.depth)
    return {p: tree.leaf_items(p) for p in leaves}


# -- order and history independence ----------------------------------------------------------


@given(item_sets, st.randoms(use_true_random=False))
def test_every_node_depends_only_on_the_set(items: dict[str, bytes], rnd) -> None:
    pairs = list(items.items())
    shuffled = pairs[:]
    rnd.shuffle(shuffled)
    built = MerkleTree.build(pairs, key=SECRET, **SMALL)
    incremental = MerkleTree(SECRET, **SMALL)
    for k, d in shuffled:
        assert incremental.set(k, d) is None
    assert snapshot(incremental) == snapshot(built)
    assert leaf_snapshot(incremental) == leaf_snapshot(built)
    assert incremental.count() == built.count() == len(items)


ops = st.lists(
    st.tuples(st.sampled_from(["set", "remove", "update"]), st.sampled_from("abcdefgh"), digests),
    max_size=60,
)


@given(ops)
@settings(max_examples=150)
def test_any_history_reaching_a_set_gives_the_rebuilt_tree(history) -> None:
    tree = MerkleTree(SECRET, **SMALL)
    model: dict[str, bytes] = {}
    for op, k, d in history:
        if op == "set":
            assert tree.set(k, d) == model.get(k)
            model[k] = d
        elif op == "remove":
            assert tree.remove(k) == model.pop(k, None)
        elif k in model:  # update: delete what is there, or change it
            new = None if d[0] % 2 else d
            tree.update(k, model[k], new)
            if new is None:
                del model[k]
            else:
                model[k] = new
        else:
            tree.update(k, None, d)
            model[k] = d
    rebuilt = MerkleTree.build(model.items(), key=SECRET, **SMALL)
    assert snapshot(tree) == snapshot(rebuilt)
    assert leaf_snapshot(tree) == leaf_snapshot(rebuilt)
    assert sorted(tree.items()) == sorted(model.items())
    assert len(tree) == tree.count() == len(model)


@given(item_sets)
def test_removing_everything_gives_the_empty_tree(items: dict[str, bytes]) -> None:
    tree = MerkleTree.build(items.items(), key=SECRET, **SMALL)
    for k in items:
        tree.remove(k)
    assert snapshot(tree) == snapshot(MerkleTree(SECRET, **SMALL))
    assert tree.root() == bytes(HASH_SIZE)
    assert tree.count() == 0
    assert list(tree.items()) == []
    assert all(not tree._leaf(leaf) for leaf in tree._leaf_indices())
    assert all(k not in tree for k in items)
    assert tree.leaf_items(()) == []
    assert all(not level for level in tree._levels)  # sparse: nothing left behind


@given(item_sets)
def test_each_node_is_the_sum_of_its_children(items: dict[str, bytes]) -> None:
    tree = MerkleTree.build(items.items(), key=SECRET, **SMALL)
    for prefix in all_prefixes(tree.fanout, tree.depth - 1):
        total = sum(int.from_bytes(c, "big") for c in tree.children(prefix)) % 2**256
        assert total.to_bytes(HASH_SIZE, "big") == tree.node(prefix)
        assert tree.children(prefix) == [tree.node((*prefix, d)) for d in range(tree.fanout)]


@given(item_sets)
def test_the_root_does_not_depend_on_the_shape(items: dict[str, bytes]) -> None:
    roots = {
        MerkleTree.build(items.items(), key=SECRET, fanout=f, depth=d).root()
        for f, d in [(2, 1), (4, 3), (16, 4), (64, 3), (256, 2)]
    }
    assert len(roots) == 1


# -- what the hashes bind ------------------------------------------------------------------


@given(item_sets.filter(lambda items: len(items) > 1))
def test_a_different_secret_gives_different_inner_nodes(items: dict[str, bytes]) -> None:
    # The root is the sum of the (keyed) digests; the secret also decides where items sit.
    a = MerkleTree.build(items.items(), key=SECRET, **SMALL)
    b = MerkleTree.build(items.items(), key=OTHER_SECRET, **SMALL)
    assert a.root() == b.root()
    spread = {k: (a.path(k), b.path(k)) for k in items}
    if any(pa != pb for pa, pb in spread.values()):
        assert snapshot(a) != snapshot(b)


def test_a_different_secret_places_keys_in_other_leaves() -> None:
    a, b = MerkleTree(SECRET), MerkleTree(OTHER_SECRET)
    names = [f"k{i}" for i in range(50)]
    assert sum(a.path(k) == b.path(k) for k in names) <= 2


@given(item_sets.filter(bool), keys, digests)
def test_any_change_changes_the_root(items: dict[str, bytes], key: str, digest: bytes) -> None:
    tree = MerkleTree.build(items.items(), key=SECRET)
    before = tree.root()
    previous = tree.set(key, digest)
    assert (tree.root() == before) == (previous == digest)


def test_the_hash_definitions_are_a_protocol_contract() -> None:
    # Replicas of different releases must agree on every node value: recompute the root and
    # the leaf choice from the documented definitions (scheme 2: an item's value is its
    # digest), and pin one root.
    items = [("a", digest_of(1)), ("node-0000042", digest_of(2))]
    tree = MerkleTree.build(items, key=SECRET)
    total = 0
    for k, d in items:
        kb = k.encode()
        total += int.from_bytes(d, "big")
        leaf = hashlib.blake2b(kb, digest_size=8, key=SECRET, person=b"wn-merkle-leaf")
        bits = int.from_bytes(leaf.digest(), "big") >> (64 - 16)
        assert tree.path(k) == tuple((bits >> s) & 15 for s in (12, 8, 4, 0))
        assert tree.leaf_index(k) == bits
    assert tree.root() == (total % 2**256).to_bytes(32, "big")
    assert tree.root().hex() == (
        "c3f172543e1ea3a0191ddebec4e4078b4f1f21d8c3f9d56d79189ffef8d00bc7"
    )
    assert tree.path("a") == (11, 14, 1, 13)


def test_keys_spread_evenly_over_leaves() -> None:
    tree = MerkleTree.build(
        ((f"node-{i:06d}", digest_of(i)) for i in range(16_384)), key=SECRET, fanout=16, depth=2
    )
    per_leaf = Counter(tree.path(f"node-{i:06d}") for i in range(16_384))
    assert len(per_leaf) == 256
    # 64 expected per leaf, standard deviation 8: 6 sigma either side
    assert min(per_leaf.values()) > 16
    assert max(per_leaf.values()) < 112


# -- queries ---------------------------------------------------------------------------------


def test_queries_on_a_known_tree() -> None:
    items = [(f"k{i}", digest_of(i)) for i in range(200)]
    tree = MerkleTree.build(items, key=SECRET, **SMALL)
    assert tree.fanout == 4
    assert tree.depth == 3
    assert tree.leaf_count == 64
    assert tree.node(()) == tree.root() != bytes(HASH_SIZE)
    assert len(tree.children(())) == 4
    assert tree.leaf_items(()) == sorted(items)
    for k, d in items[:20]:
        assert tree.get(k) == d
        assert k in tree
        assert (k, d) in tree.leaf_items(tree.path(k))
        assert (k, d) in tree.leaf_items(tree.path(k)[:1])
    assert tree.get("absent") is None
    assert "absent" not in tree
    assert 3 not in tree
    for prefix in all_prefixes(4, 2):
        assert tree.leaf_items(prefix) == sorted(
            item for item in items if tree.path(item[0])[: len(prefix)] == prefix
        )
    leaf = tree.path("k1")
    assert tree.leaves([leaf]) == {leaf: tree.leaf_items(leaf)}
    wanted: dict[Prefix, bytes] = {(d,): tree.node((d,)) for d in range(4)}
    wanted.update({(2, d): tree.node((2, d)) for d in range(4)})
    assert tree.child_hashes([(), (2,)]) == wanted
    assert "count=200" in repr(tree)


def test_leaf_items_of_a_wide_sparse_prefix() -> None:
    tree = MerkleTree.build([("a", digest_of(1)), ("b", digest_of(2))], key=SECRET)
    assert tree.leaf_items(()) == [("a", digest_of(1)), ("b", digest_of(2))]
    assert tree.leaf_items(tree.path("a")[:1]) == [
        i for i in tree.leaf_items(()) if tree.path(i[0])[0] == tree.path("a")[0]
    ]


def test_empty_tree() -> None:
    tree = MerkleTree(SECRET)
    assert tree.root() == bytes(HASH_SIZE)
    assert tree.count() == 0
    assert tree.children(()) == [bytes(HASH_SIZE)] * 16
    assert tree.leaf_items((0, 0, 0, 0)) == []
    assert tree.remove("x") is None


def test_noop_writes_change_nothing() -> None:
    tree = MerkleTree.build([("a", digest_of(1))], key=SECRET, **SMALL)
    before = snapshot(tree)
    assert tree.set("a", digest_of(1)) == digest_of(1)
    tree.update("b", None, None)
    tree.update("a", digest_of(1), digest_of(1))
    assert snapshot(tree) == before
    assert tree.count() == 1


# -- errors ----------------------------------------------------------------------------------


def test_a_stale_update_is_refused_and_changes_nothing() -> None:
    tree = MerkleTree.build([("a", digest_of(1))], key=SECRET, **SMALL)
    before = snapshot(tree)
    with pytest.raises(InvalidArgumentError, match="stale"):
        tree.update("a", digest_of(2), digest_of(3))
    with pytest.raises(InvalidArgumentError, match="stale"):
        tree.update("a", None, digest_of(3))
    with pytest.raises(InvalidArgumentError, match="stale"):
        tree.update("b", digest_of(1), None)
    assert snapshot(tree) == before


@pytest.mark.parametrize("secret", [b"", b"x" * 15, b"x" * 65, "x" * 32, None])
def test_bad_secrets_are_refused(secret) -> None:
    with pytest.raises(InvalidArgumentError, match="secret"):
        MerkleTree(secret)


@pytest.mark.parametrize(
    ("fanout", "depth"), [(0, 4), (1, 4), (3, 4), (512, 1), (16, 0), (16, 9), (2, 33), (16.0, 4)]
)
def test_bad_shapes_are_refused(fanout, depth) -> None:
    with pytest.raises(InvalidArgumentError):
        MerkleTree(SECRET, fanout=fanout, depth=depth)


def test_bad_items_are_refused() -> None:
    tree = MerkleTree(SECRET)
    bad_digests: tuple[Any, ...] = (b"x" * 31, b"x" * 33, "x" * 32, bytearray(32))
    for bad_digest in bad_digests:
        with pytest.raises(InvalidArgumentError, match="digest"):
            tree.set("a", bad_digest)
        with pytest.raises(InvalidArgumentError, match="digest"):
            tree.update("a", bad_digest, None)
    with pytest.raises(InvalidArgumentError, match="remove"):
        tree.set("a", None)  # type: ignore[arg-type]
    for bad_key in (b"a", 1, None):
        with pytest.raises(InvalidArgumentError, match="str"):
            tree.set(bad_key, digest_of(1))  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="UTF-8"):
        tree.set("\ud800", digest_of(1))
    with pytest.raises(InvalidArgumentError, match="twice"):
        MerkleTree.build([("a", digest_of(1)), ("a", digest_of(2))], key=SECRET)
    assert tree.count() == 0
    assert tree.root() == bytes(HASH_SIZE)


@pytest.mark.parametrize("prefix", [(16,), (-1,), (0, 0, 0, 0, 0), [0], ("0",), (True,)])
def test_bad_prefixes_are_refused(prefix) -> None:
    tree = MerkleTree(SECRET)
    with pytest.raises(InvalidArgumentError, match="prefix"):
        tree.node(prefix)
    with pytest.raises(InvalidArgumentError, match="prefix"):
        tree.leaf_items(prefix)


def test_leaves_have_no_children() -> None:
    with pytest.raises(InvalidArgumentError, match="prefix"):
        MerkleTree(SECRET, **SMALL).children((0, 0, 0))


# -- cold build, base slices and the wire form of node values --------------------------------


@given(item_sets, item_sets, st.randoms(use_true_random=False))
@settings(max_examples=150)
def test_writes_after_a_cold_build_equal_a_rebuild(
    first: dict[str, bytes], second: dict[str, bytes], rnd
) -> None:
    # The cold build keeps leaves as sorted slices; writes go to per-leaf overlays (a removed
    # built key is hidden, a removed new one forgotten), read through on every lookup.
    tree = MerkleTree.build(first.items(), key=SECRET, **SMALL)
    model = dict(first)
    ops = [(k, d) for k, d in second.items()] + [(k, None) for k in first]
    ops += [(k, None) for k in rnd.sample(sorted(second), len(second) // 2)]
    rnd.shuffle(ops)
    for k, d in ops:
        if d is None:
            assert tree.remove(k) == model.pop(k, None)
        else:
            assert tree.set(k, d) == model.get(k)
            model[k] = d
        assert tree.get(k) == model.get(k)
    for k in {*first, *second}:
        assert tree.get(k) == model.get(k)
        assert (k in tree) == (k in model)
    assert sorted(tree.items()) == sorted(model.items())
    assert len(tree) == len(model)
    rebuilt = MerkleTree.build(list(model.items()), key=SECRET, **SMALL)
    assert snapshot(tree) == snapshot(rebuilt)
    assert leaf_snapshot(tree) == leaf_snapshot(rebuilt)
    assert tree.leaf_items(()) == sorted(model.items())
    assert tree.leaf_items((1,)) == rebuilt.leaf_items((1,))


def test_a_large_cold_build_equals_incremental_inserts() -> None:
    # Enough items that limb sums carry and every level has many nodes.
    items = [(f"node-{i:06d}", digest_of(i)) for i in range(5_000)]
    built = MerkleTree.build(items, key=SECRET)
    incremental = MerkleTree(SECRET)
    for k, d in reversed(items):
        incremental.set(k, d)
    assert built.root() == incremental.root()
    for level in range(5):
        assert built._levels[level] == incremental._levels[level]
    total = sum(int.from_bytes(d, "big") for _, d in items)
    assert built._levels[0][0] == total  # exact, unreduced


@given(item_sets, st.integers(1, HASH_SIZE))
def test_truncated_values_keep_the_sums(items: dict[str, bytes], width: int) -> None:
    tree = MerkleTree.build(items.items(), key=SECRET, **SMALL)
    mod = 2 ** (8 * width)
    for level in range(tree.depth):
        parents = range(4**level)
        values = tree.level_values(level, parents, width)
        assert len(values) == width * len(parents)
        for parent in parents:
            children = tree.level_values(level + 1, range(parent * 4, parent * 4 + 4), width)
            total = sum(
                int.from_bytes(children[i : i + width], "big") for i in range(0, 4 * width, width)
            )
            own = int.from_bytes(values[parent * width : (parent + 1) * width], "big")
            assert total % mod == own
    assert tree.level_values(0, [0]) == tree.root()
    assert tree.level_values(0, [0], 8) == tree.root()[-8:]


@pytest.mark.parametrize(("level", "width"), [(-1, 8), (4, 8), (0, 0), (0, 33), (1.0, 8)])
def test_bad_level_reads_are_refused(level, width) -> None:
    with pytest.raises(InvalidArgumentError):
        MerkleTree(SECRET, **SMALL).level_values(level, [0], width)


@pytest.mark.parametrize("n", [5, 40, 300])  # 64 leaves: searched (5) or indexed per leaf
def test_first_writes_after_a_build_find_built_digests_both_ways(n: int) -> None:
    items = {f"k{i}": digest_of(i) for i in range(n)}
    tree = MerkleTree.build(items.items(), key=SECRET, **SMALL)
    assert bool(tree._base_first) == (tree.leaf_count <= 4 * n)
    model = dict(items)
    for i in range(0, n, 2):
        assert tree.set(f"k{i}", digest_of(n + i)) == model[f"k{i}"]
        model[f"k{i}"] = digest_of(n + i)
    for i in range(1, n, 3):
        assert tree.remove(f"k{i}") == model.pop(f"k{i}")
    assert tree.remove("absent") is None
    assert tree.set("new", digest_of(10 * n)) is None
    model["new"] = digest_of(10 * n)
    assert all(tree.get(k) == model.get(k) for k in items)
    rebuilt = MerkleTree.build(model.items(), key=SECRET, **SMALL)
    assert snapshot(tree) == snapshot(rebuilt)
    assert leaf_snapshot(tree) == leaf_snapshot(rebuilt)


@given(item_sets)
def test_leaf_digests_are_the_leaf_items_digests(items: dict[str, bytes]) -> None:
    tree = MerkleTree.build(items.items(), key=SECRET, fanout=4, depth=3)
    for leaf in range(tree.leaf_count):
        digits = tuple((leaf >> (2 * (2 - i))) & 3 for i in range(3))
        assert tree.leaf_digests(leaf) == [d for _, d in tree.leaf_items(digits)]
    for bad in (-1, tree.leaf_count, "0"):
        with pytest.raises(InvalidArgumentError):
            tree.leaf_digests(bad)  # type: ignore[arg-type]
