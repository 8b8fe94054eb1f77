"""The RPC client: call a method of a worknode on whichever node serves it.

Transport failures map to statuses at this boundary: no responders -> ``UnavailableError``
(at once, no waiting for the deadline), a timeout -> ``DeadlineExceededError``, not
connected -> ``UnavailableError``, a request over the server's max payload ->
``ResourceExhaustedError``. An error reply raises the exception of its status (from the body,
or from the ``Nats-Service-Error-Code`` header when the body is not an ``RpcResponse``). A
late reply to a call that already timed out is dropped by the transport.

With a ``signer`` (a ``RequestSigner`` holding the caller's key: the key its tokens name as
holder, or a node's own key when it passes on a token in a nested call) every request is
signed (``Worknode-Auth``, living as long as its deadline and a second more), and unless
``verify_replies`` is off every reply must be signed by a responder its keys know (one of
``responders`` when given) and bound to that very request: a relayed or replayed response
raises ``UnauthenticatedError`` (its cause the ``SignatureError``) before its body is read.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Mapping
from typing import Any, Final

from broker.codec import WireCodec
from broker.codec._binding import MAX_LIFETIME_MS
from broker.errors import (
    DeadlineExceededError,
    InvalidSubjectError,
    NoRespondersError,
    PayloadTooLargeError,
    ResourceExhaustedError,
    RpcError,
    RpcInvalidArgumentError,
    SignatureError,
    StatusCode,
    TransportError,
    TransportTimeoutError,
    UnauthenticatedError,
    UnavailableError,
    error_for,
)
from broker.rpc._protocol import (
    TRACE_ID_BYTES,
    Response,
    clamp_timeout_ms,
    decode_response,
    encode_call,
    error_of,
)
from broker.transport import (
    ERROR_CODE_HEADER,
    ERROR_HEADER,
    RequestSigner,
    Signers,
    Transport,
    rpc_subject,
)

__all__ = ["DEFAULT_TIMEOUT_MS", "RpcClient"]

DEFAULT_TIMEOUT_MS: Final = 5_000
_REPLY_SLACK_MS: Final = 1_000
"""A signed request lives its deadline and this much more (clocks of two hosts differ)."""
SUBJECT_CACHE_SIZE: Final = 1024
"""Endpoint subjects a client remembers (built and validated once)."""


class _TraceIds:
    """16-byte trace ids, unique per process: 8 random bytes drawn once per process (again in
    a forked child) followed by an 8-byte counter. Cheaper than 16 fresh random bytes per
    call; a trace id names a call chain, it is no secret."""

    def __init__(self) -> None:
        self._reseed()
        os.register_at_fork(after_in_child=self._reseed)

    def _reseed(self) -> None:
        self._prefix = os.urandom(TRACE_ID_BYTES - 8)
        self._counter = itertools.count(int.from_bytes(os.urandom(4), "big"))

    def next(self) -> bytes:
        """A new trace id."""
        return self._prefix + (next(self._counter) & 0xFFFF_FFFF_FFFF_FFFF).to_bytes(8, "big")


_trace_ids: Final = _TraceIds()


class RpcClient:
    """Calls worknode methods over ``transport`` in ``namespace``."""

    def __init__(
        self,
        transport: Transport,
        *,
        namespace: str,
        codec: WireCodec | None = None,
        default_timeout_ms: float = DEFAULT_TIMEOUT_MS,
        signer: RequestSigner | None = None,
        verify_replies: bool = True,
        responders: Signers = None,
    ) -> None:
        self.transport = transport
        self.signer = signer
        self.verify_replies = verify_replies
        self.responders = responders
        self.namespace = namespace
        self.codec = codec if codec is not None else WireCodec()
        self.default_timeout_ms = default_timeout_ms
        self._subjects: dict[tuple[str, str], str] = {}

    async def call(
        self,
        subject: str,
        worknode: str,
        method: str,
        arguments: Mapping[str, Any] | None = None,
        *,
        token: bytes,
        timeout_ms: float | None = None,
        depth: int = 0,
        trace_id: bytes | None = None,
    ) -> Response:
        """Call ``method`` on ``worknode`` of ``subject``; the OK response, or the
        ``RpcError`` subclass of the status (see module doc). The deadline is
        ``timeout_ms`` (default ``default_timeout_ms``), capped at ``MAX_RPC_TIMEOUT_MS``."""
        trace = trace_id if trace_id is not None else _trace_ids.next()
        deadline = clamp_timeout_ms(
            self.default_timeout_ms if timeout_ms is None else timeout_ms
        )
        if deadline <= 0:
            raise DeadlineExceededError("no time left for the call", trace_id=trace)
        target = self._subjects.get((subject, method))
        if target is None:
            try:
                target = rpc_subject(self.namespace, subject, method)
            except InvalidSubjectError as exc:
                raise RpcInvalidArgumentError(str(exc), trace_id=trace) from None
            if len(self._subjects) < SUBJECT_CACHE_SIZE:
                self._subjects[subject, method] = target
        data = encode_call(
            self.codec, worknode, method, arguments or {}, token, deadline, depth, trace)
        signer = self.signer
        auth = None
        signed: dict[str, str] | None = None
        if signer is not None:
            signed, auth = signer.sign(
                target, data, reply_root=self.transport.reply_root,
                lifetime_ms=min(MAX_LIFETIME_MS, math.ceil(deadline) + _REPLY_SLACK_MS),
            )
        try:
            reply = await self.transport.request(
                target, data, timeout=deadline / 1000.0, headers=signed
            )
        except NoRespondersError:
            raise UnavailableError(f"nobody serves {target}", trace_id=trace) from None
        except TransportTimeoutError:
            raise DeadlineExceededError(
                f"no reply from {target} within {deadline} ms", trace_id=trace
            ) from None
        except PayloadTooLargeError as exc:
            raise ResourceExhaustedError(str(exc), trace_id=trace) from None
        except TransportError as exc:
            raise UnavailableError(str(exc), trace_id=trace) from None
        if signer is not None and auth is not None and self.verify_replies:
            try:
                signer.check_reply(reply, auth, self.responders)
            except SignatureError as exc:
                raise UnauthenticatedError(
                    f"reply from {target} does not verify (relayed or replayed?): {exc}",
                    trace_id=trace,
                ) from exc
        try:
            response = decode_response(self.codec, reply.data)
        except RpcError:
            headers = reply.headers or {}
            if ERROR_CODE_HEADER in headers:
                code = StatusCode.from_http(headers[ERROR_CODE_HEADER])
                raise error_for(code, headers.get(ERROR_HEADER, ""), trace_id=trace) from None
            raise
        if response.status is not StatusCode.OK:
            raise error_of(response, trace)
        return response
