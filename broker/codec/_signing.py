"""Ed25519 signatures on envelopes: a node's signer, and the roster of keys a node trusts.

Invariants: a signature covers ``DOMAIN`` followed by the exact body bytes carried, so it
authenticates those bytes and cannot be replayed as another kind of signed message; a body is
only decoded after its signature verified with the roster's key for the claimed signer.

Pure: keys and bytes in, bytes or errors out (randomness only through ``Signer.generate``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Final

import nacl.exceptions
import nacl.signing

from broker.crdt import validate_replica_id
from broker.errors import (
    BadSignatureError,
    InvalidArgumentError,
    UnknownSignerError,
    UnsignedMessageError,
)

__all__ = ["DOMAIN", "REPORT_DOMAIN", "SIGNATURE_SIZE", "Signer", "TrustRoster"]

DOMAIN: Final = b"worknode-envelope\x00"
REPORT_DOMAIN: Final = b"worknode-heal-report\x00"
"""Heal reports are signed under their own domain, so neither can pass for the other."""
SIGNATURE_SIZE: Final = 64
_SEED_SIZE: Final = 32


class Signer:
    """A node's identity: its id and Ed25519 signing key."""

    __slots__ = ("_key", "node_id")

    def __init__(self, node_id: str, seed: bytes) -> None:
        self.node_id = validate_replica_id(node_id)
        if len(seed) != _SEED_SIZE:
            raise InvalidArgumentError(f"an Ed25519 seed is {_SEED_SIZE} bytes, got {len(seed)}")
        self._key = nacl.signing.SigningKey(seed)

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
        return self._key.sign(domain + body).signature


class TrustRoster:
    """Node id -> Ed25519 public key: whose envelopes this node accepts."""

    __slots__ = ("_keys",)

    def __init__(self, keys: Mapping[str, bytes] | Iterable[tuple[str, bytes]] = ()) -> None:
        self._keys: dict[str, nacl.signing.VerifyKey] = {}
        items = keys.items() if isinstance(keys, Mapping) else keys
        for node_id, public_key in items:
            self.add(node_id, public_key)

    def add(self, node_id: str, public_key: bytes) -> None:
        """Trust ``public_key`` for ``node_id`` (replacing a previous key: rotation)."""
        try:
            self._keys[validate_replica_id(node_id)] = nacl.signing.VerifyKey(public_key)
        except (nacl.exceptions.ValueError, nacl.exceptions.TypeError) as exc:
            raise InvalidArgumentError(f"invalid Ed25519 public key for {node_id!r}") from exc

    def remove(self, node_id: str) -> None:
        """Stop trusting ``node_id``."""
        self._keys.pop(node_id, None)

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def verify(self, signer: str, body: bytes, signature: bytes, domain: bytes = DOMAIN) -> None:
        """Raise a ``SignatureError`` subclass unless ``signature`` is ``signer``'s over body."""
        if not signature:
            raise UnsignedMessageError(f"envelope from {signer!r} carries no signature")
        key = self._keys.get(signer)
        if key is None:
            raise UnknownSignerError(f"signer {signer!r} is not in the trust roster")
        if len(signature) != SIGNATURE_SIZE:
            raise BadSignatureError(f"signature is {len(signature)} bytes, not {SIGNATURE_SIZE}")
        try:
            key.verify(domain + body, signature)
        except nacl.exceptions.BadSignatureError as exc:
            raise BadSignatureError(f"signature by {signer!r} does not verify") from exc
