"""A Merkle tree that follows one replica: the replica side of healing, refreshed in the
background (see ``broker.healing._endpoints`` for the schedule and its bounds).

Invariant: once ``current()`` returns, the tree's root depends only on the set of
``(key, item_digest(key, entry))`` of the replica's store at that moment; a failed background
step never leaves a wrong tree (it schedules a whole rebuild).

An adapter: reads the asyncio loop's timers (``call_later``) and ``time.perf_counter`` to keep
its share of the loop bounded.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Collection
from typing import Final

from broker.merkle import MerkleTree
from broker.repair import item_digest
from broker.replica import Replica

__all__ = ["BUILD_CHUNK", "REFRESH_CHUNK", "ReplicaTree"]

log = logging.getLogger(__name__)

REFRESH_CHUNK: Final = 500  # dirty keys digested per background step (~5-15 ms of the loop)
BUILD_CHUNK: Final = 5_000  # entries digested per background step of a (re)build


class ReplicaTree:
    """A Merkle tree that follows one replica: dirty keys, refreshed in the background once
    started (see module doc) and on demand.

    A (re)build in the background digests the entries in chunks first (keys changed meanwhile
    are noted and refreshed after), then builds the tree in one step (numpy: ~0.2 s at 100k
    keys), so a large replica never stalls its event loop for all its digests at once."""

    def __init__(
        self,
        replica: Replica,
        secret: bytes,
        *,
        refresh_delay: float = 0.05,
        refresh_budget: float = 0.1,
    ) -> None:
        self.replica = replica
        self.secret = secret
        self.tree = MerkleTree(key=secret)
        self._dirty: set[str] | None = None  # None: everything (first build, full joins)
        self._delay = refresh_delay
        self._budget = refresh_budget
        self._pause = refresh_delay  # before the next background step (budget-adjusted)
        self._handle: asyncio.TimerHandle | None = None
        self._running = False
        # a background (re)build in progress: keys still to digest, digests so far, and the
        # keys that changed since it started
        self._todo: list[str] | None = None
        self._digests: list[tuple[str, bytes]] = []
        self._changed: set[str] = set()
        self.background_keys = 0  # entries digested by background steps (tests, metrics)
        replica.add_change_listener(self._on_change)

    def start(self) -> None:
        """Refresh in the background from now on."""
        self._running = True
        self._schedule()

    def stop(self) -> None:
        """No more background refreshes (on-demand ones still work)."""
        self._running = False
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _on_change(self, keys: Collection[str] | None) -> None:
        if keys is None:
            self._dirty = None
            self._todo = None  # a build in progress starts over
        elif self._dirty is not None:
            self._dirty.update(keys)
        elif self._todo is not None:
            self._changed.update(keys)
        self._schedule()

    def _schedule(self) -> None:
        if not self._running or self._handle is not None or self._dirty == set():
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # a change outside the loop: the next request refreshes
            return
        self._handle = loop.call_later(self._pause, self._step)

    def _step(self) -> None:
        self._handle = None
        t0 = time.perf_counter()
        failed = False
        try:
            if self._dirty is None:
                self._build_step()
            elif self._dirty:
                keys = [self._dirty.pop() for _ in range(min(REFRESH_CHUNK, len(self._dirty)))]
                try:
                    self._update(keys)
                except BaseException:
                    self._dirty.update(keys)  # not lost: refreshed by the next try
                    raise
                self.background_keys += len(keys)
            else:
                return
        except Exception:
            # Never silent, never a wrong tree: a full rebuild at the next step or request
            # (retried at most once a second).
            log.exception("background refresh of a Merkle tree failed; rebuilding it")
            self._dirty, self._todo = None, None
            failed = True
        spent = time.perf_counter() - t0
        # At most ``budget`` of the loop's time: a step of ``spent`` s is followed by a pause
        # of spent * (1 - budget) / budget (and never less than the delay); once caught up,
        # the next change waits only the delay.
        self._pause = max(self._delay, spent * (1 - self._budget) / self._budget)
        if failed:
            self._pause = max(self._pause, 1.0)
        elif self._dirty == set():
            self._pause = self._delay
        self._schedule()

    def _build_step(self) -> None:
        store = self.replica.state.store or {}
        if self._todo is None:
            self._todo, self._digests, self._changed = list(store), [], set()
        chunk = self._todo[-BUILD_CHUNK:]
        del self._todo[-BUILD_CHUNK:]
        secret = self.secret
        for key in chunk:
            entry = store.get(key)
            if entry is not None:  # removed since the build started: noted as changed
                self._digests.append((key, item_digest(key, entry, secret)))
        self.background_keys += len(chunk)
        if not self._todo:
            self.tree = MerkleTree.build(self._digests, key=secret)
            # Keys changed after their digest was taken (or added since) are refreshed the
            # usual way; every other digest matches the entry it was taken from.
            self._dirty, self._todo, self._digests = self._changed, None, []
            self._changed = set()

    def _update(self, keys: Collection[str]) -> None:
        store = self.replica.state.store or {}
        for key in keys:
            entry = store.get(key)
            if entry is None:
                self.tree.remove(key)
            else:
                self.tree.set(key, item_digest(key, entry, self.secret))

    def current(self) -> MerkleTree:
        """The tree, brought up to date with every change noted so far."""
        if self._dirty is None:
            store = self.replica.state.store or {}
            secret = self.secret
            items = [(k, item_digest(k, v, secret)) for k, v in store.items()]
            self.tree = MerkleTree.build(items, key=secret)
            self._todo, self._digests, self._changed = None, [], set()
        else:
            self._update(self._dirty)
        self._dirty = set()
        return self.tree

