"""Signed requests and replies bound to their request (broker.codec._binding), pure."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.codec import (
    AUTH_HEADER,
    RateLimiter,
    ReplayGuard,
    Signer,
    TrustRoster,
    parse_auth,
    request_digest,
    sign_reply,
    sign_request,
    verify_reply,
    verify_request,
)
from broker.codec._binding import MAX_LIFETIME_MS, MAX_SKEW_MS
from broker.errors import (
    BadSignatureError,
    ExpiredRequestError,
    InvalidArgumentError,
    ReplayedRequestError,
    ResourceExhaustedError,
    SignatureError,
    UnknownSignerError,
    UnsignedMessageError,
)

A = Signer("node-a", bytes(range(32)))
B = Signer("node-b", bytes(range(1, 33)))
ROSTER = TrustRoster({"node-a": A.public_key, "node-b": B.public_key})
NOW = 1_800_000_000_000
SUBJECT = "wn.ns.sync.orders"
ROOT = "_INBOX.UABC"
REPLY = ROOT + ".x1.7"
HEADERS = {"Worknode-Sync": "request", "Worknode-Full": "1"}
BODY = b"\x00\x01request body"


def _request(nonce: bytes = b"n" * 16, now: int = NOW, **kw: object) -> tuple[str, object]:
    auth = sign_request(
        A, subject=SUBJECT, reply_root=ROOT, body=BODY, headers=HEADERS, now_ms=now,
        nonce=nonce, **kw,  # type: ignore[arg-type]
    )
    return auth.header(), auth


def _verify(value: str | None, **kw: object) -> object:
    args: dict[str, object] = {
        "subject": SUBJECT, "reply": REPLY, "body": BODY, "headers": HEADERS, "now_ms": NOW,
    }
    args.update(kw)
    return verify_request(ROSTER, value, **args)  # type: ignore[arg-type]


def test_a_request_verifies_as_sent() -> None:
    value, auth = _request()
    got = _verify(value)
    assert got == auth  # the digest too: what the responder binds its reply to
    assert parse_auth(value) == dataclasses.replace(auth, digest=b"")  # type: ignore[type-var]


@pytest.mark.parametrize(
    "change",
    [
        {"subject": "wn.ns.sync.other"},
        {"reply": "_INBOX.UEVE.x1.7"},  # the attacker's own inbox: not the requester's
        {"reply": "_INBOX.UABCD.x1"},  # a root that only starts like the signed one
        {"body": BODY + b"!"},
        {"headers": {"Worknode-Sync": "announce", "Worknode-Full": "1"}},
        {"headers": {"Worknode-Sync": "request"}},
        {"headers": {**HEADERS, "Worknode-To": "node-c"}},
    ],
)
def test_a_request_moved_or_altered_does_not_verify(change: dict[str, object]) -> None:
    value, _ = _request()
    with pytest.raises(BadSignatureError):
        _verify(value, **change)


def test_announce_cannot_pass_as_request() -> None:
    # An announce expects no reply: signed without a reply root, it is refused with one.
    auth = sign_request(
        A, subject=SUBJECT, reply_root="", body=BODY, headers={"Worknode-Sync": "announce"},
        now_ms=NOW, nonce=b"a" * 16,
    )
    with pytest.raises(BadSignatureError):
        _verify(auth.header(), headers={"Worknode-Sync": "request"})
    with pytest.raises(BadSignatureError):
        _verify(auth.header(), headers={"Worknode-Sync": "announce"})  # a reply subject added
    assert _verify(auth.header(), reply="", headers={"Worknode-Sync": "announce"}) == auth


def test_expiry_and_clock_bounds() -> None:
    value, _ = _request(lifetime_ms=1000)
    _verify(value, now_ms=NOW + 999)
    with pytest.raises(ExpiredRequestError):
        _verify(value, now_ms=NOW + 1000)
    with pytest.raises(ExpiredRequestError):
        _verify(value, now_ms=NOW - MAX_SKEW_MS - 1)  # issued too far ahead of this clock
    with pytest.raises(InvalidArgumentError):
        _request(lifetime_ms=MAX_LIFETIME_MS + 1)


def test_unknown_and_unsigned() -> None:
    with pytest.raises(UnsignedMessageError):
        _verify(None)
    eve = Signer("node-e", bytes(32))
    auth = sign_request(eve, subject=SUBJECT, reply_root=ROOT, body=BODY, headers=HEADERS,
                        now_ms=NOW, nonce=b"e" * 16)
    with pytest.raises(UnknownSignerError):
        _verify(auth.header())
    value, _ = _request()
    with pytest.raises(BadSignatureError):
        _verify(value, signers={"node-b"})  # a known key, but not one served here


def test_a_forged_signer_name_fails() -> None:
    value, _ = _request()
    with pytest.raises(BadSignatureError):
        _verify(value.replace(" node-a ", " node-b "))


def test_replay_guard_refuses_a_second_delivery_until_expiry() -> None:
    guard = ReplayGuard()
    _, auth = _request(lifetime_ms=1000)
    guard.check(auth, NOW)  # type: ignore[arg-type]
    with pytest.raises(ReplayedRequestError):
        guard.check(auth, NOW + 10)  # type: ignore[arg-type]
    guard.check(_request(nonce=b"m" * 16)[1], NOW)  # type: ignore[arg-type]
    guard.check(auth, NOW + 1000)  # type: ignore[arg-type]  # expired: forgotten (verify refuses it)


def test_replay_guard_is_bounded_and_never_forgets_a_live_request() -> None:
    guard = ReplayGuard(capacity=2)
    a1 = _request(nonce=b"1" * 16)[1]
    a2 = _request(nonce=b"2" * 16)[1]
    guard.check(a1, NOW)  # type: ignore[arg-type]
    guard.check(a2, NOW)  # type: ignore[arg-type]
    with pytest.raises(ResourceExhaustedError):
        guard.check(_request(nonce=b"3" * 16)[1], NOW)  # type: ignore[arg-type]
    with pytest.raises(ReplayedRequestError):
        guard.check(a1, NOW)  # type: ignore[arg-type]
    assert len(guard) == 2


def test_a_reply_is_bound_to_its_request_and_its_signer() -> None:
    _, req = _request()
    _, other = _request(nonce=b"o" * 16)
    body, headers = b"state", {"Nats-Service-Error-Code": "400"}
    value = sign_reply(B, req.digest, body=body, headers=headers, now_ms=NOW)  # type: ignore[attr-defined]
    hdrs = {**headers, AUTH_HEADER: value}
    assert verify_reply(ROSTER, value, request=req, body=body, headers=hdrs) == "node-b"  # type: ignore[arg-type]
    # Replayed to another request:
    with pytest.raises(BadSignatureError):
        verify_reply(ROSTER, value, request=other, body=body, headers=hdrs)  # type: ignore[arg-type]
    # Relayed: node-b's reply where node-a was asked.
    with pytest.raises(BadSignatureError):
        verify_reply(ROSTER, value, request=req, body=body, headers=hdrs, signers={"node-a"})  # type: ignore[arg-type]
    # Altered body or headers (an error turned into a success):
    with pytest.raises(BadSignatureError):
        verify_reply(ROSTER, value, request=req, body=b"other", headers=hdrs)  # type: ignore[arg-type]
    with pytest.raises(BadSignatureError):
        verify_reply(ROSTER, value, request=req, body=body, headers={AUTH_HEADER: value})  # type: ignore[arg-type]
    with pytest.raises(UnsignedMessageError):
        verify_reply(ROSTER, None, request=req, body=body, headers={})  # type: ignore[arg-type]


def test_a_request_signature_does_not_verify_as_a_reply() -> None:
    value, req = _request()
    with pytest.raises(SignatureError):
        verify_reply(ROSTER, value, request=req, body=BODY, headers=HEADERS)  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=600))
def test_any_header_value_fails_only_with_a_signature_error(value: str) -> None:
    try:
        _verify(value)
    except SignatureError:
        return
    pytest.fail("an arbitrary header verified")


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 7), st.binary(min_size=1, max_size=4))
def test_a_mutated_header_field_fails(index: int, junk: bytes) -> None:
    value, _ = _request()
    parts = value.split(" ")
    part = parts[index % len(parts)]
    parts[index % len(parts)] = part + junk.hex()
    with pytest.raises(SignatureError):
        _verify(" ".join(parts))


def test_rate_limiter_refills_and_is_bounded() -> None:
    lim = RateLimiter(rate=2.0, burst=2, max_keys=2)
    assert lim.allow("a", 0)
    assert lim.allow("a", 0)
    assert not lim.allow("a", 0)
    assert lim.allow("a", 500)  # one token back after half a second
    assert not lim.allow("a", 500)
    assert lim.allow("b", 0)
    assert lim.allow("c", 0)
    assert len(lim._buckets) == 2


def test_rate_limiter_forgets_the_least_recently_used_key() -> None:
    lim = RateLimiter(rate=0.001, burst=1, max_keys=2)
    assert lim.allow("a", 0)
    assert lim.allow("b", 0)
    assert not lim.allow("a", 0)  # a used again: now b is the least recently used
    assert lim.allow("c", 0)  # b forgotten, not a
    assert not lim.allow("a", 0)  # a's empty bucket was kept
    assert lim.allow("b", 0)  # b starts again with a full bucket


def test_a_guard_refuses_requests_issued_before_it_started() -> None:
    # What a restarted responder cannot remember it refuses: a request captured before.
    guard = ReplayGuard(not_before_ms=NOW + 1)
    with pytest.raises(ExpiredRequestError):
        guard.check(_request()[1], NOW + 5)  # type: ignore[arg-type]
    guard.check(_request(now=NOW + 1)[1], NOW + 5)  # type: ignore[arg-type]


def test_a_refusal_of_a_request_with_a_copied_signature_answers_nothing() -> None:
    # Review i16 finding 6: a reply binds to the request's signed bytes as received, so a
    # junk request carrying a genuine request's signature gets a reply no requester accepts.
    value, genuine = _request()
    junk = parse_auth(value)  # the same header (signature), another body
    digest = request_digest(junk, subject=SUBJECT, body=b"junk", headers=HEADERS)
    refusal = sign_reply(B, digest, body=b"", headers=None, now_ms=NOW)
    with pytest.raises(BadSignatureError):
        verify_reply(ROSTER, refusal, request=genuine, body=b"", headers={})  # type: ignore[arg-type]
    same = request_digest(junk, subject=SUBJECT, body=BODY, headers=HEADERS)
    assert same == genuine.digest  # type: ignore[attr-defined]
    ok = sign_reply(B, same, body=b"", headers=None, now_ms=NOW)
    assert verify_reply(ROSTER, ok, request=genuine, body=b"", headers={}) == "node-b"  # type: ignore[arg-type]


# -- the signed bytes and the header's base64url, against their definitions ------------------
# The hot-path builders (issue 19) must produce exactly the bytes of the module doc's layout
# and of the base64 module: a difference would fail every signature across a mixed-version
# cluster. The references below are that definition written plainly.


def _ref_field(value: bytes) -> bytes:
    return len(value).to_bytes(4, "big") + value


def _ref_headers(headers: dict[str, str] | None) -> bytes:
    items = sorted((k, v) for k, v in (headers or {}).items() if k.lower() != AUTH_HEADER.lower())
    return len(items).to_bytes(4, "big") + b"".join(
        _ref_field(k.encode()) + _ref_field(v.strip().encode()) for k, v in items)


_text = st.text(max_size=40)
_headers = st.none() | st.dictionaries(
    st.sampled_from(["A", "b", "Worknode-Sync", AUTH_HEADER, "worknode-auth", "Z-1"]), _text,
    max_size=4)


@settings(max_examples=300, deadline=None)
@given(signer=_text, subject=_text, root=_text, nonce=st.binary(max_size=20),
       issued=st.integers(0, 2**63 - 1), expires=st.integers(0, 2**63 - 1), headers=_headers,
       body=st.binary(max_size=200), digest=st.binary(max_size=40))
def test_signed_bytes_are_the_documented_layout(signer, subject, root, nonce, issued, expires,
                                                headers, body, digest):
    import hashlib

    from broker.codec._binding import _reply_bytes, _request_bytes

    sha = hashlib.sha256(body).digest()
    assert _request_bytes(signer, subject, root, nonce, issued, expires, headers, body) == (
        _ref_field(signer.encode()) + _ref_field(subject.encode()) + _ref_field(root.encode())
        + _ref_field(nonce) + issued.to_bytes(8, "big") + expires.to_bytes(8, "big")
        + _ref_headers(headers) + sha)
    assert _reply_bytes(signer, digest, issued, headers, body) == (
        _ref_field(signer.encode()) + _ref_field(digest) + issued.to_bytes(8, "big")
        + _ref_headers(headers) + sha)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=100), junk=st.text(max_size=12))
def test_header_base64url_matches_the_base64_module(data, junk):
    import base64
    import binascii

    from broker.codec._binding import _b64, _unb64

    text = base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")
    assert _b64(data) == text
    assert _unb64(text or "-") == data
    for candidate in (junk, text + junk, junk + text):  # anything: the same answer or refusal
        try:
            expected: bytes | None = (b"" if candidate == "-" else base64.urlsafe_b64decode(
                candidate + "=" * (-len(candidate) % 4)))
        except (binascii.Error, ValueError):
            expected = None
        if expected is None:
            with pytest.raises(BadSignatureError):
                _unb64(candidate)
        else:
            assert _unb64(candidate) == expected


def _b64_of(data: bytes) -> str:
    import base64

    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


_GOOD = ("node-a", "AAAAAAAAAAAAAAAAAAAAAA", "1", "999999999999999", "_INBOX.abc",
         _b64_of(bytes(range(64))))
_ODD = (  # per field: values at and past the edges of what is accepted
    ["x" * 128, "x" * 129, "é", "", "-", "\t"],
    ["-", "AAAA", "A", "", "=", "\t", "Ab=c"],
    ["0", "123456789012345", "1234567890123456", "²", "\u0661", "", "1_0", "+1"],
    ["0", "9999999999999999", "²", "\u0661\u0662", "", " 1"],
    ["-", "r", "x" * 129, "", "é"],
    [_b64_of(bytes(63)), _b64_of(bytes(65)), "-", "", _b64_of(bytes(64)) + "="],
)
_any = st.text(alphabet=st.characters(min_codepoint=0x09, max_codepoint=0x7E), max_size=90)


@settings(max_examples=1000, deadline=None)
@given(version=st.sampled_from(["1", "1", "2", ""]), data=st.data())
def test_the_one_pattern_reading_accepts_and_refuses_as_the_field_by_field_one(version, data):
    from broker.codec._binding import _fields, _fields_one_by_one

    fields = list(_GOOD)
    for i in data.draw(st.sets(st.integers(0, 5), max_size=2)):  # one or two fields off
        fields[i] = data.draw(st.one_of(st.sampled_from(_ODD[i]), _any))
    if data.draw(st.integers(0, 9)) == 0:
        fields = fields[: data.draw(st.integers(0, 6))]  # too few fields
    value = " ".join([version, *fields])
    if not value or len(value) > 512:
        return
    outcomes = []
    for read in (_fields, _fields_one_by_one):
        try:
            outcomes.append(read(value))
        except SignatureError:
            outcomes.append(None)
    assert outcomes[0] == outcomes[1], value


@pytest.mark.parametrize("issued", ["²", "1²"])
def test_a_time_of_other_digits_is_a_bad_signature_not_a_crash(issued):
    # "²".isdigit() holds but int("²") raises ValueError: it escaped parse_auth before.
    header = f"1 node-a - {issued} 9 - {_b64_of(bytes(64))}"
    with pytest.raises(BadSignatureError):
        parse_auth(header)
