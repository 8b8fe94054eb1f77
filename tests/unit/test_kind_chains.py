"""Random kind-version chains: every chain of valid lenses passes the gate (no false
alarms), and writes made through any version are read alike by every version.

A chain starts from one shape and applies random lens operations (renames, hoists, plunges,
converts, adds, removes, wraps); each step's schema is built from the operations alone and
its model rebuilt from the schema (as a service that was not built with it would). Writes
through random versions to one worknode converge, and every version reads the same counter,
the same set and, through its value mappings, the same register.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from broker.crdt import Tree
from broker.kinds import (
    AddField,
    Convert,
    Crdt,
    FieldSpec,
    Hoist,
    KindSchema,
    KindView,
    LensOp,
    Plunge,
    Registry,
    RemoveField,
    RenameField,
    Wrap,
    check_all,
    map_path,
)
from tests.unit.test_kinds import run

LWW_STR = FieldSpec(Crdt.LWW, ("str",), (), "", True)
COUNTER = FieldSpec(Crdt.COUNTER, ("int",))
SET = FieldSpec(Crdt.SET, ("str",))
BASE: dict[tuple[str, ...], FieldSpec] = {
    ("a",): LWW_STR, ("b",): COUNTER, ("s",): SET, ("m", "c"): LWW_STR, ("m", "d"): COUNTER,
}
MAPPING = (("x", "X"), ("y", "Y"))


def shape_of(leaves: dict[tuple[str, ...], FieldSpec], maps: set[tuple[str, ...]]
             ) -> tuple[tuple[str, FieldSpec], ...]:
    def build(prefix: tuple[str, ...]) -> tuple[tuple[str, FieldSpec], ...]:
        out = [(p[-1], s) for p, s in leaves.items() if p[:-1] == prefix]
        out += [(m[-1], FieldSpec(Crdt.MAP, fields=build(m))) for m in maps
                if m[:-1] == prefix]
        return tuple(sorted(out))
    return build(())


@st.composite
def chains(draw: st.DrawFn) -> list[KindSchema]:
    leaves = dict(BASE)
    maps: set[tuple[str, ...]] = {("m",)}
    schemas = [KindSchema("k", 1, shape_of(leaves, maps))]
    fresh = iter(f"f{i}" for i in range(100))
    for version in range(2, draw(st.integers(2, 4)) + 1):
        ops: list[LensOp] = []
        for _ in range(draw(st.integers(1, 3))):
            top = sorted(p for p in leaves if len(p) == 1)
            nested = sorted(p for p in leaves if len(p) == 2)
            kind = draw(st.sampled_from(["rename", "hoist", "plunge", "convert", "add",
                                         "remove", "wrap"]))
            op: LensOp | None = None
            if kind == "rename":
                op = RenameField(draw(st.sampled_from(top + nested)), next(fresh))
            elif kind == "hoist" and nested:
                src = draw(st.sampled_from(nested))
                op = Hoist(src[:1], src[1])
            elif kind == "plunge" and top and maps:
                op = Plunge(sorted(maps)[0], draw(st.sampled_from(top))[0])
            elif kind == "convert":
                regs = sorted(p for p, s in leaves.items() if s.crdt in (Crdt.LWW, Crdt.SET))
                if regs:
                    op = Convert(draw(st.sampled_from(regs)), MAPPING)
            elif kind == "add":
                op = AddField((next(fresh),), "d")
            elif kind == "remove":
                removable = [p for p in top if leaves[p].crdt is Crdt.LWW]
                if removable:
                    op = RemoveField(draw(st.sampled_from(removable)), "")
            elif kind == "wrap":
                regs = sorted(p for p, s in leaves.items() if s.crdt is Crdt.LWW)
                if regs:
                    op = Wrap(regs[0])
            if op is None:
                continue
            ops.append(op)
            if isinstance(op, (RenameField, Hoist, Plunge)):
                leaves = {op.forward_path(p): s for p, s in leaves.items()}
                maps = {op.forward_path(m) for m in maps}
            elif isinstance(op, AddField):
                leaves[op.path] = FieldSpec(Crdt.LWW, ("str",), (), "d", True)
            elif isinstance(op, RemoveField):
                del leaves[op.path]
            elif isinstance(op, Wrap):
                leaves[op.path] = FieldSpec(Crdt.MV, ("str",))
        schemas.append(KindSchema("k", version, shape_of(leaves, maps), lens=tuple(ops)))
    return schemas


def chain_between(schemas: list[KindSchema], i: int, j: int) -> list[LensOp]:
    return [op for s in schemas[i + 1: j + 1] for op in s.lens]


def get(model: Any, path: tuple[str, ...]) -> Any:
    for k in path:
        model = getattr(model, k)
    return model


@settings(max_examples=60, deadline=None)
@given(chains(), st.lists(st.tuples(st.integers(0, 3), st.sampled_from(["x", "y", "z"])),
                          max_size=6))
def test_random_chains_pass_the_gate_and_every_version_reads_alike(
    schemas: list[KindSchema], writes: list[tuple[int, str]]
) -> None:
    assert check_all(schemas) == []
    models = [s.to_model() for s in schemas]
    views = [KindView(m, models[:i]) for i, m in enumerate(models)]
    tree = Tree()
    run(tree, views[0].create_ops("w"))
    increments = 0
    tags: set[str] = set()
    for n, (which, value) in enumerate(writes):
        v = which % len(views)
        chain = chain_between(schemas, 0, v)
        counter, tag_set = map_path(chain, ("b",)), map_path(chain, ("s",))
        # the value as version v writes it (its own mapping of the base's values)
        shown = value
        for op in chain:
            shown = op.forward_value(map_path(chain[: chain.index(op)], ("s",)), shown)
        changes: dict[str, Any] = {}
        place(changes, counter, 1)
        place(changes, tag_set, {shown})
        run(tree, views[v].ops("w", **changes), f"r{v}", 100 + n)
        increments += 1
        tags.add(value)
    # registered one by one through the gate, the history reads back whole (the gate a
    # registry read runs again refuses none of it), and its views read what these do
    registry_tree = Tree()
    for s in schemas:
        run(registry_tree, Registry.from_tree(registry_tree).register_ops(s))
    registry = Registry.from_tree(registry_tree)
    assert registry.skipped == ()
    assert registry.versions("k") == [s.version for s in schemas]
    for i, view in enumerate(views):
        chain = chain_between(schemas, 0, i)
        read = view.read(tree, "w")
        assert (registry.view("k", schemas[i].version).read(tree, "w").model_dump()
                == read.model_dump())
        assert get(read, map_path(chain, ("b",))) == increments
        seen = get(read, map_path(chain, ("s",)))
        expected = set(tags)
        for k, op in enumerate(chain):
            expected = {op.forward_value(map_path(chain[:k], ("s",)), t) for t in expected}
        assert seen == expected


def place(changes: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for k in path[:-1]:
        changes = changes.setdefault(k, {})
    changes[path[-1]] = value
