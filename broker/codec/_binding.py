"""Requests and replies signed and bound to their request, their sender and their moment.

A request or reply keeps its body as it is (Cap'n Proto, an envelope) and carries one header,
``Worknode-Auth``: the signer's id, a random nonce, issue and expiry times (Unix ms), the
requester's reply root (its inbox prefix: the reply subject must lie under it) and an Ed25519
signature over

    request:  REQUEST_DOMAIN | signer | subject | reply root | nonce | issued | expires
              | every other header (sorted) | SHA-256(body)
    reply:    REPLY_DOMAIN | signer | SHA-256(the request's signed bytes, as received) | issued
              | every other header (sorted) | SHA-256(body)

each field length-prefixed, so no two different messages sign the same bytes. Hence:

- a request cannot be moved to another subject, to a reply subject outside the requester's
  inbox root (which bus permissions let only that identity read), to other headers
  (``Worknode-Sync: announce`` cannot become ``request``) or another body; it expires
  (``expires``, at most ``MAX_LIFETIME_MS`` after ``issued``), and within its lifetime
  a ``ReplayGuard`` refuses it a second time (same signer and nonce);
- a reply names the request it answers by the digest of that request's signed bytes (unique:
  a nonce is in them) as the responder received them, and its own signer: a reply to a
  request that only copied another's signature, with a body or headers of its own, names
  other bytes than the genuine request's, so a responder's refusal of such a request is no
  answer to the genuine one; a reply replayed to another request, or relayed from another
  responder, does not verify for the requester, who also checks the signer is the one it
  asked.

Invariants: every verification failure is a ``SignatureError`` subclass, whatever the header
holds; nothing here reads a clock or draws randomness (``now_ms`` and ``nonce`` are
arguments). A key lookup is any object with ``TrustRoster.verify``'s signature.

Pure: bytes and ints in, bytes, values or errors out.
"""

from __future__ import annotations

import binascii
import hashlib
import heapq
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Final, Protocol

from broker.codec._signing import SIGNATURE_SIZE, Signer
from broker.errors import (
    BadSignatureError,
    ExpiredRequestError,
    InvalidArgumentError,
    ReplayedRequestError,
    ResourceExhaustedError,
    UnsignedMessageError,
)

__all__ = [
    "AUTH_HEADER",
    "DEFAULT_LIFETIME_MS",
    "MAX_LIFETIME_MS",
    "MAX_SKEW_MS",
    "NONCE_SIZE",
    "REPLAY_SHARE",
    "REPLY_DOMAIN",
    "REQUEST_DOMAIN",
    "KeyLookup",
    "RateLimiter",
    "ReplayGuard",
    "RequestAuth",
    "parse_auth",
    "request_digest",
    "sign_reply",
    "sign_request",
    "verify_reply",
    "verify_request",
]

AUTH_HEADER: Final = "Worknode-Auth"
REQUEST_DOMAIN: Final = b"worknode-request\x00"
REPLY_DOMAIN: Final = b"worknode-reply\x00"
NONCE_SIZE: Final = 16
DEFAULT_LIFETIME_MS: Final = 10_000
"""A request's lifetime unless its sender chooses another (the longest RPC deadline is 30 s:
an RPC request lives as long as its deadline)."""
MAX_LIFETIME_MS: Final = 60_000
"""Longest lifetime a verifier accepts: bounds how long a ``ReplayGuard`` remembers a nonce."""
MAX_SKEW_MS: Final = 5_000
"""How far in the future a request's issue time may lie (clocks of two hosts disagree)."""
REPLAY_SHARE: Final = 50_000
"""The share of a service's ``ReplayGuard`` (100 000 live requests) one requester may hold:
a flood of fresh signed requests from one identity is refused alone, and half the guard stays
for everyone else (one holder still makes ~8 000 calls/s of 6 s lifetime)."""
_VERSION: Final = "1"
_MAX_HEADER: Final = 512
_ID: Final = re.compile(r"[!-~]{1,128}", re.ASCII)  # printable ASCII without space


class KeyLookup(Protocol):
    """Verifies a signature by a named signer (``TrustRoster`` is one)."""

    def verify(self, signer: str, body: bytes, signature: bytes, domain: bytes = ...) -> None:
        """Raise a ``SignatureError`` subclass unless ``signature`` is ``signer``'s."""


@dataclass(frozen=True, slots=True)
class RequestAuth:
    """The ``Worknode-Auth`` header of one request or reply, parsed (not yet verified)."""

    signer: str
    nonce: bytes
    issued_ms: int
    expires_ms: int
    reply_root: str
    """The inbox prefix the request's reply subject lies under ('' for a reply, or a request
    that expects none)."""
    signature: bytes
    digest: bytes = b""
    """SHA-256 of the request's signed bytes (what a reply binds to); set by
    ``sign_request`` and ``verify_request``, empty when only parsed. Not in the header."""

    def header(self) -> str:
        """The header value."""
        return " ".join((
            _VERSION, self.signer, _b64(self.nonce) or "-", str(self.issued_ms),
            str(self.expires_ms), self.reply_root or "-", _b64(self.signature),
        ))


_AUTH_SETTERS: Final = tuple(
    RequestAuth.__dict__[name].__set__
    for name in ("signer", "nonce", "issued_ms", "expires_ms", "reply_root", "signature",
                 "digest")
)


def _new_auth(
    signer: str, nonce: bytes, issued_ms: int, expires_ms: int, reply_root: str,
    signature: bytes, digest: bytes,
) -> RequestAuth:
    """``RequestAuth(...)`` with every field given, set through the slots' own setters: a
    frozen dataclass's ``__init__`` goes through ``object.__setattr__`` per field, twice the
    cost, and a request's auth is made on every signed request and every verified one."""
    a: RequestAuth = object.__new__(RequestAuth)
    s_signer, s_nonce, s_issued, s_expires, s_root, s_sig, s_digest = _AUTH_SETTERS
    s_signer(a, signer)
    s_nonce(a, nonce)
    s_issued(a, issued_ms)
    s_expires(a, expires_ms)
    s_root(a, reply_root)
    s_sig(a, signature)
    s_digest(a, digest)
    return a


# base64url through binascii directly: what ``base64.urlsafe_b64encode`` / ``_b64decode`` do
# (translate, then the same non-strict ``a2b_base64``) without their wrappers' per-call
# checks; a header is written and read on every request and reply.
_TO_URL: Final = bytes.maketrans(b"+/", b"-_")
_FROM_URL: Final = bytes.maketrans(b"-_", b"+/")
_PAD: Final = ("", "===", "==", "=")


def _b64(data: bytes) -> str:
    return binascii.b2a_base64(data, newline=False).translate(_TO_URL).rstrip(b"=").decode(
        "ascii")


def _unb64(text: str) -> bytes:
    if text == "-":
        return b""
    try:
        raw = (text + _PAD[len(text) % 4]).encode("ascii").translate(_FROM_URL)
        return binascii.a2b_base64(raw)
    except (binascii.Error, ValueError) as exc:
        raise BadSignatureError("Worknode-Auth: a field is not base64url") from exc


_Fields = tuple[str, bytes, int, int, str, bytes]
_AUTH_FORM: Final = re.compile(
    r"1 ([!-~]{1,128}) ([^ ]+) ([0-9]{1,15}) ([0-9]{1,15}) ([!-~]{1,128}) ([^ ]+)"
)
"""The header as every honest signer writes it: one pattern instead of a split and a check
per field (a header is read on every request and reply). What it does not match goes
through the field-by-field reading, which accepts or refuses exactly as before."""


def _fields(value: str | None) -> _Fields:
    """(signer, nonce, issued, expires, reply root, signature) of a header (see
    ``parse_auth``)."""
    if not value:
        raise UnsignedMessageError(f"request or reply carries no {AUTH_HEADER} header")
    if len(value) > _MAX_HEADER:
        raise BadSignatureError(f"{AUTH_HEADER} header is over {_MAX_HEADER} characters")
    m = _AUTH_FORM.fullmatch(value)
    if m is None:
        return _fields_one_by_one(value)
    signer, nonce, issued, expires, root, signature = m.groups()
    sig = _unb64(signature)
    if len(sig) != SIGNATURE_SIZE:
        raise BadSignatureError(f"{AUTH_HEADER} signature is not {SIGNATURE_SIZE} bytes")
    return signer, _unb64(nonce), int(issued), int(expires), "" if root == "-" else root, sig


def _fields_one_by_one(value: str) -> _Fields:
    parts = value.split(" ")
    if len(parts) != 7 or parts[0] != _VERSION:
        raise BadSignatureError(f"{AUTH_HEADER} header has an unknown form")
    _, signer, nonce, issued, expires, root, signature = parts
    if _ID.fullmatch(signer) is None or _ID.fullmatch(root) is None:
        raise BadSignatureError(f"{AUTH_HEADER} header names no valid signer or reply root")
    # isdecimal, not isdigit: int() refuses digits such as "²" (a ValueError, not a
    # SignatureError, would have escaped).
    if not (issued.isdecimal() and expires.isdecimal() and len(issued) < 16
            and len(expires) < 16):
        raise BadSignatureError(f"{AUTH_HEADER} header times are not Unix milliseconds")
    sig = _unb64(signature)
    if len(sig) != SIGNATURE_SIZE:
        raise BadSignatureError(f"{AUTH_HEADER} signature is not {SIGNATURE_SIZE} bytes")
    return signer, _unb64(nonce), int(issued), int(expires), "" if root == "-" else root, sig


def parse_auth(value: str | None) -> RequestAuth:
    """The parsed header; ``UnsignedMessageError`` if absent, ``BadSignatureError`` if it
    does not have the form ``1 <signer> <nonce> <issued> <expires> <reply root> <signature>``
    (``-`` for an empty nonce or root)."""
    return RequestAuth(*_fields(value))


def _field(out: list[bytes], value: bytes) -> None:
    out.append(len(value).to_bytes(4, "big"))
    out.append(value)


_NO_HEADERS: Final = (0).to_bytes(4, "big")
_AUTH_LOWER: Final = AUTH_HEADER.lower()


def _headers_part(out: list[bytes], headers: Mapping[str, str] | None) -> None:
    if not headers or (len(headers) == 1 and AUTH_HEADER in headers):
        out.append(_NO_HEADERS)  # the common case: no header but the auth itself
        return
    items = sorted((k, v) for k, v in headers.items() if k.lower() != _AUTH_LOWER)
    out.append(len(items).to_bytes(4, "big"))
    for key, value in items:
        _field(out, key.encode())
        _field(out, value.strip().encode())  # values arrive stripped (the NATS wire)


def _request_bytes(
    signer: str, subject: str, reply_root: str, nonce: bytes, issued_ms: int,
    expires_ms: int, headers: Mapping[str, str] | None, body: bytes,
) -> bytes:
    s, subj, root = signer.encode(), subject.encode(), reply_root.encode()
    out = [
        len(s).to_bytes(4, "big"), s, len(subj).to_bytes(4, "big"), subj,
        len(root).to_bytes(4, "big"), root, len(nonce).to_bytes(4, "big"), nonce,
        issued_ms.to_bytes(8, "big"), expires_ms.to_bytes(8, "big"),
    ]
    _headers_part(out, headers)
    out.append(hashlib.sha256(body).digest())
    return b"".join(out)


def _reply_bytes(
    signer: str, request_digest: bytes, issued_ms: int,
    headers: Mapping[str, str] | None, body: bytes,
) -> bytes:
    s = signer.encode()
    out = [
        len(s).to_bytes(4, "big"), s, len(request_digest).to_bytes(4, "big"), request_digest,
        issued_ms.to_bytes(8, "big"),
    ]
    _headers_part(out, headers)
    out.append(hashlib.sha256(body).digest())
    return b"".join(out)


def sign_request(
    signer: Signer,
    *,
    subject: str,
    reply_root: str,
    body: bytes,
    headers: Mapping[str, str] | None,
    now_ms: int,
    nonce: bytes,
    lifetime_ms: int = DEFAULT_LIFETIME_MS,
) -> RequestAuth:
    """The auth of a request from ``signer`` (put ``.header()`` in ``AUTH_HEADER``).

    ``reply_root``: the inbox prefix its reply subject lies under ('' when it expects no
    reply); ``headers``: every other header it carries, exactly as sent; ``nonce``:
    ``NONCE_SIZE`` fresh random bytes.
    """
    if reply_root and _ID.fullmatch(reply_root) is None:
        raise InvalidArgumentError(f"invalid reply root {reply_root!r}")
    if len(nonce) != NONCE_SIZE:
        raise InvalidArgumentError(f"a request nonce is {NONCE_SIZE} bytes")
    if not 0 < lifetime_ms <= MAX_LIFETIME_MS or now_ms < 0:
        raise InvalidArgumentError(f"request lifetime must be in (0, {MAX_LIFETIME_MS}] ms")
    expires = now_ms + lifetime_ms
    message = _request_bytes(
        signer.node_id, subject, reply_root, nonce, now_ms, expires, headers, body
    )
    return _new_auth(
        signer.node_id, nonce, now_ms, expires, reply_root,
        signer.sign(message, REQUEST_DOMAIN), hashlib.sha256(message).digest(),
    )


def verify_request(
    keys: KeyLookup,
    value: str | None,
    *,
    subject: str,
    reply: str,
    body: bytes,
    headers: Mapping[str, str] | None,
    now_ms: int,
    signers: Collection[str] | None = None,
) -> RequestAuth:
    """The verified auth of a request, or a ``SignatureError`` subclass: unsigned, malformed,
    a reply subject (``reply``, as received) outside the signed reply root (or a reply
    subject on a request signed to expect none), a signer not in ``signers`` (when given) or
    unknown to ``keys``, a bad signature,
    ``ExpiredRequestError`` (expired, issued more than ``MAX_SKEW_MS`` ahead, or a lifetime
    over ``MAX_LIFETIME_MS``). Replays within the lifetime are a ``ReplayGuard``'s job."""
    signer, nonce, issued, expires, root, signature = _fields(value)
    if len(nonce) != NONCE_SIZE:
        raise BadSignatureError(f"request nonce is not {NONCE_SIZE} bytes")
    if reply and not (root and reply.startswith(root + ".")):
        raise BadSignatureError("reply subject outside the requester's signed inbox root")
    if signers is not None and signer not in signers:
        raise BadSignatureError(f"requests from {signer!r} are not served here")
    if expires <= now_ms:
        raise ExpiredRequestError(f"request from {signer!r} expired")
    if issued > now_ms + MAX_SKEW_MS:
        raise ExpiredRequestError(f"request from {signer!r} issued in the future")
    if not 0 < expires - issued <= MAX_LIFETIME_MS:
        raise ExpiredRequestError(f"request from {signer!r} claims too long a lifetime")
    message = _request_bytes(signer, subject, root, nonce, issued, expires, headers, body)
    keys.verify(signer, message, signature, REQUEST_DOMAIN)
    return _new_auth(
        signer, nonce, issued, expires, root, signature, hashlib.sha256(message).digest()
    )


def request_digest(
    auth: RequestAuth, *, subject: str, body: bytes, headers: Mapping[str, str] | None
) -> bytes:
    """SHA-256 of the signed bytes of the request whose (parsed, perhaps unverified) auth is
    ``auth``, as received on ``subject`` with ``body`` and ``headers``: what a reply to it
    binds to. Equal to the requester's ``RequestAuth.digest`` only for its genuine request."""
    return hashlib.sha256(_request_bytes(
        auth.signer, subject, auth.reply_root, auth.nonce, auth.issued_ms, auth.expires_ms,
        headers, body,
    )).digest()


def sign_reply(
    signer: Signer,
    request_digest: bytes,
    *,
    body: bytes,
    headers: Mapping[str, str] | None,
    now_ms: int,
) -> str:
    """The ``AUTH_HEADER`` value of a reply to the request whose signed bytes hash to
    ``request_digest`` (``RequestAuth.digest``, or ``request_digest()`` of what arrived;
    ``headers``: every other header the reply carries, exactly as sent)."""
    message = _reply_bytes(signer.node_id, request_digest, now_ms, headers, body)
    signature = signer.sign(message, REPLY_DOMAIN)
    # RequestAuth(signer.node_id, b"", now_ms, 0, "", signature).header(), written out
    return f"{_VERSION} {signer.node_id} - {now_ms} 0 - {_b64(signature)}"


def verify_reply(
    keys: KeyLookup,
    value: str | None,
    *,
    request: RequestAuth,
    body: bytes,
    headers: Mapping[str, str] | None,
    signers: Collection[str] | None = None,
) -> str:
    """The signer of a verified reply to ``request`` (the auth this requester sent), or a
    ``SignatureError`` subclass: unsigned, malformed, signed by someone not in ``signers``
    (when given: a relayed reply), or not bound to this request (a replayed one)."""
    signer, _, issued, _, _, signature = _fields(value)
    if signers is not None and signer not in signers:
        raise BadSignatureError(
            f"reply signed by {signer!r}, not by the responder asked (a relay?)"
        )
    if not request.digest:
        raise BadSignatureError("no request to bind the reply to (sign_request's auth needed)")
    message = _reply_bytes(signer, request.digest, issued, headers, body)
    keys.verify(signer, message, signature, REPLY_DOMAIN)
    return signer


class ReplayGuard:
    """Remembers each verified request's ``(signer, nonce)`` until it expires, and refuses it a
    second time. Bounded: with ``capacity`` unexpired requests remembered, new ones are refused
    (``ResourceExhaustedError``) rather than an old one forgotten (which would let it replay).
    ``per_signer``: at most this many of them from one owner (``check``'s ``owner``, by
    default the signer), so that one identity flooding fresh requests is refused alone
    instead of filling the guard and locking every other requester out (None: no share).
    Expired requests leave in expiry order (a heap), so a full guard refuses in O(log n),
    never by sweeping every entry on each request.
    ``not_before_ms``: when this guard's memory began (its process started). A request issued
    before then is refused (``ExpiredRequestError``): the guard cannot know whether it was
    served already, by the process that ran before a restart (a captured request replayed
    after a restart is refused, not served twice). A request in flight across a restart is
    refused too; its sender signs a new one."""

    __slots__ = ("_capacity", "_counts", "_expiry", "_per_signer", "_seen", "not_before_ms")

    def __init__(
        self, capacity: int = 100_000, *, per_signer: int | None = None, not_before_ms: int = 0
    ) -> None:
        if capacity < 1 or (per_signer is not None and per_signer < 1):
            raise InvalidArgumentError("a replay guard holds at least one request")
        self.not_before_ms = not_before_ms
        self._capacity = capacity
        self._per_signer = per_signer
        self._seen: dict[tuple[str, bytes], str] = {}
        """(signer, nonce) -> the owner it counts against."""
        self._expiry: list[tuple[int, str, bytes]] = []
        """A heap of (expires, signer, nonce): one per entry of ``_seen``."""
        self._counts: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._seen)

    def _expire(self, now_ms: int) -> None:
        heap, seen, counts = self._expiry, self._seen, self._counts
        while heap and heap[0][0] <= now_ms:
            _, signer, nonce = heapq.heappop(heap)
            owner = seen.pop((signer, nonce))
            left = counts[owner] - 1
            if left:
                counts[owner] = left
            else:
                del counts[owner]

    def check(self, auth: RequestAuth, now_ms: int, owner: str | None = None) -> None:
        """Record ``auth`` (verified) or raise ``ReplayedRequestError`` if seen before;
        ``ResourceExhaustedError`` when the guard, or ``owner``'s share of it, is full.
        ``owner``: who the request counts against (default its signer; the RPC server
        names the token's holder: there the signer id is only a label)."""
        if auth.issued_ms < self.not_before_ms:
            raise ExpiredRequestError(
                f"request from {auth.signer!r} issued before this responder started"
            )
        self._expire(now_ms)
        key = (auth.signer, auth.nonce)
        seen = self._seen
        if key in seen:
            raise ReplayedRequestError(f"request from {auth.signer!r} replayed")
        if len(seen) >= self._capacity:
            raise ResourceExhaustedError(
                f"{self._capacity} requests in their lifetime already; retry later"
            )
        who = auth.signer if owner is None else owner
        share = self._per_signer
        count = self._counts.get(who, 0)
        if share is not None and count >= share:
            raise ResourceExhaustedError(
                f"{share} requests from {auth.signer!r} in their lifetime already; retry later"
            )
        seen[key] = who
        self._counts[who] = count + 1
        heapq.heappush(self._expiry, (auth.expires_ms, auth.signer, auth.nonce))


class RateLimiter:
    """Token buckets per key (a signer, say): ``rate`` per second, bursts of ``burst``.
    Bounded: at most ``max_keys`` buckets (the least recently used is forgotten, which only
    ever lets its key start again with a full bucket)."""

    __slots__ = ("_buckets", "burst", "max_keys", "rate")

    def __init__(self, rate: float, burst: float, *, max_keys: int = 4096) -> None:
        if not rate > 0 or not burst >= 1 or max_keys < 1:
            raise InvalidArgumentError("a rate limit needs rate > 0, burst >= 1, max_keys >= 1")
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        # A plain dict (insertion-ordered: a bucket taken out and put back is the most
        # recently used), half the cost of an OrderedDict per call: one per request.
        self._buckets: dict[str, tuple[float, int]] = {}

    def allow(self, key: str, now_ms: int, cost: float = 1.0) -> bool:
        """Take ``cost`` tokens from ``key``'s bucket if it holds them."""
        buckets = self._buckets
        tokens, at = buckets.pop(key, (self.burst, now_ms))
        tokens = min(self.burst, tokens + max(0, now_ms - at) * self.rate / 1000.0)
        ok = tokens >= cost
        if ok:
            tokens -= cost
        buckets[key] = (tokens, now_ms)
        if len(buckets) > self.max_keys:
            del buckets[next(iter(buckets))]  # the least recently used
        return ok
