"""The wire codec: CRDT documents and signed envelopes as packed Cap'n Proto.

Pure: bytes and keys in, objects out. Every decode failure is a ``broker.errors.CodecError``.
"""

from broker.codec._binding import (
    AUTH_HEADER,
    KeyLookup,
    RateLimiter,
    ReplayGuard,
    RequestAuth,
    parse_auth,
    request_digest,
    sign_reply,
    sign_request,
    verify_reply,
    verify_request,
)
from broker.codec._document import CAUSAL_OF_KIND
from broker.codec._schema import (
    CURRENT_VERSION,
    KINDS_BY_VERSION,
    OLDEST_VERSION,
    SUPPORTED_VERSIONS,
    WireSchema,
    load_schema,
)
from broker.codec._signing import (
    REPORT_DOMAIN,
    REVOKED_FIELD,
    ROSTER_ROLES,
    Revocation,
    RosterEntry,
    Signer,
    TrustRoster,
    dump_roster,
    parse_revocations,
    parse_roster,
)
from broker.codec._wire import (
    COMPRESS_MIN_BYTES,
    DEFAULT_MAX_PAYLOAD,
    NESTING_LIMIT,
    Envelope,
    WireCodec,
    decoding,
)

__all__ = [
    "AUTH_HEADER",
    "CAUSAL_OF_KIND",
    "COMPRESS_MIN_BYTES",
    "CURRENT_VERSION",
    "DEFAULT_MAX_PAYLOAD",
    "KINDS_BY_VERSION",
    "NESTING_LIMIT",
    "OLDEST_VERSION",
    "REPORT_DOMAIN",
    "REVOKED_FIELD",
    "ROSTER_ROLES",
    "SUPPORTED_VERSIONS",
    "Envelope",
    "KeyLookup",
    "RateLimiter",
    "ReplayGuard",
    "RequestAuth",
    "Revocation",
    "RosterEntry",
    "Signer",
    "TrustRoster",
    "WireCodec",
    "WireSchema",
    "decoding",
    "dump_roster",
    "load_schema",
    "parse_auth",
    "parse_revocations",
    "parse_roster",
    "request_digest",
    "sign_reply",
    "sign_request",
    "verify_reply",
    "verify_request",
]
