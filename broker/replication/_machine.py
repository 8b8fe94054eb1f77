"""The replication machine: everything one replica of one subject decides, as events in and
actions out.

What it decides (``broker/replica.py`` only executes):

- **Write -> commit -> publish.** ``write`` applies local writes to the tree and returns their
  joined delta; the driver logs it durably and reports ``Committed``. Only then does the delta
  join the pending batch (EVENTUAL) or the LOCAL batch (published on ``SyncWanted``). A batch
  is published when the flush window since its first delta ends or, with ``adaptive_flush``
  (replicas' default), Nagle-style: at once when no batch went out during the last flush
  window (a lone write at low load is not held back), else when a flush window has passed
  since the previous batch (under load, deltas keep joining into one batch per window: the
  window caps the wait); and at once when it reaches ``max_batch_ops`` ops or half of
  ``max_batch_bytes``. One ``Publish`` is in flight at a time; it carries the next publish
  sequence, which only ``Published`` consumes. A failed publish
  joins its batch back into the pending one (joins commute: the same batch either way) and
  retries after a backoff doubling from 50 ms to 2 s; a batch too large for any message is
  dropped (its writes stay durable; catch-up and the healer carry them). Writers beyond
  ``max_pending_ops`` ops accepted and not yet published get ``BackpressureError``.
- **Remote apply.** A peer's delta is joined only if the causal gate admits it (``_gate``: its
  context claims no dot this replica neither saw nor receives with it). Otherwise it is held,
  bounded by ``max_held_deltas`` and ``max_held_bytes`` (the oldest evicted, counted, and left
  to catch-up), and a catch-up is wanted from its writer. Held deltas are re-checked after
  every join and drain in any order. Per-writer sequences reveal lost batches (``gap``), and
  so does a hole left in the context below a writer's dot after a join (the first batch seen
  from a writer has no sequence to compare with). Before any of that, a batch its signer
  cannot have written honestly (``_gate.forged``: a dot of another replica in its store, a
  dot or claim far beyond what is seen here) is rejected (``Report("rejected", (reason,
  writer))``) and changes nothing; a full state takes the same checks and the same gate. A
  delta held ``max_hold`` seconds is rejected as ``unbacked_context`` (its writer owes a
  catch-up).
  On an add-only subject (``ReplicationConfig.add_only``) a document whose join would remove
  a dot held here is rejected too (``removal``, ``_addonly.removes``), on arrival and again
  when a held delta drains (its claims may have arrived meanwhile).
- **Catch-up.** A gap, a held delta, a slow consumer, a reconnect, a peer's announce showing
  dots this replica lacks, and ``Started`` each want a catch-up. One runs at a time; wants
  that arrive meanwhile are remembered (coalesced) and start one more when it ends. Starts are
  at least ``catchup_min_interval`` apart, except one from a writer whose batch is held here
  and that was not asked within ``catchup_min_interval`` (it just published: asking it at once
  ends the hold), while no catch-up has failed; at most ``_BYPASS_BURST`` such starts per
  ``_BYPASS_BURST`` intervals (the same average rate of state transfers, in bursts). A
  catch-up that fails (no peer answered in time, or an answer was rejected) is retried after
  a jittered exponential backoff, bounded by ``catchup_max_backoff``, until a peer answers;
  it alternates between the peer it wanted and any peer. A reply that leaves deltas held
  wants another, from their writer.
- **Sync requests and announces.** A catch-up asks for the full state (``full``) unless
  its only reasons were peers' announces: a removal issues no dot, so a context cannot show
  that its delta was lost. A request that is not ``full`` is answered with the full state
  only when the asker lacks a dot this replica has seen, else with an empty delta. A peer's
  announce showing dots this replica lacks wants a catch-up from it; one showing that the
  peer lacks dots seen here is answered by an announce (rate-limited), so the peer asks.
- **Snapshots** every ``snapshot_every`` ops, covering records up to the last one published
  (unpublished records stay in the log to be republished).
- **A write's causal past is as durable as the write.** Received state lives in memory until a
  snapshot; local writes are logged at once. A crash between the two used to reload a state
  holding a later local write without the remote write it followed (a regressed causal past:
  a counter increment then resurrected increments a delete had removed; simulation finding
  F9). So every envelope joined since the last snapshot (``DeltaReceived.raw``,
  ``CatchupReplied.raw``) is kept, and the next ``write`` returns them in
  ``Written.received``: the driver logs them, marked received, in the same commit as the
  write and before it. A node that only receives logs nothing until ``max_unlogged_bytes``
  are kept; then they are logged on their own (``LogReceived``, queued in order with local
  commits), so memory stays bounded even when snapshots fail. A full catch-up state asks for
  a snapshot as well (it holds everything; logging it again with every write would not do).
  A snapshot covers every record once no local write waits to be published, received and
  repair records included, so a node that only receives keeps a bounded log.

How to drive it: build ``ReplicationMachine(node_id, config, seed=..., loaded=...)``; feed
every event with ``handle(event)`` (events carry ``now``, monotonic seconds) and execute the
actions it returns in order: ``Publish``/``RequestCatchup`` report back later with
``Published``/``PublishFailed`` and ``CatchupReplied``/``CatchupFailed``; ``ScheduleTimer``
reports ``TimerFired`` at its time (a new timer of the same name replaces the old one; a timer
that fires late or spuriously is harmless); ``Snapshot`` reports ``SnapshotTaken``. Local
writes go through ``write(mutators, now_ms)`` (wall milliseconds for the hybrid clock), which
returns the delta to log; report ``Committed`` (or ``CommitFailed``) after the commit. A
simulator may deliver any event at any time; the machine never blocks and never reads a clock
or randomness of its own (jitter comes from ``seed``).

Invariants: every committed EVENTUAL delta is in exactly one of: the pending batch, the
in-flight publish, or published (or dropped as too large, counted); the publish sequence
increases by one per published batch; a held delta is joined at most once its claims are
covered; the state is only ever a join of local writes, admitted deltas, catch-up states and
repairs. Pure: no I/O, no clock, no asyncio.
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from broker.crdt import Batch, CausalContext, HybridClock, Increment, ORMap, Tree, TreeOp, coalesce
from broker.crdt._hlc import LOGICAL_BITS
from broker.crdt._stores import (
    MAX_NESTING_DEPTH,
    Kind,
    KindStore,
    LWWStore,
    MapStore,
    Whole,
    join_entry,
)
from broker.errors import (
    BackpressureError,
    BoundsError,
    InvalidArgumentError,
    PayloadTooLargeError,
    UnsupportedContentError,
    ValueTooLargeError,
    WorknodeError,
)
from broker.replication._addonly import removes
from broker.replication._events import (
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
    LogReceived,
    Publish,
    Published,
    PublishFailed,
    Received,
    ReceivedLogged,
    Reconnected,
    RepairApplied,
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
)
from broker.replication._gate import (
    MAX_COUNTER,
    SequenceWindow,
    forged,
    relayed,
    unseen_claims,
)
from broker.replication._strong import (
    STRONG_AUTHOR,
    is_strong,
    stamp,
    strong_entry_problem,
    without_strong,
)

__all__ = [
    "DEFAULT_MAX_HELD_BYTES",
    "DEFAULT_MAX_HELD_DELTAS",
    "Loaded",
    "Mutator",
    "ReplicationConfig",
    "ReplicationMachine",
    "Written",
    "lacks",
]

Mutator = Callable[[Tree, str, int], ORMap]
"""``(tree, replica_id, hlc) -> delta``: a delta-mutator on the subject's tree."""

DEFAULT_MAX_HELD_DELTAS: Final = 1_024
"""Deltas held by the causal gate at most; beyond it the oldest is evicted (catch-up)."""
DEFAULT_MAX_HELD_BYTES: Final = 16 * 1024 * 1024
"""Bytes (as received) of held deltas at most; beyond it the oldest is evicted."""

LOG_CAUSAL_PAST = True
"""Whether received state is made durable for the writes that follow it: ``write`` returns
the envelopes joined since the last snapshot to be logged with the write, the bound logs them
on their own, a full catch-up state asks for a snapshot. Only the simulation's mutation check
turns it off (finding F9 comes back)."""

MAX_OWED_ATTEMPTS: Final = 8
_BYPASS_BURST: Final = 4
"""Catch-ups from writers whose batches are held may start at once (past the rate limit) at
most this many times per this many ``catchup_min_interval`` s: the old global rate on
average, a burst of that many (a replica restarting among several active writers)."""
MAX_CUT_WRITERS: Final = 16
"""Writers a catch-up answer names as cut out of it (``SendState.cut``), at most; an asker
takes no more of a peer's list either."""
CLAIM_SKEW_MS: Final = 2_000
"""A claim is taken to have seen writes stamped up to this long after it: honest clocks
differ (and a restarted node's clock may not have caught up with what it observed before);
a claim of a write stamped later than that removes nothing (``without_later_claims``)."""
RECENT_BATCHES: Final = 1024
"""Batches per writer whose envelope timestamps a replica remembers (``without_later_claims``)."""
"""Catch-ups answered by peers other than a writer whose state is needed, at most, before
that writer is given up on (left to the healer)."""
TIMER_FLUSH: Final = "flush"
TIMER_PUBLISH_RETRY: Final = "publish-retry"
TIMER_CATCHUP: Final = "catchup"
TIMER_ANNOUNCE: Final = "announce"
TIMER_IDLE_ANNOUNCE: Final = "idle-announce"
TIMER_HOLD: Final = "hold"
_PUBLISH_BACKOFF: Final = (0.05, 2.0)


@dataclass(frozen=True, slots=True)
class ReplicationConfig:
    """Bounds and timings of one replication machine (seconds, ops, bytes)."""

    flush_interval: float = 0.005
    adaptive_flush: bool = False
    """Nagle-style publishing (``_due``): a batch goes at once when none went out during the
    last flush window, else a window after the previous one. Off: every batch waits a whole
    window from its first delta (what a test that drives the machine step by step expects;
    ``broker.replica.ReplicaConfig`` turns it on)."""
    max_batch_ops: int = 5_000
    max_batch_bytes: int = 256 * 1024
    publish_alone_bytes: int = 0
    """A committed delta whose record is at least this many bytes is published at once and
    alone, with its record as the envelope's document (no window; 0: off). Joining it with
    the next would save one message at the price of encoding every entry again, and a
    delta that large is a batch already."""
    max_pending_ops: int = 100_000
    snapshot_every: int = 20_000
    catchup_timeout: float = 2.0
    catchup_min_interval: float = 0.5
    catchup_max_backoff: float = 10.0
    max_held_deltas: int = DEFAULT_MAX_HELD_DELTAS
    max_held_bytes: int = DEFAULT_MAX_HELD_BYTES
    max_hold: float = 30.0
    """Seconds the causal gate holds a peer's delta at most: a claim still unbacked then
    (catch-up, retried meanwhile, brought no state holding the claimed dots) is rejected as
    ``unbacked_context`` and its writer left owing a catch-up."""
    max_unlogged_bytes: int = 8 * 1024 * 1024
    """Bytes of received envelopes joined since the last snapshot and kept to be logged with
    the next local write, at most; beyond it a snapshot is asked for (it makes them durable),
    so a node that receives much and writes little holds bounded memory."""
    idle_announce: float = 1.0
    """Seconds after its last publish at which a replica announces its context and publish
    sequence once: a peer that lost that last batch (a removal issues no dot, and no later
    batch reveals a gap) then sees the sequence it lacks and asks for a full state."""
    max_evidence_bytes: int = 6 * 1024 * 1024
    """Bytes of other writers' signed batches kept as they arrived, at most (oldest dropped
    first): a catch-up answer forwards the ones its asker lacks dots of, so their dots reach
    it under their writers' own signatures (a relayed state carries only its relay's)."""
    max_evidence_reply_bytes: int = 6 * 1024 * 1024
    """Bytes of kept batches forwarded with one catch-up answer, at most (the asker's next
    catch-up brings the rest)."""
    max_evidence_reply_messages: int = 4096
    """Kept batches forwarded with one catch-up answer, at most: each is one message ahead of
    the answer, and an asker takes no more (nor do NATS permissions let a node send more
    replies to one request: ``broker.transport._auth.EVIDENCE_REPLIES``)."""
    writable_kinds: frozenset[int] | None = None
    """Kinds a local write may create (the wire version this node writes carries them); None:
    every kind. A write of another kind fails with UnsupportedContentError before it
    changes anything (a v1 node's flag could be neither logged nor published, and would have
    stayed in memory unacknowledged, failing every later snapshot)."""
    add_only: bool = False
    """The subject only grows (``_addonly``): a peer's document whose join would remove a
    dot held here is rejected (``removal``, its signer named), and a local write that would
    remove one fails with InvalidArgumentError before it changes anything."""
    strong_prefixes: tuple[str, ...] = ()
    """Worknode ids starting with one of these are STRONG (``_strong``): they change only by
    the subject's STRONG log (``apply_log``); a local write to one fails with
    InvalidArgumentError before it changes anything, and peers' documents are joined
    without them. Empty: no STRONG key."""


def _kinds(entry: Any, out: set[int]) -> set[int]:
    """The kind numbers of every store under ``entry``."""
    t = type(entry)
    if t is Whole:
        return _kinds(entry.store, out)
    if t is MapStore:
        out.add(Kind.MAP)
        for v in entry.values():
            _kinds(v, out)
    elif t is KindStore:
        for v in entry.values():
            _kinds(v, out)
    elif entry is not None:
        out.add(int(entry.KIND))
    return out


def max_hlc(entry: Any, depth: int = 0) -> int:
    """The greatest last-writer-wins timestamp anywhere under ``entry`` (0 if none)."""
    if entry is None or depth > MAX_NESTING_DEPTH + 2:
        return 0
    if isinstance(entry, LWWStore):
        return max((entry[i] for i in range(2, len(entry), 4)), default=0)
    if isinstance(entry, dict):
        return max((max_hlc(v, depth + 1) for v in entry.values()), default=0)
    if isinstance(entry, Whole):
        return max_hlc(entry.store, depth + 1)
    return 0


_EMPTY: Final = CausalContext()
"""An empty context (never mutated): the side of a quarantined key that has seen nothing."""


@dataclass(frozen=True, slots=True)
class Loaded:
    """What the driver read from the store at start.

    ``unpublished``: the join of committed records after ``published_upto`` (a crash between
    commit and publish), ``unpublished_ops`` records of them; republished after ``Started``.
    """

    state: ORMap
    clock_last: int = 0
    last_record_seq: int = 0
    snapshot_seq: int = 0
    sequence: int = 0
    published_upto: int = 0
    unpublished: ORMap | None = None
    unpublished_ops: int = 0
    evidence: tuple[tuple[str, CausalContext, bytes], ...] = ()
    """Other writers' signed batches and states kept as evidence when the last snapshot was
    taken (``ReplicationMachine.evidence``), oldest first: ``(writer, the envelope's
    document's context, envelope)``."""
    quarantined: frozenset[str] = frozenset()
    """Top-level keys left out of ``state`` because their stored content was invalid. The
    state's context still claims their dots, so a plain join would never take them back: a
    peer's entry for such a key is adopted instead (see ``ReplicationMachine.quarantined``)."""


@dataclass(frozen=True, slots=True)
class Written:
    """The result of ``write``: the joined ``delta`` of the first ``ops`` writes (to log,
    then report ``Committed``), ``error`` that stopped the rest, and ``actions`` to run."""

    delta: ORMap
    ops: int
    error: BaseException | None
    actions: list[Action]
    received: list[Received] = field(default_factory=list)
    """Envelopes joined here since the last snapshot, in join order: log them (marked
    received, never republished) in the same commit as ``delta`` and before it."""


@dataclass(frozen=True, slots=True)
class _Evidence:
    """A writer's signed batch kept as it arrived: it claims ``writer``'s dots 1..``upto``
    and ``extra``."""

    writer: str
    upto: int
    extra: tuple[int, ...]
    raw: bytes
    state: bool = False
    """A full state of ``writer``'s (superseded by its next one), not a batch."""

    def lacked_by(self, context: CausalContext) -> bool:
        """Whether ``context`` lacks a dot of ``writer`` this batch claims."""
        if self.upto and not context.covers(self.writer, self.upto):
            return True  # (covers(w, upto) without 1..upto-1 is a hole below: asked for)
        return any(not context.covers(self.writer, n) for n in self.extra)


@dataclass(slots=True)
class _Held:
    writer: str
    sequence: int
    document: ORMap
    nbytes: int
    report: tuple[Any, ...]
    raw: bytes = b""
    since: float = 0.0
    seen_at: CausalContext | None = None
    """This replica's context when the batch arrived, kept when it claimed other writers'
    dots not seen here then (see ``_join_remote``)."""
    hlc: int | None = None
    """The batch's envelope timestamp."""


def _received_size(item: Received) -> int:
    """Bytes of a kept received envelope (a clipped one counts as it arrived)."""
    return len(item.raw if isinstance(item, Clipped) else item)


def lacks(mine: CausalContext, theirs: CausalContext) -> bool:
    """Whether context ``mine`` misses a dot that context ``theirs`` has seen."""
    vv = mine.version_vector
    for r, n in theirs.version_vector.items():
        top = vv.get(r, 0)
        if n > top and not all(mine.covers(r, k) for k in range(top + 1, n + 1)):
            return True
    return any(not mine.covers(r, n) for r, n in theirs.cloud)


class ReplicationMachine:
    """One subject's replication on one node (see the module doc for how to drive it)."""

    def __init__(
        self,
        node_id: str,
        config: ReplicationConfig | None = None,
        *,
        seed: int = 0,
        loaded: Loaded | None = None,
    ) -> None:
        self.node_id = node_id
        self.config = config or ReplicationConfig()
        self._rng = random.Random(seed)
        loaded = loaded or Loaded(ORMap())
        self.tree = Tree(loaded.state)
        """The subject's tree (its ``state`` is the document)."""
        self.quarantined: set[str] = set(loaded.quarantined)
        """Keys whose stored content was invalid and left out at load. Until a peer's whole
        entry for one arrives (a full state, a heal repair) every remote document's entry
        for it is adopted as if this replica had seen nothing there: its own context claims
        dots it no longer holds, and a plain join would drop the peer's entries for good."""
        self.clock = HybridClock(last=loaded.clock_last)
        """The hybrid clock stamping this replica's writes and envelopes."""
        self.sequence = loaded.sequence
        """Sequence of the last published batch."""
        self.last_record_seq = loaded.last_record_seq
        self.snapshot_seq = loaded.snapshot_seq
        self.published_upto = loaded.published_upto
        self.queued_ops = loaded.unpublished_ops
        """Ops accepted and not yet published (committing, pending, in flight, LOCAL)."""
        self._pending: ORMap | None = loaded.unpublished
        self._pending_ops = loaded.unpublished_ops if loaded.unpublished is not None else 0
        self._pending_bytes = 0
        self._pending_owned = True
        self._pending_record: bytes | None = None
        self._pending_since = 0.0
        self._pending_upto = loaded.last_record_seq if loaded.unpublished is not None else 0
        self._flush_at: float | None = None
        self._last_sent_at = -math.inf  # when the last Publish went out (the Nagle rule)
        self._inflight: tuple[Publish, int, float, bool] | None = None  # action, upto, since, owned
        self._retry_at: float | None = None
        self._backoff = _PUBLISH_BACKOFF[0]
        self._local: ORMap | None = None
        self._local_ops = 0
        self._ops_since_snapshot = 0
        self._last_seq: dict[str, int] = {}
        self._windows: dict[str, SequenceWindow] = {}
        self._held: list[_Held] = []
        self._held_bytes = 0
        # Writers whose state this replica needs (a lost batch: sequence gap, evicted held
        # delta, first batch seen from a writer after others) -> unsatisfied catch-ups since.
        self._owed: dict[str, int] = {}
        self._given_up: set[str] = set()  # owed writers no peer had: left to the healer
        if self.config.strong_prefixes:
            # The STRONG log's dots come from the log alone, never from a peer: never owed.
            self._given_up.add(STRONG_AUTHOR)
        # Peers whose last answers were cut (``_note_cut``) -> how many in a row: asked
        # again once the writers they cut out have answered.
        self._recheck: dict[str, int] = {}
        self._catchup_running = False
        self._catchup_wanted = False
        self._catchup_full = False  # some reason besides an announce: ask for the full state
        self._catchup_asked_full = False
        self._catchup_peer: str | None = None
        self._catchup_asked: str | None = None
        self._catchup_from = CausalContext()  # the context when the running one started
        self._catchup_failures = 0
        self._catchup_not_before = float("-inf")
        self._catchup_timer: float | None = None
        # When each peer was last asked by name: a catch-up wanted from a writer not asked
        # within ``catchup_min_interval`` starts at once (``_pump_catchup``).
        self._asked_at: dict[str, float] = {}
        self._bypasses: list[float] = []  # when those starts at once were made, lately
        self._announce_not_before = float("-inf")
        self._announce_timer: float | None = None
        self._idle_announce_at: float | None = None
        # Envelopes joined since the last snapshot, not yet handed to a write to be logged:
        # entry i has absolute index _received_base + i (``received_mark``).
        self._received: list[Received] = []
        self._received_base = 0
        self._received_bytes = 0
        # Other writers' signed batches as they arrived, oldest first (``_Evidence``).
        self._evidence: deque[_Evidence] = deque()
        self._evidence_bytes = 0
        self._relay_refusal = ""  # why the last relayed state was refused
        self._unvouched = False  # the last relayed state carried dots nothing backs here
        self._last_now = 0.0  # ``now`` of the event being handled
        # Writer -> (lowest dot, highest dot, envelope timestamp) of its batches joined lately
        # (since this start: what was known before is not; see ``without_later_claims``).
        self._start_hlc = 0
        self._recent: dict[str, deque[tuple[int, int, int]]] = {}
        for writer, context, raw in loaded.evidence:
            self._keep_evidence(writer, context, raw)
        self._handlers: dict[type[Any], Callable[[Any], list[Action]]] = {
            Started: self._on_started,
            Committed: self._on_committed,
            CommitFailed: self._on_commit_failed,
            SyncWanted: self._on_sync_wanted,
            FlushWanted: self._on_flush_wanted,
            Published: self._on_published,
            PublishFailed: self._on_publish_failed,
            DeltaReceived: self._on_delta,
            CatchupWanted: self._on_catchup_wanted,
            SlowConsumer: self._on_slow_consumer,
            Reconnected: self._on_reconnected,
            CatchupReplied: self._on_catchup_replied,
            CatchupFailed: self._on_catchup_failed,
            SyncRequested: self._on_sync_requested,
            AnnounceReceived: self._on_announce,
            RepairApplied: self._on_repair,
            StateEvidence: self._on_state_evidence,
            ReceivedLogged: self._on_received_logged,
            SnapshotTaken: self._on_snapshot_taken,
            TimerFired: self._on_timer,
        }

    # -- reading -----------------------------------------------------------------------------

    @property
    def state(self) -> ORMap:
        """The subject's document."""
        return self.tree.state

    @property
    def idle(self) -> bool:
        """Nothing EVENTUAL waits to be published (no pending batch, none in flight)."""
        return self._pending is None and self._inflight is None

    @property
    def held(self) -> int:
        """Deltas held by the causal gate."""
        return len(self._held)

    @property
    def catching_up(self) -> bool:
        """A catch-up is running or wanted."""
        return self._catchup_running or self._catchup_wanted

    def received_mark(self) -> int:
        """A mark of the envelopes joined so far; read it when encoding a snapshot and give it
        back in ``SnapshotTaken`` (the ones before it need no logging any more)."""
        return self._received_base + len(self._received)

    def evidence(self) -> list[bytes]:
        """The signed batches and states kept as evidence, oldest first (for the driver to
        store with a snapshot and hand back in ``Loaded.evidence``)."""
        return [e.raw for e in self._evidence]

    @property
    def evidence_bytes(self) -> int:
        """Bytes of evidence kept (at most ``max_evidence_bytes``)."""
        return self._evidence_bytes

    @property
    def unlogged_bytes(self) -> int:
        """Bytes of received envelopes joined since the last snapshot and not yet logged."""
        return self._received_bytes

    def snapshot_upto(self) -> int:
        """The store records a snapshot taken now may replace: every one the state holds
        (writes are applied before they commit) and that was published; all of them (received
        and repair records too) when no local write is queued, committing or unpublished."""
        if self.queued_ops == 0 and self._pending is None and self._inflight is None \
                and self._local is None:
            return max(self.last_record_seq, self.snapshot_seq)
        return max(min(self.last_record_seq, self.published_upto), self.snapshot_seq)

    # -- writing -----------------------------------------------------------------------------

    def admit(self, n: int) -> None:
        """Raise unless ``n`` more writes may be accepted now (nothing changes)."""
        if n > self.config.max_batch_ops:
            raise PayloadTooLargeError(
                f"{n} operations in one write, over max_batch_ops={self.config.max_batch_ops}"
            )
        if self.tree.state.context.max_counter(self.node_id) + n > MAX_COUNTER:
            # Only a forged context (one that reached this state by a path without the
            # delta checks) gets here: refuse, rather than write dots past the int64 every
            # record, digest and Merkle leaf packs (a record the store could not load).
            raise BoundsError(
                f"dot counter of {self.node_id} would pass MAX_COUNTER={MAX_COUNTER}; "
                "nothing was written"
            )
        if self.queued_ops + n > self.config.max_pending_ops:
            raise BackpressureError(
                f"{self.queued_ops} ops wait to be published (max_pending_ops="
                f"{self.config.max_pending_ops}); retry later"
            )

    def write(self, mutators: Sequence[Mutator | TreeOp], now_ms: Callable[[], int]) -> Written:
        """Apply local writes in order; they count as queued until published.

        Consecutive increments of one counter apply as one increment of their sum
        (``coalesce``). A write that raises stops the sequence: the ones before it stay
        applied (``Written.ops``) and its error is returned; none applied raises it.
        ``now_ms``: wall-clock milliseconds for the hybrid clock (read per write).
        """
        self.admit(len(mutators))
        own_before = self.tree.state.context.max_counter(self.node_id)
        error: BaseException | None = None
        batch = Batch()
        done = 0
        tree, node_id, clock = self.tree, self.node_id, self.clock
        writable = self.config.writable_kinds
        todo = list(coalesce(mutators))
        todo.reverse()
        while todo:
            fn, count = todo.pop()
            try:
                if isinstance(fn, TreeOp):
                    strong = self.config.strong_prefixes
                    if strong and is_strong(getattr(fn, "node", ""), strong):
                        raise InvalidArgumentError(
                            f"worknode {getattr(fn, 'node', '')!r} is STRONG: write it with "
                            "consistency STRONG (it was not applied)")
                    if self.config.add_only:
                        # Fused: it changes the state before its delta exists to check.
                        raise InvalidArgumentError(
                            f"{type(fn).__name__} on an add-only subject: write it as a "
                            "mutator (checked before it applies); it was not applied")
                    # Fused: merged here, and its delta joined into the batch in place.
                    d = fn.apply_into(tree, node_id, clock.now(now_ms()), batch)
                else:
                    d = fn(tree, node_id, clock.now(now_ms()))
                    if self.config.add_only:
                        hit = removes(d, tree.state)
                        if hit is not None:
                            raise InvalidArgumentError(
                                f"the subject is add-only: this write would remove dot "
                                f"{hit.dot} at {list(hit.path)}; it was not applied")
                    if writable is not None and d.store is not None:
                        unwritable = _kinds(d.store, set()) - writable
                        if unwritable:
                            raise UnsupportedContentError(
                                f"kind {min(unwritable)} needs a newer wire version than "
                                "this node writes; nothing was written"
                            )
                    strong = self.config.strong_prefixes
                    if strong and d.store and any(is_strong(k, strong) for k in d.store):
                        raise InvalidArgumentError(
                            "this write touches a STRONG worknode: write it with consistency "
                            "STRONG (it was not applied)")
                    tree.merge(d)
            except ValueTooLargeError as exc:
                if count > 1:  # a run's sum overflows: replay it write by write
                    assert isinstance(fn, Increment)
                    todo.extend((w, 1) for w in reversed(mutators[done : done + count]))
                    continue
                error = exc
                break
            except (WorknodeError, ValueError, TypeError) as exc:
                error = exc
                break
            if d is not None:
                batch.join(d)
            done += count
        if not done:
            assert error is not None
            raise error
        self.queued_ops += done
        delta = batch.delta
        keys = tuple(delta.store.keys()) if delta.store else ()
        received: list[Received] = []
        if self._received and LOG_CAUSAL_PAST:
            received, self._received = self._received, []
            self._received_base += len(received)
            self._received_bytes = 0
        if done:
            # This replica's own writes are judged like a peer's against later claims.
            self._note_written(node_id, delta.context, clock.last, own_before + 1)
        return Written(delta, done, error, [Changed(keys)], received)

    @property
    def log_applied(self) -> int:
        """The STRONG log's sequence applied here up to (every entry before it too)."""
        return self.tree.state.context._vv.get(STRONG_AUTHOR, 0)

    def apply_log(
        self, seq: int, delta: ORMap | None, key: str | None = None, writer: str = "log"
    ) -> list[Action]:
        """Apply STRONG log entry ``seq`` (see ``_strong``): ``delta``, written for worknode
        ``key`` against the version its compare-and-set named, renamed to the log's dot and
        joined; None for an entry that writes nothing (a fence, or one gone from the stream),
        whose sequence is only marked seen. Entries before ``seq`` not applied yet are
        marked seen too (the stream dropped them: superseded entries, expired fences).
        Idempotent: an entry at or below ``log_applied`` does nothing. A refused entry
        (``strong_entry_problem``) is marked seen and reported (``Report("rejected",
        (reason, writer))``): every replica
        refuses it alike (``writer``: its signer, named in the report)."""
        applied = self.log_applied
        if seq <= applied:
            return []
        out: list[Action] = []
        reason = None
        if delta is not None and key is not None:
            reason = strong_entry_problem(delta, key, seq)
            if reason is not None:
                out.append(Report("rejected", (reason, writer)))
        if delta is None or key is None or reason is not None:
            # Seen, nothing written (not logged: a reload reads it from the log again).
            self.tree.state.context.merge(CausalContext({STRONG_AUTHOR: seq}))
            return out
        entry = stamp(delta, key, seq)
        state = self.tree.state
        if state.store is None:
            state.store = MapStore()
        state.store[key] = entry
        state.context.merge(CausalContext({STRONG_AUTHOR: seq}))
        self.clock.witness(max_hlc(MapStore({key: entry})))
        # Not logged: the log is this entry's durable copy; a snapshot covers it here, and
        # after a crash the replica replays the log from the last snapshot's position.
        out.append(Changed((key,)))
        return out + self._count_ops(1)

    # -- events ------------------------------------------------------------------------------

    def handle(self, event: Event) -> list[Action]:
        """React to ``event``; the actions to execute, in order."""
        self._last_now = event.now
        return self._handlers[type(event)](event)

    def _on_started(self, ev: Started) -> list[Action]:
        if ev.wall_ms is not None:
            self._start_hlc = ev.wall_ms << LOGICAL_BITS
        out: list[Action] = []
        if self._pending is not None:  # republish what a crash left unpublished
            self._pending_since = ev.now
            out += self._maybe_publish(ev.now, force=True)
        out += self._want_catchup(ev.now, None, urgent=True)
        out.append(Announce())
        return out

    def _on_committed(self, ev: Committed) -> list[Action]:
        self.last_record_seq = max(self.last_record_seq, ev.record_seq)
        out: list[Action] = []
        if ev.eventual:
            out += self._queue(ev.now, ev.delta, ev.ops, ev.nbytes, ev.record_seq, ev.record)
        elif self._local is None:
            self._local, self._local_ops = ev.delta.copy(), ev.ops  # the writer holds ev.delta
        else:
            self._local.merge(ev.delta)
            self._local_ops += ev.ops
        out += self._count_ops(ev.ops)
        return out

    def _on_commit_failed(self, ev: CommitFailed) -> list[Action]:
        self.queued_ops -= ev.ops
        return []

    def _on_sync_wanted(self, ev: SyncWanted) -> list[Action]:
        out: list[Action] = []
        if self._local is not None:
            local, ops = self._local, self._local_ops
            self._local, self._local_ops = None, 0
            out += self._queue(ev.now, local, ops, 0, self.last_record_seq, None, owned=True)
        return out + self._maybe_publish(ev.now, force=True)

    def _on_flush_wanted(self, ev: FlushWanted) -> list[Action]:
        return self._maybe_publish(ev.now, force=True)

    def _on_published(self, ev: Published) -> list[Action]:
        if self._inflight is None or self._inflight[0].sequence != ev.sequence:
            return []
        action, upto, since, _ = self._inflight
        self._inflight = None
        self.sequence = ev.sequence
        self._backoff = _PUBLISH_BACKOFF[0]
        self.queued_ops -= action.ops
        self.published_upto = max(self.published_upto, upto)
        out: list[Action] = [
            SaveProgress(self.sequence, self.published_upto),
            Report("published", (action.ops, ev.nbytes, ev.now - since)),
        ]
        armed = self._idle_announce_at is not None
        self._idle_announce_at = ev.now + self.config.idle_announce
        if not armed:  # else the armed timer, firing early, re-arms itself (one per burst)
            out.append(ScheduleTimer(TIMER_IDLE_ANNOUNCE, self._idle_announce_at))
        return out + self._maybe_publish(ev.now)

    def _on_publish_failed(self, ev: PublishFailed) -> list[Action]:
        if self._inflight is None or self._inflight[0].sequence != ev.sequence:
            return []
        action, upto, since, owned = self._inflight
        self._inflight = None
        out: list[Action] = [Report("publish_failed", ())]
        if ev.too_large:
            # Cannot ever fit one message: the writes stay durable here; catch-up (a state
            # transfer) and the healer carry them. Counted, not retried forever.
            self.queued_ops -= action.ops
            return out + self._maybe_publish(ev.now)
        # Keep the batch (joined back in front of newer deltas) and retry after a backoff.
        if self._pending is not None:
            self._own_pending()
            assert self._pending is not None
            self._pending.merge(action.document)
        else:
            self._pending, self._pending_owned = action.document, owned
            self._pending_record = action.record
        self._pending_ops += action.ops
        self._pending_since = since
        self._pending_upto = max(self._pending_upto, upto)
        self._retry_at = ev.now + self._backoff
        self._backoff = min(self._backoff * 2, _PUBLISH_BACKOFF[1])
        out.append(ScheduleTimer(TIMER_PUBLISH_RETRY, self._retry_at))
        return out

    def _on_delta(self, ev: DeltaReceived) -> list[Action]:
        w = ev.writer
        # Byzantine checks first: a forged batch changes nothing here, not even the
        # writer's sequence. A full state (a batch holding a ``clear``) goes through the same
        # checks and the same gate as a delta: its context removes what it claims anywhere.
        reason = forged(ev.document, w, self.tree.state.context, hlc=ev.hlc)
        if reason is not None:
            return [Report("rejected", (reason, w))]
        if self.config.add_only and removes(ev.document, self.tree.state) is not None:
            return [Report("rejected", ("removal", w))]
        out: list[Action] = []
        last = self._last_seq.get(w, 0)
        if last and ev.sequence > last + 1:
            out.append(Report("gap", (w, ev.sequence - last - 1)))
            self._owed.setdefault(w, 0)
            out += self._want_catchup(ev.now, w)
        elif not last and not self._windows.get(w, SequenceWindow()).follows(ev.sequence):
            # The first batch seen from ``w`` (since a start) follows batches never seen
            # here: one of them may have been a removal, which no context can show.
            self._owed.setdefault(w, 0)
            out += self._want_catchup(ev.now, w)
        if ev.sequence > last:
            self._last_seq[w] = ev.sequence
        item = _Held(w, ev.sequence, ev.document, ev.nbytes, ev.report, ev.raw, ev.now,
                     self._seen_if_claims_unseen(ev.document, w), ev.hlc)
        if self._admits(item):
            out += self._join_remote(item)
            if self._held:
                out += self._drain()
            return out + self._pump_catchup(ev.now)
        self._held.append(item)
        self._held_bytes += item.nbytes
        out.append(Report("gated", ("held",)))
        if len(self._held) == 1:
            out.append(ScheduleTimer(TIMER_HOLD, item.since + self.config.max_hold))
        while self._held and (
            len(self._held) > self.config.max_held_deltas
            or self._held_bytes > self.config.max_held_bytes
        ):
            old = self._held.pop(0)
            self._held_bytes -= old.nbytes
            self._owed.setdefault(old.writer, 0)
            out.append(Report("gated", ("evicted",)))
        out += self._want_catchup(ev.now, w)
        return out

    def _on_catchup_wanted(self, ev: CatchupWanted) -> list[Action]:
        return self._want_catchup(ev.now, ev.peer, urgent=ev.urgent)

    def _on_slow_consumer(self, ev: SlowConsumer) -> list[Action]:
        return self._want_catchup(ev.now, None)

    def _on_reconnected(self, ev: Reconnected) -> list[Action]:
        return [*self._want_catchup(ev.now, None), Announce()]

    def _on_catchup_replied(self, ev: CatchupReplied) -> list[Action]:
        if not self._catchup_running:
            return []
        self._catchup_running = False
        self._note_asked(ev.peer, ev.now)  # (asked by name or not: it just answered)
        out: list[Action] = []
        doc = ev.document
        if not doc.is_delta or doc.store or doc.context.size():
            # A relayed state: only what the peer vouches for (its own dots, and other
            # writers' that this replica saw) is joined; the rest comes under its writers'
            # own signatures (the evidence sent ahead of this answer, or their catch-up).
            merged = self._merge_relayed(doc, ev.peer, ev.raw, ev.hlc, seen=ev.vouch)
            if merged is None:
                self._catchup_running = True
                return [
                    Report("rejected", (self._relay_refusal, ev.peer)),
                    *self._on_catchup_failed(CatchupFailed(ev.now, "rejected")),
                ]
            if self._unvouched and not ev.evidence_dropped:
                # An honest answer carries only what its peer can vouch for to this replica
                # (its own dots, dots seen here or sent ahead as evidence): this one carried
                # another writer's dots or claims nothing backs. Joined without them, and its
                # signer counted.
                out.append(Report("rejected", ("unvouched_state", ev.peer)))
            out += merged
        if not doc.is_delta:
            # The peer's state holds every batch it published up to ``ev.sequence``. An empty
            # answer ("your context covers mine") does not: a removal it published issues no
            # dot, so the batches behind that sequence are not known to be here.
            self._windows.setdefault(ev.peer, SequenceWindow()).raise_to(ev.sequence)
            self._owed.pop(ev.peer, None)
            self._given_up.discard(ev.peer)
        out += self._note_cut(ev)
        out.append(Report("catchup", ("ok",)))
        if self._held:
            out += self._drain()
        # Still missing something (a held delta, an evicted one, a hole in the context): the
        # peer lacked it too. Ask its writer next, after a backoff as if this one failed, so
        # a writer that is away costs a bounded rate of state transfers.
        missing = self._held[0].writer if self._held else (
            min(self._owed) if self._owed else self._hole_writer())
        ctx_now = self.tree.state.context
        if missing is not None and missing in self._owed and not self._held and (
            ctx_now.max_counter(missing) <= self._catchup_from.max_counter(missing)
        ):
            # Not one more of its dots (an answer bringing some, as its evidence budget
            # allows, is progress: the next one brings more, not a reason to give up).
            self._owed[missing] += 1
            if self._owed[missing] > MAX_OWED_ATTEMPTS:
                # Peers keep answering without that writer's state: it is away for good.
                # Leave what it alone held to the healer instead of asking forever.
                del self._owed[missing]
                self._given_up.add(missing)
                out.append(Report("catchup", ("gave_up",)))
                missing = self._hole_writer()
        if missing is None:
            self._catchup_failures = 0
            self._catchup_not_before = ev.now + self.config.catchup_min_interval
        elif (
            self._asks_held_writer(missing, ev.now, capped=False) and missing != ev.peer
            and self._catchup_peer in (None, missing, ev.peer)
        ):
            # A batch of its writer's is held and that writer was not asked lately (a peer
            # answered): ask it now, not after a backoff (it just published: it is there).
            # Each writer is asked this way at most once per ``catchup_min_interval`` and
            # only while no catch-up failed; then the branch below backs off. Another peer
            # already wanted (an announce showed it has more) is not overwritten: it goes
            # first (a want of the peer that just answered is what this answer was).
            self._catchup_not_before = ev.now + self.config.catchup_min_interval
            self._catchup_wanted = self._catchup_full = True
            self._catchup_peer = missing  # (``_pump_catchup`` starts it at once, or by the
            # rate limit when too many such starts were made lately: not a failure either)
        else:
            self._catchup_failures += 1
            self._catchup_not_before = ev.now + self._backoff_delay()
            self._catchup_wanted = self._catchup_full = True
            if self._catchup_peer is None or missing in self._owed:
                # A writer owed goes first, before a peer that merely announced more: only
                # its own answer vouches for its dots no peer kept evidence of.
                self._catchup_peer = missing
        return out + self._pump_catchup(ev.now)

    def _note_cut(self, ev: CatchupReplied) -> list[Action]:
        """Follow up an answer whose peer cut other writers' dots out (``ev.cut``): they and
        the peer's claims of them (its removals) were left out because this replica had not
        seen them. Ask those writers for their states, then the peer again, whose removals
        of those dots are joined once they are seen here — at most ``MAX_OWED_ATTEMPTS``
        cut answers in a row from one peer."""
        cut = [w for w in ev.cut[:MAX_CUT_WRITERS]
               if w not in (self.node_id, ev.peer) and w not in self._given_up]
        if not cut:
            self._recheck.pop(ev.peer, None)
        else:
            rounds = self._recheck.get(ev.peer, 0) + 1
            if rounds <= MAX_OWED_ATTEMPTS:
                for w in cut:
                    self._owed.setdefault(w, 0)
                self._recheck[ev.peer] = rounds
            else:
                self._recheck.pop(ev.peer, None)
                return [Report("catchup", ("gave_up",))]
        if self._recheck and not (self._owed.keys() - self._recheck.keys()):
            # Every writer asked of has answered (or is given up): the peers again.
            for peer in sorted(self._recheck):
                if peer not in self._given_up:
                    self._owed.setdefault(peer, 0)
        return []

    def _merge_relayed(
        self,
        doc: ORMap,
        relay: str,
        raw: bytes,
        hlc: int | None,
        *,
        seen: CausalContext | None = None,
    ) -> list[Action] | None:
        """Join what ``relay`` vouches for in its ``doc`` (a catch-up answer, or a state kept
        as evidence), marking the writers whose dots were stripped as owed; None (reason in
        ``_relay_refusal``) if ``doc`` is refused whole. ``seen``: what ``relay`` may vouch
        for other writers' dots against (``CatchupReplied.vouch``); default this replica's
        context now."""
        kept = relayed(doc, relay, self.tree.state.context if seen is None else seen, hlc=hlc)
        if kept.document is None:
            self._relay_refusal = kept.reason or "dot_range"
            return None
        out: list[Action] = []
        held = {item.writer for item in self._held}
        # What it carried beyond what is seen here is backed only by evidence this replica
        # holds back (gated): anything else nothing backs.
        self._unvouched = bool(set(kept.stripped) - held)
        if kept.stripped:
            out.append(Report("stripped", (relay, len(kept.stripped))))
        for owner in sorted(kept.stripped):
            if owner != self.node_id and owner not in self._given_up:
                self._owed.setdefault(owner, 0)
        clipped = kept.document
        if hlc is not None:
            clipped = self.without_later_claims(clipped, relay, hlc)
        if self.config.add_only and removes(clipped, self.tree.state) is not None:
            self._relay_refusal = "removal"
            return None
        self._merge_noting(clipped, hlc, whole=not doc.is_delta)
        if raw:
            out += self._keep_received(
                raw if clipped is kept.document and not kept.stripped else Clipped(raw, clipped))
            if not doc.is_delta:
                self._keep_evidence(relay, doc.context, raw, state=True)
        if not doc.is_delta and raw and LOG_CAUSAL_PAST:
            out.append(Snapshot())  # covers it: a write meanwhile logs it once
        out.append(Changed(None if not doc.is_delta else tuple(doc.store.keys())))
        return out + self._count_ops(max(1, len(doc)))

    def _merge_noting(self, doc: ORMap, hlc: int | None, *, whole: bool) -> None:
        """``_merge_remote``, noting ``hlc`` (the relayed state's timestamp, an upper bound
        of when each write it holds was made) as the write time of every dot it brought, for
        ``without_later_claims``: a dot that arrived by a state, not a batch, is judged by it
        too (a pre-claim of it removes nothing either)."""
        if hlc is None:
            self._merge_remote(doc, whole=whole)
            return
        ctx = self.tree.state.context
        before = {r: ctx.max_counter(r) for r in doc.context._vv.keys() | doc.context._cloud}
        self._merge_remote(doc, whole=whole)
        ctx = self.tree.state.context
        for r, was in before.items():
            now = ctx.max_counter(r)
            if now > was:
                self._note_range(r, was + 1, now, hlc)

    def _on_state_evidence(self, ev: StateEvidence) -> list[Action]:
        out = self._merge_relayed(ev.document, ev.writer, ev.raw, ev.hlc)
        if out is None:
            return [Report("rejected", (self._relay_refusal, ev.writer))]
        if self._held:
            out += self._drain()
        return out

    def _hole_writer(self) -> str | None:
        """A replica with a dot this state's context lacks below one it has (a lost batch)."""
        holes = [
            r for r, _ in self.tree.state.context.cloud
            if r != self.node_id and r not in self._given_up
        ]
        return min(holes) if holes else None

    def _asks_held_writer(self, writer: str | None, now: float, *, capped: bool = True) -> bool:
        """Whether a catch-up from ``writer`` may start at once: a batch of its is held
        here, no catch-up failed since the last answer, it was not asked (nor answered)
        within ``catchup_min_interval``, and (``capped``) fewer than ``_BYPASS_BURST`` such
        starts were made in the last ``_BYPASS_BURST`` intervals (so all writers together
        are asked this way no faster than the rate limit allows on average)."""
        interval = self.config.catchup_min_interval
        if (
            writer is None or self._catchup_failures
            or now < self._asked_at.get(writer, float("-inf")) + interval
            or not any(item.writer == writer for item in self._held)
        ):
            return False
        window = _BYPASS_BURST * interval
        return not capped or sum(now - t < window for t in self._bypasses) < _BYPASS_BURST

    def _note_asked(self, peer: str, now: float) -> None:
        """Remember that ``peer`` was asked (or answered) at ``now``; entries older than
        ``catchup_min_interval`` no longer matter and are dropped (bounded by the peers
        asked within one interval)."""
        interval = self.config.catchup_min_interval
        self._asked_at = {p: t for p, t in self._asked_at.items() if now - t < interval}
        self._asked_at[peer] = now

    def _backoff_delay(self) -> float:
        """Jittered exponential backoff after ``_catchup_failures`` unsatisfied catch-ups."""
        base: float = self.config.catchup_min_interval * 2.0 ** min(self._catchup_failures, 30)
        return min(self.config.catchup_max_backoff, base) * (0.5 + 0.5 * self._rng.random())

    def _on_catchup_failed(self, ev: CatchupFailed) -> list[Action]:
        if not self._catchup_running:
            return []
        self._catchup_running = False
        self._catchup_failures += 1
        n = self._catchup_failures
        self._catchup_not_before = ev.now + self._backoff_delay()
        # Until a peer answers: alternate between the peer wanted and any peer.
        self._catchup_wanted = True
        self._catchup_full = self._catchup_full or self._catchup_asked_full
        if self._catchup_peer is None and n % 2 == 1:
            self._catchup_peer = self._catchup_asked
        out: list[Action] = [Report("catchup", (ev.outcome,)), Report("catchup", ("retry",))]
        return out + self._pump_catchup(ev.now)

    def _on_sync_requested(self, ev: SyncRequested) -> list[Action]:
        mine = self.tree.state
        full = ev.full or lacks(ev.context, mine.context)
        document = mine if full else ORMap(is_delta=True)
        evidence: list[bytes] = []
        if full:
            vouch = ev.context.copy()
            budget = self.config.max_evidence_reply_bytes
            for item in self._evidence:
                if len(evidence) >= self.config.max_evidence_reply_messages:
                    break
                if item.lacked_by(ev.context) and len(item.raw) <= budget:
                    evidence.append(item.raw)
                    budget -= len(item.raw)
                    vouch.merge(CausalContext(
                        {item.writer: item.upto}, [(item.writer, k) for k in item.extra]))
            # The answer carries only what this replica can vouch for to this asker: its own
            # dots, and other writers' the asker has seen or gets in the evidence sent ahead.
            # An honest answer then never reaches further; one that does is counted against
            # its signer (``_on_catchup_replied``).
            kept = relayed(mine, self.node_id, vouch)
            if kept.document is not None:
                document = kept.document
                cut = tuple(sorted(kept.stripped)[:MAX_CUT_WRITERS])
                return [SendState(ev.reply_to, document, tuple(evidence), cut)]
        return [SendState(ev.reply_to, document, tuple(evidence))]

    def _on_announce(self, ev: AnnounceReceived) -> list[Action]:
        if ev.peer == self.node_id:
            return []
        mine = self.tree.state.context
        out: list[Action] = []
        window = self._windows.get(ev.peer)
        if ev.sequence > (window.top if window is not None else 0):
            # The announcer published batches not applied here (its last one lost, maybe a
            # removal, which no context shows): its full state is owed.
            self._owed.setdefault(ev.peer, 0)
            out += self._want_catchup(ev.now, ev.peer, full=True)
        elif lacks(mine, ev.context):
            out += self._want_catchup(ev.now, ev.peer, full=False)
        if lacks(ev.context, mine):
            # The announcer lacks what this replica has (e.g. batches published while it
            # was away, that no later batch will reveal by a gap, and that an untargeted
            # catch-up answered by another peer did not carry): announce back, so that it
            # asks here. At most one announce per ``catchup_min_interval``.
            out += self._announce_soon(ev.now)
        return out

    def _announce_soon(self, now: float) -> list[Action]:
        if now >= self._announce_not_before:
            self._announce_not_before = now + self.config.catchup_min_interval
            return [Announce()]
        if self._announce_timer != self._announce_not_before:
            self._announce_timer = self._announce_not_before
            return [ScheduleTimer(TIMER_ANNOUNCE, self._announce_timer)]
        return []

    def _on_repair(self, ev: RepairApplied) -> list[Action]:
        out: list[Action] = []
        if ev.delta.store or ev.delta.context.size():  # empty: only ``stripped`` to record
            # A repair carries a peer's whole entries.
            self._merge_noting(ev.delta, ev.hlc, whole=True)
            self.last_record_seq = max(self.last_record_seq, ev.record_seq)
            out.append(Changed(tuple(ev.delta.store.keys()) if ev.delta.store else ()))
            if self._held:
                out += self._drain()
        for owner in ev.stripped:
            # Dots of ``owner`` the repair's source could not vouch for: its own signed
            # state brings them (the heal converges after that catch-up).
            if owner != self.node_id:
                self._owed.setdefault(owner, 0)
                out += self._want_catchup(ev.now, owner)
        return out + self._pump_catchup(ev.now)


    def _on_snapshot_taken(self, ev: SnapshotTaken) -> list[Action]:
        self.snapshot_seq = max(self.snapshot_seq, ev.upto)
        mark = self.received_mark() if ev.received_mark is None else ev.received_mark
        covered = max(0, min(len(self._received), mark - self._received_base))
        if covered:
            self._received_bytes -= sum(map(_received_size, self._received[:covered]))
            del self._received[:covered]
            self._received_base += covered
        return []

    def _on_received_logged(self, ev: ReceivedLogged) -> list[Action]:
        self.last_record_seq = max(self.last_record_seq, ev.upto)
        return []

    def _keep_received(self, raw: Received) -> list[Action]:
        """Keep a joined envelope until a local write logs it or a snapshot covers it; past
        ``max_unlogged_bytes``, hand them all to the driver to log on their own."""
        if not raw:
            return []
        self._received.append(raw)
        self._received_bytes += _received_size(raw)
        if self._received_bytes > self.config.max_unlogged_bytes and LOG_CAUSAL_PAST:
            kept, self._received = tuple(self._received), []
            self._received_base += len(kept)
            self._received_bytes = 0
            return [LogReceived(kept)]
        return []

    def _on_timer(self, ev: TimerFired) -> list[Action]:
        if ev.name == TIMER_FLUSH:
            if self._flush_at is None or ev.now < self._flush_at:
                return []
            self._flush_at = None
            return self._maybe_publish(ev.now)
        if ev.name == TIMER_PUBLISH_RETRY:
            if self._retry_at is None or ev.now < self._retry_at:
                return []
            self._retry_at = None
            return self._maybe_publish(ev.now, force=True)
        if ev.name == TIMER_ANNOUNCE:
            if self._announce_timer is None or ev.now < self._announce_timer:
                return []
            self._announce_timer = None
            return self._announce_soon(ev.now)
        if ev.name == TIMER_IDLE_ANNOUNCE:
            if self._idle_announce_at is None:
                return []
            if ev.now < self._idle_announce_at:  # published since it was armed: not idle yet
                return [ScheduleTimer(TIMER_IDLE_ANNOUNCE, self._idle_announce_at)]
            self._idle_announce_at = None
            return self._announce_soon(ev.now)
        if ev.name == TIMER_HOLD:
            return self._expire_held(ev.now)
        if ev.name == TIMER_CATCHUP:
            if self._catchup_timer is None or ev.now < self._catchup_timer:
                return []
            self._catchup_timer = None
            return self._pump_catchup(ev.now)
        return []

    # -- publishing --------------------------------------------------------------------------

    def _queue(
        self,
        now: float,
        delta: ORMap,
        ops: int,
        nbytes: int,
        upto: int,
        record: bytes | None,
        *,
        owned: bool = False,
    ) -> list[Action]:
        """Join a committed delta into the pending batch. ``record``: ``delta`` encoded;
        while the batch is that one delta, publishing reuses those bytes. ``owned``: no one
        else holds ``delta`` (else it is copied before anything joins in: the writer got it
        back from ``write``)."""
        self._pending_upto = max(self._pending_upto, upto)
        if self._pending is None:
            self._pending, self._pending_owned = delta, owned
            self._pending_record = record
            self._pending_since = now
        else:
            self._own_pending()
            self._pending.merge(delta)
        self._pending_ops += ops
        self._pending_bytes += nbytes
        if self._full() or self._alone():
            return self._maybe_publish(now, force=True)
        if self._flush_at is None:
            return self._maybe_publish(now)
        return []

    def publishes_at_once(self, now: float, ops: int, nbytes: int) -> int | None:
        """The sequence an EVENTUAL commit of ``ops`` ops and ``nbytes`` record bytes,
        committed at ``now`` or later, goes out with at once, alone (its record the
        document), or None when it would wait or join others. The driver may seal that batch
        while the commit is made durable; it uses those bytes only for the very ``Publish``
        it then gets (same sequence, delta and record), so a wrong guess costs a seal, never
        a wrong envelope."""
        if self._pending is not None or self._inflight is not None or self._retry_at is not None:
            return None
        # _maybe_publish's rule, for a pending batch that would be this commit alone.
        if self._goes_alone(nbytes) or self._fills(ops, nbytes) or now >= self._due_after(now):
            return self.sequence + 1
        return None

    def _due(self) -> float:
        """When the pending batch may go (``_due_after`` its first delta)."""
        return self._due_after(self._pending_since)

    def _due_after(self, since: float) -> float:
        """When a batch whose first delta came at ``since`` may go. Adaptive: a flush window
        after the previous batch went out, and not before its first delta (so at once after a
        quiet window); else a window after its first delta."""
        if self.config.adaptive_flush:
            return max(since, self._last_sent_at + self.config.flush_interval)
        return since + self.config.flush_interval

    def _alone(self) -> bool:
        """The pending batch is one delta with its record, large enough to go alone."""
        return self._pending_record is not None and self._goes_alone(self._pending_bytes)

    def _goes_alone(self, nbytes: int) -> bool:
        alone = self.config.publish_alone_bytes
        return bool(alone) and nbytes >= alone

    def _full(self) -> bool:
        return self._fills(self._pending_ops, self._pending_bytes)

    def _fills(self, ops: int, nbytes: int) -> bool:
        return ops >= self.config.max_batch_ops or nbytes >= self.config.max_batch_bytes // 2

    def _own_pending(self) -> None:
        """Make the pending batch ours to join into; its record no longer matches it."""
        assert self._pending is not None
        if not self._pending_owned:
            self._pending, self._pending_owned = self._pending.copy(), True
        self._pending_record = None

    def _maybe_publish(self, now: float, *, force: bool = False) -> list[Action]:
        """Publish the pending batch if one may go now: none in flight, no retry backoff
        running, and its time come (``_due``; or ``force``, or the batch full, or one delta
        large enough to go alone)."""
        if self._pending is None or self._inflight is not None or self._retry_at is not None:
            return []
        due = self._due()
        if not (force or self._full() or self._alone() or now >= due):
            self._flush_at = due
            return [ScheduleTimer(TIMER_FLUSH, due)]
        action = Publish(self.sequence + 1, self._pending, self._pending_ops, self._pending_record)
        self._inflight = (action, self._pending_upto, self._pending_since, self._pending_owned)
        self._last_sent_at = now
        self._pending, self._pending_ops, self._pending_bytes = None, 0, 0
        self._pending_record = None
        self._flush_at = None
        return [action]

    # -- applying ----------------------------------------------------------------------------

    def _admits(self, item: _Held) -> bool:
        window = self._windows.get(item.writer)
        follows = item.sequence == 1 if window is None else window.follows(item.sequence)
        exempt = item.writer if follows else None
        return not unseen_claims(item.document, self.tree.state.context, exempt=exempt, limit=1)

    def _merge_remote(self, doc: ORMap, *, whole: bool) -> None:
        """Join a peer's document, first adopting its entries of quarantined keys.

        Adopting joins the peer's entry with this replica's own entry (what it wrote since
        the load) as if this replica's context were empty there, so every dot the peer holds
        is taken and only what the peer saw removed is dropped. ``whole``: the document holds
        the peer's whole entry of each key it names (a full state or a repair), after which
        the key is no longer quarantined; a delta's entry is adopted but leaves it so.
        STRONG keys and claims of the STRONG log's dots are left out (``without_strong``)."""
        doc = without_strong(doc, self.config.strong_prefixes)
        if self.quarantined and doc.store:
            state = self.tree.state
            store = state.store if state.store is not None else MapStore()
            for key in sorted(self.quarantined & doc.store.keys()):
                theirs = join_entry(None, doc.store[key], _EMPTY, doc.context, True, False, 2)
                mine = store.get(key)
                if theirs is not None:
                    mine = join_entry(mine, theirs, _EMPTY, doc.context, True, False, 2)
                if mine is not None:
                    store[key] = mine
                if whole:
                    self.quarantined.discard(key)
            if store:
                state.store = store
        self.tree.merge(doc)
        if whole:
            # Deltas' timestamps are observed by the driver (with its drift check); whole
            # entries may hold older writes' timestamps above this clock: a write that
            # overwrites one of them must carry a higher timestamp.
            self.clock.witness(max_hlc(doc.store))

    def _expire_held(self, now: float) -> list[Action]:
        """Reject every delta held ``max_hold`` seconds or more (its claims stayed unbacked);
        re-arm the timer for the oldest one left."""
        out: list[Action] = []
        keep: list[_Held] = []
        for item in self._held:
            if item.since + self.config.max_hold <= now:
                self._held_bytes -= item.nbytes
                self._owed.setdefault(item.writer, 0)
                out.append(Report("rejected", ("unbacked_context", item.writer)))
            else:
                keep.append(item)
        self._held = keep
        if keep:
            out.append(ScheduleTimer(
                TIMER_HOLD, min(i.since for i in keep) + self.config.max_hold))
        return out

    def _join_remote(self, item: _Held) -> list[Action]:
        doc = item.document
        cut: list[Action] = []
        if item.seen_at is not None:
            # Claims of other writers' dots that were not seen here when the batch arrived
            # are cut, not honoured now that the dots are here: a dot is predictable, and a
            # claim signed before the write existed (a stolen key "pre-claiming" another
            # writer's next writes, held by the gate until they arrive) would remove it as if
            # its signer had seen it. An honest batch that merely overtook the write it
            # removes loses nothing: its writer is asked for its state, which removes the
            # write as that writer holds it removed (a relayed state's claims of dots held
            # here are honoured).
            kept = relayed(doc, item.writer, item.seen_at)
            if kept.document is not None and kept.stripped:
                doc = kept.document
                cut = self._claims_cut(item.writer)
        if item.hlc is not None:
            later = self.without_later_claims(doc, item.writer, item.hlc, batch=True)
            if later is not doc:
                doc = later
                cut = cut or self._claims_cut(item.writer)
        whole = not doc.is_delta  # a full state: its entries are whole
        first = self._first_unseen(item.writer, doc.context) if item.hlc is not None else 0
        self._merge_remote(doc, whole=whole)
        self._windows.setdefault(item.writer, SequenceWindow()).add(item.sequence)
        if item.raw:
            self._keep_evidence(item.writer, doc.context, item.raw)
        if item.hlc is not None:
            self._note_written(item.writer, doc.context, item.hlc, first)
        out: list[Action] = [
            *self._keep_received(Clipped(item.raw, doc) if cut and item.raw else item.raw),
            Changed(None if whole else tuple(doc.store.keys()) if doc.store else ()),
            Report("applied", item.report),
            *cut,
        ]
        ctx = self.tree.state.context
        if item.writer not in self._given_up and (
            ctx.version_vector.get(item.writer, 0) < ctx.max_counter(item.writer)
        ):
            # A hole below a dot of the writer's: a batch of it was lost. Sequence gaps show
            # that too, but not for the first batch seen from a writer (or after a restart).
            self._catchup_wanted = self._catchup_full = True
            if self._catchup_peer is None:
                self._catchup_peer = item.writer
        return out + self._count_ops(max(1, len(doc)))

    def _claims_cut(self, claimer: str) -> list[Action]:
        """A batch of ``claimer``'s was joined without some of its claims: report it, and
        ask the claimer for its state (which brings the removals it still holds)."""
        out: list[Action] = [Report("gated", ("cut",))]
        if claimer not in self._given_up:
            self._owed.setdefault(claimer, 0)
            out += self._want_catchup(self._last_now, claimer, urgent=True)
        return out

    def _note_written(
        self, writer: str, context: CausalContext, hlc: int, first: int
    ) -> None:
        """Remember when ``writer``'s dots in a batch joined here were written (its envelope
        timestamp): the last ``RECENT_BATCHES`` batches of each writer. ``first``: the
        lowest of those dots not seen here before the join (``_first_unseen``; 0: none).
        The batch's context also claims the older dots its writes overwrote, written
        before it: taking them as written now would drop honest claims of them (and of
        every dot between)."""
        lo = context._vv.get(writer, 0)
        extra = context._cloud.get(writer)
        hi = max(lo, max(extra) if extra else 0)
        if not hi or not first or first > hi:
            return
        self._note_range(writer, first, hi, hlc)

    def _first_unseen(self, writer: str, context: CausalContext) -> int:
        """The lowest of ``writer``'s dots in ``context`` this replica has not seen (0:
        none). Costs O(``context``'s cloud of ``writer`` + this context's cloud)."""
        seen = self.tree.state.context
        top = seen._vv.get(writer, 0)
        out = 0
        if context._vv.get(writer, 0) > top:
            k = top + 1
            while seen.covers(writer, k):  # bounded: the receiver's cloud dots above top
                k += 1
            out = k if k <= context._vv[writer] else 0
        for k in context._cloud.get(writer, ()):
            if (not out or k < out) and not seen.covers(writer, k):
                out = k
        return out

    def _note_range(self, writer: str, low: int, hi: int, hlc: int) -> None:
        """Record that ``writer``'s dots ``low..hi`` were written at ``hlc`` at the latest."""
        recent = self._recent.get(writer)
        if recent is None:
            recent = self._recent[writer] = deque(maxlen=RECENT_BATCHES)
        recent.append((low, hi, hlc))

    def without_later_claims(
        self, doc: ORMap, claimer: str, hlc: int, *, batch: bool = False
    ) -> ORMap:
        """``doc`` (signed by ``claimer`` at ``hlc``) without its claims of other writers'
        dots written after ``hlc``, as far as this replica knows when they were written
        (the batches it joined lately): no signer can have seen a write made after it
        signed, so such a claim (a "pre-claim" of a predictable dot, delivered after the
        write) removes nothing, beyond ``CLAIM_SKEW_MS`` of clock skew. A ``batch`` (a delta)
        signed before this replica started keeps only its claimer's own claims (the write
        times known before the start are gone; its claimer is asked for its state instead).
        ``doc`` itself when no claim is dropped."""
        ctx = doc.context
        if batch and hlc < self._start_hlc and any(
            r != claimer for r in ctx._vv.keys() | ctx._cloud.keys()
        ):
            # Signed before this replica started: the write times it knew then are gone, so
            # none of its claims of other writers' dots can be shown to predate those writes.
            # Only the claimer's own claims stay; its current state (asked for by the caller)
            # brings any removal it still holds.
            return ORMap(doc.store, CausalContext(
                {claimer: ctx._vv[claimer]} if claimer in ctx._vv else {},
                [(claimer, k) for k in ctx._cloud.get(claimer, ())]), is_delta=doc.is_delta)
        drop: dict[str, set[int]] = {}
        limit = hlc + (CLAIM_SKEW_MS << LOGICAL_BITS)
        for r, batches in self._recent.items():
            if r == claimer:
                continue
            top = max(ctx._vv.get(r, 0), max(ctx._cloud.get(r, ()), default=0))
            if not top:
                continue
            # Newest first: a writer's batches arrive in timestamp order (mostly), and the
            # first one written before ``hlc`` ends the walk — O(1) for an honest claim.
            for low, hi, written in reversed(batches):
                if written <= limit:
                    break
                if low <= top:
                    for k in range(low, min(hi, top) + 1):
                        if ctx.covers(r, k):
                            drop.setdefault(r, set()).add(k)
        if not drop:
            return doc
        vv = dict(ctx._vv)
        cloud = [(r, k) for r, ks in ctx._cloud.items() for k in ks
                 if k not in drop.get(r, ())]
        for r, ks in drop.items():
            n = vv.get(r, 0)
            first = min(ks)
            if n >= first:
                vv[r] = first - 1
                cloud += [(r, k) for k in range(first + 1, n + 1) if k not in ks]
        return ORMap(doc.store, CausalContext(vv, cloud), is_delta=doc.is_delta)

    def _seen_if_claims_unseen(self, doc: ORMap, writer: str) -> CausalContext | None:
        """A copy of this replica's context if ``doc``, a batch of ``writer``'s, may claim
        a dot of another writer's not seen here (cheap: its vector and cloud against ours);
        else None."""
        seen = self.tree.state.context
        ctx = doc.context
        vv = seen._vv
        if any(r != writer and n > vv.get(r, 0) for r, n in ctx._vv.items()) or any(
            r != writer and any(not seen.covers(r, k) for k in ks)
            for r, ks in ctx._cloud.items()
        ):
            return seen.copy()
        return None

    def _keep_evidence(
        self, writer: str, context: CausalContext, raw: bytes, *, state: bool = False
    ) -> None:
        """Keep ``writer``'s signed batch or full state (``state``; it replaces the one kept
        before) as evidence of ``writer``'s dots, if it claims any; drop the oldest past
        ``max_evidence_bytes``."""
        if writer == self.node_id or len(raw) > self.config.max_evidence_bytes:
            return
        upto = context._vv.get(writer, 0)
        extra = context._cloud.get(writer)
        if not upto and not extra:
            return  # no dot of its writer's: nothing a relay could not vouch for itself
        if state:
            old = [e for e in self._evidence if e.state and e.writer == writer]
            for e in old:
                self._evidence.remove(e)
                self._evidence_bytes -= len(e.raw)
        self._evidence.append(
            _Evidence(writer, upto, tuple(sorted(extra)) if extra else (), raw, state))
        self._evidence_bytes += len(raw)
        while self._evidence_bytes > self.config.max_evidence_bytes and self._evidence:
            self._evidence_bytes -= len(self._evidence.popleft().raw)

    def _drain(self) -> list[Action]:
        """Join every held delta the gate now admits, until none is left or none passes."""
        out: list[Action] = []
        progress = True
        while progress and self._held:
            progress = False
            for item in list(self._held):
                if self._admits(item):
                    self._held.remove(item)
                    self._held_bytes -= item.nbytes
                    if self.config.add_only and removes(item.document, self.tree.state):
                        # Its claims arrived meanwhile: dots it would now remove.
                        out.append(Report("rejected", ("removal", item.writer)))
                        continue
                    out += self._join_remote(item)
                    out.append(Report("gated", ("drained",)))
                    progress = True
        return out

    def _count_ops(self, ops: int) -> list[Action]:
        self._ops_since_snapshot += ops
        if self._ops_since_snapshot >= self.config.snapshot_every:
            self._ops_since_snapshot = 0
            return [Snapshot()]
        return []

    # -- catching up -------------------------------------------------------------------------

    def _want_catchup(
        self, now: float, peer: str | None, *, urgent: bool = False, full: bool = True
    ) -> list[Action]:
        self._catchup_wanted = True
        self._catchup_full = self._catchup_full or full
        if peer is not None and self._catchup_peer is None:
            self._catchup_peer = peer
        if urgent and not self._catchup_running:
            self._catchup_not_before = min(self._catchup_not_before, now)
        return self._pump_catchup(now)

    def _pump_catchup(self, now: float) -> list[Action]:
        """Start the wanted catch-up if none runs and the rate limit or backoff allows."""
        if not self._catchup_wanted or self._catchup_running:
            return []
        at = self._catchup_not_before
        peer = self._catchup_peer
        if now < at and peer is not None and self._asks_held_writer(peer, now):
            # A writer whose batch is held is asked at once, even right after another peer
            # answered: starts to one peer stay ``catchup_min_interval`` apart, all such
            # starts average no more than one per interval, and a failure backs off every
            # start.
            at = now
            window = _BYPASS_BURST * self.config.catchup_min_interval
            self._bypasses = [t for t in self._bypasses if now - t < window] + [now]
        if now < at:
            if self._catchup_timer != at:
                self._catchup_timer = at
                return [ScheduleTimer(TIMER_CATCHUP, at)]
            return []
        self._catchup_running, self._catchup_wanted = True, False
        self._catchup_asked, self._catchup_peer = self._catchup_peer, None
        if self._catchup_asked is not None:
            self._note_asked(self._catchup_asked, now)
        self._catchup_not_before = now + self.config.catchup_min_interval
        full, self._catchup_full = self._catchup_full, False
        self._catchup_asked_full = full
        self._catchup_from = self.tree.state.context.copy()
        return [RequestCatchup(self._catchup_asked, self.config.catchup_timeout, full)]
