"""Lenses between kind versions: laws on CRDT stores (states and deltas), and two service
versions writing one worknode concurrently.

- round trip: ``backward(forward(x)) == x`` for states, and a delta translated there and
  back joins into any state as the delta does;
- a lens commutes with join: translating two states (or a state and a delta) and joining
  them equals joining and then translating, in both directions;
- fields the lens does not name (``z``, unknown to every version here) pass untouched;
- a v1 and a v2 service write one worknode concurrently through their views; the replicas
  converge and each reads the other's writes in its own shape.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from broker.crdt import ORMap, Tree
from broker.crdt._stores import MapStore
from broker.kinds import (
    LWW,
    MV,
    AddField,
    Convert,
    Counter,
    Head,
    Hoist,
    KindDefinitionError,
    KindModel,
    KindSchema,
    KindView,
    LensOp,
    ORSet,
    Plunge,
    RemoveField,
    RenameField,
    Wrap,
    check_all,
    map_path,
    translate_document,
    translate_fields,
)
from tests.unit.test_kinds import run

VALUES = ("x", "y", "X", "Y", 1)
ELEMENTS = ("p", "q", "P")

# The source shape: a (register), b (counter), s (set), m (map of c: register, d: counter);
# z is a field no lens names (unknown to the versions).
Write = Callable[[ORMap, str, int], ORMap]
WRITES: list[tuple[str, Callable[[Any], Write]]] = [
    ("assign a", lambda v: lambda d, r, t: d.assign(r, ("a",), v, t)),
    ("assign z", lambda v: lambda d, r, t: d.assign(r, ("z",), v, t)),
    ("assign m.c", lambda v: lambda d, r, t: d.assign(r, ("m", "c"), v, t)),
    ("incr b", lambda v: lambda d, r, t: d.increment(r, ("b",), len(str(v)))),
    ("incr m.d", lambda v: lambda d, r, t: d.increment(r, ("m", "d"), 2)),
    ("add s", lambda v: lambda d, r, t: d.add(r, ("s",), str(v)[:1].lower() or "p")),
    ("discard s", lambda v: lambda d, r, t: d.discard(r, ("s",), "p")),
    ("remove a", lambda v: lambda d, r, t: d.remove(("a",))),
    ("remove m", lambda v: lambda d, r, t: d.remove(("m",))),
    ("remove m.c", lambda v: lambda d, r, t: d.remove(("m", "c"))),
    ("multi a", lambda v: lambda d, r, t: d.assign_multi(r, ("a",), v)),  # a kind conflict
    ("assign m", lambda v: lambda d, r, t: d.assign(r, ("m",), v, t)),  # a map and a value
]

def writes_by(*replicas: str) -> st.SearchStrategy[list[tuple[str, int, Any]]]:
    """Writes by ``replicas`` (two diverged copies never share a replica: dots are unique)."""
    return st.lists(st.tuples(st.sampled_from(replicas), st.sampled_from(range(len(WRITES))),
                              st.sampled_from(VALUES)), max_size=8)


def apply(doc: ORMap, writes: list[tuple[str, int, Any]], t0: int) -> list[ORMap]:
    deltas = []
    for i, (replica, w, value) in enumerate(writes):
        delta = WRITES[w][1](value)(doc, replica, t0 + i)
        doc.merge(delta)
        deltas.append(delta)
    return deltas


@st.composite
def lenses(draw: st.DrawFn) -> list[LensOp]:
    """A random lens valid on the source shape (the shape tracked as ops are drawn)."""
    leaves = {("a",): "lww", ("b",): "counter", ("s",): "set", ("m", "c"): "lww",
              ("m", "d"): "counter"}
    maps = {("m",)}
    fresh = iter(["n1", "n2", "n3", "n4", "n5", "n6"])
    ops: list[LensOp] = []
    for _ in range(draw(st.integers(0, 5))):
        top = sorted(p for p in leaves if len(p) == 1)
        nested = sorted(p for p in leaves if len(p) == 2)
        choice = draw(st.sampled_from(["rename", "hoist", "plunge", "convert", "add",
                                       "remove", "wrap"]))
        op: LensOp | None = None
        if choice == "rename" and (top or nested):
            src = draw(st.sampled_from(top + nested))
            op = RenameField(src, next(fresh))
        elif choice == "hoist" and nested:
            src = draw(st.sampled_from(nested))
            op = Hoist(src[:1], src[1])
        elif choice == "plunge" and top and maps:
            src = draw(st.sampled_from(top))
            op = Plunge(sorted(maps)[0], src[0])
        elif choice == "convert":
            regs = sorted(p for p, c in leaves.items() if c in ("lww", "set"))
            if regs:
                op = Convert(draw(st.sampled_from(regs)), (("x", "X"), ("y", "Y"), ("p", "P")))
        elif choice == "add":
            op = AddField((next(fresh),), "d")
        elif choice == "remove" and top:
            op = RemoveField(draw(st.sampled_from(top)), None)
        elif choice == "wrap":
            regs = sorted(p for p, c in leaves.items() if c == "lww")
            if regs:
                op = Wrap(regs[0])
        if op is None:
            continue
        ops.append(op)
        if isinstance(op, (RenameField, Hoist, Plunge)):
            leaves = {op.forward_path(p): c for p, c in leaves.items()}
    return ops


def same(x: ORMap, y: ORMap) -> bool:
    """Equal stores (delta markers included) and equal contexts."""
    return (x.store or MapStore()) == (y.store or MapStore()) and x.context == y.context


@settings(max_examples=150, deadline=None)
@given(writes_by("ra", "rb"), writes_by("ra", "rc"), writes_by("rb", "rd"), lenses())
# a removal of a whole map, seen from a shape where one of its fields moved out of it
@example([("ra", 2, "x"), ("ra", 4, "x")], [("ra", 8, "x")], [], [Hoist(("m",), "c")])
@example([("ra", 0, "x")], [("ra", 8, "x")], [("rb", 4, "x")], [Plunge(("m",), "a")])
# a batch removing map m and then writing into it, seen from a shape that renames inside m
@example([("ra", 2, "x")], [("ra", 8, "x"), ("ra", 2, "y")], [],
         [RenameField(("m", "c"), "n1")])
def test_lens_round_trips_and_commutes_with_join(
    common: list[Any], left: list[Any], right: list[Any], lens: list[LensOp]
) -> None:
    base = ORMap()
    apply(base, common, 1000)
    a, b = base.copy(), base.copy()
    deltas = apply(a, left, 2000) + apply(b, right, 3000)

    fwd = translate_fields(lens, a)
    assert same(translate_fields(lens, fwd, reverse=True), a)
    for d in deltas:
        back = translate_fields(lens, translate_fields(lens, d), reverse=True)
        # A removal out of a map the lens hoists from may come back with one more
        # ``Whole(None)`` marker (its context covers nothing there): the same effect.
        for target in (base, a, b):
            assert target.join(back) == target.join(d)

    # a delta batch (the join of several deltas, as published) translates as its parts do
    if deltas:
        batch = deltas[0].copy()
        for d in deltas[1:]:
            batch.merge(d)
        parts = translate_fields(lens, deltas[0])
        for d in deltas[1:]:
            parts.merge(translate_fields(lens, d))
        # (equal in effect: a marker inside a removed map may be dropped, being implied)
        for target in (base, a, b):
            moved = translate_fields(lens, target)
            assert moved.join(translate_fields(lens, batch)) == moved.join(parts)
        back = translate_fields(lens, translate_fields(lens, batch), reverse=True)
        for target in (base, a, b):  # as for one delta: the same effect wherever joined
            assert target.join(back) == target.join(batch)

    joined = a.join(b)
    assert translate_fields(lens, joined) == translate_fields(lens, a).join(
        translate_fields(lens, b))
    # deltas translated one by one and joined == the translated join
    acc = translate_fields(lens, base)
    for d in deltas:
        acc.merge(translate_fields(lens, d))
    assert acc == translate_fields(lens, joined)
    # and the other direction, from the newer shape back
    fa, fb = translate_fields(lens, a), translate_fields(lens, b)
    assert translate_fields(lens, fa.join(fb), reverse=True) == joined
    # z is named by no lens: it is where it was, as it was
    assert fwd.get(("z",)) == a.get(("z",))


def test_a_document_translates_per_worknode_and_back() -> None:
    tree = Tree()
    tree.merge(tree.create("r1", "n1", "root", 1))
    tree.merge(tree.create("r1", "n2", "n1", 2))
    tree.merge(tree.assign("r1", "n1", ("a",), "x", 3))
    tree.merge(tree.assign("r1", "n2", ("a",), "y", 4))
    lens = [RenameField(("a",), "b"), Convert(("b",), (("x", "X"),))]
    out = Tree(translate_document(lens, tree.state))
    assert out.fields("n1") == {"b": "X"}
    assert out.fields("n2") == {"b": "y"}
    assert out.parents() == tree.parents()
    assert translate_document(lens, out.state, reverse=True) == tree.state


# -- two service versions, one worknode ------------------------------------------------------


class Address(KindModel):
    city: LWW[str] = ""


class CustomerV1(KindModel, kind="customer", version=1):
    name: LWW[str] = ""
    total: Counter = 0
    status: LWW[str] = "new"
    tags: ORSet[str] = frozenset()
    address: Address = Address()


class CustomerV2(KindModel, kind="customer", version=2, lens=[
    RenameField(("total",), "amount"),
    Convert(("status",), (("new", "NEW"), ("gold", "GOLD"))),
    Hoist(("address",), "city"),
    Wrap(("name",)),
]):
    name: MV[str] = ()
    amount: Counter = 0
    status: LWW[str] = "NEW"
    tags: ORSet[str] = frozenset()
    city: LWW[str] = ""


class CustomerV3(KindModel, kind="customer", version=3, lens=[Head(("name",))]):
    name: LWW[str] = ""
    amount: Counter = 0
    status: LWW[str] = "NEW"
    tags: ORSet[str] = frozenset()
    city: LWW[str] = ""


V1 = KindView(CustomerV1)
V2 = KindView(CustomerV2, [CustomerV1])


def test_the_customer_history_passes_the_gate() -> None:
    models = (CustomerV1, CustomerV2, CustomerV3)
    assert check_all([KindSchema.of_model(m) for m in models]) == []


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.sampled_from(["total", "status", "tag", "city",
                                                          "name"]),
                          st.integers(0, 3)), max_size=12))
def test_two_versions_write_concurrently_converge_and_read_each_other(
    writes: list[tuple[bool, str, int]]
) -> None:
    one, two = Tree(), Tree()
    run(one, V1.create_ops("c1"), "r1", 10)
    two.merge(one.state)
    expected_total = 0
    for i, (by_v1, field, n) in enumerate(writes):
        tree, view, replica = (one, V1, "r1") if by_v1 else (two, V2, "r2")
        if field == "total":
            expected_total += n
            changes: dict[str, Any] = {"total" if by_v1 else "amount": n}
        elif field == "status":
            changes = {"status": ["new", "gold"][n % 2] if by_v1 else ["NEW", "GOLD"][n % 2]}
        elif field == "tag":
            changes = {"tags": {f"t{n}"}}
        elif field == "city":
            changes = {"address": {"city": f"c{n}"}} if by_v1 else {"city": f"c{n}"}
        else:
            changes = {"name": f"n{n}"}
        run(tree, view.ops("c1", **changes), replica, 100 + i)
    one.merge(two.state)
    two.merge(one.state)
    assert one.state == two.state
    r1, r2 = V1.read(one, "c1"), V2.read(two, "c1")
    assert r1.total == r2.amount == expected_total  # type: ignore[attr-defined]
    assert {"new": "NEW", "gold": "GOLD"}[r1.status] == r2.status  # type: ignore[attr-defined]
    assert r1.address.city == r2.city  # type: ignore[attr-defined]
    assert r1.tags == r2.tags  # type: ignore[attr-defined]
    assert (r1.name in r2.name) or (r1.name == "" and r2.name == ())  # type: ignore[attr-defined]
    # the v2 read is the stored state translated by the lens chain (Wrap changes only how
    # name reads: compared apart)
    fwd = Tree(translate_document(V2.chain, one.state, ["c1"])).fields("c1")
    dump = r2.model_dump()
    for k, v in fwd.items():
        if k not in ("_kind", "name"):
            assert dump[k] == v


def test_fields_a_version_does_not_know_are_preserved() -> None:
    """A v1 writer and a v3 field: v1 writes never remove what v1 does not know."""
    class V2Extra(KindModel, kind="customer", version=2, lens=[AddField(("vip",), False)]):
        name: LWW[str] = ""
        total: Counter = 0
        status: LWW[str] = "new"
        tags: ORSet[str] = frozenset()
        address: Address = Address()
        vip: LWW[bool] = False

    newer = KindView(V2Extra, [CustomerV1])
    tree = Tree()
    run(tree, V1.create_ops("c1", name="a"))
    run(tree, newer.ops("c1", vip=True), "r2", 200)
    run(tree, V1.ops("c1", name="b", total=1), "r1", 300)
    assert newer.read(tree, "c1").vip is True  # type: ignore[attr-defined]
    assert V1.read(tree, "c1").name == "b"  # type: ignore[attr-defined]


class LevelV1(KindModel, kind="level", version=1):
    level: LWW[str] = "low"
    seen: ORSet[str] = frozenset()


class LevelV2(KindModel, kind="level", version=2, lens=[
    # not its own inverse (a 3-cycle low -> mid -> high -> low once completed): a view that
    # maps a direction the wrong way reads or writes the wrong value
    Convert(("level",), (("low", "mid"), ("mid", "high"))),
    Convert(("seen",), (("low", "mid"), ("mid", "high"))),
]):
    level: LWW[str] = "mid"
    seen: ORSet[str] = frozenset()


def test_a_convert_maps_each_direction_its_own_way() -> None:
    v1, v2 = KindView(LevelV1), KindView(LevelV2, [LevelV1])
    assert check_all([KindSchema.of_model(m) for m in (LevelV1, LevelV2)]) == []
    forward = {"low": "mid", "mid": "high", "high": "low"}
    for value, newer in forward.items():
        tree = Tree()
        run(tree, v1.create_ops("l1", level=value, seen={value}))
        assert v2.read(tree, "l1") == LevelV2(level=newer, seen=frozenset({newer}))
        run(tree, v2.ops("l1", level=newer, seen={forward[newer]}), "r2", 200)
        assert v1.read(tree, "l1") == LevelV1(level=value, seen=frozenset({value, newer}))
        assert v2.read(tree, "l1").seen == {newer, forward[newer]}  # type: ignore[attr-defined]
        # the stored shape is v1's: what v2 wrote is stored as v1 would have written it
        assert tree.fields("l1")["level"] == value


def test_a_view_s_history_must_be_in_version_order() -> None:
    """The oldest version is the stored shape and the lenses chain in order: a history out
    of order (or with the version itself in it) would write and read other paths."""
    histories: list[list[type[KindModel]]] = [
        [CustomerV2, CustomerV1], [CustomerV1, CustomerV1], [CustomerV1, CustomerV3]]
    for history in histories:
        with pytest.raises(KindDefinitionError):
            KindView(CustomerV3, history)
    assert KindView(CustomerV3, [CustomerV1, CustomerV2]).info.version == 3


NEW_SHAPE_WRITES: list[tuple[tuple[str, ...], str]] = [
    (("a",), "assign"), (("b",), "incr"), (("s",), "add"), (("m", "c"), "assign"),
    (("m", "d"), "incr"), (("z",), "assign"), (("s",), "discard"), (("a",), "remove"),
]


@settings(max_examples=150, deadline=None)
@given(writes_by("ra", "rb"), lenses(),
       st.lists(st.tuples(st.sampled_from(["rn", "ra"]),
                          st.sampled_from(range(len(NEW_SHAPE_WRITES))),
                          st.sampled_from(VALUES)), max_size=8))
def test_deltas_written_in_the_newer_shape_translate_back(
    common: list[Any], lens: list[LensOp], newer: list[tuple[str, int, Any]]
) -> None:
    """The other direction, with deltas: a writer of the newer shape writes at the paths
    the lens moved fields to; each delta translated back and joined into the older shape's
    state keeps the two states each other's translation, step by step."""
    old = ORMap()
    apply(old, common, 1000)
    new = translate_fields(lens, old)
    for i, (replica, w, value) in enumerate(newer):
        source, what = NEW_SHAPE_WRITES[w]
        path = map_path(lens, source)
        if what == "assign":
            delta = new.assign(replica, path, value, 5000 + i)
        elif what == "incr":
            delta = new.increment(replica, path, 1)
        elif what == "add":
            delta = new.add(replica, path, str(value)[:1].lower() or "p")
        elif what == "discard":
            delta = new.discard(replica, path, "p")
        else:
            delta = new.remove(path)
        new.merge(delta)
        old.merge(translate_fields(lens, delta, reverse=True))
        assert translate_fields(lens, old) == new
        assert translate_fields(lens, new, reverse=True) == old



class Inner(KindModel):
    x: LWW[str] = ""
    y: LWW[str] = ""


class Outer(KindModel):
    inner: Inner = Inner()


class InnerV2(KindModel):
    y: LWW[str] = ""


class OuterV2(KindModel):
    x: LWW[str] = ""
    inner: InnerV2 = InnerV2()


class DeepV1(KindModel, kind="deep", version=1):
    outer: Outer = Outer()


class DeepV2(KindModel, kind="deep", version=2, lens=[Hoist(("outer", "inner"), "x")]):
    outer: OuterV2 = OuterV2()


def test_a_hoist_out_of_a_nested_map_lands_in_its_parent_map() -> None:
    """``Hoist(("outer", "inner"), "x")``: outer.inner.x becomes outer.x (not a top field)."""
    assert check_all([KindSchema.of_model(m) for m in (DeepV1, DeepV2)]) == []
    v1, v2 = KindView(DeepV1), KindView(DeepV2, [DeepV1])
    tree = Tree()
    run(tree, v1.create_ops("d1", outer={"inner": {"x": "a", "y": "b"}}))
    assert v2.read(tree, "d1").model_dump() == {"outer": {"x": "a", "inner": {"y": "b"}}}
    run(tree, v2.ops("d1", outer={"x": "c"}), "r2", 200)
    assert v1.read(tree, "d1").model_dump() == {"outer": {"inner": {"x": "c", "y": "b"}}}
    lens = DeepV2.__kind__.lens  # type: ignore[union-attr]
    moved = Tree(translate_document(lens, tree.state, ["d1"])).fields("d1")
    assert moved["outer"]["x"] == "c"
