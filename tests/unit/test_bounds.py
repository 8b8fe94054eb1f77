"""Bounds and validation: every bad input gets a specific error and changes nothing."""

from __future__ import annotations

import pytest

from broker.crdt import (
    MAX_KEY_BYTES,
    MAX_NESTING_DEPTH,
    MAX_VALUE_BYTES,
    CausalContext,
    LWWRegister,
    ORMap,
    ORSet,
    PNCounter,
)
from broker.crdt._stores import LWWStore, MapStore
from broker.errors import (
    InvalidArgumentError,
    InvalidKeyError,
    InvalidReplicaIdError,
    InvalidValueError,
    NestingDepthError,
    ValueTooLargeError,
    WorknodeError,
)


def test_max_depth_path_is_accepted() -> None:
    m = ORMap()
    path = tuple(f"k{i}" for i in range(MAX_NESTING_DEPTH))
    m.merge(m.assign("r1", path, "deep", 1))
    assert m.get(path) == "deep"
    assert m.join(m.copy()) == m


def test_depth_nine_path_is_refused() -> None:
    m = ORMap()
    path = tuple(f"k{i}" for i in range(MAX_NESTING_DEPTH + 1))
    with pytest.raises(NestingDepthError):
        m.assign("r1", path, "too deep", 1)
    with pytest.raises(NestingDepthError):
        m.remove(path)
    assert m.value() == {}


def _nested(depth: int) -> MapStore:
    store: object = LWWStore(("r9", 1, 1, "x"))
    for i in range(depth):
        store = MapStore({f"k{i}": store})
    assert isinstance(store, MapStore)
    return store


def test_merging_a_state_nested_too_deep_is_refused() -> None:
    """A peer's state with nine map levels is refused by join, digest and value."""
    hostile = ORMap(_nested(MAX_NESTING_DEPTH + 1), CausalContext({"r9": 1}))
    target = ORMap()
    with pytest.raises(NestingDepthError):
        target.merge(hostile)
    with pytest.raises(NestingDepthError):
        hostile.digest()
    with pytest.raises(NestingDepthError):
        hostile.value()
    ok = ORMap(_nested(MAX_NESTING_DEPTH), CausalContext({"r9": 1}))
    target.merge(ok)
    assert target.digest() == ok.digest()


def test_nesting_error_is_a_bounds_error() -> None:
    assert issubclass(NestingDepthError, WorknodeError)


@pytest.mark.parametrize("rid", ["", "a.b", "a b", "*", ">", "x" * 65, "é", None, 7])
def test_invalid_replica_ids_are_refused(rid: object) -> None:
    with pytest.raises(InvalidReplicaIdError):
        ORMap().assign(rid, ("k",), 1, 1)  # type: ignore[arg-type]


@pytest.mark.parametrize("key", ["", "x" * (MAX_KEY_BYTES + 1), "\ud800", 3, b"k", None])
def test_invalid_keys_are_refused(key: object) -> None:
    with pytest.raises(InvalidKeyError):
        ORMap().assign("r1", (key,), 1, 1)  # type: ignore[arg-type]


def test_path_must_be_a_sequence_of_keys() -> None:
    with pytest.raises(InvalidKeyError):
        ORMap().assign("r1", "abc", 1, 1)
    with pytest.raises(InvalidKeyError):
        ORMap().assign("r1", (), 1, 1)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), [1], {"a": 1}, object()])
def test_invalid_values_are_refused(value: object) -> None:
    with pytest.raises(InvalidValueError):
        LWWRegister().assign("r1", value, 1)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [2**63, -(2**63) - 1, "x" * (MAX_VALUE_BYTES + 1)])
def test_oversized_values_are_refused(value: object) -> None:
    with pytest.raises(ValueTooLargeError):
        LWWRegister().assign("r1", value, 1)  # type: ignore[arg-type]


@pytest.mark.parametrize("element", [True, 1.5, None, (1,)])
def test_set_elements_must_be_str_int_or_bytes(element: object) -> None:
    with pytest.raises(InvalidValueError):
        ORSet().add("r1", element)  # type: ignore[arg-type]


def test_counter_amounts_are_checked() -> None:
    c = PNCounter()
    with pytest.raises(InvalidArgumentError):
        c.increment("r1", 1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueTooLargeError):
        c.increment("r1", 2**63)
    c.merge(c.increment("r1", 2**63 - 1))
    with pytest.raises(ValueTooLargeError):
        c.increment("r1", 1)
    assert c.value() == 2**63 - 1


@pytest.mark.parametrize("ts", [-1, 2**63, 1.5, "x", None])
def test_invalid_hybrid_timestamps_are_refused(ts: object) -> None:
    with pytest.raises(InvalidArgumentError):
        ORMap().assign("r1", ("k",), 1, ts)  # type: ignore[arg-type]
