"""A lost STRONG compare-and-set crosses the RPC wire with its versions: the server's
``ConflictError`` becomes FAILED_PRECONDITION with ``expected``/``current`` beside the
status, and the caller gets an ``RpcConflictError`` (a ``ConflictError``) carrying them."""

from __future__ import annotations

import pytest

from broker.codec import WireCodec
from broker.errors import (
    ConflictError,
    FailedPreconditionError,
    RpcConflictError,
    StatusCode,
    error_for,
)
from broker.rpc._protocol import decode_response, encode_response, error_of, error_response


@pytest.mark.parametrize("current", [9, None])
def test_a_conflict_round_trips_with_its_versions(current: int | None) -> None:
    codec = WireCodec()
    sent = error_response(ConflictError("moved", expected=7, current=current), "moved", b"t")
    assert sent.status is StatusCode.FAILED_PRECONDITION
    got = error_of(decode_response(codec, encode_response(codec, sent)))
    assert isinstance(got, RpcConflictError)
    assert isinstance(got, ConflictError)
    assert (got.expected, got.current, got.trace_id) == (7, current, b"t")
    assert got.code is StatusCode.FAILED_PRECONDITION


def test_a_plain_failed_precondition_is_not_a_conflict() -> None:
    codec = WireCodec()
    sent = error_response(FailedPreconditionError("old wire"), "old wire")
    got = error_of(decode_response(codec, encode_response(codec, sent)))
    assert type(got) is FailedPreconditionError
    # The header path (no body) names the reason only: a conflict with unknown versions.
    by_header = error_for(StatusCode.FAILED_PRECONDITION, "x", reason="conflict")
    assert isinstance(by_header, RpcConflictError)
    assert by_header.current is None
