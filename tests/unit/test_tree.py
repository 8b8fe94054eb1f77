"""The worknode tree: structure, concurrent moves without cycles, subtree deletion."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.crdt import MAX_FIELD_DEPTH, ROOT_ID, Tree
from broker.errors import InvalidNodeIdError, NestingDepthError, TreeError, UnknownNodeError


def build(*edges: tuple[str, str]) -> Tree:
    t = Tree()
    for ts, (node, parent) in enumerate(edges, start=1):
        t.merge(t.create("r1", node, parent, ts))
    return t


def exchange(a: Tree, b: Tree) -> None:
    sa, sb = a.state.copy(), b.state.copy()
    a.merge(sb)
    b.merge(sa)


def test_create_children_and_fields() -> None:
    t = build(("a", ROOT_ID), ("b", "a"), ("c", "a"))
    t.merge(t.assign("r1", "b", ("title",), "hello", 10))
    t.merge(t.increment("r1", "b", ("stats", "views"), 2))
    assert t.children(ROOT_ID) == ["a"]
    assert t.children("a") == ["b", "c"]
    assert t.parent("b") == "a"
    assert t.fields("b") == {"title": "hello", "stats": {"views": 2}}
    assert list(t.walk()) == [(1, "a"), (2, "b"), (2, "c")]


def test_concurrent_moves_that_would_form_a_cycle_show_no_cycle() -> None:
    base = build(("a", ROOT_ID), ("b", ROOT_ID))
    r1, r2 = Tree(base.state.copy()), Tree(base.state.copy())
    r1.merge(r1.move("r1", "a", "b", 100))  # a under b
    r2.merge(r2.move("r2", "b", "a", 200))  # b under a, later
    exchange(r1, r2)
    assert r1.parents() == r2.parents()
    # The earlier move stands; the later one would close a cycle and yields to the root.
    assert r1.parents() == {"a": "b", "b": ROOT_ID}
    assert r1.state == r2.state


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 4), st.integers(0, 5)), max_size=20))
def test_random_concurrent_moves_never_show_a_cycle(moves: list[tuple[int, int, int]]) -> None:
    names = ["n0", "n1", "n2", "n3", "n4"]
    base = build(*[(n, ROOT_ID) for n in names])
    reps = [Tree(base.state.copy()) for _ in range(3)]
    for ts, (i, node, target) in enumerate(moves, start=100):
        t = reps[i]
        dest = ROOT_ID if target == 5 else names[target]
        # A move refused locally (it would form a cycle in this view) changes nothing.
        with contextlib.suppress(TreeError):
            t.merge(t.move(f"r{i}", names[node], dest, ts))
    for a in reps:
        for b in reps:
            a.merge(b.state.copy())
    views = [r.parents() for r in reps]
    assert views[0] == views[1] == views[2]
    for start in views[0]:
        seen, cur = set(), start
        while cur != ROOT_ID:
            assert cur not in seen, f"cycle through {cur}"
            seen.add(cur)
            cur = views[0][cur]
    assert sorted(n for _, n in reps[0].walk()) == names


def test_move_under_own_descendant_is_refused_locally() -> None:
    t = build(("a", ROOT_ID), ("b", "a"))
    with pytest.raises(TreeError):
        t.move("r1", "a", "b", 5)
    with pytest.raises(TreeError):
        t.move("r1", "a", "a", 5)


def test_delete_removes_subtree_as_observed() -> None:
    base = build(("a", ROOT_ID), ("b", "a"), ("c", "b"))
    r1, r2 = Tree(base.state.copy()), Tree(base.state.copy())
    r1.merge(r1.delete("a"))
    r2.merge(r2.create("r2", "late", "c", 50))  # concurrent: r1 never saw it
    r2.merge(r2.assign("r2", "b", ("note",), "kept", 51))
    exchange(r1, r2)
    assert r1.parents() == r2.parents()
    # The unseen child survives and hangs under the root; so does b, revived by the
    # concurrent field write (add-wins), without its deleted parent.
    assert r1.parents() == {"late": ROOT_ID, "b": ROOT_ID}
    assert r1.fields("b") == {"note": "kept"}


def test_bad_ids_and_unknown_nodes() -> None:
    t = build(("a", ROOT_ID))
    with pytest.raises(InvalidNodeIdError):
        t.create("r1", "x.y", ROOT_ID, 1)
    with pytest.raises(InvalidNodeIdError):
        t.create("r1", ROOT_ID, ROOT_ID, 1)
    with pytest.raises(UnknownNodeError):
        t.create("r1", "z", "missing", 1)
    with pytest.raises(TreeError):
        t.create("r1", "a", ROOT_ID, 1)
    with pytest.raises(UnknownNodeError):
        t.assign("r1", "nope", ("f",), 1, 1)
    with pytest.raises(NestingDepthError):
        t.assign("r1", "a", tuple(f"f{i}" for i in range(MAX_FIELD_DEPTH + 1)), 1, 1)


def test_node_id_memo_still_refuses_the_root_bad_ids_and_str_subclasses() -> None:
    from broker.crdt import validate_node_id

    class Id(str):
        __slots__ = ()

    for i in range(5000):  # past the memo's bound: it is cleared and refilled
        validate_node_id(f"n{i}")
    assert validate_node_id("n1") == "n1"
    with pytest.raises(InvalidNodeIdError):
        validate_node_id(ROOT_ID)
    assert validate_node_id(ROOT_ID, allow_root=True) == ROOT_ID
    with pytest.raises(InvalidNodeIdError):
        validate_node_id(ROOT_ID)  # allowing it once does not remember it as valid
    with pytest.raises(InvalidNodeIdError):
        validate_node_id("a b")
    assert validate_node_id(Id("n1")) == "n1"  # valid text; checked, never remembered
    with pytest.raises(InvalidNodeIdError):
        validate_node_id(Id("a b"))
