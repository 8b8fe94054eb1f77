"""Moving bytes between worknode processes: the ``Transport`` contract, its NATS adapter, an
in-memory fake for tests, the embedded ``nats-server``, and the subject layout.

The subject layout contract (namespace first, ids last) is documented in
``broker.transport._subjects``.
"""

from broker.transport._memory import (
    DEFAULT_MEMORY_MAX_PAYLOAD,
    MemoryNetwork,
    MemorySubscription,
    MemoryTransport,
)
from broker.transport._nats import DEFAULT_RECONNECT_BUFFER_SIZE, NatsSubscription, NatsTransport
from broker.transport._protocol import (
    DEFAULT_PENDING_BYTES_LIMIT,
    DEFAULT_PENDING_MSGS_LIMIT,
    Handler,
    Msg,
    NullObserver,
    SlowConsumerCallback,
    Subscription,
    Transport,
    TransportObserver,
    encoded_size,
    validate_headers,
)
from broker.transport._server import EmbeddedNatsServer, find_nats_server
from broker.transport._subjects import (
    KIND_DELTA,
    KIND_HEAL,
    KIND_RPC,
    KIND_SYNC,
    KINDS,
    MAX_SUBJECT_BYTES,
    MAX_TOKEN_LENGTH,
    PREFIX,
    SubjectParts,
    delta_subject,
    heal_subject,
    namespace_wildcard,
    parse_subject,
    rpc_subject,
    subject_matches,
    sync_subject,
    validate_pattern,
    validate_subject,
    validate_token,
    wildcard,
)

__all__ = [
    "DEFAULT_MEMORY_MAX_PAYLOAD",
    "DEFAULT_PENDING_BYTES_LIMIT",
    "DEFAULT_PENDING_MSGS_LIMIT",
    "DEFAULT_RECONNECT_BUFFER_SIZE",
    "KINDS",
    "KIND_DELTA",
    "KIND_HEAL",
    "KIND_RPC",
    "KIND_SYNC",
    "MAX_SUBJECT_BYTES",
    "MAX_TOKEN_LENGTH",
    "PREFIX",
    "EmbeddedNatsServer",
    "Handler",
    "MemoryNetwork",
    "MemorySubscription",
    "MemoryTransport",
    "Msg",
    "NatsSubscription",
    "NatsTransport",
    "NullObserver",
    "SlowConsumerCallback",
    "SubjectParts",
    "Subscription",
    "Transport",
    "TransportObserver",
    "delta_subject",
    "encoded_size",
    "find_nats_server",
    "heal_subject",
    "namespace_wildcard",
    "parse_subject",
    "rpc_subject",
    "subject_matches",
    "sync_subject",
    "validate_headers",
    "validate_pattern",
    "validate_subject",
    "validate_token",
    "wildcard",
]
