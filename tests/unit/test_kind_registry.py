"""Kind schemas as data, the registry subject, and the FULL_TRANSITIVE compatibility gate.

A schema survives JSON and rebuilds a model that reads and writes like the original; the
registry is CRDT state (two replicas registering concurrently converge, a version registered
twice with different schemas is reported, never silently picked); an incompatible version is
refused with a specific rule and nothing is written.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.crdt import Add, Assign, Create, Tree
from broker.kinds import (
    LWW,
    MV,
    AddField,
    Convert,
    Counter,
    Head,
    IncompatibleKindError,
    KindModel,
    KindSchema,
    KindView,
    ORSet,
    Registry,
    RemoveField,
    RenameField,
    SchemaFormatError,
    UnknownKindError,
    Wrap,
    check_all,
    check_new,
)
from tests.unit.test_kinds import VIEW, Invoice, Order, run


class PersonV1(KindModel, kind="person", version=1):
    name: LWW[str] = ""
    total: Counter = 0


class PersonV2(KindModel, kind="person", version=2,
               lens=[RenameField(("total",), "amount"), AddField(("first",), ""),
                     AddField(("last",), ""), RemoveField(("name",), "")]):
    first: LWW[str] = ""
    last: LWW[str] = ""
    amount: Counter = 0


def schema(model: type[KindModel]) -> KindSchema:
    return KindSchema.of_model(model)


def registered(*models: type[KindModel]) -> tuple[Tree, Registry]:
    tree = Tree()
    for m in models:
        run(tree, Registry.from_tree(tree).register_ops(schema(m)))
    return tree, Registry.from_tree(tree)


def test_a_schema_survives_json_and_rebuilds_a_working_model() -> None:
    for model in (Order, Invoice, PersonV2):
        s = schema(model)
        back = KindSchema.from_json(s.to_json())
        assert back == s
        rebuilt = back.to_model()
        assert schema(rebuilt) == s
    tree = Tree()
    run(tree, VIEW.create_ops("o1", title="desk", total=2, status="paid",
                              address={"city": "Oslo"}))
    order = KindView(schema(Order).to_model()).read(tree, "o1")
    assert order.model_dump() == VIEW.read(tree, "o1").model_dump()


@pytest.mark.parametrize("text", [
    "not json", "[]", '{"format": 2}', '{"format": 1, "name": "bad name", "version": 1}',
    '{"format": 1, "name": "k", "version": 0, "fields": {}}',
    '{"format": 1, "name": "k", "version": 1, "fields": {"x": {"crdt": "nope"}}}',
    '{"format": 1, "name": "k", "version": 1, "fields": {}, "lens": [{"op": "zap"}]}',
])
def test_malformed_schema_text_is_refused(text: str) -> None:
    with pytest.raises(SchemaFormatError):
        KindSchema.from_json(text)


def _schema_text(fields: object = None, **over: object) -> str:
    data: dict[str, object] = {
        "format": 1, "name": "k", "version": 1, "parent": None, "lens": [], "jsonSchema": {},
        "fields": {"a": {"crdt": "lww", "types": ["str"], "default": ""}}
        if fields is None else fields}
    data.update(over)
    return json.dumps(data)


_LWW_STR = {"crdt": "lww", "types": ["str"], "default": ""}

FORGED = {
    "nested too deep for json": "[" * 100_000 + "]" * 100_000,
    "register with no value type": _schema_text({"a": {"crdt": "lww"}}),
    "counter with no value type": _schema_text({"a": {"crdt": "counter"}}),
    "counter with a default": _schema_text({"a": {"crdt": "counter", "types": ["int"],
                                                  "default": 5}}),
    "set of floats": _schema_text({"a": {"crdt": "set", "types": ["float"]}}),
    "default of another type": _schema_text({"a": {"crdt": "lww", "types": ["str"],
                                                   "default": 5}}),
    "enum of other types": _schema_text({"a": {"crdt": "lww", "types": ["str"],
                                               "enum": [1, 2]}}),
    "private field name": _schema_text({"_a": _LWW_STR}),
    "field shadowing pydantic": _schema_text({"model_dump": _LWW_STR}),
    "dotted field name": _schema_text({"a.b": _LWW_STR}),
    "field name not an identifier": _schema_text({"a b": _LWW_STR}),
    "version over int64": _schema_text(version=2**70),
    "rename to a list": _schema_text(lens=[{"op": "rename", "path": ["a"], "to": ["x"]}]),
    "add with a list default": _schema_text(lens=[{"op": "add", "path": ["b"],
                                                   "default": [1, 2]}]),
    "huge field name": _schema_text({"x" * 100_000: _LWW_STR}),
    "huge nested field name": _schema_text({"a": {"crdt": "map", "fields": {
        "\ud800" + "y" * 100_000: _LWW_STR}}}),
    "map nested too deep": _schema_text({"a": json.loads(
        '{"crdt": "map", "fields": {"x": ' * 40 + json.dumps(_LWW_STR) + "}}" * 40)}),
}


@pytest.mark.parametrize("text", FORGED.values(), ids=FORGED.keys())
def test_a_forged_registry_entry_is_skipped_with_a_reason_never_a_crash(text: str) -> None:
    """A peer (or a stolen key) writing junk schema text into the registry subject: the
    text is refused as a SchemaFormatError, a registry read skips it and says why, and
    asking for the kind is a clear UnknownKindError, never a TypeError or RecursionError
    out of pydantic or json in a service or the CLI."""
    with pytest.raises(SchemaFormatError):
        KindSchema.from_json(text)
    tree = Tree()
    run(tree, [Create("k"), Assign("k", ("_kind",), "kind-schema"),
               Add("k", ("versions",), text), Assign("k", ("active",), 1)])
    reg = Registry.from_tree(tree)
    assert reg.kinds() == []
    assert len(reg.skipped) == 1
    assert reg.skipped[0].startswith("k: ")
    assert len(reg.skipped[0]) < 500  # one readable line, whatever the junk's size
    with pytest.raises(UnknownKindError) as info:
        reg.view("k")
    assert "1 stored entry refused" in str(info.value)  # not a bare "no kind"


def test_the_registry_is_crdt_state_and_converges() -> None:
    a, _ = registered(PersonV1)
    b = Tree()
    b.merge(a.state)
    run(b, Registry.from_tree(b).register_ops(schema(PersonV2)), "rb", 500)
    run(a, Registry.from_tree(a).register_ops(schema(Order)), "ra", 500)
    a.merge(b.state)
    b.merge(a.state)
    assert a.state == b.state
    reg = Registry.from_tree(a)
    assert reg.kinds() == ["order", "person"]
    assert reg.versions("person") == [1, 2]
    assert reg.get("person") == schema(PersonV2)
    assert reg.active["person"] == 2


def test_a_service_reads_a_kind_it_was_not_built_with() -> None:
    """Only the registry's data: the v2 model is built from the stored schema."""
    _, reg = registered(PersonV1, PersonV2)
    data = Tree()
    run(data, KindView(PersonV1).create_ops("p1", name="Ada", total=5))
    person = reg.view("person").read(data, "p1")
    assert person.model_dump() == {"first": "", "last": "", "amount": 5}
    assert type(person).__name__ == "PersonV2"


def test_concurrent_registrations_of_one_version_are_reported() -> None:
    class Other(KindModel, kind="person", version=1):
        name: LWW[int] = 0

    a, b = Tree(), Tree()
    run(a, Registry.from_tree(a).register_ops(schema(PersonV1)), "ra")
    run(b, Registry.from_tree(b).register_ops(schema(Other)), "rb")
    a.merge(b.state)
    reg = Registry.from_tree(a)
    assert reg.conflicted == {"person": (1,)}
    with pytest.raises(IncompatibleKindError):
        reg.get("person", 1)


def test_unknown_kinds_and_versions() -> None:
    _, reg = registered(PersonV1)
    with pytest.raises(UnknownKindError):
        reg.get("nope")
    with pytest.raises(UnknownKindError):
        reg.get("person", 7)


def test_registering_again_only_reactivates() -> None:
    tree, reg = registered(PersonV1, PersonV2)
    run(tree, reg.register_ops(schema(PersonV1)), ts=900)
    reg = Registry.from_tree(tree)
    assert reg.active["person"] == 1
    assert reg.versions("person") == [1, 2]


def test_view_for_a_built_in_model_refuses_a_different_registered_schema() -> None:
    class Drifted(KindModel, kind="person", version=1):
        name: LWW[str] = "x"
        total: Counter = 0

    _, reg = registered(PersonV1)
    with pytest.raises(IncompatibleKindError):
        reg.view_for(Drifted)
    assert reg.view_for(PersonV1).chain == ()


# -- the gate --------------------------------------------------------------------------------


def rules(*models: type[KindModel]) -> list[str]:
    return [f.rule for f in check_all([schema(m) for m in models])]


def test_a_rename_without_a_lens_is_refused_and_nothing_is_written() -> None:
    class Bad(KindModel, kind="person", version=2):
        name: LWW[str] = ""
        amount: Counter = 0

    tree, reg = registered(PersonV1)
    before = tree.state.digest()
    with pytest.raises(IncompatibleKindError) as info:
        reg.register_ops(schema(Bad))
    assert [f.rule for f in info.value.findings] == ["FIELD_REMOVED"]  # type: ignore[attr-defined]
    assert "person@2.total: FIELD_REMOVED:" in str(info.value)
    assert "[person@1 → person@2]" in str(info.value)
    assert tree.state.digest() == before


def test_the_worked_example_is_compatible() -> None:
    assert rules(PersonV1, PersonV2) == []


@pytest.mark.parametrize(("v2_fields", "lens", "expected"), [
    ({"name": (LWW[int], 0), "total": (Counter, 0)}, [], ["VALUE_TYPE_CHANGED"]),
    ({"name": (Counter, 0), "total": (Counter, 0)}, [], ["CRDT_CHANGED"]),
    ({"name": (LWW[str], ""), "total": (Counter, 0), "x": (LWW[str], ...)}, [],
     ["FIELD_ADDED_WITHOUT_DEFAULT"]),
    ({"name": (LWW[str], ""), "total": (Counter, 0), "x": (LWW[str], ...)},
     [AddField(("x",), "d")], []),
    ({"name": (LWW[str], ""), "total": (Counter, 0)}, [RenameField(("nope",), "x")],
     ["LENS_INVALID"]),
    ({"total": (Counter, 0)}, [RemoveField(("name",), "")], []),
    ({"name": (LWW[str], "x"), "total": (Counter, 0)}, [], ["DEFAULT_CHANGED"]),
    ({"name": (LWW[str], ""), "total": (Counter, 0), "tags": (ORSet[str], frozenset())}, [],
     []),
    # an AddField default the new field cannot hold is no default for earlier writes
    ({"name": (LWW[str], ""), "total": (Counter, 0), "x": (LWW[str], ...)},
     [AddField(("x",), 5)], ["FIELD_ADDED_WITHOUT_DEFAULT"]),
])
def test_each_rule_fires_for_its_change(v2_fields: dict[str, object], lens: list[object],
                                        expected: list[str]) -> None:
    from pydantic import create_model
    v2 = create_model("V2", __base__=KindModel,  # type: ignore[call-overload]
                      __cls_kwargs__={"kind": "person", "version": 2, "lens": lens},
                      **v2_fields)
    assert rules(PersonV1, v2) == expected


def test_removing_a_required_register_needs_a_fitting_default() -> None:
    class Strict1(KindModel, kind="s", version=1):
        code: LWW[str]

    class Strict2(KindModel, kind="s", version=2, lens=[RemoveField(("code",))]):
        other: LWW[str] = ""

    class Strict2b(KindModel, kind="s", version=2, lens=[RemoveField(("code",), "none")]):
        other: LWW[str] = ""

    assert rules(Strict1, Strict2) == ["REMOVED_WITHOUT_DEFAULT"]
    assert rules(Strict1, Strict2b) == []


def test_convert_covers_an_enum_change_and_wrap_a_crdt_view_change() -> None:
    class E1(KindModel, kind="e", version=1):
        state: LWW[Literal["on", "off"]] = "off"

    class E2ok(KindModel, kind="e", version=2,
               lens=[Convert(("state",), (("on", "ON"), ("off", "OFF")))]):
        state: LWW[Literal["ON", "OFF"]] = "OFF"

    class E3(KindModel, kind="e", version=3, lens=[Wrap(("state",))]):
        state: MV[Literal["ON", "OFF"]] = ()

    class E4(KindModel, kind="e", version=4, lens=[Head(("state",))]):
        state: LWW[Literal["ON", "OFF"]] = "OFF"

    class E2bad(KindModel, kind="e", version=2):
        state: LWW[Literal["ON", "OFF"]] = "OFF"

    assert rules(E1, E2ok, E3, E4) == []
    assert rules(E1, E2bad) == ["VALUE_TYPE_CHANGED"]


def test_transitive_checks_reach_back_past_the_version_before() -> None:
    """v3 re-adds v1's removed field with another type: fine against v2 (which removed it),
    refused against v1, whose writers still write it (FULL_TRANSITIVE)."""
    class V2(KindModel, kind="person", version=2, lens=[RemoveField(("name",), "")]):
        total: Counter = 0

    class V3(KindModel, kind="person", version=3, lens=[AddField(("name",), 0)]):
        total: Counter = 0
        name: LWW[int] = 0

    found = check_new([schema(PersonV1), schema(V2)], schema(V3))
    assert [(f.rule, f.pairs) for f in found] == [
        ("VALUE_TYPE_CHANGED", ("person@1 → person@3",))]

    class V3b(KindModel, kind="person", version=3):
        total: Counter = 0
        name: Counter = 0

    found = check_new([schema(PersonV1), schema(V2)], schema(V3b))
    assert [(f.rule, f.pairs) for f in found] == [("CRDT_CHANGED", ("person@1 → person@3",))]


def test_a_version_below_the_newest_is_refused() -> None:
    class PersonV3(KindModel, kind="person", version=3, lens=PersonV2.__kind__.lens):
        first: LWW[str] = ""
        last: LWW[str] = ""
        amount: Counter = 0

    tree, reg = registered(PersonV1, PersonV3)
    before = tree.state.digest()
    with pytest.raises(IncompatibleKindError) as info:
        reg.register_ops(schema(PersonV2))
    assert [f.rule for f in info.value.findings] == ["VERSION_NOT_NEWER"]  # type: ignore[attr-defined]
    assert tree.state.digest() == before


class Party(KindModel, kind="party", version=1):
    name: LWW[str] = ""
    total: Counter = 0


def test_a_changed_parent_kind_is_refused() -> None:
    class PersonAsParty(Party, kind="person", version=2):
        pass

    assert schema(PersonAsParty).parent == "party@1"
    assert rules(PersonV1, PersonAsParty) == ["PARENT_CHANGED"]


def test_version_order_is_enforced() -> None:
    _, reg = registered(PersonV1, PersonV2)

    class Old(KindModel, kind="person", version=1):
        name: LWW[int] = 0

    with pytest.raises(IncompatibleKindError) as info:
        reg.register_ops(schema(Old))
    assert [f.rule for f in info.value.findings] == ["VERSION_TAKEN"]  # type: ignore[attr-defined]


def test_the_readme_rule_table_is_the_gate_s() -> None:
    import re
    from pathlib import Path

    from broker.kinds import RULES
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Kinds and schema evolution", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([A-Z_]+)` \| (\w+) \| (.+?) \| (.+?) \|$", section, re.M)
    assert {r[0]: (r[1], r[2], r[3]) for r in rows} == {
        name: (rule.kind, rule.refuses, rule.why) for name, rule in RULES.items()}


_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-3, 3),
                     st.sampled_from(["", "a", "b"]),
                     st.floats(allow_nan=False, allow_infinity=False))
_NAMES = st.sampled_from(["a", "b", "_a", "a.b", "", "schema", "model_dump", "fields"])


def _spec_json(children: st.SearchStrategy[object]) -> st.SearchStrategy[object]:
    return st.fixed_dictionaries(
        {"crdt": st.sampled_from(["lww", "mv", "counter", "set", "flag", "map", "x"])},
        optional={"types": st.lists(st.sampled_from(["null", "bool", "int", "float", "str",
                                                     "bytes"]), max_size=3),
                  "enum": st.lists(_SCALARS, max_size=3), "default": _SCALARS,
                  "fields": st.dictionaries(_NAMES, children, max_size=3)})


_LENS_JSON = st.one_of(
    st.fixed_dictionaries({"op": st.sampled_from(["add", "remove"]),
                           "path": st.lists(_NAMES, max_size=2), "default": _SCALARS}),
    st.fixed_dictionaries({"op": st.just("rename"), "path": st.lists(_NAMES, max_size=2),
                           "to": st.one_of(_NAMES, st.lists(_NAMES))}),
    st.fixed_dictionaries({"op": st.just("convert"), "path": st.lists(_NAMES, max_size=2),
                           "mapping": st.lists(st.lists(_SCALARS, min_size=2, max_size=2),
                                               max_size=3)}),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(_NAMES, st.recursive(_spec_json(st.nothing()), _spec_json,
                                            max_leaves=6), max_size=4),
       st.lists(_LENS_JSON, max_size=3))
def test_whatever_schema_text_is_accepted_builds_a_model_like_a_compiled_one(
    fields: dict[str, object], lens: list[object]
) -> None:
    """Random schema text (as a peer might write it): refused as a SchemaFormatError, or
    it builds a model whose schema is the text's, and a view that creates and reads."""
    try:
        s = KindSchema.from_json(_schema_text(fields, lens=lens, version=2))
    except SchemaFormatError:
        return
    model = s.to_model()
    assert KindSchema.of_model(model) == s
    assert KindSchema.from_json(s.to_json()) == s
    view = KindView(model)
    required: dict[str, Any] = {n: _value_of(spec) for n, spec in s.fields
                if spec.crdt.value == "lww" and not spec.has_default}
    tree = Tree()
    run(tree, view.create_ops("n", **required))
    assert view.read(tree, "n").model_dump() == model(**required).model_dump()


def _value_of(spec: object) -> object:
    from broker.kinds._fields import VALUE_TYPES, FieldSpec
    assert isinstance(spec, FieldSpec)
    if spec.enum:
        return spec.enum[0]
    return VALUE_TYPES[spec.types[0]]() if spec.types[0] != "null" else None


def test_a_forged_version_the_gate_would_refuse_is_skipped_on_read() -> None:
    """A writer bypassing ``register_ops`` (a peer, a stolen key, or two nodes registering
    versions 2 and 3 concurrently, each checked against version 1 alone) stores a schema
    that breaks the gate: readers refuse it as if it were registered now, with the rule,
    and keep reading the versions that pass."""
    class PersonV2Counter(KindModel, kind="person", version=2):
        name: Counter = 0  # a register turned into a counter: CRDT_CHANGED
        total: Counter = 0

    tree, _ = registered(PersonV1)
    run(tree, [Add("person", ("versions",), schema(PersonV2Counter).to_json()),
               Assign("person", ("active",), 2)], "rx", 900)
    reg = Registry.from_tree(tree)
    assert reg.versions("person") == [1]
    assert len(reg.skipped) == 1
    assert "CRDT_CHANGED" in reg.skipped[0]
    with pytest.raises(UnknownKindError):
        reg.view("person")  # the active version is the refused one: never silently v1
    assert reg.view("person", 1).info.ref == "person@1"
    # and a legitimate next version still registers on top of what passed
    run(tree, reg.register_ops(schema(PersonV2)), "r1", 1000)
    assert Registry.from_tree(tree).get("person") == schema(PersonV2)


def test_a_value_written_over_the_registry_s_fields_hides_nothing() -> None:
    """A register written at ``versions`` (or a set at ``active``) beside the real ones makes
    a kind conflict in storage: the registry still reads the set and the register."""
    tree, _ = registered(PersonV1, PersonV2)
    run(tree, [Assign("person", ("versions",), "junk"), Add("person", ("active",), 1)],
        "rx", 900)
    reg = Registry.from_tree(tree)
    assert reg.versions("person") == [1, 2]
    assert reg.active == {"person": 2}
