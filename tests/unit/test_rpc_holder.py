"""Pure parts of issue 16's RPC checks: a request's key lookup is the token holder's key (or a
forwarding peer's), and the revoked ids are read through any kind a peer put beside them."""

from __future__ import annotations

import pytest

from broker.codec import Signer, TrustRoster
from broker.codec._binding import REQUEST_DOMAIN
from broker.crdt import KindConflict
from broker.errors import BadSignatureError, UnknownSignerError
from broker.rpc import HolderKeys
from broker.rpc._revocation import _ids_in

HOLDER = Signer("anyone", bytes(range(32)))
PEER = Signer("n1", bytes(range(1, 33)))
OTHER = Signer("other", bytes(range(2, 34)))


def test_the_holder_key_decides_not_the_signer_name() -> None:
    keys = HolderKeys(HOLDER.public_key)
    body = b"request bytes"
    keys.verify("whatever-label", body, HOLDER.sign(body, REQUEST_DOMAIN), REQUEST_DOMAIN)
    with pytest.raises(BadSignatureError):
        keys.verify("anyone", body, OTHER.sign(body, REQUEST_DOMAIN), REQUEST_DOMAIN)
    with pytest.raises(BadSignatureError):  # the holder's signature, another domain
        keys.verify("anyone", body, HOLDER.sign(body), REQUEST_DOMAIN)
    with pytest.raises(BadSignatureError):
        keys.verify("anyone", body, b"short", REQUEST_DOMAIN)


def test_a_roster_peer_may_forward_a_token_it_was_handed() -> None:
    roster = TrustRoster({"n1": PEER.public_key})
    keys = HolderKeys(HOLDER.public_key, roster)
    body = b"nested call"
    keys.verify("n1", body, PEER.sign(body, REQUEST_DOMAIN), REQUEST_DOMAIN)
    with pytest.raises(BadSignatureError):  # claims the peer's id with another key
        keys.verify("n1", body, OTHER.sign(body, REQUEST_DOMAIN), REQUEST_DOMAIN)
    with pytest.raises(BadSignatureError):  # not a peer: only the holder's key counts
        keys.verify("other", body, OTHER.sign(body, REQUEST_DOMAIN), REQUEST_DOMAIN)
    with pytest.raises(UnknownSignerError):
        TrustRoster().verify("n1", body, PEER.sign(body, REQUEST_DOMAIN), REQUEST_DOMAIN)


def test_revoked_ids_are_read_through_a_retyped_key() -> None:
    assert _ids_in(frozenset({"aa", "bb"})) == {"aa", "bb"}
    assert _ids_in(KindConflict({5: frozenset({"aa"}), 2: 7})) == {"aa"}
    assert _ids_in(7) == set()
    assert _ids_in(None) == set()
