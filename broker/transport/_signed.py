"""Signed request/reply over any ``Transport``: the adapter side of ``broker.codec``'s binding.

``RequestSigner`` holds one identity (a ``Signer``) and the keys it trusts, the wall clock and
the nonce source. As a requester it signs each request (``Worknode-Auth``: subject, headers,
body, its inbox root, a nonce, an expiry) and verifies that the reply is signed by a
responder it accepts and bound to that very request. As a responder it verifies requests
(signature, expiry, its ``ReplayGuard`` against a second delivery) and signs replies bound to
the request they answer. ``endpoint_auth`` packages the responder side for a micro endpoint
(``Endpoint.auth``): verification, who may call, a rate limit per caller, and signed replies,
errors included.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Collection, Mapping
from typing import Final

from broker.codec import (
    AUTH_HEADER,
    KeyLookup,
    RateLimiter,
    ReplayGuard,
    RequestAuth,
    Signer,
    parse_auth,
    request_digest,
    sign_reply,
    sign_request,
    verify_reply,
    verify_request,
)
from broker.codec._binding import DEFAULT_LIFETIME_MS, MAX_LIFETIME_MS, NONCE_SIZE, REPLAY_SHARE
from broker.errors import CodecError, ResourceExhaustedError
from broker.transport._protocol import Msg, Transport

__all__ = ["RequestSigner", "SignedEndpointAuth", "Signers"]

Signers = Collection[str] | Callable[[], Collection[str]] | None
"""Who may sign (a request served, a reply accepted): ids, a callable giving them now (a
roster that reloads), or None for anyone the keys know."""

_REPLY_SLACK_MS: Final = 1_000


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


def _resolve(signers: Signers) -> Collection[str] | None:
    return signers() if callable(signers) else signers


class RequestSigner:
    """One identity's signed requests and replies (see the module doc)."""

    __slots__ = ("keys", "nonce", "replay", "signer", "wall_ms")

    def __init__(
        self,
        signer: Signer,
        keys: KeyLookup,
        *,
        wall_ms: Callable[[], int] = _wall_ms,
        nonce: Callable[[int], bytes] = os.urandom,
        replay: ReplayGuard | None = None,
    ) -> None:
        self.signer = signer
        self.keys = keys
        self.wall_ms = wall_ms
        self.nonce = nonce
        self.replay = replay if replay is not None else ReplayGuard(
            per_signer=REPLAY_SHARE, not_before_ms=wall_ms()
        )

    @property
    def node_id(self) -> str:
        """The identity this signer signs as."""
        return self.signer.node_id

    # -- requester side ------------------------------------------------------------------

    def sign(
        self,
        subject: str,
        body: bytes,
        headers: Mapping[str, str] | None = None,
        *,
        reply_root: str = "",
        lifetime_ms: int | None = None,
    ) -> tuple[dict[str, str], RequestAuth]:
        """Headers for a request (``headers`` plus ``Worknode-Auth``) and the auth to verify
        its reply with. ``reply_root`` '' signs a message that expects no reply."""
        auth = sign_request(
            self.signer,
            subject=subject,
            reply_root=reply_root,
            body=body,
            headers=headers,
            now_ms=self.wall_ms(),
            nonce=self.nonce(NONCE_SIZE),
            lifetime_ms=DEFAULT_LIFETIME_MS if lifetime_ms is None else lifetime_ms,
        )
        if not headers:  # the common case: no header but the auth (no copy to make)
            return {AUTH_HEADER: auth.header()}, auth
        out = dict(headers)
        out[AUTH_HEADER] = auth.header()
        return out, auth

    async def request(
        self,
        transport: Transport,
        subject: str,
        body: bytes,
        *,
        timeout: float,  # noqa: ASYNC109 - the request's deadline, as Transport.request
        headers: Mapping[str, str] | None = None,
        signers: Signers = None,
    ) -> Msg:
        """A signed request; the reply once verified (signed by one of ``signers``, bound to
        this request), else a ``SignatureError`` subclass. The request lives ``timeout`` and a
        second more, so a responder refuses it once nobody waits for the answer."""
        lifetime = min(MAX_LIFETIME_MS, math.ceil(timeout * 1000) + _REPLY_SLACK_MS)
        hdrs, auth = self.sign(
            subject, body, headers, reply_root=transport.reply_root, lifetime_ms=lifetime
        )
        reply = await transport.request(subject, body, timeout=timeout, headers=hdrs)
        self.check_reply(reply, auth, signers)
        return reply

    def check_reply(self, reply: Msg, auth: RequestAuth, signers: Signers = None) -> str:
        """The signer of ``reply`` if it answers the request signed ``auth``; else a
        ``SignatureError`` subclass."""
        headers = reply.headers or {}
        return verify_reply(
            self.keys,
            headers.get(AUTH_HEADER),
            request=auth,
            body=reply.data,
            headers=headers,
            signers=_resolve(signers),
        )

    # -- responder side ------------------------------------------------------------------

    def verify(self, msg: Msg, signers: Signers = None) -> RequestAuth:
        """The verified auth of request ``msg`` (recorded against replay), else a
        ``SignatureError`` subclass (``ReplayedRequestError`` for a second delivery) or
        ``ResourceExhaustedError`` (the replay guard is full)."""
        now = self.wall_ms()
        headers = msg.headers or {}
        auth = verify_request(
            self.keys,
            headers.get(AUTH_HEADER),
            subject=msg.subject,
            reply=msg.reply,
            body=msg.data,
            headers=headers,
            now_ms=now,
            signers=_resolve(signers),
        )
        self.replay.check(auth, now)
        return auth

    def reply_headers(
        self, msg: Msg, body: bytes, headers: Mapping[str, str] | None = None, *,
        digest: bytes | None = None,
    ) -> dict[str, str]:
        """``headers`` plus the ``Worknode-Auth`` of a reply to request ``msg`` carrying
        ``body``. A request without a readable auth gets a reply bound to nothing (its
        requester cannot verify it: only error replies go to such requests). ``digest``:
        ``RequestAuth.digest`` of ``msg`` as ``verify_request`` returned it (saves parsing
        and hashing the request again); computed from ``msg`` when None."""
        if digest is None:
            try:
                auth = parse_auth((msg.headers or {}).get(AUTH_HEADER))
                digest = request_digest(auth, subject=msg.subject, body=msg.data,
                                        headers=msg.headers)
            except CodecError:
                digest = b""
        value = sign_reply(self.signer, digest, body=body, headers=headers, now_ms=self.wall_ms())
        if not headers:
            return {AUTH_HEADER: value}
        out = dict(headers)
        out[AUTH_HEADER] = value
        return out

    def endpoint_auth(
        self,
        signers: Signers = None,
        *,
        limiter: RateLimiter | None = None,
        on_refused: Callable[[Msg, BaseException], None] | None = None,
    ) -> SignedEndpointAuth:
        """The responder side for a micro ``Endpoint``: see ``SignedEndpointAuth``."""
        return SignedEndpointAuth(self, signers, limiter=limiter, on_refused=on_refused)


class SignedEndpointAuth:
    """``Endpoint.auth`` for signed endpoints: a request is served only when it verifies
    (signed by one of ``signers``, fresh, not replayed) and its signer is within its rate
    limit; every reply, error replies included, is signed and bound to its request.
    ``on_refused(msg, error)`` hears every refusal (count it)."""

    __slots__ = ("limiter", "on_refused", "signer", "signers")

    def __init__(
        self,
        signer: RequestSigner,
        signers: Signers = None,
        *,
        limiter: RateLimiter | None = None,
        on_refused: Callable[[Msg, BaseException], None] | None = None,
    ) -> None:
        self.signer = signer
        self.signers = signers
        self.limiter = limiter
        self.on_refused = on_refused

    def authenticate(self, msg: Msg) -> RequestAuth:
        """The request's verified auth, or the error its refusal answers with."""
        try:
            auth = self.signer.verify(msg, self.signers)
            if self.limiter is not None and not self.limiter.allow(
                auth.signer, self.signer.wall_ms()
            ):
                raise ResourceExhaustedError(
                    f"requests from {auth.signer!r} over their rate limit; retry later"
                )
        except (CodecError, ResourceExhaustedError) as exc:
            if self.on_refused is not None:
                self.on_refused(msg, exc)
            raise
        return auth

    def reply_headers(
        self, msg: Msg, body: bytes, headers: Mapping[str, str] | None
    ) -> dict[str, str]:
        """The reply's headers, signed."""
        return self.signer.reply_headers(msg, body, headers)
