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
reason. A delta joins only once the causal gate admits it (every dot its context claims is
seen here or carried by it); until then it is held, bounded, and a catch-up is wanted.
Per-writer sequence numbers reveal lost batches; a gap, a held delta, a slow-consumer event,
a reconnect or a start triggers catch-up: a state transfer from a peer over request/reply,
retried with backoff until a peer answers, with requests meanwhile coalesced into one more.

Every decision above is made by the pure ``broker.replication.ReplicationMachine``; this
module is its asyncio driver. One write's path: ``write_many`` -> ``machine.write`` (apply,
delta) -> the committer logs it -> ``Committed`` -> ``Publish`` -> ``_publish`` seals and
sends it; at a peer, ``_on_delta`` opens it -> ``DeltaReceived`` -> gate -> join.

Remote deltas are not logged one by one: the applied state is snapshotted to the store every
``snapshot_every`` ops and on stop, and catch-up refetches what a crash lost. Local writes are
logged before they are acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import json
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Collection, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol, TypeVar

from broker._store_thread import StoreThread, store_thread
from broker.codec import (
    AUTH_HEADER,
    Envelope,
    RateLimiter,
    Signer,
    TrustRoster,
    WireCodec,
    parse_auth,
)
from broker.codec._binding import MAX_LIFETIME_MS
from broker.crdt import (
    Add,
    Assign,
    Causal,
    CausalContext,
    Create,
    HybridClock,
    Increment,
    Move,
    ORMap,
    Tree,
    TreeOp,
    hlc_physical,
)
from broker.crdt._stores import digest_entry
from broker.errors import (
    BadSignatureError,
    ClockSkewError,
    CodecError,
    ExpiredRequestError,
    InvalidArgumentError,
    MalformedMessageError,
    MessageTooDeepError,
    MessageTooLargeError,
    NotConnectedError,
    ReplayedRequestError,
    ReplicaError,
    ResourceExhaustedError,
    StoreError,
    TransportError,
    UnknownSignerError,
    UnsignedMessageError,
    UnsupportedContentError,
    UnsupportedVersionError,
    WorknodeError,
)
from broker.repair import adds_nothing, subset, vouched
from broker.replication import (
    BYZANTINE_REASONS,
    DEFAULT_MAX_HELD_BYTES,
    DEFAULT_MAX_HELD_DELTAS,
    MAX_CUT_WRITERS,
    Action,
    Announce,
    AnnounceReceived,
    CatchupFailed,
    CatchupReplied,
    CatchupWanted,
    Changed,
    Clipped,
    CommitFailed,
    Committed,
    DeltaReceived,
    Event,
    FlushWanted,
    Loaded,
    LogReceived,
    Mutator,
    Publish,
    Published,
    PublishFailed,
    Received,
    ReceivedLogged,
    Reconnected,
    RepairApplied,
    ReplicationConfig,
    ReplicationMachine,
    Report,
    RequestCatchup,
    SaveProgress,
    ScheduleTimer,
    SendState,
    SlowConsumer,
    Snapshot,
    SnapshotTaken,
    Started,
    StateEvidence,
    SyncRequested,
    SyncWanted,
    TimerFired,
    max_hlc,
    own_claims,
    removes,
    without_strong,
)
from broker.store import DurableStore
from broker.transport import (
    EVIDENCE_REPLIES,
    Msg,
    RequestSigner,
    Signers,
    Subscription,
    Transport,
    delta_subject,
    is_reply_subject,
    sync_subject,
)

if TYPE_CHECKING:
    from broker.strong import StrongMode

__all__ = [
    "EVIDENCE_HEADER",
    "FULL_HEADER",
    "REFUSE_REASONS",
    "REJECT_REASONS",
    "SYNC_HEADER",
    "Consistency",
    "Mutator",
    "NullReplicaObserver",
    "Replica",
    "ReplicaConfig",
    "ReplicaObserver",
]

log = logging.getLogger(__name__)
_T = TypeVar("_T")

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
    "expired",
    "replayed",
    "too_much_evidence",
    *BYZANTINE_REASONS,
)
"""Every reason an incoming envelope is rejected for: a bounded metric label set (the last
ones, ``BYZANTINE_REASONS``, name a roster key sending what it cannot have written)."""

REFUSE_REASONS: Final = (
    "unsigned",
    "unknown_signer",
    "bad_signature",
    "expired",
    "replayed",
    "not_served",
    "rate_limited",
    "busy",
    "malformed",
)
"""Every reason a catch-up request is refused for (``ReplicaObserver.catchup_refused``): a
bounded metric label set. ``not_served``: the signer is not one ``serve_to`` names; ``busy``:
the replay guard is full."""

SYNC_HEADER: Final = "Worknode-Sync"
"""Header of the sync subject: ``request`` (a catch-up asks for state) or ``announce``. Part
of the sync protocol other tools speak (``worknode set`` confirms a write with a request)."""
FULL_HEADER: Final = "Worknode-Full"
"""Header on a catch-up request: answer with the full state even if no dot is lacking."""
_SYNC: Final = SYNC_HEADER
_TO: Final = "Worknode-To"
_FULL: Final = FULL_HEADER
_WRITER: Final = "Worknode-Writer"
EVIDENCE_HEADER: Final = "Worknode-Evidence"
"""Header of a message sent ahead of a catch-up answer, holding another writer's signed
batch as it arrived (checked by the asker like any delta: its own writer's signature)."""
_EVIDENCE: Final = EVIDENCE_HEADER
_CUT: Final = "Worknode-Cut"
"""Header on a catch-up answer (signed with it): the writers it cut out (``SendState.cut``),
comma-separated."""
_EVIDENCE_HEADERS: Final = {_EVIDENCE: "1"}
MAX_EVIDENCE_MESSAGES: Final = EVIDENCE_REPLIES
"""Evidence messages an asker takes with one catch-up answer, at most (more are dropped
and counted; the next catch-up brings them)."""
"""Header on published batches naming the writer, so a replica drops its own echo unopened
(the envelope inside is still what is trusted; the header only saves work)."""
_REPLY_SLACK_MS: Final = 1_000
"""A catch-up request lives its timeout and this much more: refused once nobody waits."""
_META_PUBLISHED: Final = "published"
_META_EVIDENCE: Final = "evidence"
"""Meta key of the evidence kept at the last snapshot: each envelope as a 4-byte big-endian
length and its bytes, oldest first."""
"""Store meta key: ``{"sequence": last publish sequence, "upto": last record published}``."""
_PROGRESS_SAVE_DELAY: Final = 0.005
"""Seconds a publish progress save waits, joined with the saves that follow (one commit for
a burst of publishes; after a lone write, once its receivers have applied it rather than in
competition with them for the CPU). Best effort: a restart republishes a little more."""


class Consistency(enum.Enum):
    """How far a write goes before ``write`` returns and where its delta goes next."""

    LOCAL = "local"
    """Persisted and applied here; published on the next explicit ``sync()``."""
    EVENTUAL = "eventual"
    """Persisted and applied here; published in the next batch (within the flush window)."""
    STRONG = "strong"
    """Ordered through the subject's STRONG log (a JetStream stream): acknowledged once the
    stream's quorum stored it and this replica applied it; for STRONG worknodes only (see
    ``broker.strong``). In a minority it fails within its timeout (UnavailableError)."""


@dataclass(frozen=True, slots=True)
class ReplicaConfig:
    """Bounds and timings of one replica (see module doc)."""

    namespace: str
    subject: str
    flush_interval: float = 0.005
    """Seconds a committed delta may wait for others to join its batch."""
    adaptive_flush: bool = True
    """Publish at once when no batch went out during the last flush window (low latency at
    low load); under load one batch per window (``ReplicationConfig.adaptive_flush``)."""
    max_batch_ops: int = 5_000
    """Ops in one published batch; a full batch is flushed at once."""
    max_batch_bytes: int = 256 * 1024
    """Approximate encoded bytes in one batch; kept well under the NATS max payload."""
    publish_alone_bytes: int = 8 * 1024
    """A commit whose record is at least this large is published at once, alone, its record
    reused as the envelope's document (``ReplicationConfig.publish_alone_bytes``; 0: off)."""
    max_pending_ops: int = 100_000
    """Committed ops not yet published; beyond it writers get BackpressureError."""
    snapshot_every: int = 20_000
    """Ops (local or remote) after which the state is snapshotted and the log compacted."""
    catchup_timeout: float = 2.0
    """Seconds to wait for a peer's state transfer."""
    catchup_min_interval: float = 0.5
    """Catch-up requests are rate-limited to one per this many seconds."""
    catchup_max_backoff: float = 10.0
    """Seconds between retries of a failing catch-up at most (the backoff doubles up to it)."""
    max_held_deltas: int = DEFAULT_MAX_HELD_DELTAS
    """Peers' deltas the causal gate holds at most; beyond it the oldest is evicted."""
    max_held_bytes: int = DEFAULT_MAX_HELD_BYTES
    """Bytes of held deltas at most; beyond it the oldest is evicted."""
    max_hold: float = 30.0
    """Seconds a held delta waits for its claims at most; then rejected (``unbacked_context``)."""
    max_evidence_bytes: int = 6 * 1024 * 1024
    """Bytes of other writers' signed batches and states kept as evidence, at most."""
    catchup_serve_rate: float = 5.0
    """Catch-up requests served per second to one requesting peer, sustained (a peer's
    machine asks at most once per ``catchup_min_interval``; more is a replay or a flood)."""
    catchup_serve_burst: float = 10.0
    """Catch-up requests one peer may have served back to back before the rate applies."""
    add_only: bool = False
    """The subject only grows: documents and local writes that would remove a dot are
    refused (``ReplicationConfig.add_only``)."""
    strong_prefixes: tuple[str, ...] = ()
    """Worknode ids starting with one of these are STRONG: written and read only with
    ``Consistency.STRONG`` through the subject's STRONG log (``broker.strong``); "" makes
    every worknode of the subject STRONG. Empty: none."""

    def replication(self) -> ReplicationConfig:
        """The replication machine's part of this configuration."""
        return ReplicationConfig(
            flush_interval=self.flush_interval,
            adaptive_flush=self.adaptive_flush,
            max_batch_ops=self.max_batch_ops,
            max_batch_bytes=self.max_batch_bytes,
            publish_alone_bytes=self.publish_alone_bytes,
            max_pending_ops=self.max_pending_ops,
            snapshot_every=self.snapshot_every,
            catchup_timeout=self.catchup_timeout,
            catchup_min_interval=self.catchup_min_interval,
            catchup_max_backoff=self.catchup_max_backoff,
            max_held_deltas=self.max_held_deltas,
            max_held_bytes=self.max_held_bytes,
            max_hold=self.max_hold,
            max_evidence_bytes=self.max_evidence_bytes,
            add_only=self.add_only,
            strong_prefixes=self.strong_prefixes,
        )


class ReplicaObserver(Protocol):
    """Events a replica reports; the service turns them into Prometheus metrics."""

    def committed(self, subject: str, ops: int, seconds: float) -> None: ...
    def published(self, subject: str, ops: int, nbytes: int, seconds: float) -> None: ...
    def applied(self, subject: str, version: int, nbytes: int, lag_ms: float) -> None: ...
    def rejected(self, subject: str, reason: str, writer: str | None = None) -> None: ...
    def gap(self, subject: str, writer: str, missing: int) -> None: ...
    def catchup(self, subject: str, outcome: str) -> None: ...
    def snapshot(self, subject: str, nbytes: int, seconds: float) -> None: ...
    def publish_failed(self, subject: str) -> None: ...
    def gated(self, subject: str, outcome: str) -> None:
        """A peer's delta was ``held`` by the causal gate, later ``drained``, or ``evicted``
        from a full hold (then left to catch-up)."""

    def catchup_served(self, subject: str, nbytes: int) -> None:
        """A peer's catch-up request was answered with ``nbytes`` bytes (state or empty)."""

    def catchup_refused(self, subject: str, reason: str) -> None:
        """A catch-up request was refused unanswered, for ``reason`` (``REFUSE_REASONS``)."""

    def stripped(self, subject: str, relay: str, owners: int) -> None:
        """A relayed state (``relay``'s catch-up answer or kept state) carried dots of
        ``owners`` other writers this replica had not seen: left out, asked of their
        writers (their own signed batches or states)."""

    def evidence(self, subject: str, forwarded: int, kept_bytes: int) -> None:
        """A catch-up answer went out with ``forwarded`` kept batches/states of other
        writers; ``kept_bytes`` are kept in all (``max_evidence_bytes`` bounds them)."""


class NullReplicaObserver:
    """Discards every event."""

    def committed(self, subject: str, ops: int, seconds: float) -> None:
        """Ignore."""

    def published(self, subject: str, ops: int, nbytes: int, seconds: float) -> None:
        """Ignore."""

    def applied(self, subject: str, version: int, nbytes: int, lag_ms: float) -> None:
        """Ignore."""

    def rejected(self, subject: str, reason: str, writer: str | None = None) -> None:
        """Ignore."""

    def gap(self, subject: str, writer: str, missing: int) -> None:
        """Ignore."""

    def catchup(self, subject: str, outcome: str) -> None:
        """Ignore."""

    def snapshot(self, subject: str, nbytes: int, seconds: float) -> None:
        """Ignore."""

    def publish_failed(self, subject: str) -> None:
        """Ignore."""

    def gated(self, subject: str, outcome: str) -> None:
        """Ignore."""

    def catchup_served(self, subject: str, nbytes: int) -> None:
        """Ignore."""

    def catchup_refused(self, subject: str, reason: str) -> None:
        """Ignore."""

    def stripped(self, subject: str, relay: str, owners: int) -> None:
        """Ignore."""

    def evidence(self, subject: str, forwarded: int, kept_bytes: int) -> None:
        """Ignore."""


def reject_reason(exc: BaseException) -> str:
    """The bounded metric label for a rejected envelope."""
    table: list[tuple[type[BaseException], str]] = [
        (UnsignedMessageError, "unsigned"),
        (UnknownSignerError, "unknown_signer"),
        (ReplayedRequestError, "replayed"),
        (ExpiredRequestError, "expired"),
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
    delta: ORMap | None
    """The local write's delta (encoded as a record by the committer); None for received
    state logged on its own (``LogReceived``)."""
    ops: int
    consistency: Consistency
    done: asyncio.Future[None] | None
    received: list[bytes]
    """Received state the write was applied over, logged before it (``Written.received``)."""


@dataclass(frozen=True, slots=True)
class _Group:
    """Consecutive writes committed as one record (``Replica._close_run``)."""

    index: int
    """The record's place in its transaction."""
    members: list[_Commit]
    delta: ORMap
    """Their deltas joined."""
    record: bytes
    ops: int
    eventual: bool


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


class Replica:
    """One subject's replicated tree on this node. ``async with`` or ``start()``/``stop()``.

    The asyncio driver of a ``ReplicationMachine``: it turns I/O outcomes into the machine's
    events and executes the actions the machine returns (see the module doc).
    """

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
        serve_to: Signers = None,
        requests: RequestSigner | None = None,
    ) -> None:
        """``serve_to``: who may have catch-up requests served (ids, a callable giving them
        now, or None: any roster member; never this replica itself); ``requests``: the signer
        of sync requests and replies (default: ``signer`` over ``roster``, ``now_ms``)."""
        self.node_id = signer.node_id
        self.signer = signer
        self.roster = roster
        self.codec = codec
        self.transport = transport
        self.store = store
        self.config = config
        self.observer: ReplicaObserver = observer or NullReplicaObserver()
        self._now_ms = now_ms
        self.requests = (
            requests if requests is not None else RequestSigner(signer, roster, wall_ms=now_ms)
        )
        """Signs this replica's sync requests and replies, verifies peers' (replay guard)."""
        self.serve_to: Signers = serve_to
        self._serve_limit = RateLimiter(config.catchup_serve_rate, config.catchup_serve_burst)
        self.machine = ReplicationMachine(self.node_id, config.replication())
        """The pure machine deciding what this replica does (replaced on ``start``)."""
        self.delta_subject = delta_subject(config.namespace, config.subject)
        self.sync_subject = sync_subject(config.namespace, config.subject)
        self._mutate_lock = asyncio.Lock()
        self.strong: StrongMode | None = None
        """The STRONG side (``broker.strong.StrongMode``), attached by the service when the
        subject declares STRONG worknodes."""
        self._commits: list[_Commit] = []
        self._commit_wake = asyncio.Event()
        self._progress = asyncio.Event()  # set after every machine step: flush() re-checks
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._catchup_done: asyncio.Future[bool] | None = None
        self._snapshot_lock = asyncio.Lock()
        self._progress_lock = asyncio.Lock()
        self._saved_sequence = 0
        self._background: set[asyncio.Task[Any]] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._subs: list[Subscription] = []
        self._running = False
        self._degraded: BaseException | None = None
        self.applied_envelopes = 0
        self.load_errors: list[tuple[str, str]] = []
        """``(key, reason)`` of every top-level key left out of the stored state on load."""
        self._listeners: list[Callable[[Collection[str] | None], None]] = []
        self._store_thread: StoreThread | None = None
        self._progress_due: SaveProgress | None = None
        self._progress_timer: asyncio.TimerHandle | None = None
        self._presealed: tuple[int, ORMap, bytes, bytes] | None = None
        """``(sequence, delta, record, envelope)``: a lone commit's batch sealed while the
        store made it durable (``_preseal``); used only by the ``Publish`` of exactly it."""

    # -- the machine ---------------------------------------------------------------------------

    @property
    def tree(self) -> Tree:
        """The subject's tree (owned by the machine)."""
        return self.machine.tree

    @property
    def clock(self) -> HybridClock:
        """The hybrid clock stamping this replica's writes and envelopes."""
        return self.machine.clock

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    def _handle(self, event: Event) -> None:
        self._run(self.machine.handle(event))

    def _run(self, actions: list[Action]) -> None:
        """Execute the machine's actions, in order (I/O ones as tasks: the machine keeps at
        most one publish and one catch-up in flight)."""
        for a in actions:
            if isinstance(a, Changed):
                self._changed(a.keys)
            elif isinstance(a, Report):
                if a.event == "applied":
                    self.applied_envelopes += 1
                report = getattr(self.observer, a.event, None)
                if report is not None:
                    report(self.config.subject, *a.args)
            elif isinstance(a, ScheduleTimer):
                old = self._timers.pop(a.name, None)
                if old is not None:
                    old.cancel()
                loop = asyncio.get_running_loop()
                self._timers[a.name] = loop.call_at(a.at, self._fire, a.name, a.at)
            elif isinstance(a, Publish):
                self._spawn(self._publish(a))
            elif isinstance(a, SaveProgress):
                self._progress_due = a  # a later save covers an earlier one
                if self._progress_timer is None:
                    self._progress_timer = asyncio.get_running_loop().call_later(
                        _PROGRESS_SAVE_DELAY, self._save_due)
            elif isinstance(a, RequestCatchup):
                self._catchup_done = asyncio.get_running_loop().create_future()
                self._spawn(self._catchup(a, self._catchup_done))
            elif isinstance(a, SendState):
                self._spawn(self._send_state(a))
            elif isinstance(a, Announce):
                self._spawn(self.announce())
            elif isinstance(a, Snapshot):
                self._spawn(self._snapshot_quietly())
            elif isinstance(a, LogReceived):
                # Queued behind the commits already waiting, ahead of later ones: a later
                # write's causal past is then logged before it, or the write fails with it.
                received = [r for r in map(self._received_record, a.envelopes) if r]
                self._commits.append(
                    _Commit(None, 0, Consistency.EVENTUAL, None, received)
                )
                self._commit_wake.set()
        self._progress.set()

    def _save_due(self) -> None:
        self._progress_timer = None
        action, self._progress_due = self._progress_due, None
        if action is not None and self._running:
            self._spawn(self._save_progress(action))

    def _fire(self, name: str, at: float) -> None:
        self._timers.pop(name, None)
        if self._running:
            # A timer may run a hair before its time (the loop's clock resolution).
            self._handle(TimerFired(max(self._now(), at), name))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _in_store(self, fn: Callable[..., _T], /, *args: Any, **kwargs: Any) -> Awaitable[_T]:
        """``fn(*args, **kwargs)`` (a call of the store) on the store's own thread, never on
        the event loop: cheaper than ``asyncio.to_thread`` per call (``broker._store_thread``)."""
        if self._store_thread is None:
            self._store_thread = store_thread(self.store)
        return self._store_thread.run(fn, *args, **kwargs)

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def _headers(self) -> dict[str, str]:
        return {_WRITER: self.node_id}

    async def start(self) -> None:
        """Load durable state, subscribe, start the committer, republish, catch up. Idempotent."""
        if self._running:
            return
        await self._load()
        self._running = True
        self._tasks = [
            asyncio.create_task(self._committer(), name=f"commit:{self.config.subject}"),
        ]
        self._subs.append(
            await self.transport.subscribe(
                self.delta_subject, self._on_delta, on_slow_consumer=self._on_slow_consumer
            )
        )
        self._subs.append(await self.transport.subscribe(self.sync_subject, self._on_sync))
        self._handle(Started(self._now(), self._now_ms()))
        await self._catchup_outcome()  # the first attempt; retries go on in the background

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
        for handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
        if self._progress_timer is not None:
            self._progress_timer.cancel()
            self._progress_timer = None
        tasks = [*self._tasks, *self._background]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks.clear()
        for c in self._commits:  # queued after the committer stopped: tell the writers
            if c.done is not None and not c.done.done():
                c.done.set_exception(ReplicaError("replica stopped before the commit"))
        self._commits.clear()
        due, self._progress_due = self._progress_due, None
        if due is not None:
            with contextlib.suppress(WorknodeError):
                await self._save_progress(due)
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
        if consistency is Consistency.STRONG:
            return await self._write_strong(mutators)
        self._check_writable()
        self.machine.admit(len(mutators))
        async with self._mutate_lock:
            self._check_writable()  # stop() may have begun while we waited for the lock
            written = self.machine.write(mutators, self._now_ms)
            self._run(written.actions)
            received = [r for r in map(self._received_record, written.received) if r]
            if any(len(r) > self.store.max_record_bytes for r in received):
                # A catch-up state too large for one record: a snapshot (the state holds it)
                # makes it durable instead. If that fails, this write cannot be made durable
                # with its causal past: it fails as a failed commit does (the replica then
                # refuses writes until a restart reloads what is durable).
                try:
                    await self._snapshot()
                    received = []
                except WorknodeError as exc:
                    log.error("snapshot of %s before a write failed: %s",
                              self.config.subject, exc)
                    self._degraded = exc
                    self._handle(CommitFailed(self._now(), written.ops))
                    raise
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._commits.append(
                _Commit(written.delta, written.ops, consistency, fut, received)
            )
            self._commit_wake.set()
        await fut
        if written.error is not None:
            raise written.error
        return written.delta

    async def _write_strong(self, mutators: Sequence[Mutator | TreeOp]) -> ORMap:
        """``write_many`` with ``Consistency.STRONG``: through ``self.strong``."""
        if self.strong is None:
            raise InvalidArgumentError(
                f"subject {self.config.subject!r} has no STRONG log here: STRONG writes need "
                "strong_prefixes and a JetStream server")
        ops = [m for m in mutators if isinstance(m, TreeOp)]
        if len(ops) != len(mutators):
            raise InvalidArgumentError("a STRONG write is a list of TreeOps, not functions")
        self._check_writable()
        await self.strong.write(ops)
        return subset(self.machine.state, [str(getattr(op, "node", "")) for op in ops])

    def apply_log(self, seq: int, delta: ORMap | None, key: str | None, writer: str) -> None:
        """Apply STRONG log entry ``seq`` (``StrongMode`` calls it in log order)."""
        self._run(self.machine.apply_log(seq, delta, key, writer))
        self._progress.set()

    def _record(self, state: ORMap) -> bytes:
        """``state`` as a store record: unpacked where the fast writer can (cheaper to
        write), packed when that is too large for the store."""
        data = self.codec.encode_record(state)
        if len(data) > self.store.max_record_bytes and data[:1] == b"\x00":
            data = self.codec.encode_document(state)
        return data

    def _received_record(self, raw: Received) -> bytes:
        """The document of a received envelope (verified when it arrived), as a store record
        (of a clipped one, the part joined)."""
        try:
            if isinstance(raw, Clipped):
                return self.codec.encode_document(raw.document)
            return self.codec.packed_document(raw)  # opened (verified, decoded) on arrival
        except CodecError as exc:  # it opened when it arrived: only a codec defect gets here
            log.error("received state of %s not logged with a local write: %s",
                      self.config.subject, exc)
            return b""

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
            self._handle(SyncWanted(self._now()))
        await self.flush()

    async def flush(self) -> None:
        """Wait until every committed EVENTUAL write has been published.

        While NATS is unreachable this waits (publishing retries); bound it with
        ``asyncio.timeout`` where that matters. Raises ReplicaError if the replica's
        committer died (a bug), instead of waiting forever.
        """
        while self._running and (self._commits or not self.machine.idle):
            dead = [t for t in self._tasks if t.done()]
            if dead:
                raise ReplicaError(
                    f"replica of {self.config.subject!r}: background task "
                    f"{dead[0].get_name()} stopped"
                ) from (dead[0].exception() if not dead[0].cancelled() else None)
            self._progress.clear()
            self._commit_wake.set()
            if not self._commits:
                self._handle(FlushWanted(self._now()))
                self._progress.clear()
            if not self._commits and self.machine.idle:
                break
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._progress.wait()

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
        return self.machine.state

    def digest(self) -> bytes:
        """Digest of the subject's state: content and causal context."""
        return self.machine.state.digest()

    def content_digest(self) -> bytes:
        """Digest of the content alone (what readers see), without the causal context.

        Two replicas repaired by the healer hold equal content, while their contexts may
        still differ in dots that no entry holds any more (overwritten or removed writes);
        the next deltas close that gap, and it never changes what either replica shows.
        """
        return digest_entry(self.machine.state.store, key=b"content")

    def hlc(self) -> int:
        """A fresh hybrid timestamp from this replica's clock."""
        return self.clock.now(self._now_ms())

    @property
    def queued_ops(self) -> int:
        """Committed ops not yet published (committing, pending, LOCAL)."""
        return self.machine.queued_ops

    @property
    def held_deltas(self) -> int:
        """Peers' deltas the causal gate holds until what they claim arrives."""
        return self.machine.held

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
    # Every request and announce carries a Worknode-Auth (broker.codec's binding): its headers
    # (request vs announce, Worknode-To, Worknode-Full), body, expiry and the requester's inbox
    # root are signed, and a second delivery is refused (replay guard). That header is checked
    # before the envelope is opened, so a refusal costs one signature check at most. A request
    # is served only to ``serve_to`` (default: the roster), within a rate per requester; its
    # reply is signed and bound to the request, so the requester accepts no other answer (a
    # captured "nothing new" replayed to a later request is rejected and the catch-up retried).
    # When to ask, whom, and how often to retry is the machine's decision.

    def request_catchup(self) -> None:
        """Ask a peer for its state soon (coalesced, rate-limited, retried until one answers);
        used after gaps, slow consumers and reconnects."""
        if self._running:
            self._handle(CatchupWanted(self._now()))

    def reconnected(self) -> None:
        """The transport reconnected: catch up (retried until a peer answers) and announce,
        so peers that missed this replica's batches meanwhile ask for them too."""
        if self._running:
            self._handle(Reconnected(self._now()))

    def _on_slow_consumer(self) -> None:
        if self._running:
            self._handle(SlowConsumer(self._now()))

    def _context_envelope(self, context: CausalContext | None = None) -> bytes:
        probe = ORMap(
            None, self.machine.state.context.copy() if context is None else context,
            is_delta=True,
        )
        return self.codec.seal(
            self.signer,
            subject=self.sync_subject,
            hlc=self.clock.now(self._now_ms()),
            sequence=self.machine.sequence,
            document=probe,
        )

    async def announce(self) -> None:
        """Tell peers what this replica has seen, so the ones that lack some of it ask."""
        body = self._context_envelope()
        # Signed to expect no reply (no inbox root): replayed as a request, it fails.
        headers, _ = self.requests.sign(self.sync_subject, body, {_SYNC: "announce"})
        try:
            await self.transport.publish(self.sync_subject, body, headers=headers)
        except TransportError as exc:
            log.debug("announce of %s: %s", self.config.subject, exc)

    async def catch_up(self, peer: str | None = None) -> bool:
        """Fetch a peer's state (``peer`` or any) and join it now (or wait for the catch-up
        already running). Returns whether a peer answered."""
        if not self._running:
            return False
        self._handle(CatchupWanted(self._now(), peer, urgent=True))
        return await self._catchup_outcome()

    async def _catchup_outcome(self) -> bool:
        """Whether the running (or last) catch-up got an answer; False if it was cancelled."""
        fut = self._catchup_done
        if fut is None:
            return False
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            if fut.cancelled():
                return False
            raise

    async def _catchup(self, action: RequestCatchup, done: asyncio.Future[bool]) -> None:
        headers = {_SYNC: "request"}
        if action.peer is not None:
            headers[_TO] = action.peer
        if action.full:
            headers[_FULL] = "1"
        rejected: list[CodecError | ClockSkewError] = []
        evidence: list[bytes] = []
        dropped: list[bool] = []  # evidence past MAX_EVIDENCE_MESSAGES (the answer's may be)
        event: Event
        try:
            # The context sent is the one the answer is judged against (with the evidence
            # that comes with it): see ``CatchupReplied.vouch``.
            asked = self.machine.state.context.copy()
            body = self._context_envelope(asked)
            lifetime = min(MAX_LIFETIME_MS, math.ceil(action.timeout * 1000) + _REPLY_SLACK_MS)
            signed, auth = self.requests.sign(
                self.sync_subject, body, headers,
                reply_root=self.transport.reply_root, lifetime_ms=lifetime,
            )
            peers = None if action.peer is None else (action.peer,)
            opened: list[tuple[Msg, Envelope, ORMap]] = []

            def accept(reply: Msg) -> bool:
                # The first answer that is bound to this very request, signed by the peer
                # asked (or any roster member but this one) and sealing a state that peer
                # wrote. Any other (a captured answer replayed, a relay) is counted and
                # dropped, and the wait goes on for the real one.
                if reply.headers and reply.headers.get(_EVIDENCE):
                    # Another writer's signed batch, sent ahead of the answer: checked
                    # below as a delta of its own writer's, whoever forwarded it.
                    if len(evidence) < MAX_EVIDENCE_MESSAGES:
                        evidence.append(reply.data)
                    else:
                        dropped.append(True)
                        self.observer.rejected(self.config.subject, "too_much_evidence")
                    return False
                try:
                    replier = self.requests.check_reply(reply, auth, peers)
                    if replier == self.node_id:
                        raise BadSignatureError("a catch-up reply signed by this replica")
                    if peers is None and replier not in self.roster.with_role("node"):
                        # The first answer ends the wait: only a node's may (a writer's
                        # key, the least guarded, would otherwise answer "nothing new" to
                        # every catch-up). A peer asked by name may answer whatever it is.
                        raise BadSignatureError(
                            f"a catch-up answered by {replier!r}, not a node of the roster"
                        )
                    env = self.codec.open(reply.data, self.roster, subject=self.sync_subject)
                    self.clock.observe(env.hlc, self._now_ms())
                    if env.writer != replier:
                        raise BadSignatureError(
                            f"catch-up state sealed by {env.writer!r}, answered by {replier!r}"
                        )
                    document = env.document
                    if not isinstance(document, ORMap):
                        raise MalformedMessageError("catch-up state is not an OR-map")
                    # A full state, or an empty delta ("nothing new"). Never a bare context
                    # (an announce probe replayed as a reply would claim dots it lacks).
                    if document.is_delta and (document.store or document.context.size()):
                        raise MalformedMessageError("a catch-up reply is a full state or empty")
                except (CodecError, ClockSkewError) as exc:
                    rejected.append(exc)
                    self.observer.rejected(self.config.subject, reject_reason(exc))
                    return False
                opened.append((reply, env, document))
                return True

            await self.transport.request_many(
                self.sync_subject, body, timeout=action.timeout, max_replies=1,
                headers=signed, accept=accept,
            )
            if opened:
                reply, env, document = opened[0]
                cut = (reply.headers or {}).get(_CUT, "")
                event = CatchupReplied(
                    self._now(), env.writer, env.sequence, document, raw=reply.data,
                    hlc=env.hlc, vouch=asked, evidence_dropped=bool(dropped),
                    # Only writers of the roster: a name nobody can answer for would be owed
                    # (and asked, and each later catch-up followed up) until given up.
                    cut=tuple(w for w in cut.split(",")[:MAX_CUT_WRITERS] if w in self.roster)
                    if cut else (),
                )
            else:
                event = CatchupFailed(self._now(), "rejected" if rejected else "no_peer")
        except TransportError as exc:
            log.debug("catch-up of %s: %s", self.config.subject, exc)
            event = CatchupFailed(self._now(), "no_peer")
        except CodecError as exc:
            self.observer.rejected(self.config.subject, reject_reason(exc))
            event = CatchupFailed(self._now(), "rejected")
        except asyncio.CancelledError:
            done.cancel()  # stopping: whoever waits gets "no answer"
            raise
        if self._running:
            # The evidence first: the answer's state is then measured against a context
            # that holds what the evidence brought.
            vouch = event.vouch if isinstance(event, CatchupReplied) else None
            for data in evidence:
                received = self._open_evidence(data, vouch)
                if received is not None:
                    self._handle(received)
        done.set_result(isinstance(event, CatchupReplied))
        if self._running:
            self._handle(event)  # may start the next catch-up (retry or coalesced want)

    async def _send_state(self, action: SendState) -> None:
        msg: Msg = action.reply_to
        try:
            data = self.codec.seal(
                self.signer,
                subject=self.sync_subject,
                hlc=self.clock.now(self._now_ms()),
                sequence=self.machine.sequence,
                document=action.document,
                is_state=not action.document.is_delta,
            )
        except MessageTooLargeError:
            log.warning("state of %s too large for one transfer", self.config.subject)
            self.observer.catchup(self.config.subject, "too_large")
            return
        # Bound to the request it answers (the cut list under the same signature).
        headers = self.requests.reply_headers(
            msg, data, {_CUT: ",".join(action.cut)} if action.cut else None)
        try:
            for batch in action.evidence:  # ahead of the answer, which ends the asker's wait
                await self.transport.respond(msg, batch, headers=_EVIDENCE_HEADERS)
            if action.evidence:
                self.observer.evidence(
                    self.config.subject, len(action.evidence), self.machine.evidence_bytes)
            await self.transport.respond(msg, data, headers=headers)
        except TransportError:
            return
        self.observer.catchup_served(self.config.subject, len(data))

    def _refuse(self, reason: str, msg: Msg, exc: BaseException | None = None) -> None:
        """Count a catch-up request refused unanswered."""
        self.observer.catchup_refused(self.config.subject, reason)
        log.debug("catch-up request on %s refused (%s): %s", msg.subject, reason, exc)

    def _verify_sync(self, msg: Msg, kind: str | None) -> str | None:
        """The verified signer of sync message ``msg`` (refusals counted), or None to drop
        it. Only headers and a signature are checked here: the envelope is not opened yet."""
        headers = msg.headers or {}
        try:
            claimed: str | None = parse_auth(headers.get(AUTH_HEADER)).signer
        except CodecError:
            claimed = None  # verify below refuses it and says why
        if claimed == self.node_id:
            return None  # our own request or announce, echoed by the server
        if kind == "request":
            if not msg.reply or not is_reply_subject(msg.reply):
                # No answer expected, or one that would make this node publish elsewhere.
                self._refuse("malformed", msg)
                return None
            allowed = self.serve_to() if callable(self.serve_to) else self.serve_to
            if claimed is not None and allowed is not None and claimed not in allowed:
                # Refused before any signature work; a name the roster lacks says so.
                self._refuse("not_served" if claimed in self.roster else "unknown_signer", msg)
                return None
        try:
            auth = self.requests.verify(msg)
        except (CodecError, ResourceExhaustedError) as exc:
            reason = "busy" if isinstance(exc, ResourceExhaustedError) else reject_reason(exc)
            if kind == "request":
                self._refuse(reason if reason in REFUSE_REASONS else "malformed", msg, exc)
            else:
                self.observer.rejected(self.config.subject, reason, claimed)
            return None
        if kind == "request" and not self._serve_limit.allow(auth.signer, self._now_ms()):
            self._refuse("rate_limited", msg)
            return None
        return auth.signer

    async def _on_sync(self, msg: Msg) -> None:
        headers = msg.headers or {}
        kind = headers.get(_SYNC)
        target = headers.get(_TO)
        if kind not in ("request", "announce"):
            return
        if target is not None and target != self.node_id:
            return
        signer = self._verify_sync(msg, kind)
        if signer is None:
            return
        try:
            env = self.codec.open(msg.data, self.roster, subject=self.sync_subject)
        except CodecError as exc:
            self.observer.rejected(self.config.subject, reject_reason(exc), signer)
            return
        if env.writer != signer:
            # Another replica's envelope inside this signer's request: not what it says.
            self.observer.rejected(self.config.subject, "bad_signature", signer)
            return
        if not isinstance(env.document, ORMap):
            return
        theirs = env.document.context
        if kind == "announce":
            self._handle(AnnounceReceived(self._now(), env.writer, theirs, env.sequence))
        else:
            self._handle(SyncRequested(self._now(), theirs, msg, full=headers.get(_FULL) == "1"))

    # -- internals: incoming -----------------------------------------------------------------

    async def _on_delta(self, msg: Msg) -> None:
        if msg.headers and msg.headers.get(_WRITER) == self.node_id:
            return  # our own batch, echoed by the server: skip verify and decode
        claimed = msg.headers.get(_WRITER) if msg.headers else None
        received = self._open_delta(msg.data, msg.subject, claimed)
        if received is not None:
            self._handle(received)

    def _open_evidence(
        self, data: bytes, vouch: CausalContext | None = None
    ) -> DeltaReceived | StateEvidence | None:
        """Evidence forwarded with a catch-up answer: another writer's delta batch (sealed
        for the delta subject) or its full state (sealed for the sync subject, as a catch-up
        answer of its own), verified against that writer's key; None if refused (counted)
        or this replica's own. Its writer's own dots join ``vouch`` (the answer was cut to
        them too: ``CatchupReplied.vouch``), this replica's own batches included."""
        try:
            env = self.codec.open(data, self.roster)
            if vouch is not None and isinstance(env.document, ORMap) and env.subject in (
                self.delta_subject, self.sync_subject
            ):
                vouch.merge(own_claims(env.document.context, env.writer))
            if env.subject == self.delta_subject:
                return self._open_delta(data, self.delta_subject)
            if (
                env.subject != self.sync_subject
                or not isinstance(env.document, ORMap)
                or env.document.is_delta
            ):
                raise MalformedMessageError("evidence is a writer's delta batch or full state")
            if env.writer == self.node_id:
                return None
            self.clock.observe(env.hlc, self._now_ms())
        except (CodecError, ClockSkewError) as exc:
            self.observer.rejected(self.config.subject, reject_reason(exc))
            return None
        return StateEvidence(self._now(), env.writer, env.document, data, env.hlc)

    def _open_delta(
        self, data: bytes, subject: str, claimed: str | None = None
    ) -> DeltaReceived | None:
        """A delta batch received on ``subject`` (or forwarded as evidence), verified and
        decoded, or None (a refusal counted; ``claimed``: the writer an unsigned header
        names, a lead for the log, not a proof)."""
        try:
            env = self.codec.open(data, self.roster)
            if env.writer == self.node_id:
                return None  # our own batch, echoed by the server (or forwarded back)
            if env.subject != subject:
                self.observer.rejected(self.config.subject, "wrong_subject", env.writer)
                return None
            if not isinstance(env.document, ORMap):
                self.observer.rejected(self.config.subject, "wrong_kind", env.writer)
                return None
            now_ms = self._now_ms()
            self.clock.observe(env.hlc, now_ms)
        except (CodecError, ClockSkewError) as exc:
            self.observer.rejected(self.config.subject, reject_reason(exc), claimed)
            return None
        lag_ms = max(0.0, now_ms - (env.hlc >> 16))
        return DeltaReceived(
            self._now(), env.writer, env.sequence, env.document, len(data),
            (env.version, len(data), lag_ms), raw=data, hlc=env.hlc,
        )

    def add_change_listener(self, listener: Callable[[Collection[str] | None], None]) -> None:
        """Call ``listener(keys)`` after every change: the top-level keys a delta touched, or
        None when a full state was joined (any key may have changed)."""
        self._listeners.append(listener)

    def _changed(self, keys: Collection[str] | None) -> None:
        for listener in self._listeners:
            listener(keys)

    async def apply_repair(
        self, delta: ORMap, packed: bytes | None = None, *, stripped: Sequence[str] = (),
        hlc: int | None = None,
    ) -> None:
        """Join a repair delta durably (logged before this returns); not published: the
        healer repairs every replica itself. ``packed``: ``delta`` as packed document bytes,
        logged instead of encoding ``delta`` again. A repair that changes nothing (a replayed
        or re-sent one: ``broker.repair.adds_nothing``) is not logged, so replaying it cannot
        grow the store. ``stripped``: writers whose dots its source could not vouch for
        (``apply_voucher``): each is owed a catch-up. No check here: a healer's repairs go
        through ``apply_voucher``."""
        async with self._mutate_lock:
            keys = set(delta.store or ())
            if not (self.machine.quarantined & keys) and adds_nothing(self.state, delta):
                if stripped:
                    self._handle(RepairApplied(self._now(), ORMap(is_delta=True), 0,
                                               tuple(stripped)))
                return
            record = packed if packed is not None else self.codec.encode_document(delta)
            seq = await self._in_store(
                self.store.append, self.config.subject, [record], received=[0]
            )
            self._handle(RepairApplied(self._now(), delta, seq, tuple(stripped), hlc))

    async def apply_voucher(
        self, voucher: ORMap, source: str, hlc: int, *, max_age_s: float
    ) -> str | None:
        """Repair this replica from ``voucher``: a fetch reply of replica ``source`` (its
        ``subset`` of some keys, each key it lacks as ``Whole(None)``, with its context),
        sealed by ``source`` at hybrid time ``hlc``; the caller checked the seal, the signer
        (a roster node, not this one) and the subject. Returns None when applied, else the
        reason it was refused (already counted with ``observer.rejected``): ``clock_skew``
        (``hlc`` ahead of this clock), ``expired`` (older than ``max_age_s``: a voucher
        replayed late), or a ``BYZANTINE_REASONS`` member of ``relayed`` (``source`` served
        what it cannot vouch for).

        The repair of the voucher's keys is computed here, against this replica's state
        (``broker.repair.vouched``), and only what ``source`` vouches for is joined
        (``relayed``): other writers' dots unseen here are dropped and their writers owed a
        catch-up. What is logged is the kept delta, never the voucher."""
        subject = self.config.subject
        now_ms = self._now_ms()
        try:
            self.clock.observe(hlc, now_ms)
        except (ClockSkewError, InvalidArgumentError):
            self.observer.rejected(subject, "clock_skew", source)
            return "clock_skew"
        if now_ms - hlc_physical(hlc) > max_age_s * 1000:
            self.observer.rejected(subject, "expired", source)
            return "expired"
        kept = vouched(voucher, source, self.state, hlc)
        if kept.document is None:
            reason = kept.reason or "dot_range"
            self.observer.rejected(subject, reason, source)
            log.warning("repair of %s from %s's voucher refused: %s", subject, source, reason)
            return reason
        # A claim of a write made after the voucher was signed removes nothing (pre-claim).
        document = self.machine.without_later_claims(kept.document, source, hlc)
        if self.machine.config.add_only and removes(document, self.state) is not None:
            self.observer.rejected(subject, "removal", source)  # add-only: never a removal
            return "removal"
        await self.apply_repair(document, stripped=sorted(kept.stripped), hlc=hlc)
        return None

    # -- internals: commit, publish, persist ---------------------------------------------------

    async def _committer(self) -> None:
        while True:
            await self._commit_wake.wait()
            self._commit_wake.clear()
            if not self._commits:
                self._progress.set()
                continue
            commits, self._commits = self._commits, []
            if self._degraded is not None:
                # A commit failed: what queued behind it may depend on what it carried
                # (received state logged with it), so nothing more is logged until a restart.
                self._fail_commits(commits, self._degraded)
                continue
            t0 = time.perf_counter()
            # Each write after the received state it was applied over (marked received:
            # never republished as this node's own), all in one transaction. Consecutive
            # EVENTUAL writes are joined into one record (up to a batch's ops), encoded once
            # here: published alone, that record is the envelope's document too.
            records: list[bytes] = []
            received: list[int] = []
            groups: list[_Group] = []
            run: list[_Commit] = []
            run_ops = 0
            try:
                for c in commits:
                    if c.delta is not None and (
                        c.consistency is not Consistency.EVENTUAL
                        or run_ops + c.ops > self.config.max_batch_ops
                    ):
                        self._close_run(run, records, groups)
                        run_ops = 0
                    received.extend(range(len(records), len(records) + len(c.received)))
                    records.extend(c.received)
                    if c.delta is None:
                        continue  # received state alone
                    run.append(c)
                    run_ops += c.ops
                    if c.consistency is not Consistency.EVENTUAL:
                        self._close_run(run, records, groups)  # a LOCAL write: its own record
                        run_ops = 0
                self._close_run(run, records, groups)
                appended = self._in_store(
                    self.store.append, self.config.subject, records, received=received
                )
                if len(groups) == 1:
                    self._preseal(groups[0])  # on the loop while the store thread commits
                seq = await appended
            except Exception as exc:
                # No rollback (a rebuild from the store would drop other writers' queued
                # commits and reuse their dots): these writes stay in memory, unacknowledged
                # and unpublished, and the replica refuses writes until it is restarted,
                # which reloads exactly what was committed.
                log.error("commit of %s failed: %s", self.config.subject, exc)
                self._degraded = exc
                self._fail_commits(commits, exc)
                continue
            ops = sum(c.ops for c in commits)
            self.observer.committed(self.config.subject, ops, time.perf_counter() - t0)
            now = self._now()
            first = seq - len(records) + 1
            for g in groups:
                self._handle(
                    Committed(now, g.delta, g.ops, len(g.record), first + g.index, g.record,
                              eventual=g.eventual)
                )
                for c in g.members:
                    if c.done is not None and not c.done.done():
                        c.done.set_result(None)
            self._handle(ReceivedLogged(now, seq))

    def _close_run(
        self, run: list[_Commit], records: list[bytes],
        groups: list[_Group],
    ) -> None:
        """Encode the writes of ``run`` as one record (their deltas joined), appended to
        ``records``; ``run`` is emptied."""
        if not run:
            return
        deltas = [c.delta for c in run if c.delta is not None]
        delta = deltas[0]
        if len(deltas) > 1:
            delta = delta.copy()  # the writers hold theirs: join into a copy
            for d in deltas[1:]:
                delta.merge(d)
        record = self._record(delta)
        groups.append(_Group(
            len(records), list(run), delta, record, sum(c.ops for c in run),
            run[0].consistency is Consistency.EVENTUAL,
        ))
        records.append(record)
        run.clear()

    def _preseal(self, group: _Group) -> None:
        """Seal (encode and sign) a commit's batch before it is durable, when the machine
        will publish it at once and alone: the seal then overlaps the store's commit instead
        of following it on the write-to-remote-apply path. Nothing is published before the
        commit is durable; ``_publish`` uses the envelope only for the very batch sealed."""
        if not group.eventual:
            return
        sequence = self.machine.publishes_at_once(self._now(), group.ops, len(group.record))
        if sequence is None:
            return
        try:
            data = self.codec.seal(
                self.signer, subject=self.delta_subject, hlc=self.clock.now(self._now_ms()),
                sequence=sequence, document=group.delta, packed=group.record,
            )
        except CodecError:  # too large, say: _publish seals it again and handles the error
            return
        self._presealed = (sequence, group.delta, group.record, data)

    def _fail_commits(self, commits: list[_Commit], exc: BaseException) -> None:
        for c in commits:
            if c.delta is None:
                continue
            self._handle(CommitFailed(self._now(), c.ops))
            if c.done is not None and not c.done.done():
                c.done.set_exception(exc)

    async def _publish(self, action: Publish) -> None:
        event: Event
        pre, self._presealed = self._presealed, None
        try:
            if (
                pre is not None and pre[0] == action.sequence and pre[1] is action.document
                and pre[2] is action.record
            ):
                data = pre[3]
            else:
                data = self.codec.seal(
                    self.signer,
                    subject=self.delta_subject,
                    hlc=self.clock.now(self._now_ms()),
                    sequence=action.sequence,
                    document=action.document,
                    packed=action.record,
                )
            await self.transport.publish(self.delta_subject, data, headers=self._headers)
            event = Published(self._now(), action.sequence, len(data))
        except MessageTooLargeError as exc:
            log.error("batch of %s too large to publish (%s); left to catch-up/healing",
                      self.config.subject, exc)
            event = PublishFailed(self._now(), action.sequence, too_large=True)
        except Exception as exc:
            log.warning("publish of %s failed, retrying: %s", self.config.subject, exc)
            event = PublishFailed(self._now(), action.sequence)
        if self._running:
            self._handle(event)

    async def _save_progress(self, action: SaveProgress) -> None:
        async with self._progress_lock:
            if action.sequence <= self._saved_sequence:
                return  # a later save already ran
            progress = {"sequence": action.sequence, "upto": action.upto}
            try:
                await self._in_store(
                    self.store.set_meta,
                    self.config.subject,
                    _META_PUBLISHED,
                    json.dumps(progress).encode(),
                )
            except StoreError as exc:  # a restart then republishes a little more: harmless
                log.warning("could not record publish progress of %s: %s",
                            self.config.subject, exc)
                return
            self._saved_sequence = action.sequence

    async def _load(self) -> None:
        loaded = await self._in_store(self.store.load, self.config.subject)
        self.load_errors = []
        state = ORMap()
        if loaded.snapshot is not None:
            state = self._decode_stored(loaded.snapshot)
        strong = self.config.strong_prefixes
        for _, record in loaded.records:
            # A received record is a peer's document as it arrived (its STRONG keys were
            # left out when it was joined: so again here); STRONG keys come from the
            # snapshot and the log.
            doc = self._decode_stored(record)
            state.merge(without_strong(doc, strong) if strong else doc)
        raw = await self._in_store(self.store.get_meta, self.config.subject, _META_PUBLISHED)
        progress = json.loads(raw) if raw else {}
        sequence = int(progress.get("sequence", 0))
        published_upto = int(progress.get("upto", 0))
        # Committed but never published (a crash between commit and publish): publish them
        # now, so an acknowledged write reaches peers. (LOCAL writes not yet synced when a
        # later EVENTUAL batch went out are not tracked separately; they reach peers by
        # catch-up and healing.)
        unpublished = [
            (n, r) for n, r in loaded.records
            if n > published_upto and n not in loaded.received
        ]
        batch: ORMap | None = None
        if unpublished:
            batch = ORMap(is_delta=True)
            for _, record in unpublished:
                batch.merge(self._decode_stored(record))
        self.machine = ReplicationMachine(
            self.node_id,
            dataclasses.replace(
                self.config.replication(), writable_kinds=self.codec.schema.kinds
            ),
            seed=random.getrandbits(32),  # only desynchronises retry jitter across nodes
            loaded=Loaded(
                state,
                # Our own dots keep increasing after a restart (the context does that), and
                # the hybrid clock must not run behind the timestamps already in the state,
                # or a write after a restart on a node whose wall clock stepped back could
                # lose to an older one.
                clock_last=max_hlc(state.store),
                last_record_seq=(
                    loaded.records[-1][0] if loaded.records else loaded.snapshot_seq
                ),
                snapshot_seq=loaded.snapshot_seq,
                sequence=sequence,
                published_upto=published_upto,
                unpublished=batch,
                unpublished_ops=len(unpublished),
                quarantined=frozenset(key for key, _ in self.load_errors),
                evidence=self._load_evidence(await self._in_store(
                    self.store.get_meta, self.config.subject, _META_EVIDENCE)),
            ),
        )
        self._saved_sequence = sequence
        self._changed(None)

    def _load_evidence(self, blob: bytes | None) -> tuple[tuple[str, CausalContext, bytes], ...]:
        """The evidence stored with the last snapshot, each envelope verified again (a
        writer since removed from the roster is no evidence any more)."""
        out: list[tuple[str, CausalContext, bytes]] = []
        for raw in _unframe(blob or b""):
            try:
                env = self.codec.open(raw, self.roster)
            except CodecError:
                continue
            if isinstance(env.document, ORMap):
                out.append((env.writer, env.document.context, raw))
        return tuple(out)

    def _decode_stored(self, data: bytes) -> ORMap:
        """A stored snapshot or record. A top-level key whose content the codec refuses is
        left out and reported (logged, and kept in ``load_errors``) instead of refusing the
        whole node. The key stays quarantined until a peer's whole entry for it arrives
        (catch-up asks for full states; the healer repairs it): see
        ``ReplicationMachine.quarantined``."""
        bad: list[tuple[str, str]] = []
        doc: Causal = self.codec.decode_record(data, ORMap, bad_keys=bad)
        assert isinstance(doc, ORMap)
        for key, reason in bad:
            log.error("stored state of %s: key %r left out on load: %s",
                      self.config.subject, key, reason)
        self.load_errors.extend(bad)
        return doc

    async def _snapshot(self) -> None:
        # The in-memory state holds every committed record up to the last one (writes are
        # applied before they commit); unpublished records stay in the log to be republished.
        async with self._snapshot_lock:
            t0 = time.perf_counter()
            upto = self.machine.snapshot_upto()
            mark = self.machine.received_mark()
            data = self._record(self.machine.state)
            evidence = _frame(self.machine.evidence(), self.store.max_record_bytes)
            await self._in_store(self.store.write_snapshot, self.config.subject, data, upto)
            await self._in_store(
                self.store.set_meta, self.config.subject, _META_EVIDENCE, evidence or None)
            if self._running:
                self._handle(SnapshotTaken(self._now(), upto, mark))
            else:
                self.machine.snapshot_seq = max(self.machine.snapshot_seq, upto)
            self.observer.snapshot(self.config.subject, len(data), time.perf_counter() - t0)

    async def _snapshot_quietly(self) -> None:
        try:
            await self._snapshot()
        except WorknodeError as exc:  # never kills the task that called it
            log.error("snapshot of %s failed: %s", self.config.subject, exc)

    def __repr__(self) -> str:
        return f"<Replica {self.node_id} {self.delta_subject}>"


def _frame(envelopes: Sequence[bytes], limit: int) -> bytes:
    """The newest of ``envelopes`` that fit in ``limit`` bytes, framed (``_META_EVIDENCE``)."""
    parts: list[bytes] = []
    size = 0
    for raw in reversed(envelopes):
        size += 4 + len(raw)
        if size > limit:
            break
        parts.append(len(raw).to_bytes(4, "big") + raw)
    return b"".join(reversed(parts))


def _unframe(blob: bytes) -> Iterator[bytes]:
    """The envelopes of a ``_frame`` blob (a truncated tail is dropped)."""
    i = 0
    while i + 4 <= len(blob):
        n = int.from_bytes(blob[i : i + 4], "big")
        if i + 4 + n > len(blob):
            return
        yield blob[i + 4 : i + 4 + n]
        i += 4 + n
