"""Writes as values (``TreeOp``) and the coalescing of increment runs."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from broker.crdt import INT64_MAX, Add, Assign, Create, Increment, Move, Tree, coalesce


def test_runs_of_one_counter_become_one_increment_of_their_sum() -> None:
    a, b = Increment("x", ("n",), 2), Increment("x", ("n",), -5)
    other = Increment("x", ("m",), 1)
    s = Assign("x", ("k",), 1)
    got = list(coalesce([a, a, b, other, other, s, a]))
    assert got == [
        (Increment("x", ("n",), -1), 3),
        (Increment("x", ("m",), 2), 2),
        (s, 1),
        (a, 1),
    ]


def test_invalid_amounts_and_sum_overflow_end_a_run() -> None:
    big = Increment("x", ("n",), INT64_MAX)
    bad = Increment("x", ("n",), True)  # a bool is not an amount: it must fail by itself
    one = Increment("x", ("n",), 1)
    assert list(coalesce([one, bad, one])) == [(one, 1), (bad, 1), (one, 1)]
    assert list(coalesce([big, one, one])) == [(big, 1), (Increment("x", ("n",), 2), 2)]


def test_mutator_functions_stand_alone() -> None:
    def fn(t: Tree, rid: str, ts: int) -> Any:
        return t.increment(rid, "x", ("n",), 1)

    ops: list[Any] = [fn, fn]
    assert list(coalesce(ops)) == [(fn, 1), (fn, 1)]


amounts = st.integers(-3, 3)
op_lists = st.lists(
    st.one_of(
        st.builds(Increment, st.just("x"), st.sampled_from([("n",), ("m",)]), amounts),
        st.builds(Assign, st.just("x"), st.just(("k",)), st.integers(0, 3)),
        st.builds(Add, st.just("x"), st.just(("s",)), st.integers(0, 3)),
    ),
    max_size=30,
)


@settings(max_examples=200)
@given(op_lists)
def test_coalesced_writes_leave_the_same_values_as_one_by_one(ops: list[Any]) -> None:
    one, many = Tree(), Tree()
    for t in (one, many):
        t.state.merge(t.create("r1", "x", "root", 1))
    for i, op in enumerate(ops, start=2):
        one.state.merge(_delta(one, op, i))
    ts = 2
    for op, count in coalesce(ops):
        op.apply(many, "r1", ts)
        ts += count
    assert one.fields("x") == many.fields("x")
    assert sum(c for _, c in coalesce(ops)) == len(ops)


def _delta(tree: Tree, op: Any, ts: int) -> Any:
    """The op through the plain mutators (not fused), as a reference."""
    if isinstance(op, Increment):
        return tree.increment("r1", op.node, op.path, op.amount)
    if isinstance(op, Assign):
        return tree.assign("r1", op.node, op.path, op.value, ts)
    return tree.add("r1", op.node, op.path, op.element)


def test_tree_ops_apply_in_one_step() -> None:
    t = Tree()
    Create("a").apply(t, "r1", 1)
    Create("b").apply(t, "r1", 2)
    Move("b", "a").apply(t, "r1", 3)
    Assign("b", ("name",), "ada").apply(t, "r1", 4)
    Increment("b", ("n",), 3).apply(t, "r1", 5)
    Add("b", ("tags",), "x").apply(t, "r1", 6)
    assert t.children("a") == ["b"]
    assert t.fields("b") == {"name": "ada", "n": 3, "tags": {"x"}}
