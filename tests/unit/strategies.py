"""Hypothesis strategies: random operations on every CRDT kind, applied as delta-mutators.

``KINDS`` is derived from what ``broker.crdt`` exports (every ``Causal`` subclass), never
listed by hand: an exported kind without a generator in ``GENERATORS`` fails
tests/unit/test_laws.py instead of silently escaping the law and convergence tests. Generators
take a wire version: a history for version ``v`` uses only the kinds ``v`` carries (OR-maps
get nested enable-wins flags from v2 on).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from hypothesis import strategies as st

import broker.crdt
from broker.codec import CURRENT_VERSION, KINDS_BY_VERSION
from broker.crdt import EWFlag, Kind, LWWRegister, MVRegister, ORMap, ORSet, PNCounter
from broker.crdt._causal import Causal

REPLICAS = ("r1", "r2", "r3")
KEYS = ("a", "b")
atoms = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=4),
    st.binary(max_size=4),
)
elements = st.one_of(st.integers(0, 3), st.sampled_from(["x", "y"]), st.just(b"z"))
paths = st.lists(st.sampled_from(KEYS), min_size=1, max_size=3).map(tuple)


@dataclass(frozen=True)
class Op:
    """One mutation: ``name`` of the mutator and its arguments (without replica id / ts)."""

    name: str
    args: tuple[Any, ...]


def _register_ops(version: int) -> st.SearchStrategy[Op]:
    return st.builds(lambda v: Op("assign", (v,)), atoms)


def _counter_ops(version: int) -> st.SearchStrategy[Op]:
    return st.one_of(
        st.builds(lambda n: Op("increment", (n,)), st.integers(-5, 5)),
        st.builds(lambda n: Op("decrement", (n,)), st.integers(0, 5)),
    )


def _set_ops(version: int) -> st.SearchStrategy[Op]:
    return st.one_of(
        st.builds(lambda e: Op("add", (e,)), elements),
        st.builds(lambda e: Op("remove", (e,)), elements),
        st.just(Op("clear", ())),
    )


def _flag_ops(version: int) -> st.SearchStrategy[Op]:
    return st.sampled_from([Op("enable", ()), Op("disable", ())])


def _map_ops(version: int) -> st.SearchStrategy[Op]:
    some = [
        st.builds(lambda p, v: Op("assign", (p, v)), paths, atoms),
        st.builds(lambda p, v: Op("assign_multi", (p, v)), paths, atoms),
        st.builds(lambda p, n: Op("increment", (p, n)), paths, st.integers(-5, 5)),
        st.builds(lambda p, e: Op("add", (p, e)), paths, elements),
        st.builds(lambda p, e: Op("discard", (p, e)), paths, elements),
        st.builds(lambda p: Op("remove", (p,)), paths),
        st.just(Op("clear", ())),
    ]
    if Kind.FLAG in KINDS_BY_VERSION[version]:
        some += [
            st.builds(lambda p: Op("enable", (p,)), paths),
            st.builds(lambda p: Op("disable", (p,)), paths),
        ]
    return st.one_of(*some)


GENERATORS: dict[type[Causal], Callable[[int], st.SearchStrategy[Op]]] = {
    LWWRegister: _register_ops,
    MVRegister: _register_ops,
    PNCounter: _counter_ops,
    ORSet: _set_ops,
    EWFlag: _flag_ops,
    ORMap: _map_ops,
}
"""The operation generator of each kind, given the wire version the history is for."""

NOT_GENERATED = frozenset({"copy", "join", "apply_assign", "apply_increment", "apply_add"})
"""Public methods returning their kind that are not delta-mutators to generate: ``copy`` and
``join``, and the fused local writes (``run_history(fused=True)`` runs those instead)."""


def exported_kinds(module: ModuleType = broker.crdt) -> tuple[type[Causal], ...]:
    """Every CRDT kind ``module`` exports: the ``Causal`` subclasses in its ``__all__``."""
    found = (getattr(module, name) for name in module.__all__)
    return tuple(
        obj for obj in found if isinstance(obj, type) and issubclass(obj, Causal)
        and obj is not Causal
    )


KINDS = exported_kinds()
"""Every exported kind (the law tests run over each)."""


def kinds_at(version: int) -> tuple[type[Causal], ...]:
    """The exported kinds wire ``version`` carries."""
    return tuple(k for k in KINDS if k.KIND in KINDS_BY_VERSION[version])


def ops(kind: type[Causal], version: int = CURRENT_VERSION) -> st.SearchStrategy[Op]:
    """Operations valid for ``kind`` in a history for wire ``version``."""
    return GENERATORS[kind](version)


def mutate(state: Causal, rid: str, op: Op, ts: int) -> Causal:
    """Run the delta-mutator ``op`` on ``state`` as replica ``rid``; return the delta."""
    if op.name in ("remove", "clear", "disable") or (op.name == "discard"):
        if op.name == "discard":
            return state.discard(rid, *op.args)  # type: ignore[attr-defined, no-any-return]
        return getattr(state, op.name)(*op.args)  # type: ignore[no-any-return]
    if op.name == "assign" and isinstance(state, (LWWRegister, ORMap)):
        return state.assign(rid, *op.args, ts)  # type: ignore[arg-type, return-value]
    return getattr(state, op.name)(rid, *op.args)  # type: ignore[no-any-return]


_FUSED = {"assign": "apply_assign", "increment": "apply_increment", "add": "apply_add"}

Step = tuple[int, int, Op | None]
"""``(i, j, op)``: replica ``i`` runs ``op``, or (``op`` is None) merges ``j``'s state."""


def run_history(
    kind: type[Causal], history: list[Step], *, fused: bool = False
) -> tuple[list[Causal], list[Causal]]:
    """Play a history on three replicas. Returns their states and every delta issued.

    ``fused``: OR-map ``assign``, ``increment`` and ``add`` ops use the fused local writes
    ``apply_assign``, ``apply_increment``, ``apply_add`` (mutator and local merge in one).
    """
    states: list[Causal] = [kind() for _ in REPLICAS]
    deltas: list[Causal] = []
    for ts, (i, j, op) in enumerate(history, start=1):
        if op is None:
            states[i].merge(states[j])
            continue
        if fused and op.name in _FUSED and isinstance(states[i], ORMap):
            fn = getattr(states[i], _FUSED[op.name])
            d = fn(REPLICAS[i], *op.args, ts) if op.name == "assign" else fn(REPLICAS[i], *op.args)
        else:
            d = mutate(states[i], REPLICAS[i], op, ts)
            states[i].merge(d)
        deltas.append(d)
    return states, deltas


def histories(
    kind: type[Causal], max_size: int = 25, version: int = CURRENT_VERSION
) -> st.SearchStrategy[list[Step]]:
    """Random interleavings of operations and state syncs among the three replicas, using
    what wire ``version`` carries."""
    n = len(REPLICAS) - 1
    step = st.one_of(
        st.tuples(st.integers(0, n), st.just(0), ops(kind, version)),
        st.tuples(st.integers(0, n), st.integers(0, n), st.none()),
    )
    return st.lists(step, max_size=max_size)
