"""Revoked token ids in a replicated CRDT set: revocation spreads by merge.

The set lives in an ordinary replica (subject ``revocations`` by default) under the key
``revoked``: an add-wins OR-set of revocation ids (hex). Revoking is a write through the
replica, so it is durable, published as a delta, caught up after reconnects and repaired by
the healer after a partition, like any other state. Nothing ever removes an id: a revoked
token stays revoked.

Reads are O(1): the ids are kept as a frozenset, rebuilt lazily after the replica changes.

The set is add-only, and held so against writers other than ``revoke`` at three levels:

- every replica of the subject enforces it (the subject is add-only by default,
  ``WorknodeSettings.add_only_subjects``; ``broker.replication._addonly``): a peer's delta or
  full state whose join would remove a dot held here (an OR-set remove of an id, a full
  state or an empty store whose context saw an id it does not hold, a ``clear``, an id added
  again over its dots) is rejected before it changes anything, and its signer counted in
  ``worknode_byzantine_rejected_total{reason="removal"}``; a held delta is checked again
  when it drains. A local write that would remove fails with InvalidArgumentError, so
  ``revoke`` writes only ids not present yet;
- the RPC server refuses every method but ``revoke`` and reads on this subject, whatever a
  token grants;
- this list never forgets an id it has seen: ids are read from every set-kind value under the
  key (a second kind next to the set shows a ``KindConflict``), unioned with every id seen
  since this process started, and an id that vanished from the state is written again (a
  fresh add wins over a remove).

What remains for Byzantine writers (issue 17): on the delta path, a stolen roster key cannot
take a revoked id out of any replica that holds it, freshly started or not. A replica that
has not seen the id yet is covered by the causal gate: a document claiming the id's dot
without carrying it is held, and rejected as a removal once the id arrives. Catch-up replies
and heal repairs are joined without this check until the replication machine runs
``removes`` on those paths too (the catch-up and repair work of issue 17).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection, Iterable
from typing import Any, Final

from broker.crdt import Kind, KindConflict, ORMap, Tree
from broker.crdt._stores import KindStore, SetStore
from broker.errors import InvalidArgumentError
from broker.replica import Replica

__all__ = ["DEFAULT_REVOCATION_SUBJECT", "REVOKED_KEY", "RevocationList"]

DEFAULT_REVOCATION_SUBJECT: Final = "revocations"
REVOKED_KEY: Final = "revoked"
MAX_REVOKE_IDS: Final = 256
"""Ids one ``revoke`` call adds (a token has one per block)."""

log = logging.getLogger(__name__)


def _ids_in(value: Any) -> set[str]:
    """The ids under the key, whatever other kinds a writer put beside the set."""
    if isinstance(value, frozenset):
        return {str(v) for v in value}
    if isinstance(value, KindConflict):
        out: set[str] = set()
        for v in value.values():
            if isinstance(v, frozenset):
                out.update(str(x) for x in v)
        return out
    return set()


class RevocationList:
    """The revoked ids of one replica (see module doc)."""

    def __init__(self, replica: Replica) -> None:
        self.replica = replica
        self._ids: frozenset[str] | None = None
        self._seen: set[str] = set()
        """Every id seen since this list was made (the state it starts from included)."""
        self._readding: asyncio.Task[None] | None = None
        self.readded = 0
        """Ids written again after a delta removed them."""
        replica.add_change_listener(self._on_change)
        self._seen |= self._present()

    @property
    def subject(self) -> str:
        """The revocation subject."""
        return self.replica.config.subject

    def _on_change(self, keys: Collection[str] | None) -> None:
        if keys is None or REVOKED_KEY in keys:
            self._ids = None
            if self._seen:
                self._restore()

    def _present(self) -> set[str]:
        return _ids_in((self.replica.state.value() or {}).get(REVOKED_KEY))

    @property
    def ids(self) -> frozenset[str]:
        """Every revoked id this replica knows of (see module doc: never fewer)."""
        if self._ids is None:
            self._seen |= self._present()
            self._ids = frozenset(self._seen)
        return self._ids

    def _restore(self) -> None:
        """Write again any remembered id a delta removed (in a task: listeners are sync)."""
        if self._readding is not None and not self._readding.done():
            return
        missing = self._seen - self._present()
        if not missing:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._readding = loop.create_task(self._readd(missing))

    async def _readd(self, missing: set[str]) -> None:
        log.warning("%d revoked ids removed from %s by a peer's delta: writing them again",
                    len(missing), self.subject)
        try:
            ids = sorted(missing)
            for i in range(0, len(ids), MAX_REVOKE_IDS):
                await self.replica.write_many([_adder(t) for t in ids[i:i + MAX_REVOKE_IDS]])
            self.readded += len(ids)
        except Exception:
            log.exception("could not write revoked ids again")

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
        # An id present already is not written again: the add would replace its dots,
        # which an add-only subject refuses (and it is revoked already).
        present = self._present()
        missing = [i for i in ids if i not in present]
        if missing:
            await self.replica.write_many([_adder(i) for i in missing])
        self._seen.update(ids)
        self._ids = None


def _holds(state: ORMap, token_id: str) -> bool:
    """Whether the set under the key holds ``token_id`` (O(1): one set lookup)."""
    entry = state.store.get(REVOKED_KEY) if state.store else None
    if isinstance(entry, KindStore):
        entry = entry.get(Kind.SET)
    return isinstance(entry, SetStore) and bool(entry.get(token_id))


def _adder(token_id: str) -> Callable[[Tree, str, int], ORMap]:
    def add(tree: Tree, replica_id: str, ts: int) -> ORMap:
        if _holds(tree.state, token_id):
            return ORMap(is_delta=True)  # added meanwhile (a peer's delta): nothing to do
        return tree.state.add(replica_id, (REVOKED_KEY,), token_id)

    return add
