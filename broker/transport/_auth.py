"""NATS identities and their subject permissions: the contract of who may do what on the bus.

Every process that connects is an nkey user in one account of a generated nats-server config
(``render_accounts``). A process that signs envelopes (a worknode, a healer, a CLI writer) has
ONE key: its 32-byte Ed25519 signing seed, encoded as an nkey user seed (``SU...``,
``nkey_seed``) is its NATS credential and its public key (``U...``, ``nkey_public``) is its NATS
user, so the roster entry and the NATS user are the same key, not two keys kept in step.
Readers and RPC callers get seeds of the same 32-byte file format.

Every identity has its own inbox prefix ``_INBOX.<its public nkey>`` (``inbox_prefix``;
nats-py builds each inbox as ``<prefix>.<nuid>``) and may subscribe below it only, so nobody
reads another client's replies; replies are published with ``allow_responses`` (a reply
budget per request received), never with a publish permission on ``_INBOX.>``.

Permission model (the contract; ``ns`` = the identity's namespace, ``S`` = each granted
subject, or ``*`` when none is granted; subjects as in ``broker/transport/_subjects.py``;
``"subject q"`` is a subscription allowed only in the queue group ``q``)::

    node <name>     publish    wn.ns.delta.S  wn.ns.sync.S  wn.ns.rpc.S.*  (nested RPC calls)
                               wn.ns.strong.S.>  + the JetStream API of S's STRONG stream
                               (STREAM.{INFO,CREATE,UPDATE,MSG.GET}, CONSUMER.{CREATE,DELETE,
                               INFO}, its $JS.FC flow control; S = * : every stream's)
                    subscribe  wn.ns.delta.S  wn.ns.sync.S
                               "wn.ns.rpc.S.* q"            (RPC endpoints, queue group only)
                               "wn.ns.merkle.S.<name>.* q"  (its own healing endpoints only)
                               $SRV.{PING,INFO,STATS}[.worknode-replica[.*]|.worknode-rpc[.*]]
                               _INBOX.<key>.>
                    allow_responses max 4 + EVIDENCE_REPLIES (sync replies with
                    their evidence, RPC, healing endpoints, $SRV
                               documents: both services answer a plain $SRV.PING)
    healer <name>   publish    wn.ns.merkle.S.*.*  (requests to replicas, repairs included)
                               $SRV.INFO.worknode-replica  (discovery)  wn.ns.heal.S (reports)
                    subscribe  _INBOX.<key>.>
    writer <name>   publish    wn.ns.delta.S  wn.ns.sync.S
                               wn.ns.strong.S.>  + S's STRONG stream API (as a node)
                    subscribe  wn.ns.delta.S  wn.ns.sync.S  _INBOX.<key>.>
                    allow_responses max 1 (its replica answers catch-up requests)
    reader <name>   publish    nothing (deny >)
                    subscribe  wn.ns.delta.S  wn.ns.heal.S
    caller <name>   publish    wn.ns.rpc.S.*
                    subscribe  _INBOX.<key>.>
    admin <name>    publish >, subscribe > : break-glass (operators' tools, never a service)

A node's ``S`` must include every subject it hosts: with RPC served, the revocation set's
subject too (``revocations`` by default; it is a replicated subject like any other). Nested
RPC calls from a node's methods go to its granted subjects only.

Consequences the integration tests check against a real server: nobody but a node subscribes
to merkle or RPC request subjects (or to sync subjects, but for a writer's own replica of
its granted subjects), joins the RPC queue group or answers
``$SRV.*.worknode-replica``; a node serves only its own healing endpoints; nobody but a healer
publishes to ``wn.ns.merkle.>`` (only the healer repairs); nobody but a node or a writer
publishes to a STRONG log or uses its stream's API (the healer cannot); nobody publishes into
an inbox except as a reply to a request it received; a client without a listed key cannot connect.

Why ``allow_responses`` allows one reply per request received (``true``) and, for a node,
four plus ``EVIDENCE_REPLIES``: every reply in this system is one message (an RPC response, a
Merkle answer, a micro document) except a node's catch-up answer, which other writers' signed
batches precede as evidence (up to ``EVIDENCE_REPLIES`` messages, each checked by the asker,
which takes no more); and a node runs two micro services (``worknode-replica``,
``worknode-rpc``) on one connection, both subscribed to the plain ``$SRV.PING``/``INFO``/
``STATS`` (``nats micro ls``), so one request reaches it twice and is answered twice through
one reply subject, and nats-server's budget does not stretch to that one-for-one (measured on
2.15 with a request delivered twice: ``true`` lets neither answer through, ``max: 2`` one,
``max: 3`` both; the tests check it), hence twice the number of services. Replies may come
up to 2 minutes after the request (nats-server's default expiry; RPC deadlines are capped at
30 s).

Everything here is pure: strings and bytes in, strings out (imports ``nkeys`` only).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

import nkeys

from broker.errors import InvalidArgumentError
from broker.transport._subjects import PREFIX, validate_token

__all__ = [
    "EVIDENCE_REPLIES",
    "INBOX_ROOT",
    "MICRO_SERVICES",
    "SIGNING_ROLES",
    "NatsIdentity",
    "Permissions",
    "Role",
    "dump_identities",
    "inbox_prefix",
    "load_identities",
    "nkey_public",
    "nkey_seed",
    "permissions",
    "public_of_nkey",
    "render_accounts",
]


REPLICA_SERVICE: Final = "worknode-replica"
"""The healing endpoints' micro service (``broker.healing._wire.REPLICA_SERVICE``)."""
RPC_SERVICE: Final = "worknode-rpc"
"""The RPC endpoints' micro service (``broker.rpc._server.RPC_SERVICE``)."""
MICRO_SERVICES: Final = (REPLICA_SERVICE, RPC_SERVICE)
"""The micro services a node runs (named here: importing their modules would run adapters)."""
INBOX_ROOT: Final = "_INBOX"
"""nats-py's default inbox prefix; every identity's inbox lies below it
(``_INBOX.<its public nkey>``, ``inbox_prefix``)."""
_MICRO_VERBS: Final = ("PING", "INFO", "STATS")
QUEUE_GROUP: Final = "q"
"""The ADR-32 queue group every micro endpoint joins (``broker.transport._micro``)."""

EVIDENCE_REPLIES: Final = 4096
"""Messages a node may send ahead of one catch-up answer: other writers' signed batches as
evidence (``broker.replication``: an asker takes at most this many with one answer, a
replier sends at most this many)."""
_NODE_REPLIES: Final = 2 * len(MICRO_SERVICES) + EVIDENCE_REPLIES
"""A node's reply budget per request received (see the module header)."""
_NKEY_PUBLIC_LENGTH: Final = 56  # base32 of 1 prefix byte + 32 key bytes + 2 CRC bytes


class Role(StrEnum):
    """What an identity is for; its permissions follow from it (see the module header)."""

    NODE = "node"
    """A worknode: replicates, serves catch-up, RPC and its own healing endpoints."""
    HEALER = "healer"
    """The healer: discovers replicas, compares and repairs them, publishes heal reports."""
    WRITER = "writer"
    """A CLI writer: a replica of the subjects it writes, without healing endpoints or RPC."""
    READER = "reader"
    """Reads the deltas and heal reports of its granted subjects; publishes nothing."""
    CALLER = "caller"
    """Calls RPC methods of its granted subjects."""
    ADMIN = "admin"
    """Everything (``>``): break-glass, for an operator's tools, never for a service."""


#: Roles whose key also signs envelopes, so it belongs in the roster.
SIGNING_ROLES: Final = frozenset({Role.NODE, Role.HEALER, Role.WRITER})


def nkey_seed(seed: bytes) -> str:
    """The nkey user seed (``SU...``) of a 32-byte Ed25519 seed: the NATS credential of the
    identity whose signing key ``seed`` is. A secret: never print or log it."""
    if not isinstance(seed, bytes) or len(seed) != 32:
        raise InvalidArgumentError("an Ed25519 seed is 32 bytes")
    encoded: bytes = nkeys.encode_seed(seed, nkeys.PREFIX_BYTE_USER)
    return encoded.decode("ascii")


def nkey_public(public_key: bytes) -> str:
    """The nkey user public key (``U...``) of a 32-byte Ed25519 public key: the NATS user of
    the identity, the same key its envelopes are verified with."""
    if not isinstance(public_key, bytes) or len(public_key) != 32:
        raise InvalidArgumentError("an Ed25519 public key is 32 bytes")
    raw = bytes([nkeys.PREFIX_BYTE_USER]) + public_key
    checksum: bytes = nkeys.crc16_checksum(raw)
    return base64.b32encode(raw + checksum).decode("ascii").rstrip("=")


def public_of_nkey(text: str) -> bytes:
    """The 32-byte Ed25519 public key of an nkey user public key (``U...``), the inverse of
    ``nkey_public``. Raises ``InvalidArgumentError`` for anything else (wrong length, prefix,
    encoding or checksum); the text itself is never echoed (it might be a seed)."""
    if not isinstance(text, str) or len(text) != _NKEY_PUBLIC_LENGTH:
        raise InvalidArgumentError(
            f"not an nkey user public key (U..., {_NKEY_PUBLIC_LENGTH} characters)"
        )
    try:
        raw = base64.b32decode(text, casefold=False)
    except (binascii.Error, ValueError):
        raise InvalidArgumentError("not an nkey user public key: not base32") from None
    body, checksum = raw[:-2], raw[-2:]
    if body[0] != nkeys.PREFIX_BYTE_USER:
        raise InvalidArgumentError("not an nkey user public key: wrong prefix (want U...)")
    if nkeys.crc16_checksum(body) != checksum:
        raise InvalidArgumentError("not an nkey user public key: bad checksum")
    return bytes(body[1:])


def inbox_prefix(public_key: bytes) -> str:
    """``_INBOX.<public nkey>``: the inbox prefix of the identity whose Ed25519 public key is
    ``public_key`` (give it to nats-py's ``inbox_prefix``); the identity may subscribe only
    below it. The key, not the name: a client knows it from its own seed alone, so a CLI
    caller needs no setting to receive its replies."""
    return f"{INBOX_ROOT}.{nkey_public(public_key)}"


@dataclass(frozen=True, slots=True)
class NatsIdentity:
    """One NATS user: ``name`` (a subject token, unique in an account; a signing role's
    name is its node id in the roster), ``role``, the 32-byte Ed25519 ``public_key``, the
    ``namespace`` it works in, and the ``subjects`` granted (empty: every subject of the
    namespace; admin takes none)."""

    name: str
    role: Role
    public_key: bytes
    namespace: str
    subjects: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        validate_token(self.name, "identity name")
        validate_token(self.namespace, "namespace")
        try:
            object.__setattr__(self, "role", Role(self.role))
        except ValueError:
            raise InvalidArgumentError(
                f"unknown role {self.role!r}: use one of {', '.join(Role)}"
            ) from None
        if not isinstance(self.public_key, bytes) or len(self.public_key) != 32:
            raise InvalidArgumentError(f"{self.name}: a public key is 32 bytes")
        subjects = tuple(self.subjects)
        for subject in subjects:
            validate_token(subject, "subject")
        if len(set(subjects)) != len(subjects):
            raise InvalidArgumentError(f"{self.name}: a subject is granted twice")
        if subjects and self.role is Role.ADMIN:
            raise InvalidArgumentError(f"{self.name}: admin may do everything; grant no subjects")
        object.__setattr__(self, "subjects", tuple(sorted(subjects)))

    @property
    def nkey(self) -> str:
        """The NATS user (``U...``): ``nkey_public(public_key)``."""
        return nkey_public(self.public_key)

    @property
    def inbox(self) -> str:
        """This identity's inbox prefix, ``_INBOX.<its public nkey>``."""
        return inbox_prefix(self.public_key)


@dataclass(frozen=True, slots=True)
class Permissions:
    """A nats-server user's permissions: subject allow and deny lists for publishing and
    subscribing (a subscribe entry ``"subject queue"`` allows only that queue group), and
    how many replies it may publish to each request it received (``allow_responses``; 0:
    none; nats-server's ``allow_responses: {max: n}``, ``true`` for 1). An empty allow list
    means no allow restriction (nats-server's reading), so a role that may publish nothing
    has ``publish_deny=(">",)``."""

    publish_allow: tuple[str, ...] = ()
    publish_deny: tuple[str, ...] = ()
    subscribe_allow: tuple[str, ...] = ()
    subscribe_deny: tuple[str, ...] = ()
    allow_responses: int = 0


def strong_stream_name(namespace: str, subject: str) -> str:
    """The JetStream stream of ``subject``'s STRONG log (``broker.strong.strong_stream``
    names it alike; a unit test holds them equal): permissions name it, since a stream name
    is one token and cannot be matched by a partial wildcard."""
    digest = hashlib.sha256(f"{namespace}\0{subject}".encode()).hexdigest()[:8]
    return f"WN_STRONG_{namespace}_{subject}_{digest}"[:200]


def _strong_log(ns: str, namespace: str, granted: tuple[str, ...]) -> tuple[str, ...]:
    """What a STRONG log writer (a node or a writer) publishes: its entries and fences
    (``wn.ns.strong.S.>``), and the JetStream API of the subjects' streams (create or update
    the stream, read its state and last entries, create and delete its ordered consumer),
    plus the flow-control replies of that consumer. A wildcard grant (every subject of the
    namespace) cannot name its streams: it allows every stream's API of the account."""
    streams = ["*"] if "*" in granted else [strong_stream_name(namespace, s) for s in granted]
    api = "$JS.API"
    out = [f"{ns}.strong.{s}.>" for s in granted]
    for st in streams:
        out += [f"{api}.STREAM.{verb}.{st}" for verb in ("INFO", "CREATE", "UPDATE", "MSG.GET")]
        out += [f"{api}.CONSUMER.CREATE.{st}", f"{api}.CONSUMER.CREATE.{st}.>",
                f"{api}.CONSUMER.DELETE.{st}.*", f"{api}.CONSUMER.INFO.{st}.*",
                f"$JS.FC.{st}.>"]
    return tuple(out)


def permissions(identity: NatsIdentity) -> Permissions:
    """The permissions of ``identity``'s role (the model in the module header)."""
    ns = f"{PREFIX}.{identity.namespace}"
    granted = identity.subjects or ("*",)
    inbox = f"{identity.inbox}.>"

    def each(kind: str, tail: str = "") -> tuple[str, ...]:
        return tuple(f"{ns}.{kind}.{s}{tail}" for s in granted)

    role = identity.role
    if role is Role.NODE:
        micro = tuple(f"$SRV.{verb}" for verb in _MICRO_VERBS) + tuple(
            f"$SRV.{verb}.{service}{tail}"
            for service in MICRO_SERVICES for verb in _MICRO_VERBS for tail in ("", ".*")
        )
        return Permissions(
            publish_allow=(*each("delta"), *each("sync"), *each("rpc", ".*"),
                           *_strong_log(ns, identity.namespace, granted)),
            subscribe_allow=(
                *each("delta"), *each("sync"),
                *each("rpc", f".* {QUEUE_GROUP}"),
                *each("merkle", f".{identity.name}.* {QUEUE_GROUP}"),
                *micro, inbox,
            ),
            allow_responses=_NODE_REPLIES,
        )
    if role is Role.HEALER:
        return Permissions(
            publish_allow=(*each("merkle", ".*.*"), f"$SRV.INFO.{REPLICA_SERVICE}",
                           *each("heal")),
            subscribe_allow=(inbox,),
        )
    if role is Role.WRITER:
        return Permissions(
            publish_allow=(*each("delta"), *each("sync"),
                           *_strong_log(ns, identity.namespace, granted)),
            subscribe_allow=(*each("delta"), *each("sync"), inbox),
            allow_responses=1,
        )
    if role is Role.READER:
        return Permissions(publish_deny=(">",), subscribe_allow=(*each("delta"), *each("heal")))
    if role is Role.CALLER:
        return Permissions(publish_allow=each("rpc", ".*"), subscribe_allow=(inbox,))
    return Permissions(publish_allow=(">",), subscribe_allow=(">",))


def _conf_list(values: Iterable[str]) -> str:
    # The nats-server config format reads JSON string literals (and "subject queue" pairs).
    return "[" + ", ".join(json.dumps(v) for v in values) + "]"


def _render_user(identity: NatsIdentity) -> str:
    p = permissions(identity)
    parts = []
    for verb, allow, deny in (("publish", p.publish_allow, p.publish_deny),
                              ("subscribe", p.subscribe_allow, p.subscribe_deny)):
        fields = []
        if allow:
            fields.append(f"allow: {_conf_list(allow)}")
        if deny:
            fields.append(f"deny: {_conf_list(deny)}")
        if fields:
            parts.append(f"{verb}: {{ {', '.join(fields)} }}")
    if p.allow_responses == 1:
        parts.append("allow_responses: true")
    elif p.allow_responses > 1:
        parts.append(f"allow_responses: {{ max: {p.allow_responses} }}")
    return (f"      # {identity.role} {identity.name} (namespace {identity.namespace})\n"
            f"      {{ nkey: {json.dumps(identity.nkey)}, permissions: {{\n"
            + "".join(f"        {part}\n" for part in parts)
            + "      } }")


def render_accounts(
    identities: Iterable[NatsIdentity], *, account: str = "WORKNODE", jetstream: bool = True
) -> str:
    """The nats-server config block ``accounts { <account>: { users: [...] } }`` with one
    nkey user per identity and its role's permissions (append it to the server config, e.g.
    ``EmbeddedNatsServer(config_extra=...)``; SIGHUP reloads it). Names and keys must be
    unique. At least one identity is required: a server with no users would accept anyone."""
    listed = sorted(identities, key=lambda i: (i.namespace, i.role, i.name))
    validate_token(account, "account name")
    if not listed:
        raise InvalidArgumentError("no identities: a server with no users accepts anyone")
    for attr, what in (("name", "name"), ("public_key", "key")):
        seen: set[Any] = set()
        for identity in listed:
            value = getattr(identity, attr)
            if value in seen:
                shown = identity.name if attr == "name" else identity.nkey
                raise InvalidArgumentError(f"two identities share the {what} {shown}")
            seen.add(value)
    users = ",\n".join(_render_user(i) for i in listed)
    lines = ["# generated by worknode (broker.transport._auth.render_accounts)",
             "accounts {", f"  {account}: {{"]
    if jetstream:
        lines.append("    jetstream: enabled")
    lines += ["    users: [", users, "    ]", "  }", "}"]
    return "\n".join(lines) + "\n"


def dump_identities(identities: Iterable[NatsIdentity]) -> str:
    """The identities file: JSON ``{name: {role, namespace, subjects, public_key (hex)}}``
    (public data only: it holds no seed)."""
    doc = {
        i.name: {"role": str(i.role), "namespace": i.namespace, "subjects": list(i.subjects),
                 "public_key": i.public_key.hex()}
        for i in identities
    }
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"


def load_identities(text: str) -> dict[str, NatsIdentity]:
    """Parse an identities file (``dump_identities``'s format) into ``{name: identity}``.
    Raises ``InvalidArgumentError`` saying which entry is wrong."""
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise InvalidArgumentError(f"identities file is not JSON: {exc}") from None
    if not isinstance(doc, Mapping):
        raise InvalidArgumentError("identities file must be a JSON object {name: {...}}")
    out: dict[str, NatsIdentity] = {}
    for name, entry in doc.items():
        subjects = entry.get("subjects", []) if isinstance(entry, Mapping) else None
        if not isinstance(subjects, list):  # a string would grant its characters, "" all
            raise InvalidArgumentError(f"identity {name!r}: subjects must be a JSON list")
        try:
            out[name] = NatsIdentity(
                name=name,
                role=Role(entry["role"]),
                public_key=bytes.fromhex(entry["public_key"]),
                namespace=entry["namespace"],
                subjects=tuple(subjects),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise InvalidArgumentError(f"identity {name!r}: {exc}") from None
    return out
