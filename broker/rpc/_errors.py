"""RPC errors: one exception per status code, so a caller can act on each.

Every class derives from ``RpcError`` (a ``WorknodeError``) and carries the ``StatusCode`` it
travels as. ``error_for(code, message)`` turns a status received from the wire back into its
exception. ``retriable`` says whether the same call may succeed later.
"""

from __future__ import annotations

import enum
from typing import ClassVar, Final

from broker.errors import WorknodeError

__all__ = [
    "ERROR_CLASSES",
    "CallDepthExceededError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "RpcError",
    "RpcInternalError",
    "RpcInvalidArgumentError",
    "RpcNotFoundError",
    "StatusCode",
    "UnauthenticatedError",
    "UnavailableError",
    "error_for",
]


class StatusCode(enum.IntEnum):
    """Status of an RPC, modelled on gRPC; numbers are the ordinals of ``rpc.capnp``'s enum."""

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


class RpcError(WorknodeError):
    """An RPC did not succeed. ``code`` says why; ``trace_id`` names the call chain."""

    code: ClassVar[StatusCode] = StatusCode.INTERNAL

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


class ResourceExhaustedError(RpcError):
    """Too many requests in flight at the endpoint, or a request too large. Back off and retry
    (a too-large request fails again: send less)."""

    code = StatusCode.RESOURCE_EXHAUSTED
    retriable = True


class CallDepthExceededError(ResourceExhaustedError):
    """A call chain went deeper than ``MAX_CALL_DEPTH`` hops: a recursion to break, not to
    retry."""

    retriable = False


class UnauthenticatedError(RpcError):
    """The token is missing, malformed, forged, signed by an unknown root key, expired or
    revoked. Get a valid token."""

    code = StatusCode.UNAUTHENTICATED


class PermissionDeniedError(RpcError):
    """The token is valid but does not grant this namespace, subject, worknode or method.
    Ask for a token that grants it."""

    code = StatusCode.PERMISSION_DENIED


class FailedPreconditionError(RpcError):
    """The request's wire version is not supported by the server. Upgrade the caller."""

    code = StatusCode.FAILED_PRECONDITION


class RpcNotFoundError(RpcError, LookupError):
    """No such worknode (or method) on the serving replica. Create it or fix the name."""

    code = StatusCode.NOT_FOUND


class RpcInvalidArgumentError(RpcError, ValueError):
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


def error_for(code: StatusCode, message: str, *, trace_id: bytes = b"") -> RpcError:
    """The exception a caller raises for a non-OK status received from the wire."""
    if code is StatusCode.RESOURCE_EXHAUSTED and message.startswith(DEPTH_MESSAGE):
        return CallDepthExceededError(message, trace_id=trace_id)
    cls = ERROR_CLASSES.get(code, RpcInternalError)
    return cls(message, trace_id=trace_id)


DEPTH_MESSAGE: Final = "call depth"
"""Messages of depth refusals start with this, so callers get ``CallDepthExceededError``."""
