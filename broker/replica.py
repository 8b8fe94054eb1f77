"""A replica: the state of one subject on one node, kept durable and exchanged over a transport.

Write path (``write_many``): validate and compute each delta against the current state, apply
it in memory (dots must advance before the next mutation), hand the joined delta to the group
committer, and return only after the durable store committed it. Only then is the write
acknowledged, and only then can its delta leave the process: EVENTUAL writes join the pending
batch published after the flush window; LOCAL writes wait for an explicit ``sync()``. If a
commit fails, the in-memory state is rebuilt from the store, so nothing unacknowledged stays
visible and nothing acknowledged is lost.

Batching is a join: every delta committed during a flush window is joined into one delta batch
and published as one signed envelope. The batch is bounded by ops and bytes; the queue of
committed-but-unpublished ops is bounded too, and writers beyond it get ``BackpressureError``
instead of growing memory. A publish that fails keeps its batch and retries; nothing is dropped.

Read path: verify and decode an envelope, join its document (duplicates and reordering are
harmless: joins are idempotent, commutative and associative). Rejections are counted by
reason. Per-writer sequence numbers reveal lost batches; a gap, a slow-consumer event, a
reconnect or a start triggers catch-up: a state transfer from a peer over request/reply.

Remote deltas are not logged one by one: the applied state is snapshotted to the store every
``snapshot_every`` ops and on stop, and catch-up refetches what a crash lost. Local writes are
logged before they are acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

from broker.codec import Signer, TrustRoster, WireCodec
from broker.crdt import (
    Add,
    Assign,
    Causal,
    Create,
    HybridClock,
    Increment,
    Move,
    ORMap,
    Tree,
    TreeOp,
    coalesce,
)
from broker.crdt._stores import LWWStore, Whole, digest_entry
from broker.errors import (
    BackpressureError,
    BadSignatureError,
    ClockSkewError,
    CodecError,
    MalformedMessageError,
    MessageTooDeepError,
    MessageTooLargeError,
    NotConnectedError,
    PayloadTooLargeError,
    ReplicaError,
    StoreError,
    TransportError,
    UnknownSignerError,
    UnsignedMessageError,
    UnsupportedContentError,
    UnsupportedVersionError,
    ValueTooLargeError,
    WorknodeError,
)
from broker.store import DurableStore
from broker.transport import Msg, Subscription, Transport, delta_subject, sync_subject

__all__ = [
    "REJECT_REASONS",
    "Consistency",
    "Mutator",
    "NullReplicaObserver",
    "Replica",
    "ReplicaConfig",
    "ReplicaObserver",
]

log = logging.getLogger(__name__)

Mutator = Callable[[Tree, str, int], ORMap]
"""``(tree, replica_id, hlc) -> delta``: a delta-mutator on the subject's tree."""

REJECT_REASONS: Final = (
    "unsigned",
    "unknown_signer",
    "bad_signature",
    "malformed",
    "too_large",
    "too_deep",
    "unsupported_version",
    "unsupported_content",
    "clock_skew",
    "wrong_subject",
    "wrong_kind",
)
"""Every reason an incoming envelope is rejected for: a bounded metric label set."""

_SYNC: Final = "Worknode-Sync"
_TO: Final = "Worknode-To"
_WRITER: Final = "Worknode-Writer"
"""Header on published batches naming the writer, so a replica drops its own echo unopened
(the envelope inside is still what is trusted; the header only saves work)."""
_META_PUBLISHED: Final = "published"
"""Store meta key: ``{"sequence": last publish sequence, "upto": last record published}``."""


class Consistency(enum.Enum):
    """How far a write goes before ``write`` returns and where its delta goes next."""

    LOCAL = "local"
    """Persisted and applied here; published on the next explicit ``sync()``."""
    EVENTUAL = "eventual"
    """Persisted and applied here; published in the next batch (within the flush window)."""


@dataclass(frozen=True, slots=True)
class ReplicaConfig:
    """Bounds and timings of one replica (see module doc)."""

    namespace: str
    subject: str
    flush_interval: float = 0.005
    """Seconds a committed delta may wait for others to join its batch."""
    max_batch_ops: int = 5_000
    """Ops in one published batch; a full batch is flushed at once."""
    max_batch_bytes: int = 256 * 1024
    """Approximate encoded bytes in one batch; kept well under the NATS max payload."""
    max_pending_ops: int = 100_000
    """Committed ops not yet published; beyond it writers get BackpressureError."""
    snapshot_every: int = 20_000
    """Ops (local or remote) after which the state is snapshotted and the log compacted."""
    catchup_timeout: float = 2.0
    """Seconds to wait for a peer's state transfer."""
    catchup_min_interval: float = 0.5
    """Catch-up requests are rate-limited to one per this many seconds."""


class ReplicaObserver(Protocol):
    """Events a replica reports; the service turns them into Prometheus metrics."""

    def committed(self, subject: str, ops: int, seconds: float) -> None: ...
    def published(self, subject: str, ops: int, nbytes: int, seconds: float) -> None: ...
    def applied(self, subject: str, version: int, nbytes: int, lag_ms: float) -> None: ...
    def rejected(self, subject: str, reason: str) -> None: ...
    def gap(self, subject: str, writer: str, missing: int) -> None: ...
    def catchup(self, subject: str, outcome: str) -> None: ...
    def snapshot(self, subject: str, nbytes: int, seconds: float) -> None: ...
    def publish_failed(self, subject: str) -> None: ...


class NullReplicaObserver:
    """Discards every event."""

    def committed(self, subject: str, ops: int, seconds: float) -> None:
        """Ignore."""

    def published(self, subject: str, ops: int, nbytes: int, seconds: float) -> None:
        """Ignore."""

    def applied(self, subject: str, version: int, nbytes: int, lag_ms: float) -> None:
        """Ignore."""

    def rejected(self, subject: str, reason: str) -> None:
        """Ignore."""

    def gap(self, subject: str, writer: str, missing: int) -> None:
        """Ignore."""

    def catchup(self, subject: str, outcome: str) -> None:
        """Ignore."""

    def snapshot(self, subject: str, nbytes: int, seconds: float) -> None:
        """Ignore."""

    def publish_failed(self, subject: str) -> None:
        """Ignore."""


def reject_reason(exc: BaseException) -> str:
    """The bounded metric label for a rejected envelope."""
    table: list[tuple[type[BaseException], str]] = [
        (UnsignedMessageError, "unsigned"),
        (UnknownSignerError, "unknown_signer"),
        (BadSignatureError, "bad_signature"),
        (MessageTooLargeError, "too_large"),
        (MessageTooDeepError, "too_deep"),
        (UnsupportedVersionError, "unsupported_version"),
        (UnsupportedContentError, "unsupported_content"),
        (ClockSkewError, "clock_skew"),
    ]
    for cls, reason in table:
        if isinstance(exc, cls):
            return reason
    return "malformed"


@dataclass(slots=True)
class _Commit:
    record: bytes
    delta: ORMap
    ops: int
    consistency: Consistency
    done: asyncio.Future[None]
    seq: int = 0


def _lacks(mine: Any, theirs: Any) -> bool:
    """Whether context ``mine`` misses a dot that context ``theirs`` has seen."""
    vv = mine.version_vector
    for r, n in theirs.version_vector.items():
        if n > vv.get(r, 0) and not all(mine.covers(r, k) for k in range(vv.get(r, 0) + 1, n + 1)):
            return True
    return any(not mine.covers(r, n) for r, n in theirs.cloud)


def _max_hlc(entry: Any, depth: int = 0) -> int:
    """The greatest LWW timestamp anywhere under ``entry`` (0 if none)."""
    if entry is None or depth > 16:
        return 0
    if isinstance(entry, LWWStore):
        return max((entry[i] for i in range(2, len(entry), 4)), default=0)
    if isinstance(entry, dict):
        return max((_max_hlc(v, depth + 1) for v in entry.values()), default=0)
    if isinstance(entry, Whole):
        return _max_hlc(entry.store, depth + 1)
    return 0


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


class Replica:
    """One subject's replicated tree on this node. ``async with`` or ``start()``/``stop()``."""

    def __init__(
        self,
        *,
        signer: Signer,
        roster: TrustRoster,
        codec: WireCodec,
        transport: Transport,
        store: DurableStore,
        config: ReplicaConfig,
        observer: ReplicaObserver | None = None,
        now_ms: Callable[[], int] = _wall_ms,
    ) -> None:
        self.node_id = signer.node_id
        self.signer = signer
        self.roster = roster
        self.codec = codec
        self.transport = transport
        self.store = store
        self.config = config
        self.observer: ReplicaObserver = observer or NullReplicaObserver()
        self._now_ms = now_ms
        self.clock = HybridClock()
        self.tree = Tree()
        self.delta_subject = delta_subject(config.namespace, config.subject)
        self.sync_subject = sync_subject(config.namespace, config.subject)
        self._mutate_lock = asyncio.Lock()
        self._commits: list[_Commit] = []
        self._commit_wake = asyncio.Event()
        self._pending: ORMap | None = None  # committed EVENTUAL deltas, not yet published
        self._pending_ops = 0
        self._pending_bytes = 0
        self._pending_owned = False
        self._pending_record: bytes | None = None
        self._pending_since = 0.0
        self._pending_upto = 0  # highest store record seq inside the pending batch
        self._published_upto = 0  # every record <= this has been published
        self._queued_ops = 0  # committing + pending + local: bounded by max_pending_ops
        self._local: ORMap | None = None  # committed LOCAL deltas awaiting sync()
        self._local_ops = 0
        self._flush_wake = asyncio.Event()
        self._flushed = asyncio.Event()
        self._sequence = 0
        self._last_seq: dict[str, int] = {}
        self._ops_since_snapshot = 0
        self._last_record_seq = 0
        self._last_catchup = -1e9
        self._catchup_task: asyncio.Task[None] | None = None
        self._snapshot_lock = asyncio.Lock()
        self._background: set[asyncio.Task[Any]] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._subs: list[Subscription] = []
        self._running = False
        self._degraded: BaseException | None = None
        self._snapshot_seq = 0
        self.applied_envelopes = 0
        self._listeners: list[Callable[[Collection[str] | None], None]] = []

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def _headers(self) -> dict[str, str]:
        return {_WRITER: self.node_id}

    async def start(self) -> None:
        """Load durable state, subscribe, start the committer and flusher, catch up. Idempotent."""
        if self._running:
            return
        await self._load()
        self._running = True
        self._tasks = [
            asyncio.create_task(self._committer(), name=f"commit:{self.config.subject}"),
            asyncio.create_task(self._flusher(), name=f"flush:{self.config.subject}"),
        ]
        self._subs.append(
            await self.transport.subscribe(
                self.delta_subject, self._on_delta, on_slow_consumer=self.request_catchup
            )
        )
        self._subs.append(await self.transport.subscribe(self.sync_subject, self._on_sync))
        if self._pending is not None:
            self._flush_wake.set()  # republish what a crash left unpublished
        await self.catch_up()
        await self.announce()

    async def stop(self, flush_timeout: float = 5.0) -> None:
        """Flush pending batches (for at most ``flush_timeout`` s), snapshot, unsubscribe.

        Idempotent.

        Batches that could not be published in time stay durable in the store's log; peers
        get them by catch-up or healing after the restart.
        """
        if not self._running:
            return
        with contextlib.suppress(WorknodeError, TimeoutError):
            await asyncio.wait_for(self.flush(), flush_timeout)
        self._running = False
        for sub in self._subs:
            with contextlib.suppress(WorknodeError):
                await sub.unsubscribe()
        self._subs.clear()
        tasks = [*self._tasks, *([self._catchup_task] if self._catchup_task else [])]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks.clear()
        for c in self._commits:  # queued after the committer stopped: tell the writers
            if not c.done.done():
                c.done.set_exception(ReplicaError("replica stopped before the commit"))
        self._commits.clear()
        with contextlib.suppress(WorknodeError):
            await self._snapshot()

    async def __aenter__(self) -> Replica:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- writing ---------------------------------------------------------------------------

    async def write(
        self, mutator: Mutator | TreeOp, consistency: Consistency = Consistency.EVENTUAL
    ) -> ORMap:
        """Apply one delta-mutator durably; returns its delta once it is acknowledged."""
        return await self.write_many([mutator], consistency)

    async def write_many(
        self, mutators: Sequence[Mutator | TreeOp], consistency: Consistency = Consistency.EVENTUAL
    ) -> ORMap:
        """Apply several writes as one durable commit; returns their joined delta.

        Each write is a ``TreeOp`` (``Assign``, ``Increment``, ``Add``, ``Create``, ``Move``:
        applied in one step, the fast path) or a mutator function
        ``(tree, replica_id, hlc) -> delta`` (its delta is then merged here).

        Consecutive increments of one counter are applied as one increment of their sum (see
        ``coalesce``): the same state, one dot instead of many.

        A mutator that raises (invalid input) stops the sequence: the ones before it are
        committed as usual, then its error is raised. Raises BackpressureError (nothing
        applied) when the publish queue is full, PayloadTooLargeError (nothing applied) for
        more than ``max_batch_ops`` mutators, StoreError if the commit failed (the replica
        then refuses further writes with ReplicaError until it is restarted).
        """
        self._check_writable()
        n = len(mutators)
        if n > self.config.max_batch_ops:
            raise PayloadTooLargeError(
                f"{n} operations in one write, over max_batch_ops={self.config.max_batch_ops}"
            )
        if self._queued_ops + n > self.config.max_pending_ops:
            raise BackpressureError(
                f"{self._queued_ops} ops wait to be published (max_pending_ops="
                f"{self.config.max_pending_ops}); retry later"
            )
        error: BaseException | None = None
        async with self._mutate_lock:
            self._check_writable()  # stop() may have begun while we waited for the lock
            batch = ORMap(is_delta=True)
            done = 0
            tree, node_id, clock, now_ms = self.tree, self.node_id, self.clock, self._now_ms
            pending = list(coalesce(mutators))
            pending.reverse()
            while pending:
                fn, count = pending.pop()
                try:
                    if isinstance(fn, TreeOp):
                        d = fn.apply(tree, node_id, clock.now(now_ms()))  # fused: merged here
                    else:
                        d = fn(tree, node_id, clock.now(now_ms()))
                        tree.merge(d)
                except ValueTooLargeError as exc:
                    if count > 1:  # a run's sum overflows: replay it write by write
                        assert isinstance(fn, Increment)
                        parts = mutators[done : done + count]
                        pending.extend((w, 1) for w in reversed(parts))
                        continue
                    error = exc
                    break
                except (WorknodeError, ValueError, TypeError) as exc:
                    error = exc
                    break
                batch.merge(d)
                done += count
            if not done:
                assert error is not None
                raise error
            self._changed(batch.store.keys() if batch.store else ())
            record = self.codec.encode_document(batch)
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._commits.append(_Commit(record, batch, done, consistency, fut))
            self._queued_ops += done
            self._commit_wake.set()
        await fut
        if error is not None:
            raise error
        return batch

    def _check_writable(self) -> None:
        if not self._running:
            raise NotConnectedError(f"replica of {self.config.subject!r} is not running")
        if self._degraded is not None:
            raise ReplicaError(
                f"replica of {self.config.subject!r} refuses writes after a failed commit "
                f"({self._degraded}); restart it"
            )

    async def sync(self) -> None:
        """Publish every LOCAL write made so far (and anything pending), now."""
        async with self._mutate_lock:
            if self._local is not None:
                self._queue_publish(
                    self._local, self._local_ops, 0, self._last_record_seq, owned=True
                )
                self._local, self._local_ops = None, 0
        await self.flush()

    async def flush(self) -> None:
        """Wait until every committed EVENTUAL write has been published.

        While NATS is unreachable this waits (publishing retries); bound it with
        ``asyncio.timeout`` where that matters. Raises ReplicaError if the replica's
        background tasks died (a bug), instead of waiting forever.
        """
        while self._running and (self._commits or self._pending is not None):
            dead = [t for t in self._tasks if t.done()]
            if dead:
                raise ReplicaError(
                    f"replica of {self.config.subject!r}: background task "
                    f"{dead[0].get_name()} stopped"
                ) from (dead[0].exception() if not dead[0].cancelled() else None)
            self._flushed.clear()
            self._flush_wake.set()
            self._commit_wake.set()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._flushed.wait()

    # -- convenience mutators ----------------------------------------------------------------

    async def create(self, node_id: str, parent: str = "root", **kw: Any) -> ORMap:
        """Create worknode ``node_id`` under ``parent``."""
        return await self.write(Create(node_id, parent), **kw)

    async def move(self, node_id: str, new_parent: str, **kw: Any) -> ORMap:
        """Move worknode ``node_id`` under ``new_parent``."""
        return await self.write(Move(node_id, new_parent), **kw)

    async def delete(self, node_id: str, **kw: Any) -> ORMap:
        """Delete worknode ``node_id`` and its subtree as observed."""
        return await self.write(lambda t, r, ts: t.delete(node_id), **kw)

    async def set(self, node_id: str, path: Sequence[str], value: Any, **kw: Any) -> ORMap:
        """Set a last-writer-wins field of a worknode."""
        return await self.write(Assign(node_id, path, value), **kw)

    async def increment(
        self, node_id: str, path: Sequence[str], amount: int = 1, **kw: Any
    ) -> ORMap:
        """Add ``amount`` to a counter field of a worknode."""
        return await self.write(Increment(node_id, path, amount), **kw)

    async def add(self, node_id: str, path: Sequence[str], element: Any, **kw: Any) -> ORMap:
        """Add ``element`` to a set field of a worknode."""
        return await self.write(Add(node_id, path, element), **kw)

    # -- reading ---------------------------------------------------------------------------

    @property
    def state(self) -> ORMap:
        """The subject's document (the tree's OR-map)."""
        return self.tree.state

    def digest(self) -> bytes:
        """Digest of the subject's state: content and causal context."""
        return self.tree.state.digest()

    def content_digest(self) -> bytes:
        """Digest of the content alone (what readers see), without the causal context.

        Two replicas repaired by the healer hold equal content, while their contexts may
        still differ in dots that no entry holds any more (overwritten or removed writes);
        the next deltas close that gap, and it never changes what either replica shows.
        """
        return digest_entry(self.tree.state.store, key=b"content")

    def hlc(self) -> int:
        """A fresh hybrid timestamp from this replica's clock."""
        return self.clock.now(self._now_ms())

    @property
    def queued_ops(self) -> int:
        """Committed ops not yet published (committing, pending, LOCAL)."""
        return self._queued_ops

    # -- catch-up --------------------------------------------------------------------------
    #
    # Protocol on ``wn.<ns>.sync.<subject>``, every body a signed envelope whose document is a
    # *delta* holding only the sender's causal context (never a bare context in a full state:
    # joining that would delete what it covers). Headers route:
    #   Worknode-Sync: request   -> a peer (the one named in Worknode-To, or any) replies with
    #                               its full state, or an empty delta if the requester has
    #                               seen every dot the peer has;
    #   Worknode-Sync: announce  -> no reply; a receiver missing dots the announcer has sends
    #                               it a request (after a start or reconnect, so peers that
    #                               were away from the announcer's writes catch up too).

    def request_catchup(self) -> None:
        """Ask a peer for its state soon (rate-limited); used after gaps and slow consumers."""
        if not self._running or (self._catchup_task and not self._catchup_task.done()):
            return
        self._catchup_task = asyncio.create_task(self._catchup_later())

    async def _catchup_later(self) -> None:
        wait = self._last_catchup + self.config.catchup_min_interval - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        await self.catch_up()

    def _context_envelope(self) -> bytes:
        probe = ORMap(None, self.tree.state.context.copy(), is_delta=True)
        return self.codec.seal(
            self.signer,
            subject=self.sync_subject,
            hlc=self.clock.now(self._now_ms()),
            sequence=self._sequence,
            document=probe,
        )

    async def announce(self) -> None:
        """Tell peers what this replica has seen, so the ones that lack some of it ask."""
        try:
            await self.transport.publish(
                self.sync_subject, self._context_envelope(), headers={_SYNC: "announce"}
            )
        except TransportError as exc:
            log.debug("announce of %s: %s", self.config.subject, exc)

    async def catch_up(self, peer: str | None = None) -> bool:
        """Fetch a peer's state (``peer`` or any) and join it. Returns whether one answered."""
        self._last_catchup = time.monotonic()
        headers = {_SYNC: "request"}
        if peer is not None:
            headers[_TO] = peer
        try:
            reply = await self.transport.request(
                self.sync_subject,
                self._context_envelope(),
                timeout=self.config.catchup_timeout,
                headers=headers,
            )
        except TransportError as exc:
            self.observer.catchup(self.config.subject, "no_peer")
            log.debug("catch-up of %s: %s", self.config.subject, exc)
            return False
        try:
            env = self.codec.open(reply.data, self.roster, subject=self.sync_subject)
            document = env.document
            if not isinstance(document, ORMap):
                raise MalformedMessageError("catch-up state is not an OR-map")
            # A reply is a full state, or an empty delta ("nothing new"). Never a bare
            # context (an announce probe replayed as a reply would claim dots it lacks).
            if document.is_delta and (document.store or document.context.size()):
                raise MalformedMessageError("a catch-up reply is a full state or empty")
        except CodecError as exc:
            self.observer.rejected(self.config.subject, reject_reason(exc))
            self.observer.catchup(self.config.subject, "rejected")
            return False
        self._apply(document)
        self.observer.catchup(self.config.subject, "ok")
        return True

    async def _on_sync(self, msg: Msg) -> None:
        headers = msg.headers or {}
        kind = headers.get(_SYNC)
        target = headers.get(_TO)
        if target is not None and target != self.node_id:
            return
        try:
            env = self.codec.open(msg.data, self.roster, subject=self.sync_subject)
        except CodecError as exc:
            self.observer.rejected(self.config.subject, reject_reason(exc))
            return
        if env.writer == self.node_id or not isinstance(env.document, ORMap):
            return
        theirs = env.document.context
        if kind == "announce":
            if _lacks(self.tree.state.context, theirs):
                task = asyncio.get_running_loop().create_task(self.catch_up(env.writer))
                self._background.add(task)
                task.add_done_callback(self._background.discard)
            return
        if kind != "request" or not msg.reply:
            return
        mine = self.tree.state
        document = mine if _lacks(theirs, mine.context) else ORMap(is_delta=True)
        try:
            data = self.codec.seal(
                self.signer,
                subject=self.sync_subject,
                hlc=self.clock.now(self._now_ms()),
                sequence=self._sequence,
                document=document,
                is_state=not document.is_delta,
            )
        except MessageTooLargeError:
            log.warning("state of %s too large for one transfer", self.config.subject)
            self.observer.catchup(self.config.subject, "too_large")
            return
        with contextlib.suppress(TransportError):
            await self.transport.respond(msg, data)

    # -- internals: incoming -----------------------------------------------------------------

    async def _on_delta(self, msg: Msg) -> None:
        subject = self.config.subject
        try:
            if msg.headers and msg.headers.get(_WRITER) == self.node_id:
                return  # our own batch, echoed by the server: skip verify and decode
            env = self.codec.open(msg.data, self.roster)
            if env.writer == self.node_id:
                return  # our own batch, echoed by the server
            if env.subject != msg.subject:
                self.observer.rejected(subject, "wrong_subject")
                return
            if not isinstance(env.document, ORMap):
                self.observer.rejected(subject, "wrong_kind")
                return
            self.clock.observe(env.hlc, self._now_ms())
        except (CodecError, ClockSkewError) as exc:
            self.observer.rejected(subject, reject_reason(exc))
            return
        last = self._last_seq.get(env.writer, 0)
        if env.is_state:
            pass
        elif last and env.sequence > last + 1:
            self.observer.gap(subject, env.writer, env.sequence - last - 1)
            self.request_catchup()
        if env.sequence > last:
            self._last_seq[env.writer] = env.sequence
        self._apply(env.document)
        lag_ms = max(0.0, self._now_ms() - (env.hlc >> 16))
        self.observer.applied(subject, env.version, len(msg.data), lag_ms)
        self.applied_envelopes += 1

    def add_change_listener(self, listener: Callable[[Collection[str] | None], None]) -> None:
        """Call ``listener(keys)`` after every change: the top-level keys a delta touched, or
        None when a full state was joined (any key may have changed)."""
        self._listeners.append(listener)

    def _changed(self, keys: Collection[str] | None) -> None:
        for listener in self._listeners:
            listener(keys)

    async def apply_repair(self, delta: ORMap, packed: bytes | None = None) -> None:
        """Join a healer's repair delta durably (logged before this returns); not published:
        the healer repairs every replica itself. ``packed``: ``delta`` as packed document
        bytes (as received), logged instead of encoding ``delta`` again."""
        async with self._mutate_lock:
            self.tree.merge(delta)
            self._changed(delta.store.keys() if delta.store else ())
            record = packed if packed is not None else self.codec.encode_document(delta)
            seq = await asyncio.to_thread(self.store.append, self.config.subject, [record])
            self._last_record_seq = max(self._last_record_seq, seq)

    def _apply(self, document: ORMap) -> None:
        self.tree.merge(document)
        if document.is_delta:
            self._changed(document.store.keys() if document.store else ())
        else:
            self._changed(None)  # a full state: any key may have changed
        self._ops_since_snapshot += max(1, len(document))
        if self._ops_since_snapshot >= self.config.snapshot_every:
            self._ops_since_snapshot = 0
            task = asyncio.get_running_loop().create_task(self._snapshot_quietly())
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    # -- internals: commit, publish, persist ---------------------------------------------------

    async def _committer(self) -> None:
        while True:
            await self._commit_wake.wait()
            self._commit_wake.clear()
            if not self._commits:
                if self._pending is None:
                    self._flushed.set()
                continue
            commits, self._commits = self._commits, []
            t0 = time.perf_counter()
            try:
                seq = await asyncio.to_thread(
                    self.store.append, self.config.subject, [c.record for c in commits]
                )
            except Exception as exc:
                # No rollback (a rebuild from the store would drop other writers' queued
                # commits and reuse their dots): these writes stay in memory, unacknowledged
                # and unpublished, and the replica refuses writes until it is restarted,
                # which reloads exactly what was committed.
                log.error("commit of %s failed: %s", self.config.subject, exc)
                self._degraded = exc
                for c in commits:
                    self._queued_ops -= c.ops
                    if not c.done.done():
                        c.done.set_exception(exc)
                continue
            self._last_record_seq = max(self._last_record_seq, seq)
            for i, c in enumerate(commits):
                c.seq = seq - len(commits) + 1 + i
            ops = sum(c.ops for c in commits)
            self.observer.committed(self.config.subject, ops, time.perf_counter() - t0)
            for c in commits:
                if c.consistency is Consistency.EVENTUAL:
                    self._queue_publish(c.delta, c.ops, len(c.record), c.seq, c.record)
                elif self._local is None:
                    self._local, self._local_ops = c.delta.copy(), c.ops  # the writer has c.delta
                else:
                    self._local.merge(c.delta)
                    self._local_ops += c.ops
                if not c.done.done():
                    c.done.set_result(None)
            self._ops_since_snapshot += ops
            if self._ops_since_snapshot >= self.config.snapshot_every:
                self._ops_since_snapshot = 0
                await self._snapshot_quietly()

    def _queue_publish(
        self,
        delta: ORMap,
        ops: int,
        nbytes: int,
        upto: int,
        record: bytes | None = None,
        *,
        owned: bool = False,
    ) -> None:
        """Join a committed delta into the next batch. ``record``: ``delta`` encoded (its
        durable record); while the batch is that one delta, sealing reuses those bytes.
        ``owned``: no one else holds ``delta`` (else it is copied before anything joins in:
        a writer got it back from ``write_many``)."""
        self._pending_upto = max(self._pending_upto, upto)
        if self._pending is None:
            self._pending, self._pending_owned = delta, owned
            self._pending_record = record
            self._pending_since = time.monotonic()
        else:
            self._own_pending()
            self._pending.merge(delta)
        self._pending_ops += ops
        self._pending_bytes += nbytes
        if (
            self._pending_ops >= self.config.max_batch_ops
            or self._pending_bytes >= self.config.max_batch_bytes // 2
        ):
            self._flush_wake.set()
        elif not self._flush_wake.is_set():
            loop = asyncio.get_running_loop()
            loop.call_later(self.config.flush_interval, self._flush_wake.set)

    def _own_pending(self) -> None:
        """Make the pending batch ours to join into; its record no longer matches it."""
        assert self._pending is not None
        if not self._pending_owned:
            self._pending, self._pending_owned = self._pending.copy(), True
        self._pending_record = None

    async def _flusher(self) -> None:
        backoff = 0.05
        while True:
            await self._flush_wake.wait()
            self._flush_wake.clear()
            if self._pending is None:
                if not self._commits:
                    self._flushed.set()
                continue
            batch, ops, since = self._pending, self._pending_ops, self._pending_since
            upto, record, owned = self._pending_upto, self._pending_record, self._pending_owned
            self._pending, self._pending_ops, self._pending_bytes = None, 0, 0
            self._pending_record = None
            try:
                self._sequence += 1
                data = self.codec.seal(
                    self.signer,
                    subject=self.delta_subject,
                    hlc=self.clock.now(self._now_ms()),
                    sequence=self._sequence,
                    document=batch,
                    packed=record,
                )
                await self.transport.publish(self.delta_subject, data, headers=self._headers)
            except MessageTooLargeError as exc:
                # Cannot ever fit in one message: the writes stay durable here; catch-up (a
                # state transfer) and the healer carry them. Counted, not retried forever.
                self._sequence -= 1
                self._queued_ops -= ops
                self.observer.publish_failed(self.config.subject)
                log.error("batch of %s too large to publish (%s); left to catch-up/healing",
                          self.config.subject, exc)
                continue
            except Exception as exc:
                # Keep the batch (join it back in front of newer deltas) and retry.
                self._sequence -= 1
                self.observer.publish_failed(self.config.subject)
                log.warning("publish of %s failed, retrying: %s", self.config.subject, exc)
                if self._pending is not None:
                    self._own_pending()
                    self._pending.merge(batch)  # joins commute: same batch either way
                else:
                    self._pending, self._pending_owned = batch, owned
                    self._pending_record = record
                self._pending_ops += ops
                self._pending_since = since
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                self._flush_wake.set()
                continue
            backoff = 0.05
            self._queued_ops -= ops
            self._published_upto = max(self._published_upto, upto)
            progress = {"sequence": self._sequence, "upto": self._published_upto}
            try:
                await asyncio.to_thread(
                    self.store.set_meta,
                    self.config.subject,
                    _META_PUBLISHED,
                    json.dumps(progress).encode(),
                )
            except StoreError as exc:  # a restart then republishes a little more: harmless
                log.warning("could not record publish progress of %s: %s",
                            self.config.subject, exc)
            self.observer.published(
                self.config.subject, ops, len(data), time.monotonic() - since
            )
            if self._pending is None and not self._commits:
                self._flushed.set()

    async def _load(self) -> None:
        loaded = await asyncio.to_thread(self.store.load, self.config.subject)
        state = ORMap()
        if loaded.snapshot is not None:
            state = self._decode_stored(loaded.snapshot)
        for _, record in loaded.records:
            state.merge(self._decode_stored(record))
        self.tree = Tree(state)
        self._changed(None)
        self._last_record_seq = loaded.records[-1][0] if loaded.records else loaded.snapshot_seq
        self._snapshot_seq = loaded.snapshot_seq
        raw = await asyncio.to_thread(self.store.get_meta, self.config.subject, _META_PUBLISHED)
        progress = json.loads(raw) if raw else {}
        self._sequence = int(progress.get("sequence", 0))
        self._published_upto = int(progress.get("upto", 0))
        # Committed but never published (a crash between commit and publish): publish them
        # now, so an acknowledged write reaches peers. (LOCAL writes not yet synced when a
        # later EVENTUAL batch went out are not tracked separately; they reach peers by
        # catch-up and healing.)
        unpublished = [(n, r) for n, r in loaded.records if n > self._published_upto]
        if unpublished:
            batch = ORMap(is_delta=True)
            for _, record in unpublished:
                batch.merge(self._decode_stored(record))
            self._pending, self._pending_owned = batch, True
            self._pending_ops = len(unpublished)
            self._pending_upto = unpublished[-1][0]
            self._pending_since = time.monotonic()
            self._queued_ops = len(unpublished)
        # Our own dots keep increasing after a restart (the context does that), and the hybrid
        # clock must not run behind the timestamps already in the state, or a write after a
        # restart on a node whose wall clock stepped back could lose to an older one.
        self.clock = HybridClock(last=_max_hlc(state.store))

    def _decode_stored(self, data: bytes) -> ORMap:
        doc: Causal = self.codec.decode_document(data, ORMap)
        assert isinstance(doc, ORMap)
        return doc

    async def _snapshot(self) -> None:
        # The in-memory state holds every committed record up to ``_last_record_seq`` (writes
        # are applied before they commit), so the snapshot may replace those records.
        async with self._snapshot_lock:
            t0 = time.perf_counter()
            data = self.codec.encode_document(self.tree.state)
            # Keep unpublished records in the log: a restart republishes them.
            upto = max(min(self._last_record_seq, self._published_upto), self._snapshot_seq)
            await asyncio.to_thread(self.store.write_snapshot, self.config.subject, data, upto)
            self._snapshot_seq = upto
            self.observer.snapshot(self.config.subject, len(data), time.perf_counter() - t0)

    async def _snapshot_quietly(self) -> None:
        try:
            await self._snapshot()
        except WorknodeError as exc:  # never kills the committer that called it
            log.error("snapshot of %s failed: %s", self.config.subject, exc)

    def __repr__(self) -> str:
        return f"<Replica {self.node_id} {self.delta_subject}>"
