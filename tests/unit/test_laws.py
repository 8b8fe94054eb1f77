"""Lattice laws and convergence for every CRDT kind, by property testing.

The kinds are every ``Causal`` subclass ``broker.crdt`` exports (``strategies.KINDS``); a kind
exported without an operation generator, or a delta-mutator no generator issues, fails here.
"""

from __future__ import annotations

import inspect
import types

import pytest
from hypothesis import HealthCheck, find, given, settings
from hypothesis import strategies as st

import broker.crdt
from broker.crdt import EWFlag, ORMap
from broker.crdt._causal import Causal
from tests.unit.strategies import (
    GENERATORS,
    KINDS,
    NOT_GENERATED,
    exported_kinds,
    histories,
    mutate,
    ops,
    run_history,
)

kinds = st.sampled_from(KINDS)


def test_every_exported_kind_has_a_generator() -> None:
    assert set(exported_kinds()) <= set(GENERATORS)
    assert EWFlag in KINDS
    assert ORMap in KINDS


def test_a_new_exported_kind_without_a_generator_is_noticed() -> None:
    class GCounter(Causal):  # a kind broker.crdt might export one day
        __slots__ = ()

    fake = types.ModuleType("fake_crdt")
    fake.__all__ = [*broker.crdt.__all__, "GCounter"]  # type: ignore[attr-defined]
    for name in broker.crdt.__all__:
        setattr(fake, name, getattr(broker.crdt, name))
    fake.GCounter = GCounter  # type: ignore[attr-defined]
    assert GCounter in exported_kinds(fake)
    assert set(exported_kinds(fake)) - set(GENERATORS) == {GCounter}


def _mutators(kind: type[Causal]) -> set[str]:
    """Public methods of ``kind`` that return a state of ``kind`` (its delta-mutators)."""
    return {
        name for name, fn in inspect.getmembers(kind, inspect.isfunction)
        if not name.startswith("_")
        and inspect.signature(fn).return_annotation in (kind.__name__, kind, "Self")
    } - NOT_GENERATED


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.__name__)
def test_the_generator_issues_every_delta_mutator_of_its_kind(kind: type[Causal]) -> None:
    names = _mutators(kind)
    assert names, f"{kind.__name__} has no delta-mutator"
    for name in sorted(names):
        find(ops(kind), lambda op, name=name: op.name == name,  # type: ignore[misc]
             settings=settings(database=None, suppress_health_check=list(HealthCheck)))


@st.composite
def three_states(draw: st.DrawFn) -> tuple[Causal, Causal, Causal]:
    kind = draw(kinds)
    states, _ = run_history(kind, draw(histories(kind)))
    return states[0], states[1], states[2]


@given(three_states())
def test_join_is_commutative(abc: tuple[Causal, Causal, Causal]) -> None:
    a, b, _ = abc
    assert a.join(b) == b.join(a)
    assert a.join(b).value() == b.join(a).value()


@given(three_states())
def test_join_is_associative(abc: tuple[Causal, Causal, Causal]) -> None:
    a, b, c = abc
    assert a.join(b).join(c) == a.join(b.join(c))


@given(three_states())
def test_join_is_idempotent(abc: tuple[Causal, Causal, Causal]) -> None:
    a, b, _ = abc
    assert a.join(a) == a
    ab = a.join(b)
    assert ab.join(b) == ab
    assert ab.join(a) == ab


@given(three_states())
def test_join_does_not_modify_its_inputs(abc: tuple[Causal, Causal, Causal]) -> None:
    a, b, _ = abc
    da, db = a.digest(), b.digest()
    a.join(b)
    assert (a.digest(), b.digest()) == (da, db)


@given(st.data())
def test_delta_mutator_law(data: st.DataObject) -> None:
    """Joining m(s) into s equals joining it into any state that has seen s (in full)."""
    kind = data.draw(kinds)
    states, _ = run_history(kind, data.draw(histories(kind)))
    s, other = states[0], states[1]
    op = data.draw(ops(kind))
    delta = mutate(s, "r1", op, 10_000)
    via_delta = s.join(delta)
    # A delta joined into a state that saw everything s saw gives the same result as a full
    # state join: the delta-mode join skips nothing it should visit.
    full_peer = other.join(s)
    via_full = full_peer.join(via_delta)
    via_peer_delta = full_peer.join(delta)
    assert via_peer_delta == via_full
    # And the delta alone holds no more than the mutated state.
    assert via_delta.join(delta) == via_delta


@settings(max_examples=150)
@given(st.data())
def test_random_delivery_with_duplicates_converges(data: st.DataObject) -> None:
    kind = data.draw(kinds)
    states, deltas = run_history(kind, data.draw(histories(kind, max_size=30)))
    everything = states[0].join(states[1]).join(states[2])
    replicas = []
    for _ in range(3):
        order = data.draw(st.permutations(deltas + data.draw(st.lists(st.sampled_from(deltas),
                                                                      max_size=5))
                                          if deltas else []))
        r = kind()
        for d in order:
            r.merge(d)
        replicas.append(r)
    for r in replicas:
        assert r == everything
        assert r.digest() == everything.digest()
        assert r.value() == everything.value()


@given(st.data())
def test_batched_deltas_equal_individual_deltas(data: st.DataObject) -> None:
    """Deltas joined into one batch have the effect of applying each in turn."""
    kind = data.draw(kinds)
    _, deltas = run_history(kind, data.draw(histories(kind)))
    start = data.draw(st.integers(0, len(deltas)))
    base = kind()
    for d in deltas[:start]:
        base.merge(d)
    batch = kind(is_delta=True)
    one_by_one = base.copy()
    for d in deltas[start:]:
        batch.merge(d)
        one_by_one.merge(d)
    base.merge(batch)
    assert base == one_by_one
