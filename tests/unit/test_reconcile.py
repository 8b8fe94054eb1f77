"""Reconciliation state machine: finds exactly the symmetric difference, in at most depth + 1
request rounds, descending only where node values differ, and ends even when a side changes
under it."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.errors import InvalidArgumentError
from broker.merkle import (
    DIGEST_SIZE,
    Diff,
    LeafRequest,
    MerkleTree,
    NodeRequest,
    Prefix,
    Reconciliation,
    RootInfo,
    Side,
    diff,
    node_answer,
)

SECRET = b"k" * 32
SHAPES = [(4, 3), (16, 2), (16, 4), (2, 5)]

keys = st.text(min_size=1, max_size=5)


def digest_of(n: int) -> bytes:
    return hashlib.blake2b(str(n).encode(), digest_size=DIGEST_SIZE).digest()


# Digests are keyed hashes by contract (the tree adds them as they are): pseudo-random values.
digests = st.integers(0, 2**40).map(digest_of)


@st.composite
def tree_pairs(draw: st.DrawFn) -> tuple[dict[str, bytes], dict[str, bytes], tuple[int, int]]:
    """Two item sets with a shared part, keys only on one side, and keys changed on both."""
    shared = draw(st.dictionaries(keys, digests, max_size=60))
    only_left = draw(st.dictionaries(keys, digests, max_size=8))
    only_right = draw(st.dictionaries(keys, digests, max_size=8))
    changed = draw(st.dictionaries(keys, st.tuples(digests, digests), max_size=8))
    left = {**shared, **only_left, **{k: a for k, (a, _) in changed.items()}}
    right = {**shared, **only_right, **{k: b for k, (_, b) in changed.items()}}
    # An item digest binds its key (``item_digest``; tree scheme 2 counts on it): one key's
    # digest under another key would be a different item with the same value, which the
    # sums cannot tell apart (e.g. {"0": d} and {"00": d} have equal roots).
    return _bound(left), _bound(right), draw(st.sampled_from(SHAPES))


def _bound(items: dict[str, bytes]) -> dict[str, bytes]:
    return {
        k: hashlib.blake2b(k.encode() + b"\0" + d, digest_size=DIGEST_SIZE).digest()
        for k, d in items.items()
    }


def expected(left: dict[str, bytes], right: dict[str, bytes]) -> tuple[tuple[str, ...], ...]:
    return (
        tuple(sorted(left.keys() - right.keys())),
        tuple(sorted(right.keys() - left.keys())),
        tuple(sorted(k for k in left.keys() & right.keys() if left[k] != right[k])),
    )


def answer(rec: Reconciliation, trees: dict[Side, MerkleTree], requests: list[Any]) -> None:
    for req in requests:
        tree = trees[req.side]
        if isinstance(req, NodeRequest):
            rec.receive_nodes(req.side, tree.child_hashes(req.prefixes))
        else:
            rec.receive_leaves(req.side, tree.leaves(req.prefixes))


@given(tree_pairs())
@settings(max_examples=150)
def test_finds_exactly_the_symmetric_difference(pair) -> None:
    left_items, right_items, (fanout, depth) = pair
    left = MerkleTree.build(left_items.items(), key=SECRET, fanout=fanout, depth=depth)
    right = MerkleTree.build(right_items.items(), key=SECRET, fanout=fanout, depth=depth)
    rec = Reconciliation(RootInfo.of(left), RootInfo.of(right))
    trees = {Side.LEFT: left, Side.RIGHT: right}
    rounds = 0
    while not rec.done:
        requests = rec.next_requests()
        assert requests == rec.next_requests()  # asking again changes nothing
        assert sorted(r.side.value for r in requests) == ["left", "right"]
        assert requests[0].prefixes == requests[1].prefixes  # one batched request per side
        for req in requests:
            level = len(req.prefixes[0])
            assert all(len(p) == level for p in req.prefixes)
            assert isinstance(req, LeafRequest) == (level == depth)
            # only descend where the two trees differ
            assert all(left.node(p) != right.node(p) for p in req.prefixes)
        answer(rec, trees, requests[::-1] if rounds % 2 else requests)
        rounds += 1
    result = rec.result()
    assert (result.only_left, result.only_right, result.different) == expected(
        left_items, right_items
    )
    assert result.inconsistent == ()
    assert result.round_trips == rounds <= depth + 1
    # every compared pair below the root is a child of a differing node, and nothing else
    moved = result.keys
    differing_parents = {left.path(k)[:level] for k in moved for level in range(depth)}
    assert result.nodes_compared == 1 + fanout * len(differing_parents)
    differing_leaves = {left.path(k) for k in moved}
    assert result.items_compared == sum(
        len({k for k, _ in left.leaf_items(p)} | {k for k, _ in right.leaf_items(p)})
        for p in differing_leaves
    )
    assert result.in_sync == (left_items == right_items)
    assert diff(left, right) == result


@given(st.dictionaries(keys, digests, max_size=50), st.sampled_from(SHAPES))
def test_identical_trees_need_no_request(items: dict[str, bytes], shape) -> None:
    fanout, depth = shape
    left = MerkleTree.build(items.items(), key=SECRET, fanout=fanout, depth=depth)
    right = MerkleTree(SECRET, fanout=fanout, depth=depth)
    for k, d in reversed(items.items()):
        right.set(k, d)
    rec = Reconciliation(RootInfo.of(left), RootInfo.of(right))
    assert rec.done
    assert rec.next_requests() == []
    assert rec.result() == Diff((), (), (), round_trips=0, nodes_compared=1, items_compared=0)
    assert rec.result().in_sync


def test_one_differing_key_walks_one_path() -> None:
    items = {f"k{i}": digest_of(i) for i in range(10_000)}
    left = MerkleTree.build(items.items(), key=SECRET)
    right = MerkleTree.build(items.items(), key=SECRET)
    right.set("k7", digest_of(-7))
    result = diff(left, right)
    assert result.different == ("k7",)
    assert result.round_trips == 5
    assert result.nodes_compared == 1 + 16 * 4
    assert result.items_compared == len(left.leaf_items(left.path("k7")))


def test_one_side_empty() -> None:
    items = {f"k{i}": digest_of(i) for i in range(300)}
    left = MerkleTree.build(items.items(), key=SECRET, fanout=4, depth=3)
    right = MerkleTree(SECRET, fanout=4, depth=3)
    result = diff(left, right)
    assert result.only_left == tuple(sorted(items))
    assert not result.only_right
    assert result.round_trips == 4


# -- version vectors -------------------------------------------------------------------------


def test_equal_roots_end_it_whatever_the_vectors_say() -> None:
    tree = MerkleTree.build([("a", digest_of(1))], key=SECRET)
    same = diff(tree, tree, left_vector={"r1": 3, "r2": 0}, right_vector={"r1": 3})
    assert same.vectors_equal is True
    assert same.round_trips == 0
    other = diff(tree, tree, left_vector={"r1": 3}, right_vector={"r1": 4})
    assert other.vectors_equal is False
    assert other.round_trips == 0
    assert other.in_sync
    assert diff(tree, tree, left_vector={"r1": 3}).vectors_equal is None


def test_equal_vectors_do_not_hide_a_lost_item() -> None:
    # bit rot, a restored backup or a lost delta: vectors agree, items do not
    left = MerkleTree.build([("a", digest_of(1)), ("b", digest_of(2))], key=SECRET)
    right = MerkleTree.build([("a", digest_of(1))], key=SECRET)
    result = diff(left, right, left_vector={"r1": 9}, right_vector={"r1": 9})
    assert result.vectors_equal is True
    assert result.only_left == ("b",)


# -- answers that change between rounds ------------------------------------------------------


def test_a_write_that_closes_the_gap_mid_way_is_reported_not_looped_on() -> None:
    items = {f"k{i}": digest_of(i) for i in range(500)}
    left = MerkleTree.build(items.items(), key=SECRET)
    right = MerkleTree.build(items.items(), key=SECRET)
    right.set("k1", digest_of(-1))
    rec = Reconciliation(RootInfo.of(left), RootInfo.of(right))
    answer(rec, {Side.LEFT: left, Side.RIGHT: right}, rec.next_requests())
    right.set("k1", digest_of(1))  # a concurrent write makes the sides equal again
    trees = {Side.LEFT: left, Side.RIGHT: right}
    while not rec.done:
        answer(rec, trees, rec.next_requests())
    result = rec.result()
    assert not (result.only_left)
    assert not (result.only_right)
    assert not (result.different)
    assert result.inconsistent == (left.path("k1")[:1],)
    assert not result.in_sync
    assert result.round_trips == 2


def test_a_change_seen_only_at_the_leaves_is_reported() -> None:
    left = MerkleTree.build([("a", digest_of(1))], key=SECRET, fanout=4, depth=2)
    right = MerkleTree.build([("a", digest_of(2))], key=SECRET, fanout=4, depth=2)
    rec = Reconciliation(RootInfo.of(left), RootInfo.of(right))
    trees = {Side.LEFT: left, Side.RIGHT: right}
    answer(rec, trees, rec.next_requests())
    answer(rec, trees, rec.next_requests())
    right.set("a", digest_of(1))
    answer(rec, trees, rec.next_requests())
    assert rec.result().inconsistent == (left.path("a"),)
    assert rec.result().items_compared == 1


@st.composite
def churn(draw: st.DrawFn):
    pair = draw(tree_pairs())
    writes = draw(
        st.lists(
            st.lists(st.tuples(st.sampled_from(Side), keys, st.none() | digests), max_size=4),
            max_size=8,
        )
    )
    return pair, writes


@given(churn())
@settings(max_examples=100)
def test_ends_within_depth_plus_one_rounds_under_concurrent_writes(case) -> None:
    (left_items, right_items, (fanout, depth)), writes = case
    trees = {
        Side.LEFT: MerkleTree.build(left_items.items(), key=SECRET, fanout=fanout, depth=depth),
        Side.RIGHT: MerkleTree.build(right_items.items(), key=SECRET, fanout=fanout, depth=depth),
    }
    rec = Reconciliation(RootInfo.of(trees[Side.LEFT]), RootInfo.of(trees[Side.RIGHT]))
    rounds = 0
    while not rec.done:
        for side, k, d in writes[rounds] if rounds < len(writes) else []:
            if d is None:
                trees[side].remove(k)
            else:
                trees[side].set(k, d)
        answer(rec, trees, rec.next_requests())
        rounds += 1
    assert rounds <= depth + 1
    result = rec.result()
    assert result.round_trips == rounds
    # every key it names was seen in a leaf it compared
    final_keys = {k for t in trees.values() for k, _ in t.items()}
    assert set(result.keys) <= final_keys | left_items.keys() | right_items.keys()


# -- misuse and malformed answers ------------------------------------------------------------


def started() -> tuple[Reconciliation, MerkleTree, MerkleTree]:
    left = MerkleTree.build([("a", digest_of(1))], key=SECRET, fanout=4, depth=2)
    right = MerkleTree.build([("a", digest_of(2))], key=SECRET, fanout=4, depth=2)
    return Reconciliation(RootInfo.of(left), RootInfo.of(right)), left, right


def test_result_before_done_is_refused() -> None:
    rec, _, _ = started()
    with pytest.raises(InvalidArgumentError, match="not done"):
        rec.result()


def test_shapes_must_agree() -> None:
    a = RootInfo(b"\x01" * 32, 1, fanout=16, depth=4)
    b = RootInfo(b"\x02" * 32, 1, fanout=16, depth=3)
    with pytest.raises(InvalidArgumentError, match="shapes"):
        Reconciliation(a, b)
    with pytest.raises(InvalidArgumentError):
        Reconciliation(a, "root")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"root": b"", "count": 0},
        {"root": "00", "count": 0},
        {"root": b"x", "count": -1},
        {"root": b"x", "count": 1.0},
        {"root": b"x", "count": 1, "fanout": 3},
        {"root": b"x", "count": 1, "version_vector": {"r": -1}},
        {"root": b"x", "count": 1, "version_vector": {1: 1}},
    ],
)
def test_bad_root_infos_are_refused(kwargs) -> None:
    with pytest.raises(InvalidArgumentError):
        RootInfo(**kwargs)


def test_malformed_node_answers_are_refused() -> None:
    rec, left, _right = started()
    good = left.child_hashes([()])
    with pytest.raises(InvalidArgumentError, match="exactly"):
        rec.receive_nodes(Side.LEFT, {(0,): good[(0,)]})
    with pytest.raises(InvalidArgumentError, match="exactly"):
        rec.receive_nodes(Side.LEFT, {**good, (0, 0): b"x"})
    with pytest.raises(InvalidArgumentError, match="non-empty"):
        rec.receive_nodes(Side.LEFT, {**good, (0,): b""})
    with pytest.raises(InvalidArgumentError, match="LeafRequest"):
        rec.receive_leaves(Side.LEFT, {})
    with pytest.raises(InvalidArgumentError, match="Side"):
        rec.receive_nodes("left", good)  # type: ignore[arg-type]
    rec.receive_nodes(Side.LEFT, good)
    with pytest.raises(InvalidArgumentError, match="NodeRequest"):
        rec.receive_nodes(Side.LEFT, good)  # answered already
    assert [r.side for r in rec.next_requests()] == [Side.RIGHT]


def at_leaves() -> tuple[Reconciliation, LeafRequest]:
    rec, left, right = started()
    answer(rec, {Side.LEFT: left, Side.RIGHT: right}, rec.next_requests())
    answer(rec, {Side.LEFT: left, Side.RIGHT: right}, rec.next_requests())
    request = rec.next_requests()[0]
    assert isinstance(request, LeafRequest)
    return rec, request


def test_malformed_leaf_answers_are_refused() -> None:
    _, request = at_leaves()
    leaf: Prefix = request.prefixes[0]
    other: Prefix = (0, 0) if leaf != (0, 0) else (0, 1)
    bad_answers: tuple[Any, ...] = (
        {},
        {leaf: [("a", digest_of(1))], other: []},
        {leaf: [("a", digest_of(1)), ("a", digest_of(1))]},
        {leaf: [("a", "digest")]},
        {leaf: [["a", digest_of(1)]]},
        {leaf: "ab"},
    )
    for bad in bad_answers:
        rec, _ = at_leaves()
        with pytest.raises(InvalidArgumentError):
            rec.receive_leaves(Side.LEFT, bad)
    rec, _ = at_leaves()
    with pytest.raises(InvalidArgumentError, match="NodeRequest"):
        rec.receive_nodes(Side.RIGHT, {})
    rec.receive_leaves(Side.LEFT, {leaf: [("a", digest_of(1))]})
    rec.receive_leaves(Side.RIGHT, {leaf: [("a", digest_of(2))]})
    assert rec.result().different == ("a",)


def test_truncated_node_values_still_find_the_difference() -> None:
    items = {f"k{i}": digest_of(i) for i in range(2_000)}
    left = MerkleTree.build(items.items(), key=SECRET)
    right = MerkleTree.build(items.items(), key=SECRET)
    right.remove("k5")
    right.set("new", digest_of(-1))
    rec = Reconciliation(RootInfo.of(left), RootInfo.of(right))
    trees = {Side.LEFT: left, Side.RIGHT: right}
    while not rec.done:
        for req in rec.next_requests():
            tree = trees[req.side]
            if isinstance(req, NodeRequest):
                short = {p: v[:8] for p, v in tree.child_hashes(req.prefixes).items()}
                rec.receive_nodes(req.side, short)
            else:
                rec.receive_leaves(req.side, tree.leaves(req.prefixes))
    assert rec.result().only_left == ("k5",)
    assert rec.result().only_right == ("new",)


def test_equal_roots_with_different_counts_are_looked_into() -> None:
    tree = MerkleTree.build([("a", digest_of(1))], key=SECRET, fanout=4, depth=2)
    rec = Reconciliation(RootInfo(tree.root(), 1, 4, 2), RootInfo(tree.root(), 2, 4, 2))
    assert [type(r) for r in rec.next_requests()] == [NodeRequest, NodeRequest]
    answer(rec, {Side.LEFT: tree, Side.RIGHT: tree}, rec.next_requests())
    assert rec.done
    assert rec.result().inconsistent == ((),)
    assert rec.result().round_trips == 1


# -- top levels with the root, packed and truncated values ------------------------------------


@given(
    tree_pairs(),
    st.sampled_from([0, 1, 2]),
    st.sampled_from([0, 1, 2]),
    st.sampled_from([32, 8, 6]),
)
@settings(max_examples=200)
def test_top_levels_and_packed_truncated_values_find_the_same_difference(
    pair, left_levels: int, right_levels: int, width: int
) -> None:
    left_items, right_items, (fanout, depth) = pair
    left_levels, right_levels = min(left_levels, depth - 1), min(right_levels, depth - 1)
    left = MerkleTree.build(left_items.items(), key=SECRET, fanout=fanout, depth=depth)
    right = MerkleTree.build(right_items.items(), key=SECRET, fanout=fanout, depth=depth)
    rec = Reconciliation(
        RootInfo.of(left, levels=left_levels, width=width),
        RootInfo.of(right, levels=right_levels, width=width),
    )
    trees = {Side.LEFT: left, Side.RIGHT: right}
    rounds = 0
    while not rec.done:
        for req in rec.next_requests():
            tree = trees[req.side]
            if isinstance(req, NodeRequest):
                rec.receive_nodes(req.side, node_answer(tree, req.prefixes, width))
            else:
                rec.receive_leaves(req.side, tree.leaves(req.prefixes))
        rounds += 1
    result = rec.result()
    assert (result.only_left, result.only_right, result.different) == expected(
        left_items, right_items
    )
    assert result.round_trips == rounds
    if left_items != right_items:
        top = max(left_levels, right_levels)
        extra = 1 if left_levels != right_levels and top else 0
        assert rounds <= depth + 1 - top + extra
    assert result.keys == diff(left, right).keys


def test_two_top_levels_make_four_round_trips_at_a_million_leaves_scale() -> None:
    items = {f"k{i}": digest_of(i) for i in range(20_000)}
    left = MerkleTree.build(items.items(), key=SECRET)
    right = MerkleTree.build(items.items(), key=SECRET)
    for i in range(0, 300, 3):
        left.remove(f"k{i}")
        right.remove(f"k{i + 1}")
        right.set(f"k{i + 2}", digest_of(-i))
    result = diff(left, right, levels=2, width=8)
    assert len(result.keys) == 300
    assert result.round_trips == 3  # level 3, level 4, leaves: plus the root fetch, 4


def test_packed_answers_are_checked_for_size() -> None:
    rec, left, _right = started()
    with pytest.raises(InvalidArgumentError, match="exactly"):
        rec.receive_nodes(Side.LEFT, b"x" * 7)
    rec.receive_nodes(Side.LEFT, node_answer(left, [()]))
    assert [r.side for r in rec.next_requests()] == [Side.RIGHT]


def test_root_infos_with_bad_levels_or_schemes_are_refused() -> None:
    tree = MerkleTree.build([("a", digest_of(1))], key=SECRET, fanout=4, depth=3)
    with pytest.raises(InvalidArgumentError, match="level 1"):
        RootInfo(tree.root(), 1, 4, 3, levels=(b"x" * 31,), width=8)
    with pytest.raises(InvalidArgumentError, match="fewer than depth"):
        RootInfo.of(tree, levels=3)
    with pytest.raises(InvalidArgumentError, match="width"):
        RootInfo(tree.root(), 1, 4, 3, width=0)
    old = RootInfo(tree.root(), 1, 4, 3, scheme=1)
    with pytest.raises(InvalidArgumentError, match="schemes differ"):
        Reconciliation(old, RootInfo.of(tree))


@given(tree_pairs(), st.sampled_from([4, 8, 32]), st.sampled_from([0, 2]))
@settings(max_examples=150)
def test_leaf_digests_alone_name_exactly_the_unmatched_items(
    pair, item_width: int, levels: int
) -> None:
    left_items, right_items, (fanout, depth) = pair
    levels = min(levels, depth - 1)
    left = MerkleTree.build(left_items.items(), key=SECRET, fanout=fanout, depth=depth)
    right = MerkleTree.build(right_items.items(), key=SECRET, fanout=fanout, depth=depth)
    result = diff(left, right, levels=levels, width=8, item_width=item_width)
    assert (result.only_left, result.only_right, result.different) == ((), (), ())
    lset, rset = set(left_items.items()), set(right_items.items())
    assert result.left_items == tuple(
        sorted((left.path(k), d[-item_width:]) for k, d in lset - rset)
    )
    assert result.right_items == tuple(
        sorted((right.path(k), d[-item_width:]) for k, d in rset - lset)
    )
    assert result.in_sync == (left_items == right_items)


def test_a_leaf_round_takes_one_form() -> None:
    _, request = at_leaves()
    leaf: Prefix = request.prefixes[0]
    rec, _ = at_leaves()
    rec.receive_leaves(Side.LEFT, {p: [] for p in request.prefixes})
    with pytest.raises(InvalidArgumentError, match="same form"):
        rec.receive_leaf_digests(Side.RIGHT, {p: [] for p in request.prefixes})
    rec, _ = at_leaves()
    for bad in ({}, {leaf: b"ab"}, {leaf: [b""]}, {leaf: ["x"]}):
        with pytest.raises(InvalidArgumentError):
            rec.receive_leaf_digests(Side.LEFT, bad)  # type: ignore[arg-type]
