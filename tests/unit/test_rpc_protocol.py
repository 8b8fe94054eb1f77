"""The pure RPC protocol: bodies round-trip, hostile bytes become specific errors, deadlines
shrink and are capped, call depth is bounded. No clock: times are arguments."""

from __future__ import annotations

import contextlib
import dataclasses
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.codec import WireCodec
from broker.crdt import ORMap
from broker.rpc import (
    MAX_CALL_DEPTH,
    MAX_RPC_TIMEOUT_MS,
    CallDepthExceededError,
    Deadline,
    DeadlineExceededError,
    FailedPreconditionError,
    Request,
    Response,
    RpcInvalidArgumentError,
    StatusCode,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
    error_for,
)
from broker.rpc._protocol import (
    TRACE_ID_BYTES,
    check_depth,
    child_depth,
    clamp_timeout_ms,
    encode_call,
    encode_result,
    new_request,
    new_response,
)

CODEC = WireCodec()
atoms = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=50),
    st.binary(max_size=50),
)


@given(
    args=st.dictionaries(st.text(min_size=1, max_size=10), atoms, max_size=8),
    deadline=st.integers(0, 10**9),
    depth=st.integers(0, 255),
    token=st.binary(max_size=300),
)
def test_requests_round_trip(args, deadline, depth, token) -> None:
    req = Request("o1", "get", args, token, deadline, depth, b"t" * 16)
    out = decode_request(CODEC, encode_request(CODEC, req))
    assert out.arguments == args
    assert out.deadline_ms == min(deadline, MAX_RPC_TIMEOUT_MS)  # capped on the wire
    assert (out.worknode, out.method, out.token, out.call_depth) == ("o1", "get", token, depth)
    assert out.version == CODEC.version


def test_responses_round_trip_with_state_and_status() -> None:
    s = ORMap()
    s.merge(s.assign("n1", ("o1", "x"), 5, 1 << 40))
    for code in StatusCode:
        out = decode_response(
            CODEC, encode_response(CODEC, Response(code, "why", {"a": 1}, s, b"tr"))
        )
        assert (out.status, out.message, out.result, out.trace_id) == (code, "why", {"a": 1},
                                                                       b"tr")
        assert out.state is not None
        assert out.state.value() == {"o1": {"x": 5}}


def test_hostile_request_bytes_are_invalid_argument_never_a_crash() -> None:
    good = encode_request(CODEC, Request("o1", "get", {"p": "x"}, b"tok", 100, 1, b"t"))
    rnd = random.Random(7)
    for _ in range(3000):
        data = bytearray(good)
        for _ in range(rnd.randint(1, 6)):
            data[rnd.randrange(len(data))] = rnd.randrange(256)
        data = data[: rnd.randint(0, len(data))]
        with contextlib.suppress(RpcInvalidArgumentError, FailedPreconditionError):
            decode_request(CODEC, bytes(data))


def test_a_missing_wire_version_is_failed_precondition() -> None:
    msg = CODEC.schema.rpc.RpcRequest.new_message()
    msg.method = "get"
    with pytest.raises(FailedPreconditionError):
        decode_request(CODEC, msg.to_bytes_packed())


def test_deadlines_shrink_at_each_hop_and_are_capped() -> None:
    d = Deadline.start(now_ms=1_000.0, deadline_ms=500)
    assert d.remaining_ms(1_000.0) == 500
    assert d.child_timeout_ms(1_200.0) == 300  # the remaining time, never the original
    assert d.child_timeout_ms(1_200.0, requested_ms=50) == 50  # a handler may ask for less
    assert d.child_timeout_ms(1_200.0, requested_ms=10_000) == 300  # never for more
    assert not d.expired(1_499.0)
    assert d.expired(1_500.0)
    with pytest.raises(DeadlineExceededError):
        d.child_timeout_ms(1_600.0)
    assert Deadline.start(0.0, 10**9).remaining_ms(0.0) == MAX_RPC_TIMEOUT_MS
    assert clamp_timeout_ms(-5) == 0
    assert clamp_timeout_ms(float("nan")) == 0


@given(
    st.floats(-1e6, 1e6, allow_nan=False), st.integers(0, 2 * MAX_RPC_TIMEOUT_MS),
    st.floats(-1e6, 1e7, allow_nan=False),
)
def test_expired_is_exactly_no_whole_millisecond_left(start: float, ms: int, now: float) -> None:
    d = Deadline.start(start, ms)
    assert d.expired(now) == (d.remaining_ms(now) <= 0)


def test_call_depth_is_bounded() -> None:
    check_depth(MAX_CALL_DEPTH)
    with pytest.raises(CallDepthExceededError):
        check_depth(MAX_CALL_DEPTH + 1)
    assert child_depth(0) == 1
    with pytest.raises(CallDepthExceededError):
        child_depth(MAX_CALL_DEPTH)


def test_every_status_maps_to_its_own_exception_and_back() -> None:
    seen = set()
    for code in StatusCode:
        if code is StatusCode.OK:
            continue
        exc = error_for(code, "m")
        assert exc.code is code
        assert StatusCode.from_http(code.http) is code
        seen.add(type(exc))
    assert len(seen) == len(StatusCode) - 1
    assert isinstance(error_for(StatusCode.RESOURCE_EXHAUSTED, "m", reason="call_depth"),
                      CallDepthExceededError)
    assert isinstance(error_for(StatusCode.DEADLINE_EXCEEDED, "x"), TimeoutError)


def test_trace_ids_are_16_bytes_and_unique_per_process() -> None:
    from broker.rpc._client import _trace_ids

    ids = [_trace_ids.next() for _ in range(10_000)]
    assert {len(t) for t in ids} == {TRACE_ID_BYTES}
    assert len(set(ids)) == len(ids)


@given(st.one_of(st.integers(-10**12, 10**12), st.floats(allow_nan=True)))
def test_clamp_fast_path_agrees_with_the_general_rule(x: float) -> None:
    expected = 0 if x != x else int(max(0.0, min(float(x), float(MAX_RPC_TIMEOUT_MS))))
    assert clamp_timeout_ms(x) == expected


def test_fast_constructors_build_the_same_frozen_objects() -> None:
    # new_request / new_response set the slots directly (hot paths); they must set every
    # field the dataclass has, in its order, and give equal, still-frozen objects.
    fields = [f.name for f in dataclasses.fields(Request)]
    values = ["w1", "m", {"a": 1}, b"tok", 5, 2, b"t" * 16, 3]
    assert len(fields) == len(values)
    r = new_request(*values)  # type: ignore[arg-type]
    assert r == Request(*values)  # type: ignore[arg-type]
    assert [getattr(r, f) for f in fields] == values
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.worknode = "w2"  # type: ignore[misc]
    fields = [f.name for f in dataclasses.fields(Response)]
    values = [StatusCode.NOT_FOUND, "gone", {"b": None}, None, b"t" * 16]
    assert len(fields) == len(values)
    resp = new_response(*values)  # type: ignore[arg-type]
    assert resp == Response(*values)  # type: ignore[arg-type]
    assert [getattr(resp, f) for f in fields] == values
    with pytest.raises(dataclasses.FrozenInstanceError):
        resp.message = ""  # type: ignore[misc]


@given(
    args=st.dictionaries(st.text(min_size=1, max_size=10), atoms, max_size=8),
    deadline=st.one_of(st.integers(-5, 10**9), st.floats(allow_nan=False, max_value=1e12)),
    depth=st.integers(-3, 300),
    token=st.binary(max_size=300),
    trace=st.binary(max_size=16),
)
def test_direct_encoders_write_the_same_bytes(args, deadline, depth, token, trace) -> None:
    # The client and server encode straight from their values (no Request / Response built
    # first): byte for byte what encoding the object writes.
    assert encode_call(CODEC, "o1", "get", args, token, deadline, depth, trace) == (
        encode_request(CODEC, Request("o1", "get", args, token, deadline, depth, trace)))
    assert encode_result(CODEC, args, trace) == encode_response(
        CODEC, Response(StatusCode.OK, result=args, trace_id=trace))
