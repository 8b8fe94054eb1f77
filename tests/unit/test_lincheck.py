"""The linearizability checker can fail: known non-linearizable histories are rejected, known
linearizable ones accepted, histories linearizable by construction pass and turn illegal under a
mutation no order allows, a brute-force permutation checker agrees on small random histories,
and a simulated EVENTUAL store is flagged while its synchronous twin passes."""

from __future__ import annotations

import itertools
import random
import subprocess
import sys
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.errors import InvalidArgumentError
from broker.lincheck import (
    NEVER_WRITTEN,
    Fail,
    HistoryError,
    Operation,
    Verdict,
    check,
    dumps,
    eventual_history,
    generate_history,
    loads,
    partition,
)
from broker.lincheck.__main__ import main

ROOT = Path(__file__).resolve().parents[2]


def op(client: int | str, call: float, ret: float | None, f: str, arg: Any = None,
       out: Any = None, key: str = "x") -> Operation:
    return Operation(client=client, call=call, ret=ret, f=f, arg=arg, out=out, key=key)


def w(c: int, call: float, ret: float | None, v: Any, key: str = "x") -> Operation:
    return op(c, call, ret, "write", v, key=key)


def r(c: int, call: float, ret: float | None, v: Any, key: str = "x") -> Operation:
    return op(c, call, ret, "read", out=v, key=key)


def cas(c: int, call: float, ret: float | None, expected: Any, new: Any, out: Any,
        key: str = "x") -> Operation:
    return op(c, call, ret, "cas", (expected, new), out, key=key)


def add(c: int, call: float, ret: float | None, n: int, key: str = "x") -> Operation:
    return op(c, call, ret, "add", n, key=key)


# -- known non-linearizable histories ---------------------------------------------------------

ILLEGAL: dict[str, tuple[str, list[Operation]]] = {
    "stale read: the old value after a completed write": ("register", [
        w(1, 0, 1, 1), w(1, 2, 3, 2), r(2, 4, 5, 1)]),
    "stale read: absent after a completed write": ("register", [w(1, 0, 1, 1), r(2, 2, 3, None)]),
    "lost update: two acknowledged increments, the read sees one": ("counter", [
        add(1, 0, 2, 1), add(2, 0, 2, 1), r(3, 3, 4, 1)]),
    "split brain: two cas(0 -> 1) from different clients both win": ("cas", [
        w(0, 0, 1, 0), cas(1, 2, 4, 0, 1, True), cas(2, 2, 4, 0, 1, True)]),
    "split brain: two create-if-absent both win": ("cas", [
        op(1, 0, 2, "create", "a", True), op(2, 0, 2, "create", "b", True)]),
    "read of a value never written": ("register", [
        w(1, 0, 3, 1), w(2, 0, 3, 2), r(3, 1, 2, 7)]),
    "a value read before its write was invoked": ("register", [
        r(1, 0, 1, 1), w(2, 2, 3, 1)]),
    "an indeterminate write read before its invocation": ("register", [
        r(1, 0, 1, 5), w(2, 2, None, 5)]),
    "an indeterminate write cannot un-happen": ("register", [
        w(1, 0, None, 1), r(2, 1, 2, 1), r(2, 3, 4, None)]),
    "reads go back in time under concurrent writes": ("register", [
        w(1, 0, 1, 1), w(2, 0, 1, 2), r(3, 2, 3, 2), r(3, 4, 5, 1)]),
    "a failed CAS reports a value the register does not hold": ("cas", [
        w(1, 0, 1, 1), cas(2, 2, 3, 0, 2, Fail(0))]),
    "a CAS fails although the expected value is there": ("cas", [
        w(1, 0, 1, 0), cas(2, 2, 3, 0, 2, False)]),
    "a lost update through CAS: both read 0, both swap, a read sees one": ("cas", [
        w(0, 0, 1, 0), r(1, 2, 3, 0), r(2, 2, 3, 0), cas(1, 4, 5, 0, 1, True),
        cas(2, 4, 5, 1, 2, True), cas(3, 4, 5, 2, 3, True), r(3, 6, 7, 2)]),
    "a counter read before any add completed cannot see the sum of later adds": ("counter", [
        r(1, 0, 1, 3), add(2, 2, 3, 1), add(3, 2, 3, 2)]),
}


@pytest.mark.parametrize("name", sorted(ILLEGAL))
def test_a_known_non_linearizable_history_is_rejected(name: str) -> None:
    model, history = ILLEGAL[name]
    result = check(history, model)
    assert result.verdict is Verdict.ILLEGAL
    assert result.key == "x"
    assert set(result.ops) == set(history)
    assert set(result.pending) <= set(history)
    assert result.pending
    assert "\n" not in result.explain()


# -- known linearizable histories -------------------------------------------------------------

LEGAL: dict[str, tuple[str, list[Operation]]] = {
    "empty": ("cas", []),
    "the later-invoked write goes first (order not by call time)": ("register", [
        w(1, 0, 10, 1), w(2, 1, 3, 2), r(3, 4, 5, 1), r(3, 6, 7, 1)]),
    "the CAS invoked later wins; the earlier one fails with the value it saw": ("cas", [
        w(0, 0, 1, 0), cas(2, 2, 6, 0, 2, Fail(1)), cas(1, 3, 5, 0, 1, True),
        r(3, 7, 8, 1)]),
    "a read concurrent with a write may see either value": ("register", [
        w(1, 0, 1, 1), w(2, 2, 5, 2), r(3, 3, 4, 1), r(4, 3, 4, 2)]),
    "operations touching at one instant are concurrent": ("register", [
        w(1, 0, 1, 1), r(2, 1, 2, None)]),
    "an indeterminate write that happened": ("register", [w(1, 0, None, 1), r(2, 5, 6, 1)]),
    "an indeterminate write that did not happen": ("register", [
        w(1, 0, None, 1), r(2, 5, 6, None)]),
    "an indeterminate write that happened late": ("register", [
        w(1, 0, None, 1), r(2, 5, 6, None), r(2, 7, 8, 1)]),
    "an indeterminate CAS that swapped": ("cas", [
        w(0, 0, 1, 0), cas(1, 2, None, 0, 1, None), r(2, 3, 4, 1)]),
    "an indeterminate CAS that did not": ("cas", [
        w(0, 0, 1, 0), cas(1, 2, None, 0, 1, None), r(2, 3, 4, 0)]),
    "an indeterminate CAS that never could have swapped (never, not at the end)": ("cas", [
        w(0, 0, 1, 0), w(0, 2, 3, 5), cas(1, 4, None, 0, 1, None), r(2, 5, 6, 5)]),
    "one of two concurrent CAS wins, the other reports the winner's value": ("cas", [
        op(1, 0, 2, "create", "a", True), op(2, 0, 2, "create", "b", Fail("a")),
        r(3, 3, 4, "a")]),
    "a counter read concurrent with adds sees a partial sum": ("counter", [
        add(1, 0, 4, 1), add(2, 0, 4, 2), r(3, 1, 2, 2), r(3, 5, 6, 3)]),
    "only indeterminate operations": ("cas", [w(1, 0, None, 1), r(2, 1, None, 5)]),
    "keys are independent": ("register", [
        w(1, 0, 1, 1, key="a"), w(1, 2, 3, 2, key="b"), r(2, 4, 5, 1, key="a"),
        r(2, 4, 5, 2, key="b")]),
}


@pytest.mark.parametrize("name", sorted(LEGAL))
def test_a_known_linearizable_history_is_accepted(name: str) -> None:
    model, history = LEGAL[name]
    result = check(history, model)
    assert result.verdict is Verdict.OK, result.explain()
    assert result.ok


def test_the_failing_key_and_why_are_reported() -> None:
    history = [w(1, 0, 1, 1, key="b"), r(2, 2, 3, None, key="b"),  # stale on b
               w(1, 0, 1, 1, key="a"), r(2, 2, 3, 1, key="a"),
               w(1, 0, 1, 1, key="c"), r(2, 2, 3, 9, key="c")]  # never written on c
    result = check(history, "register")
    assert (result.verdict, result.key) == (Verdict.ILLEGAL, "b")  # the first in key order
    assert result.ops == (history[0], history[1])
    assert result.linearized == (history[0],)
    assert result.state == 1
    assert result.pending == (history[1],)
    text = result.explain()
    assert "'b'" in text
    assert "1 of 2" in text


def test_an_infinite_completion_is_indeterminate() -> None:
    history = [w(1, 0, float("inf"), 1), r(2, 5, 6, None), r(2, 7, 8, 1)]
    assert check(history, "register").ok
    assert check([*history, r(2, 9, 10, None)], "register").verdict is Verdict.ILLEGAL
    line = '{"client": 1, "call": 0, "ret": Infinity, "f": "write", "arg": 1}'
    assert loads([line])[0].ret is None


def test_values_compare_by_type() -> None:
    assert check([w(1, 0, 1, 1), r(2, 2, 3, True)], "register").verdict is Verdict.ILLEGAL
    assert check([w(1, 0, 1, 1), r(2, 2, 3, 1.0)], "register").verdict is Verdict.ILLEGAL
    assert check([w(1, 0, 1, 1), r(2, 2, 3, 1)], "register").ok


@pytest.mark.parametrize(("model", "bad"), [
    ("register", cas(1, 0, 1, 0, 1, True)),  # no CAS on a plain register
    ("cas", op(1, 0, 1, "cas", 3, True)),  # not a pair
    ("cas", cas(1, 0, 1, 0, 1, "yes")),
    ("counter", add(1, 0, 1, 1.5)),
    ("counter", r(1, 0, 1, "3")),
    ("nope", r(1, 0, 1, None)),
    ("register", r(1, 2, 1, None)),  # completes before its call
    ("register", r(1, float("nan"), 1, None)),
])
def test_a_malformed_history_is_an_error_not_a_verdict(model: str, bad: Operation) -> None:
    with pytest.raises(HistoryError):
        check([bad], model)
    assert issubclass(HistoryError, InvalidArgumentError)


# -- budget ---------------------------------------------------------------------------------

def _hard() -> list[Operation]:
    """12 concurrent writes and an impossible read: every subset of writes gets explored
    (about 12 * 2**11 states, more than one clock period of the search)."""
    return [w(i, 0, 10, i) for i in range(12)] + [r(99, 1, 2, NEVER_WRITTEN)]


def test_out_of_states_is_unknown_not_illegal() -> None:
    assert check(_hard(), "register").verdict is Verdict.ILLEGAL
    result = check(_hard(), "register", max_states=500)
    assert (result.verdict, result.key) == (Verdict.UNKNOWN, "x")
    assert result.explored <= 500
    assert result.explain().startswith("unknown")


def test_past_the_deadline_is_unknown() -> None:
    ticks = itertools.count()
    result = check(_hard(), "register", now=lambda: float(next(ticks)), deadline=3.0)
    assert result.verdict is Verdict.UNKNOWN
    assert check(_hard(), "register", now=lambda: 0.0, deadline=3.0).verdict is Verdict.ILLEGAL


# -- properties -------------------------------------------------------------------------------

MODEL_NAMES = st.sampled_from(["register", "cas", "counter"])


@st.composite
def generated(draw: st.DrawFn) -> tuple[str, list[Operation]]:
    model = draw(MODEL_NAMES)
    # A seed rather than st.randoms(): Hypothesis's own randoms favour degenerate draws (every
    # time equal, so every operation concurrent with all others), which make an illegal
    # history exponentially expensive to refute; realistic overlap is what this tests.
    rng = random.Random(draw(st.integers(0, 2**32)))
    history = generate_history(
        rng, model, ops=draw(st.integers(0, 40)), keys=draw(st.integers(1, 3)),
        clients=draw(st.integers(1, 5)), indeterminate=draw(st.sampled_from([0.0, 0.1, 0.3])),
        overlap=draw(st.sampled_from([0.2, 1.0, 3.0])),
    )
    return model, history


@settings(max_examples=150, deadline=None)
@given(generated())
def test_a_history_linearizable_by_construction_is_accepted(
    case: tuple[str, list[Operation]],
) -> None:
    model, history = case
    result = check(history, model)
    assert result.verdict is Verdict.OK, result.explain()


@settings(max_examples=150, deadline=None)
@given(generated(), st.data())
def test_a_read_of_a_value_no_order_allows_is_rejected(
    case: tuple[str, list[Operation]], data: st.DataObject,
) -> None:
    model, history = case
    reads = [i for i, o in enumerate(history) if o.f == "read" and o.ret is not None]
    if reads:
        i = data.draw(st.sampled_from(reads))
        history[i] = Operation(history[i].client, history[i].call, history[i].ret, "read",
                               None, NEVER_WRITTEN, history[i].key)
    else:
        end = max((o.ret or o.call for o in history), default=0.0)
        history.append(r(-1, end + 1, end + 2, NEVER_WRITTEN, key="k0"))
        i = len(history) - 1
    result = check(history, model)
    assert result.verdict is Verdict.ILLEGAL
    assert result.key == history[i].key
    assert history[i] in result.ops
    # The explanation holds: the prefix runs in the specification and ends in ``state``.
    state: Hashable = 0 if model == "counter" else None
    for o in result.linearized:
        legal, state = _spec(model, state, o)
        assert legal
    assert state == result.state
    assert set(result.pending) <= set(result.ops) - set(result.linearized)


@settings(max_examples=100, deadline=None)
@given(generated())
def test_json_lines_round_trip(case: tuple[str, list[Operation]]) -> None:
    _, history = case
    assert loads(list(dumps(history))) == history


# -- a brute-force checker agrees ---------------------------------------------------------

def _spec(model: str, state: Hashable, o: Operation) -> tuple[bool, Hashable]:
    """The sequential specification, written again independently of broker.lincheck."""
    def eq(a: object, b: object) -> bool:
        return type(a) is type(b) and a == b

    unknown = o.ret is None
    if o.f == "read":
        return unknown or eq(o.out, state), state
    if o.f == "write":
        return True, o.arg
    if o.f == "add":
        assert isinstance(state, int)
        return True, state + o.arg
    expected, new = (None, o.arg) if o.f == "create" else o.arg
    if eq(state, expected):
        return (unknown or o.out is True), new
    if unknown:
        return False, state  # a CAS that cannot swap is one that never ran: skip it instead
    return (o.out is False or (isinstance(o.out, Fail) and eq(o.out.current, state))), state


def brute_force(model: str, history: list[Operation]) -> bool:
    """Try every order of the whole history (all keys at once) that respects real time, with
    every subset of indeterminate operations left out."""
    init: Hashable = 0 if model == "counter" else None
    before = {i: {j for j, b in enumerate(history) if b.ret is not None and b.ret < a.call}
              for i, a in enumerate(history)}
    must = {i for i, a in enumerate(history) if a.ret is not None}

    def extend(placed: frozenset[int], states: dict[str, Hashable]) -> bool:
        if must <= placed:
            return True
        for i, a in enumerate(history):
            if i in placed or not before[i] <= placed:
                continue
            legal, after = _spec(model, states.get(a.key, init), a)
            if legal and extend(placed | {i}, {**states, a.key: after}):
                return True
        return False

    return extend(frozenset(), {})


@st.composite
def small_random(draw: st.DrawFn) -> tuple[str, list[Operation]]:
    """Up to 7 operations on 1-2 keys with random outputs and small integer times (ties)."""
    model = draw(MODEL_NAMES)
    fs = {"register": ["read", "write"], "cas": ["read", "write", "cas", "create"],
          "counter": ["read", "add"]}[model]
    values = st.sampled_from([None, 0, 1, 2]) if model != "counter" else st.integers(0, 4)
    history: list[Operation] = []
    for c in range(draw(st.integers(1, 7))):
        f = draw(st.sampled_from(fs))
        call = draw(st.integers(0, 6))
        ret = None if draw(st.integers(0, 6)) == 0 else call + draw(st.integers(0, 4))
        arg: Any = None
        out: Any = None
        if f == "read":
            out = draw(values)
        elif f == "write" or f == "create":
            arg = draw(st.integers(0, 2))
        elif f == "add":
            arg = draw(st.integers(1, 2))
        if f == "cas":
            arg = (draw(st.sampled_from([None, 0, 1, 2])), draw(st.integers(0, 2)))
        if f in ("cas", "create"):
            out = draw(st.sampled_from([True, False, Fail(None), Fail(0), Fail(1)]))
        history.append(op(c, call, ret, f, arg, out, key=draw(st.sampled_from(["a", "b"]))))
    return model, history


@settings(max_examples=400, deadline=None)
@given(small_random())
def test_the_checker_agrees_with_a_brute_force_search(case: tuple[str, list[Operation]]) -> None:
    model, history = case
    assert check(history, model).ok == brute_force(model, history)


def test_the_comparison_sees_both_verdicts() -> None:
    """The agreement above means something only if both verdicts occur often: a seeded sweep
    of the same distribution of histories, compared too."""
    verdicts = []
    for seed in range(300):
        model, history = _seeded(seed)
        ok = check(history, model).ok
        assert ok == brute_force(model, history), (seed, history)
        verdicts.append(ok)
    assert 30 < sum(verdicts) < 270


def _seeded(seed: int) -> tuple[str, list[Operation]]:
    rng = random.Random(seed)
    model = rng.choice(["register", "cas", "counter"])
    history: list[Operation] = []
    for c in range(rng.randint(1, 7)):
        call = rng.randint(0, 6)
        ret = None if rng.random() < 0.15 else call + rng.randint(0, 4)
        key = rng.choice("ab")
        if model == "counter":
            history.append(add(c, call, ret, rng.randint(1, 2), key) if rng.random() < 0.5
                           else r(c, call, ret, rng.randint(0, 4), key))
            continue
        f = rng.choice(["read", "write"] + (["cas", "create"] if model == "cas" else []))
        out = rng.choice([True, False, Fail(None), Fail(0), Fail(1)])
        if f == "read":
            history.append(r(c, call, ret, rng.choice([None, 0, 1, 2]), key))
        elif f == "write":
            history.append(w(c, call, ret, rng.randint(0, 2), key))
        elif f == "cas":
            history.append(cas(c, call, ret, rng.choice([None, 0, 1]), rng.randint(0, 2), out,
                               key))
        else:
            history.append(op(c, call, ret, "create", rng.randint(0, 2), out, key))
    return model, history


# -- the EVENTUAL control ---------------------------------------------------------------------

def test_an_eventually_consistent_store_is_flagged() -> None:
    history = eventual_history(random.Random(0), ops=40, clients=4)
    result = check(history, "register")
    assert result.verdict is Verdict.ILLEGAL
    assert any(o.f == "read" for o in result.pending)


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 2**32), st.integers(1, 3))
def test_the_same_store_with_synchronous_replication_passes(seed: int, keys: int) -> None:
    assert check(eventual_history(random.Random(seed), ops=40, clients=4, keys=keys, sync=True),
                 "register").ok


def test_most_eventual_runs_are_flagged() -> None:
    flagged = sum(not check(eventual_history(random.Random(s)), "register").ok
                  for s in range(20))
    assert flagged >= 10


# -- performance ----------------------------------------------------------------------------

def test_a_long_concurrent_cas_history_is_checked_within_a_state_budget() -> None:
    """3 keys, 5 clients, 2,000 operations with overlap and some indeterminate ones: decided
    (not UNKNOWN) within 100k states; the wall time is in the package's README figure, not
    asserted here."""
    history = generate_history(random.Random(7), "cas", ops=2000, keys=3, clients=5,
                               indeterminate=0.01, overlap=2.0)
    assert len(partition(history)) == 3
    assert check(history, "cas", max_states=100_000).verdict is Verdict.OK


# -- CLI --------------------------------------------------------------------------------------

def _file(tmp_path: Path, history: list[Operation]) -> str:
    path = tmp_path / "h.jsonl"
    path.write_text("".join(line + "\n" for line in dumps(history)))
    return str(path)


def test_cli_linearizable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([_file(tmp_path, LEGAL["an indeterminate write that happened late"][1]),
                 "--model", "register", "--budget", "60"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("linearizable")
    assert out.count("\n") == 1


def test_cli_not_linearizable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, history = ILLEGAL["split brain: two cas(0 -> 1) from different clients both win"]
    assert main([_file(tmp_path, history)]) == 1
    out = capsys.readouterr().out
    assert out.startswith("NOT linearizable: key 'x'")
    assert out.count("\n") == 1


def test_cli_writes_the_failing_key_s_operations(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    _, stale = ILLEGAL["stale read: the old value after a completed write"]
    fine = [w(1, 0, 1, 1, key="a"), r(2, 2, 3, 1, key="a")]
    failing = tmp_path / "failing.jsonl"
    assert main([_file(tmp_path, fine + stale), "--model", "register",
                 "--failing", str(failing)]) == 1
    assert loads(failing.read_text().splitlines()) == stale
    assert check(stale, "register").verdict is Verdict.ILLEGAL
    capsys.readouterr()


def test_cli_unknown(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([_file(tmp_path, _hard()), "--model", "register", "--max-states", "100"]) == 2
    assert capsys.readouterr().out.startswith("unknown")


@pytest.mark.parametrize("content", [
    "not json\n", '{"client": 1, "call": 0, "f": "read", "x": 1}\n', "[1]\n",
    '{"client": 1, "call": 2, "ret": 1, "f": "read"}\n',
    '{"client": 1, "call": 0, "ret": 1, "f": "fly"}\n',
    '{"client": 1, "call": 0, "ret": 1, "f": "write", "arg": {"a": 1}}\n',
])
def test_cli_bad_input_is_one_error_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                         content: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    assert main([str(path), "--model", "register"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: ")
    assert captured.err.count("\n") == 1


def _exit_status(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse exits on bad arguments
        return exc.code if isinstance(exc.code, int) else -1


@pytest.mark.parametrize("argv", [["missing.jsonl"], [], ["f", "--model", "queue"],
                                  ["f", "--budget", "-1"], ["f", "--budget", "soon"]])
def test_cli_bad_arguments_are_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], monkeypatch: Any,
) -> None:
    monkeypatch.chdir(tmp_path)
    assert _exit_status(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: ")
    assert captured.err.count("\n") == 1


def test_the_module_runs_as_a_command(tmp_path: Path) -> None:
    _, history = ILLEGAL["lost update: two acknowledged increments, the read sees one"]
    done = subprocess.run([sys.executable, "-m", "broker.lincheck", _file(tmp_path, history),
                           "--model", "counter"], capture_output=True, text=True, cwd=ROOT,
                          timeout=60, check=False)
    assert done.returncode == 1
    assert done.stdout.startswith("NOT linearizable")
    assert done.stderr == ""
