"""Revoked token ids in a replicated CRDT set: revocation spreads by merge.

The set lives in an ordinary replica (subject ``revocations`` by default) under the key
``revoked``: an add-wins OR-set of revocation ids (hex). Revoking is a write through the
replica, so it is durable, published as a delta, caught up after reconnects and repaired by
the healer after a partition, like any other state. Nothing ever removes an id: a revoked
token stays revoked.

Reads are O(1): the ids are kept as a frozenset, rebuilt lazily after the replica changes.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from typing import Any, Final

from broker.crdt import ORMap, Tree
from broker.errors import InvalidArgumentError
from broker.replica import Replica

__all__ = ["DEFAULT_REVOCATION_SUBJECT", "REVOKED_KEY", "RevocationList"]

DEFAULT_REVOCATION_SUBJECT: Final = "revocations"
REVOKED_KEY: Final = "revoked"
MAX_REVOKE_IDS: Final = 256
"""Ids one ``revoke`` call adds (a token has one per block)."""


class RevocationList:
    """The revoked ids of one replica (see module doc)."""

    def __init__(self, replica: Replica) -> None:
        self.replica = replica
        self._ids: frozenset[str] | None = None
        replica.add_change_listener(self._on_change)

    def _on_change(self, keys: Collection[str] | None) -> None:
        if keys is None or REVOKED_KEY in keys:
            self._ids = None

    @property
    def ids(self) -> frozenset[str]:
        """Every revoked id this replica knows of."""
        if self._ids is None:
            value: Any = (self.replica.state.value() or {}).get(REVOKED_KEY, frozenset())
            self._ids = frozenset(str(v) for v in value) if isinstance(value, frozenset) else (
                frozenset()
            )
        return self._ids

    def __contains__(self, token_id: object) -> bool:
        return token_id in self.ids

    async def revoke(self, token_ids: Iterable[str]) -> None:
        """Add ``token_ids`` to the set: durable when this returns, then replicated."""
        ids = sorted(set(token_ids))
        if not ids:
            return
        if len(ids) > MAX_REVOKE_IDS:
            raise InvalidArgumentError(f"{len(ids)} ids in one revoke, at most {MAX_REVOKE_IDS}")
        for token_id in ids:
            if not token_id or len(token_id) > 256 or not all(
                c in "0123456789abcdef" for c in token_id
            ):
                raise InvalidArgumentError(f"revocation ids are lowercase hex, got {token_id!r}")
        await self.replica.write_many([_adder(i) for i in ids])


def _adder(token_id: str) -> Callable[[Tree, str, int], ORMap]:
    def add(tree: Tree, replica_id: str, ts: int) -> ORMap:
        return tree.state.add(replica_id, (REVOKED_KEY,), token_id)

    return add
