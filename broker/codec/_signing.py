"""Ed25519 signatures on envelopes: a node's signer, and the roster of keys a node trusts.

Invariants: a signature covers ``DOMAIN`` followed by the exact body bytes carried, so it
authenticates those bytes and cannot be replayed as another kind of signed message; a body is
only decoded after its signature verified with the roster's key for the claimed signer.

Pure: keys and bytes in, bytes or errors out (randomness only through ``Signer.generate``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

import nacl.bindings
import nacl.exceptions
import nacl.signing

from broker.crdt import validate_replica_id
from broker.errors import (
    BadSignatureError,
    InvalidArgumentError,
    UnknownSignerError,
    UnsignedMessageError,
)

__all__ = [
    "DOMAIN",
    "REPORT_DOMAIN",
    "REVOKED_FIELD",
    "ROSTER_ROLES",
    "SIGNATURE_SIZE",
    "Revocation",
    "RosterEntry",
    "Signer",
    "TrustRoster",
    "dump_roster",
    "parse_revocations",
    "parse_roster",
]

DOMAIN: Final = b"worknode-envelope\x00"
REPORT_DOMAIN: Final = b"worknode-heal-report\x00"
"""Heal reports are signed under their own domain, so neither can pass for the other."""
SIGNATURE_SIZE: Final = 64
_SEED_SIZE: Final = 32


class Signer:
    """A node's identity: its id and Ed25519 signing key."""

    __slots__ = ("_key", "_secret", "node_id")

    def __init__(self, node_id: str, seed: bytes) -> None:
        self.node_id = validate_replica_id(node_id)
        if len(seed) != _SEED_SIZE:
            raise InvalidArgumentError(f"an Ed25519 seed is {_SEED_SIZE} bytes, got {len(seed)}")
        self._key = nacl.signing.SigningKey(seed)
        # The 64-byte secret key libsodium signs with, for ``sign``: the binding directly,
        # without ``SigningKey.sign``'s encoder and ``SignedMessage`` (every RPC request and
        # reply is signed).
        self._secret = nacl.bindings.crypto_sign_seed_keypair(seed)[1]

    @classmethod
    def generate(cls, node_id: str) -> Signer:
        """A signer with a fresh random key."""
        return cls(node_id, bytes(nacl.signing.SigningKey.generate()))

    @property
    def seed(self) -> bytes:
        """The private seed (keep it secret; store it with mode 0600)."""
        return bytes(self._key)

    @property
    def public_key(self) -> bytes:
        """The 32-byte public key peers put in their roster."""
        return bytes(self._key.verify_key)

    def sign(self, body: bytes, domain: bytes = DOMAIN) -> bytes:
        """The 64-byte signature over ``domain + body``."""
        return _sign(domain + body, self._secret)[:SIGNATURE_SIZE]


_sign: Final = nacl.bindings.crypto_sign
_open: Final = nacl.bindings.crypto_sign_open


ROSTER_ROLES: Final = ("node", "healer", "writer")
"""What a roster entry may be trusted as: a replica (``node``), the healer (``healer``, the only
role whose heal reports and heal requests count) or a writer outside the cluster (``writer``,
e.g. ``worknode set``). The same names as the NATS roles that sign envelopes."""


@dataclass(frozen=True, slots=True)
class RosterEntry:
    """One trusted identity: its key, its role, and optionally the key it had before a
    rotation, still accepted until ``previous_until`` (Unix seconds): the overlap window."""

    key: bytes
    role: str = "node"
    previous: bytes | None = None
    previous_until: float | None = None

    def __post_init__(self) -> None:
        if self.role not in ROSTER_ROLES:
            raise InvalidArgumentError(
                f"roster role {self.role!r} is not one of {', '.join(ROSTER_ROLES)}")
        if (self.previous is None) != (self.previous_until is None):
            raise InvalidArgumentError("a previous key needs previous_until, and only it")


REVOKED_FIELD: Final = "$revoked"
"""The roster file's list of revoked keys (``worknode roster revoke``). ``$`` is no replica id
character, so the field can never be taken for an identity's entry."""


@dataclass(frozen=True, slots=True)
class Revocation:
    """A key cut off for good: the id it was trusted for, the key, and when it was revoked
    (Unix seconds; None when the file does not say). A roster whose entries use a revoked key
    (as key or previous key) is refused: a revoked key is never trusted again, under any id,
    and the id needs a new key."""

    node_id: str
    key: bytes
    at: float | None = None


def _utc_text(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _utc_seconds(text: object, node_id: str) -> float:
    try:
        when = datetime.fromisoformat(str(text))
    except ValueError:
        raise InvalidArgumentError(
            f"roster entry {node_id!r}: previous_until {text!r} is not an ISO 8601 time "
            "(e.g. 2026-12-05T00:00:00Z)") from None
    if when.tzinfo is None:
        raise InvalidArgumentError(
            f"roster entry {node_id!r}: previous_until {text!r} has no time zone (add Z)")
    return when.timestamp()


def _hex_key(value: object, node_id: str, what: str) -> bytes:
    try:
        key = bytes.fromhex(value) if isinstance(value, str) else b""
    except ValueError:
        key = b""
    if len(key) != 32:
        raise InvalidArgumentError(
            f"roster entry {node_id!r}: {what} is not a 32-byte public key in hex")
    return key


def parse_revocations(raw: object) -> list[Revocation]:
    """The revoked keys of a decoded roster file: its ``"$revoked"`` list of ``{"id": ID,
    "key": hex, "at": "2026-12-05T00:00:00Z"}`` (``at`` optional); empty without the field
    (every roster written before revocations). ``InvalidArgumentError`` naming the first bad
    item."""
    if not isinstance(raw, Mapping):
        raise InvalidArgumentError("a roster is a JSON object {id: key or entry}")
    items = raw.get(REVOKED_FIELD, [])
    if not isinstance(items, list):
        raise InvalidArgumentError(f"roster field {REVOKED_FIELD!r} is not a list")
    out: list[Revocation] = []
    for i, item in enumerate(items):
        if not isinstance(item, Mapping) or set(item) - {"id", "key", "at"} \
                or "id" not in item or "key" not in item:
            raise InvalidArgumentError(
                f"roster field {REVOKED_FIELD!r}, item {i}: not an object "
                '{"id": ID, "key": HEX, "at": TIME}')
        node_id = validate_replica_id(str(item["id"]))
        at = item.get("at")
        out.append(Revocation(node_id, _hex_key(item["key"], node_id, "revoked key"),
                              None if at is None else _utc_seconds(at, node_id)))
    return out


def parse_roster(raw: object) -> dict[str, RosterEntry]:
    """The entries of a decoded roster file: a JSON object whose values are a public key in
    hex (legacy form: role ``node``) or ``{"key": hex, "role": ROLE, "previous": hex,
    "previous_until": "2026-12-05T00:00:00Z"}`` (role defaults to node; the previous key and
    its end time go together), beside an optional ``"$revoked"`` list
    (``parse_revocations``). ``InvalidArgumentError`` naming the first bad entry, or an
    entry whose key or previous key is revoked (a file that would trust a revoked key again
    is refused whole, so a reload keeps the keys in force)."""
    if not isinstance(raw, Mapping):
        raise InvalidArgumentError("a roster is a JSON object {id: key or entry}")
    revoked = {r.key: r.node_id for r in parse_revocations(raw)}
    out: dict[str, RosterEntry] = {}
    for node_id, value in raw.items():
        if node_id == REVOKED_FIELD:
            continue
        node_id = validate_replica_id(str(node_id))
        if isinstance(value, str):
            out[node_id] = RosterEntry(_hex_key(value, node_id, "key"))
            continue
        if not isinstance(value, Mapping):
            raise InvalidArgumentError(f"roster entry {node_id!r} is neither a hex key nor "
                                       "an object")
        unknown = set(value) - {"key", "role", "previous", "previous_until"}
        if unknown:
            raise InvalidArgumentError(
                f"roster entry {node_id!r} has unknown fields {', '.join(sorted(unknown))}")
        previous = value.get("previous")
        until = value.get("previous_until")
        key = _hex_key(value.get("key"), node_id, "key")
        previous_key = None if previous is None else _hex_key(previous, node_id, "previous")
        until_s = None if until is None else _utc_seconds(until, node_id)
        try:
            out[node_id] = RosterEntry(key, str(value.get("role", "node")), previous_key,
                                       until_s)
        except InvalidArgumentError as exc:  # the role, or a previous key without its end
            raise InvalidArgumentError(f"roster entry {node_id!r}: {exc}") from None
    for node_id, entry in out.items():
        for key in (entry.key, entry.previous or b""):
            if key in revoked:
                raise InvalidArgumentError(
                    f"roster entry {node_id!r}: key {key.hex()[:16]}… was revoked (as "
                    f"{revoked[key]!r}) and is never trusted again: give {node_id} a new key")
    return out


def dump_roster(entries: Mapping[str, RosterEntry],
                revoked: Iterable[Revocation] = ()) -> dict[str, object]:
    """The JSON form of ``entries`` and ``revoked`` (the inverse of ``parse_roster`` and
    ``parse_revocations``): a plain hex key for a node with no previous key (files older
    tools read), an object otherwise; the ``"$revoked"`` list only when there is one."""
    out: dict[str, object] = {}
    gone = sorted(revoked, key=lambda r: (r.node_id, r.key))
    if gone:
        out[REVOKED_FIELD] = [
            {"id": r.node_id, "key": r.key.hex()}
            | ({} if r.at is None else {"at": _utc_text(r.at)}) for r in gone]
    for node_id in sorted(entries):
        e = entries[node_id]
        if e.role == "node" and e.previous is None:
            out[node_id] = e.key.hex()
            continue
        obj: dict[str, object] = {"key": e.key.hex(), "role": e.role}
        if e.previous is not None and e.previous_until is not None:
            obj["previous"] = e.previous.hex()
            obj["previous_until"] = _utc_text(e.previous_until)
        out[node_id] = obj
    return out


def _verify_key(node_id: str, public_key: bytes) -> nacl.signing.VerifyKey:
    try:
        return nacl.signing.VerifyKey(public_key)
    except (nacl.exceptions.ValueError, nacl.exceptions.TypeError) as exc:
        raise InvalidArgumentError(f"invalid Ed25519 public key for {node_id!r}") from exc


class _State:
    """One immutable generation of a roster: replaced whole, never edited, so a reader
    holding it (or the roster mid-reload) sees one consistent version. ``base``: a previous
    generation whose verify keys are reused for unchanged entries (an ``add`` costs one key,
    not the whole roster)."""

    __slots__ = ("_by_role", "entries", "keys", "previous")

    def __init__(self, entries: Mapping[str, RosterEntry], base: _State | None = None) -> None:
        self.entries = dict(entries)
        self.keys: dict[str, nacl.signing.VerifyKey] = {}
        self.previous: dict[str, tuple[nacl.signing.VerifyKey, float]] = {}
        for i, e in self.entries.items():
            if base is not None and base.entries.get(i) == e:
                self.keys[i] = base.keys[i]
                if i in base.previous:
                    self.previous[i] = base.previous[i]
                continue
            self.keys[i] = _verify_key(i, e.key)
            if e.previous is not None and e.previous_until is not None:
                self.previous[i] = (_verify_key(i, e.previous), e.previous_until)
        self._by_role: dict[str, frozenset[str]] | None = None

    def by_role(self, role: str) -> frozenset[str]:
        """The ids of ``role`` (computed once per generation, on first use)."""
        if self._by_role is None:
            roles: dict[str, set[str]] = {r: set() for r in ROSTER_ROLES}
            for i, e in self.entries.items():
                roles[e.role].add(i)
            self._by_role = {r: frozenset(ids) for r, ids in roles.items()}
        return self._by_role.get(role, frozenset())


class TrustRoster:
    """Node id -> Ed25519 public key and role: whose envelopes and requests this node accepts.

    One object is shared by every replica and endpoint of a process, and a reload swaps its
    contents in place (``replace``), so every holder sees the new roster at once. An entry's
    previous key (a rotation's overlap window) verifies only while ``now()`` is before its
    ``previous_until``; ``now`` (Unix seconds) is injected by the service (this module reads
    no clock): without it, previous keys are never accepted.
    """

    __slots__ = ("_now", "_state")

    def __init__(
        self,
        keys: Mapping[str, bytes] | Iterable[tuple[str, bytes]] = (),
        *,
        now: Callable[[], float] | None = None,
    ) -> None:
        self._now = now
        items = keys.items() if isinstance(keys, Mapping) else keys
        self._state = _State({})
        for node_id, public_key in items:
            self.add(node_id, public_key)

    @classmethod
    def from_entries(
        cls, entries: Mapping[str, RosterEntry], *, now: Callable[[], float] | None = None
    ) -> TrustRoster:
        """A roster of ``entries`` (validated: ids and keys)."""
        roster = cls(now=now)
        roster.replace(entries)
        return roster

    def replace(self, entries: Mapping[str, RosterEntry]) -> None:
        """Trust exactly ``entries`` from now on, in one step (a reload): validated first,
        so on ``InvalidArgumentError`` the roster in force is unchanged."""
        for node_id in entries:
            validate_replica_id(node_id)
        self._state = _State(entries, self._state)

    def add(self, node_id: str, public_key: bytes, role: str = "node", *,
            previous: bytes | None = None, previous_until: float | None = None) -> None:
        """Trust ``public_key`` for ``node_id`` as ``role`` (replacing a previous key:
        rotation; ``previous`` stays valid until ``previous_until``, Unix seconds)."""
        entries = dict(self._state.entries)
        entries[validate_replica_id(node_id)] = RosterEntry(
            bytes(public_key), role, previous, previous_until)
        self._state = _State(entries, self._state)

    def remove(self, node_id: str) -> None:
        """Stop trusting ``node_id``."""
        if node_id in self._state.entries:
            entries = dict(self._state.entries)
            del entries[node_id]
            self._state = _State(entries, self._state)

    def entries(self) -> dict[str, RosterEntry]:
        """A copy of every entry."""
        return dict(self._state.entries)

    def with_role(self, role: str) -> frozenset[str]:
        """The ids trusted as ``role`` (cheap: computed once per roster version)."""
        return self._state.by_role(role)

    def role_of(self, node_id: str) -> str | None:
        """``node_id``'s role, or None when it is not trusted."""
        entry = self._state.entries.get(node_id)
        return None if entry is None else entry.role

    def in_overlap(self) -> int:
        """How many entries have a previous key still accepted now (0 without a clock)."""
        if self._now is None:
            return 0
        now = self._now()
        return sum(1 for _, until in self._state.previous.values() if now < until)

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._state.keys

    def __len__(self) -> int:
        return len(self._state.keys)

    def verify(self, signer: str, body: bytes, signature: bytes, domain: bytes = DOMAIN) -> None:
        """Raise a ``SignatureError`` subclass unless ``signature`` is ``signer``'s over body
        (by its key, or by its previous key inside the overlap window)."""
        if not signature:
            raise UnsignedMessageError(f"envelope from {signer!r} carries no signature")
        state = self._state
        key = state.keys.get(signer)
        if key is None:
            raise UnknownSignerError(f"signer {signer!r} is not in the trust roster")
        if len(signature) != SIGNATURE_SIZE:
            raise BadSignatureError(f"signature is {len(signature)} bytes, not {SIGNATURE_SIZE}")
        try:
            # VerifyKey.verify's own work, without its encoder and type checks (hot path).
            _open(signature + domain + body, bytes(key))
        except nacl.exceptions.BadSignatureError as exc:
            previous = state.previous.get(signer)
            if previous is not None and self._now is not None and self._now() < previous[1]:
                try:
                    previous[0].verify(domain + body, signature)
                    return
                except nacl.exceptions.BadSignatureError:
                    pass
            raise BadSignatureError(f"signature by {signer!r} does not verify") from exc
