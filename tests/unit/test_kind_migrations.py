"""Deterministic migrations: replicas that run one independently write the same dots and
converge; running it again writes nothing; it never overwrites an application's write.

The worked example of the README: ``person`` v1 has ``name``; v2 renames ``total`` to
``amount`` (a lens) and splits ``name`` into ``first`` and ``last`` (a migration: no lens
splits a value).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.crdt import Tree
from broker.kinds import KindValidationError, KindView, Migration
from tests.unit.test_kind_registry import PersonV1, PersonV2
from tests.unit.test_kinds import run

V1 = KindView(PersonV1)
V2 = KindView(PersonV2, [PersonV1])


def split(fields: Mapping[str, Any]) -> dict[str, Any]:
    first, _, last = str(fields.get("name", "")).partition(" ")
    return {"first": first, "last": last} if fields.get("name") else {}


SPLIT = Migration("person", 2, "split-name", split)
NAMES = ["Ada Lovelace", "Alan Turing", "Grace Hopper", "Edsger Dijkstra"]


def test_the_split_migration_fills_the_new_fields() -> None:
    tree = Tree()
    run(tree, V1.create_ops("p1", name="Ada Lovelace", total=3))
    tree.merge(SPLIT.delta(tree))
    assert V2.read(tree, "p1").model_dump() == {"first": "Ada", "last": "Lovelace",
                                                "amount": 3}
    assert V1.read(tree, "p1").model_dump() == {"name": "Ada Lovelace", "total": 3}


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["p1", "p2", "p3"]), st.sampled_from(NAMES)),
                min_size=1, max_size=8), st.permutations([0, 1, 2]))
def test_replicas_migrating_independently_write_the_same_dots(
    writes: list[tuple[str, str]], order: list[int]
) -> None:
    source = Tree()
    deltas = []
    for i, (node, name) in enumerate(writes):
        ops = V1.create_ops(node, name=name) if node not in source else V1.ops(node, name=name)
        run(source, ops, "w", 100 + i)
        deltas.append(source.state.copy())  # states: delivered in any order below
    replicas = [Tree(), Tree(), Tree()]
    for k, r in enumerate(replicas):  # each gets the same data, in its own order
        for d in (deltas if order[k] % 2 == 0 else reversed(deltas)):
            r.merge(d)
    migrated = [SPLIT.delta(r) for r in replicas]
    assert migrated[0] == migrated[1] == migrated[2]  # same dots, same values
    for r, d in zip(replicas, migrated, strict=True):
        r.merge(d)
    assert replicas[0].state == replicas[1].state == replicas[2].state
    for r in replicas:  # again: nothing new
        assert SPLIT.delta(r).store is None


def test_a_migration_never_overwrites_an_application_write() -> None:
    tree = Tree()
    run(tree, V1.create_ops("p1", name="Ada Lovelace"))
    run(tree, V2.ops("p1", first="Augusta"), "r2", 200)
    tree.merge(SPLIT.delta(tree))
    person = V2.read(tree, "p1")
    assert person.first == "Augusta"  # type: ignore[attr-defined]
    assert person.last == "Lovelace"  # type: ignore[attr-defined]


def test_an_application_write_after_the_migration_wins() -> None:
    tree = Tree()
    run(tree, V1.create_ops("p1", name="Ada Lovelace"))
    tree.merge(SPLIT.delta(tree))
    run(tree, V2.ops("p1", last="King"), "r2", 5)  # an early clock still beats time 0
    assert V2.read(tree, "p1").last == "King"  # type: ignore[attr-defined]


def test_rerun_after_an_old_writer_changes_the_source_updates_the_result() -> None:
    tree = Tree()
    run(tree, V1.create_ops("p1", name="Ada Lovelace"))
    tree.merge(SPLIT.delta(tree))
    run(tree, V1.ops("p1", name="Ada King"), "r1", 300)
    tree.merge(SPLIT.delta(tree))
    assert V2.read(tree, "p1").last == "King"  # type: ignore[attr-defined]


def test_batches_report_progress_and_join_to_the_whole() -> None:
    tree = Tree()
    for i in range(5):
        run(tree, V1.create_ops(f"p{i}", name=f"A B{i}"), ts=100 + 10 * i)
    run(tree, [V1.create_ops("other")[0]], ts=900)  # no _kind: not a person
    batches = list(SPLIT.batches(tree, 2))
    assert [(b.done, b.total) for b in batches] == [(2, 6), (4, 6), (6, 6)]
    assert sum(b.written for b in batches) == 5
    joined = batches[0].delta.join(batches[1].delta).join(batches[2].delta)
    assert joined == SPLIT.delta(tree)


def test_replicas_that_migrated_different_data_agree_once_they_rerun_it() -> None:
    """Migration writes never travel (they are not published): A migrated "Ada Lovelace",
    B the later "Ada King". Once A has the later name too and runs the migration again, A
    writes B's very dot: their contents agree."""
    a = Tree()
    run(a, V1.create_ops("p1", name="Ada Lovelace"))
    b = Tree()
    b.merge(a.state)
    later = b.assign("r2", "p1", ("name",), "Ada King", 500)
    b.merge(later)
    a_migrated, b_migrated = SPLIT.delta(a), SPLIT.delta(b)
    a.merge(a_migrated)
    b.merge(b_migrated)
    assert V2.read(a, "p1").last == "Lovelace"  # type: ignore[attr-defined]
    assert V2.read(b, "p1").last == "King"  # type: ignore[attr-defined]
    a.merge(later)  # the application write arrives; the migration's writes do not
    rerun = SPLIT.delta(a)
    a.merge(rerun)
    assert rerun.store is not None
    assert a.fields("p1") == b.fields("p1")
    assert SPLIT.delta(b).store is None  # b had it right: nothing to do
    # and A's rewrite is B's write exactly: the same dot, the same value
    assert {d for d in rerun.context.dots() if d[0].startswith(SPLIT.prefix)} >= {
        d for d in b_migrated.context.dots() if d[0].startswith(SPLIT.prefix)
        and SPLIT.author("p1", ("last",), "King") == d[0]}


def _strict_split(fields: Mapping[str, Any]) -> dict[str, Any]:
    first, last = fields["name"].split(" ")  # KeyError, ValueError: a user's function
    return {"first": first, "last": last}


@pytest.mark.parametrize("name", [None, "Plato", "Ada"])
def test_a_migration_function_that_raises_is_a_kind_error(name: str | None) -> None:
    """Whatever the application's function raises on some worknode (a missing field, a
    value it did not expect) is one KindValidationError naming the migration and the
    worknode (the CLI prints it as one line), and nothing is written."""
    tree = Tree()
    run(tree, V1.create_ops("p1", **({} if name is None else {"name": name})))
    before = tree.state.digest()
    with pytest.raises(KindValidationError):
        Migration("person", 2, "strict-split", _strict_split).delta(tree)
    assert tree.state.digest() == before


def test_a_batch_size_below_one_is_one() -> None:
    tree = Tree()
    for i, n in enumerate(NAMES):
        run(tree, V1.create_ops(f"p{i}", name=n))
    batches = list(SPLIT.batches(tree, 0))
    assert [b.done for b in batches] == [1, 2, 3, 4]
    assert sum(b.written for b in batches) == 4
