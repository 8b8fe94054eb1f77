"""Typed kinds (broker.kinds): pydantic models over CRDT fields.

Writes are validated before any delta exists (a KindValidationError naming the field, the
tree untouched); reads return model instances; multi-value registers show every live value
and kind conflicts are reported beside the instance, never hidden.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Annotated, Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ConfigDict, Field, model_validator

from broker.crdt import Add, Assign, Create, Increment, Kind, Tree, TreeOp
from broker.errors import UnknownNodeError, WorknodeError
from broker.kinds import (
    LWW,
    MV,
    Counter,
    Flag,
    KindDefinitionError,
    KindModel,
    KindReadError,
    KindValidationError,
    KindView,
    ORSet,
    Write,
    conflicts_of,
)


class Address(KindModel):
    city: LWW[str] = ""
    zip: LWW[str | None] = None


class Order(KindModel, kind="order", version=1):
    title: LWW[str] = ""
    total: Counter = 0
    tags: ORSet[str] = frozenset()
    status: MV[Literal["open", "paid", "shipped"]] = ()
    paid: Flag = False
    address: Address = Address()


class Invoice(Order, kind="invoice", version=1):
    number: LWW[int] = 0


VIEW = KindView(Order)


def run(tree: Tree, writes: Sequence[Write], replica: str = "r1", ts: int = 100) -> None:
    """Apply writes as ``Replica.write_many`` does (a TreeOp in one step, a mutator merged)."""
    for i, w in enumerate(writes):
        if isinstance(w, TreeOp):
            w.apply(tree, replica, ts + i)
        else:
            tree.merge(w(tree, replica, ts + i))


def test_a_kind_reads_back_what_it_wrote() -> None:
    tree = Tree()
    run(tree, VIEW.create_ops("o1", title="desk", total=3, tags={"a", "b"}, status="open",
                              paid=True, address={"city": "Lyon"}))
    run(tree, VIEW.ops("o1", total=-1, tags={"c"}), ts=200)
    order = VIEW.read(tree, "o1")
    assert isinstance(order, Order)
    assert order == Order(title="desk", total=2, tags=frozenset("abc"), status=("open",),
                          paid=True, address=Address(city="Lyon"))
    assert conflicts_of(order) == {}
    assert tree.fields("o1")["_kind"] == "order"
    assert VIEW.read_all(tree) == {"o1": order}


def test_a_read_equals_pydantic_s_validation_of_it() -> None:
    """Reads skip pydantic for values already of their types: the same instance results."""
    tree = Tree()
    run(tree, VIEW.create_ops("o1", title="desk", total=3, tags={"a"}, status="open",
                              address={"city": "Lyon", "zip": None}))
    order = VIEW.read(tree, "o1")
    assert order == Order.model_validate(order.model_dump())
    assert order.model_dump() == Order.model_validate(order.model_dump()).model_dump()


def test_a_model_validator_runs_on_reads() -> None:
    from pydantic import field_validator

    class Checked(KindModel, kind="checked"):
        title: LWW[str] = ""

        @field_validator("title")
        @classmethod
        def upper(cls, v: str) -> str:
            return v.upper()

    view = KindView(Checked)
    tree = Tree()
    run(tree, view.create_ops("c1", title="abc"))
    assert view.read(tree, "c1").title == "ABC"  # type: ignore[attr-defined]


def test_a_nested_map_may_be_written_as_its_model() -> None:
    tree = Tree()
    run(tree, VIEW.create_ops("o1", address=Address(city="Oslo")))
    run(tree, VIEW.ops("o1", address=Address(zip="0150")), ts=300)  # only the field it sets
    assert VIEW.read(tree, "o1").address == Address(city="Oslo", zip="0150")  # type: ignore[attr-defined]


def test_unwritten_fields_read_as_their_defaults_and_bottoms() -> None:
    tree = Tree()
    run(tree, VIEW.create_ops("o1"))
    assert VIEW.read(tree, "o1") == Order()


@pytest.mark.parametrize(("changes", "field"), [
    ({"total": "3"}, "total"),
    ({"total": 2**63}, "total"),
    ({"title": 5}, "title"),
    ({"status": "lost"}, "status"),
    ({"tags": {1.5}}, "tags"),
    ({"paid": "yes"}, "paid"),
    ({"address": {"city": 1}}, "address.city"),
    ({"address": {"street": "x"}}, "address.street"),
    ({"nope": 1}, "nope"),
    ({"title": "x" * (1 << 20)}, "title"),
    # None is a value like any other: refused where the field's type does not hold it
    # (not taken as "field not given", not stored for a reader to trip over)
    ({"title": None}, "title"),
    ({"status": None}, "status"),
    ({"total": None}, "total"),
    ({"tags": None}, "tags"),
    ({"paid": None}, "paid"),
    ({"address": None}, "address"),
    ({"address": {"city": None}}, "address.city"),
    ({"tags": {"x" * (1 << 20)}}, "tags"),
    ({"total": -(2**63) - 1}, "total"),
])
def test_an_invalid_write_names_the_field_and_writes_nothing(
    changes: dict[str, object], field: str
) -> None:
    tree = Tree()
    run(tree, VIEW.create_ops("o1", title="kept"))
    before = tree.state.digest()
    with pytest.raises(KindValidationError) as info:
        # valid changes listed first: still nothing is written
        run(tree, VIEW.ops("o1", **{"paid": True, **changes}))
    assert info.value.field == field
    assert info.value.reason
    assert tree.state.digest() == before


def test_concurrent_multi_values_are_all_shown() -> None:
    a, b = Tree(), Tree()
    run(a, VIEW.create_ops("o1"))
    b.merge(a.state)
    run(a, VIEW.ops("o1", status="paid"), "ra", 200)
    run(b, VIEW.ops("o1", status="shipped"), "rb", 200)
    a.merge(b.state)
    assert VIEW.read(a, "o1").status == ("paid", "shipped")  # type: ignore[attr-defined]


def test_a_kind_conflict_is_reported_not_hidden() -> None:
    a, b = Tree(), Tree()
    run(a, VIEW.create_ops("o1"))
    b.merge(a.state)
    run(a, VIEW.ops("o1", total=4), "ra", 200)
    b.merge(b.assign("rb", "o1", ("total",), "four", 200))  # untyped, another CRDT
    a.merge(b.state)
    order = VIEW.read(a, "o1")
    assert order.total == 4  # type: ignore[attr-defined]
    assert conflicts_of(order) == {"total": {Kind.COUNTER: 4, Kind.LWW: "four"}}


def test_a_stored_value_of_the_wrong_type_is_a_read_error() -> None:
    tree = Tree()
    run(tree, VIEW.create_ops("o1"))
    tree.merge(tree.assign("r2", "o1", ("title",), 7, 300))
    with pytest.raises(KindReadError) as info:
        VIEW.read(tree, "o1")
    assert info.value.field == "title"


def test_reading_a_missing_worknode_fails() -> None:
    with pytest.raises(UnknownNodeError):
        VIEW.read(Tree(), "o1")


def test_set_elements_are_discarded_by_field_name() -> None:
    tree = Tree()
    run(tree, VIEW.create_ops("o1", tags={"a", "b"}))
    run(tree, VIEW.discard_ops("o1", "tags", ["a"]), ts=300)
    assert VIEW.read(tree, "o1").tags == {"b"}  # type: ignore[attr-defined]
    with pytest.raises(KindValidationError):
        VIEW.discard_ops("o1", "title", ["a"])


def test_a_flag_is_disabled_by_false() -> None:
    tree = Tree()
    run(tree, VIEW.create_ops("o1", paid=True))
    run(tree, VIEW.ops("o1", paid=False), ts=300)
    assert VIEW.read(tree, "o1").paid is False  # type: ignore[attr-defined]


def test_a_subclass_kind_names_its_parent_and_inherits_fields() -> None:
    assert Invoice.__kind__ is not None
    assert Invoice.__kind__.parent == "order@1"
    assert Order.__kind__ is not None
    assert Order.__kind__.parent is None
    names = [n for n, _ in Invoice.__shape__]
    assert "number" in names
    assert "total" in names


def test_model_definitions_are_checked() -> None:
    with pytest.raises(KindDefinitionError):
        class NoCrdt(KindModel, kind="bad"):
            x: str = ""
    with pytest.raises(KindDefinitionError):
        class BadValue(KindModel, kind="bad"):
            x: LWW[list[int]] = []  # noqa: RUF012
    with pytest.raises(KindDefinitionError):
        class BadCounter(KindModel, kind="bad"):
            x: Counter = 5
    with pytest.raises(KindDefinitionError):
        class BadSet(KindModel, kind="bad"):
            x: ORSet[float] = frozenset()
    with pytest.raises(KindDefinitionError):
        # pydantic does not validate defaults; the schema would store one no reader reads
        class BadDefault(KindModel, kind="bad"):
            x: LWW[str] = 5  # type: ignore[assignment]
    with pytest.raises(KindDefinitionError):
        class BadLiteralDefault(KindModel, kind="bad"):
            x: LWW[Literal["a", "b"]] = "c"  # type: ignore[assignment]
    with pytest.raises(KindDefinitionError):
        KindView(Address)

    class IntForFloat(KindModel, kind="fine"):
        price: LWW[float] = 0  # an int default of a float field is fine

    assert KindView(IntForFloat).read_fields(None) == IntForFloat()


@pytest.mark.parametrize("annotation", [
    LWW[Annotated[int, Field(ge=0)]], LWW[Annotated[str, Field(max_length=3)]],
    Annotated[Counter, Field(ge=0)],
])
def test_field_constraints_are_refused_not_silently_skipped(annotation: object) -> None:
    """A constraint pydantic would check is not part of a kind's schema (writes, the fast
    read and a model loaded from the registry would all skip it): the definition says so
    instead of a write of -5 to a ``ge=0`` field succeeding."""
    from pydantic import create_model
    with pytest.raises(KindDefinitionError):
        create_model("Constrained", __base__=KindModel,
                     __cls_kwargs__={"kind": "constrained"}, x=(annotation, 0))  # type: ignore[arg-type]


@given(st.lists(st.tuples(st.sampled_from(["ra", "rb"]), st.integers(-5, 5),
                          st.sets(st.sampled_from("abc"), max_size=2)), max_size=8))
def test_typed_writes_are_untyped_writes(writes: list[tuple[str, int, set[str]]]) -> None:
    """The typed path writes the same CRDT state as the same untyped writes."""
    typed, untyped = Tree(), Tree()
    run(typed, VIEW.create_ops("o1"))
    run(untyped, VIEW.create_ops("o1"))
    for i, (replica, amount, tags) in enumerate(writes):
        run(typed, VIEW.ops("o1", total=amount, tags=tags), replica, 1000 + 10 * i)
        # The one counter first (its range checked before anything is written), then the
        # other fields in name order, as the typed path writes them.
        untyped.merge(untyped.increment(replica, "o1", ("total",), amount))
        for t in sorted(tags):
            untyped.merge(untyped.add(replica, "o1", ("tags",), t))
    assert typed.state == untyped.state


class Named(KindModel, kind="named", version=1):
    name: LWW[str]
    note: LWW[str] = ""


def test_a_create_without_a_required_field_is_refused() -> None:
    """A register without a default must be written on create: else the worknode exists
    and no read of it can succeed (pydantic's "Field required" at every read)."""
    view = KindView(Named)
    tree = Tree()
    with pytest.raises(KindValidationError) as info:
        run(tree, view.create_ops("n1", note="x"))
    assert info.value.field == "name"
    assert "n1" not in tree
    run(tree, view.create_ops("n1", name="Ada"))
    run(tree, view.ops("n1", note="later"))  # an update need not repeat it
    assert view.read(tree, "n1") == Named(name="Ada", note="later")


@pytest.mark.parametrize("amount", [1, -1])
def test_a_counter_write_that_would_overflow_writes_nothing(amount: int) -> None:
    """Each amount is in range; the total is not. The write is refused naming the counter,
    and the register written beside it in the same ``ops`` is not committed alone (a
    failing write stops ``write_many`` with the writes before it kept)."""
    tree = Tree()
    run(tree, VIEW.create_ops("o1", total=(2**63 - 1) * amount))
    before = tree.state.digest()
    with pytest.raises(KindValidationError) as info:
        run(tree, VIEW.ops("o1", title="partial", tags={"t"}, total=amount))
    assert info.value.field == "total"
    assert tree.state.digest() == before


@pytest.mark.parametrize("changes", [{"x" * 100_000: 1}, {"address": {"y" * 100_000: 1}}])
def test_an_unknown_huge_field_name_makes_a_short_error(changes: dict[str, object]) -> None:
    """The error names the field, but a 100 kB name is not echoed whole into a log line."""
    with pytest.raises(KindValidationError) as info:
        VIEW.ops("o1", **changes)
    assert len(str(info.value)) < 300
    assert len(info.value.field) < 200


class Ranged(KindModel, kind="ranged", version=1):
    low: LWW[int] = 0
    high: LWW[int] = 10
    hits: Counter = 0

    @model_validator(mode="after")
    def ordered(self) -> Ranged:
        if self.low > self.high:
            raise ValueError("low is above high")
        return self


def test_a_model_validator_refuses_a_write_that_would_break_it() -> None:
    """The model's own validators check the worknode as the write would leave it (the
    stored fields plus the changes): refused before anything is written, instead of a
    write that succeeds and every later read that fails."""
    view = KindView(Ranged)
    tree = Tree()
    with pytest.raises(KindValidationError):
        view.create_ops("r1", low=11)
    run(tree, view.create_ops("r1", low=5))
    before = tree.state.digest()
    with pytest.raises(KindValidationError):
        run(tree, view.ops("r1", high=4, hits=1))
    assert tree.state.digest() == before
    run(tree, view.ops("r1", high=6, hits=1))
    assert view.read(tree, "r1") == Ranged(low=5, high=6, hits=1)


def test_a_field_name_a_registry_read_would_refuse_is_refused_at_definition() -> None:
    """``copy`` shadows a pydantic attribute (pydantic only warns): a schema naming it is
    junk to every registry reader, so the model is refused where it is written."""
    import warnings

    from pydantic import create_model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(KindDefinitionError):
            create_model("Shadow", __base__=KindModel,
                         __cls_kwargs__={"kind": "shadow"}, copy=(LWW[str], ""))


class Lowered(KindModel, kind="lowered", version=1):
    model_config = ConfigDict(str_to_lower=True, str_max_length=8)
    name: LWW[str] = ""


def test_a_model_s_own_config_applies_to_its_reads_and_writes() -> None:
    """pydantic settings of the model (here: lower-case text, at most 8 characters) are
    not skipped by the fast read, and a write they refuse writes nothing."""
    view = KindView(Lowered)
    tree = Tree()
    run(tree, view.create_ops("l1", name="ABC"))
    assert view.read(tree, "l1").name == "abc"  # type: ignore[attr-defined]
    before = tree.state.digest()
    with pytest.raises(KindValidationError):
        run(tree, view.ops("l1", name="much too long"))
    assert tree.state.digest() == before


_PATHS = st.sampled_from([("title",), ("total",), ("tags",), ("status",), ("paid",),
                          ("address",), ("address", "city"), ("address", "city", "x"),
                          ("_kind",)])
_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.text(max_size=3),
                    st.binary(max_size=2), st.sampled_from(["open", "paid"]))
_UNTYPED = st.lists(st.tuples(st.sampled_from(["assign", "incr", "add", "multi", "enable",
                                               "remove"]), _PATHS, _VALUES,
                              st.sampled_from(["r1", "r2"])), max_size=8)
_CHANGES = st.fixed_dictionaries({}, optional={
    "title": st.text(max_size=2), "total": st.integers(-3, 3),
    "tags": st.frozensets(st.text(max_size=1), max_size=2),
    "status": st.sampled_from(["open", "paid"]), "paid": st.booleans(),
    "address": st.fixed_dictionaries({}, optional={"city": st.text(max_size=2)})})


@settings(max_examples=200, deadline=None)
@given(_UNTYPED, _CHANGES)
def test_any_stored_state_reads_or_is_a_read_error_and_writes_whole_or_not_at_all(
    untyped: list[tuple[str, tuple[str, ...], object, str]], changes: dict[str, object]
) -> None:
    """Other writers (other versions, untyped tools, a peer) may store anything under a
    typed worknode: a read is an instance or a KindReadError, and a typed write over it
    either succeeds or leaves the state as it was."""
    tree = Tree()
    run(tree, [Create("n")], "r0", 1)
    for i, (what, path, value, replica) in enumerate(untyped):
        full = ("n", "fields", *path)
        with contextlib.suppress(WorknodeError):  # the untyped write may be refused
            if what == "assign":
                run(tree, [Assign("n", path, value)], replica, 10 + i)  # type: ignore[arg-type]
            elif what == "incr":
                run(tree, [Increment("n", path, value if type(value) is int else 1)], replica)
            elif what == "add":
                element = value if type(value) in (str, int, bytes) else "e"
                run(tree, [Add("n", path, element)], replica)  # type: ignore[arg-type]
            elif what == "multi":
                tree.merge(tree.assign_multi(replica, "n", path, value))  # type: ignore[arg-type]
            elif what == "enable":
                tree.merge(tree.state.enable(replica, full))
            else:
                tree.merge(tree.state.remove(full))
    with contextlib.suppress(KindReadError):
        conflicts_of(VIEW.read(tree, "n"))
    before = tree.state.digest()
    try:
        run(tree, VIEW.ops("n", **changes), "r9", 500)
    except WorknodeError:
        assert tree.state.digest() == before
