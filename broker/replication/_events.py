"""Events a replication machine takes and actions it returns (frozen dataclasses).

Every event carries ``now``: monotonic seconds, read by the driver (or a simulator's clock).
Pure: no I/O, no clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from broker.crdt import CausalContext, ORMap

__all__ = [
    "Action",
    "Announce",
    "AnnounceReceived",
    "CatchupFailed",
    "CatchupReplied",
    "CatchupWanted",
    "Changed",
    "Clipped",
    "CommitFailed",
    "Committed",
    "DeltaReceived",
    "Event",
    "FlushWanted",
    "LogReceived",
    "Publish",
    "PublishFailed",
    "Published",
    "Received",
    "ReceivedLogged",
    "Reconnected",
    "RepairApplied",
    "Report",
    "RequestCatchup",
    "SaveProgress",
    "ScheduleTimer",
    "SendState",
    "SlowConsumer",
    "Snapshot",
    "SnapshotTaken",
    "Started",
    "StateEvidence",
    "SyncRequested",
    "SyncWanted",
    "TimerFired",
]


# -- events ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Started:
    """The driver loaded the store and subscribed: publish what a crash left, catch up.
    ``wall_ms``: the wall clock then (claims signed before it are judged without the write
    times this replica knew before it started: ``without_later_claims``)."""

    now: float
    wall_ms: int | None = None


@dataclass(frozen=True, slots=True)
class Committed:
    """A local write's delta is durable (store record ``record_seq``): it is acknowledged and
    may now leave the process. ``record``: ``delta`` encoded (reused when it is a batch
    alone); ``eventual``: publish in the next batch, else wait for ``SyncWanted``."""

    now: float
    delta: ORMap
    ops: int
    nbytes: int
    record_seq: int
    record: bytes | None = None
    eventual: bool = True


@dataclass(frozen=True, slots=True)
class CommitFailed:
    """A commit of ``ops`` accepted ops failed: they will never be published."""

    now: float
    ops: int


@dataclass(frozen=True, slots=True)
class SyncWanted:
    """Publish the LOCAL writes committed so far, and anything pending, now."""

    now: float


@dataclass(frozen=True, slots=True)
class FlushWanted:
    """Publish the pending batch now instead of at the end of the flush window."""

    now: float


@dataclass(frozen=True, slots=True)
class Published:
    """The ``Publish`` with ``sequence`` reached the transport as ``nbytes`` bytes."""

    now: float
    sequence: int
    nbytes: int = 0


@dataclass(frozen=True, slots=True)
class PublishFailed:
    """The ``Publish`` with ``sequence`` failed; ``too_large``: it can never fit one message."""

    now: float
    sequence: int
    too_large: bool = False


@dataclass(frozen=True, slots=True)
class DeltaReceived:
    """A peer's batch, already verified and decoded (``codec.open``), from ``writer``.

    ``report``: arguments the driver wants back in ``Report("applied", report)`` once the
    delta is joined (version, bytes, lag); opaque to the machine."""

    now: float
    writer: str
    sequence: int
    document: ORMap
    nbytes: int
    report: tuple[Any, ...] = ()
    raw: bytes = b""
    """The envelope as received. Once joined it is returned by the next local ``write``
    (``Written.received``), to be logged before that write: a write's causal past must be as
    durable as the write (see ``ReplicationMachine.write``)."""
    hlc: int | None = None
    """The envelope's hybrid timestamp (checked for drift by the driver): no last-writer-wins
    timestamp in the batch may be above it (``_gate.forged``). None: not checked."""


@dataclass(frozen=True, slots=True)
class CatchupWanted:
    """Catch up (from ``peer`` or any): a caller asked, or something was missed.
    ``urgent``: ignore the rate limit (still one catch-up at a time)."""

    now: float
    peer: str | None = None
    urgent: bool = False


@dataclass(frozen=True, slots=True)
class SlowConsumer:
    """The transport dropped messages of the delta subscription."""

    now: float


@dataclass(frozen=True, slots=True)
class Reconnected:
    """The connection came back; messages may have been missed meanwhile."""

    now: float


@dataclass(frozen=True, slots=True)
class CatchupReplied:
    """A peer answered the running catch-up: ``document`` is its full state, or an empty
    delta (it has nothing this replica lacks). ``sequence``: the peer's publish sequence
    when it answered (its state holds every batch up to it)."""

    now: float
    peer: str
    sequence: int
    document: ORMap
    raw: bytes = b""
    """The answer's envelope as received (see ``DeltaReceived.raw``)."""
    hlc: int | None = None
    """The answer's envelope timestamp (checked against this node's clock): no
    last-writer-wins timestamp in the state may be above it."""
    cut: tuple[str, ...] = ()
    """Writers the peer cut out of its answer (``SendState.cut``): ask them, then the peer
    again."""
    vouch: CausalContext | None = None
    """The context the request carried, joined with each writer's own dots in the evidence
    that came with the answer: what an honest peer cut its answer to (``SendState``). The
    answer is judged against it, not against this replica's context now: a dot issued or
    received after the request left cannot have been seen by the peer for this answer, so
    a claim of it is a pre-claim (removes nothing) and an entry under it is not vouched for.
    None: judged against the context now."""
    evidence_dropped: bool = False
    """Evidence that came with the answer was dropped unread (past the driver's bound: a
    flood of the reply inbox, which anyone who can publish there may send): what the answer
    carries beyond ``vouch`` may be backed by it, so its signer is not counted
    (``unvouched_state``) for it; it is still joined without it."""


@dataclass(frozen=True, slots=True)
class CatchupFailed:
    """The running catch-up failed: ``outcome`` is ``no_peer`` (none answered in time),
    ``rejected`` (an answer failed verification) or ``too_large``."""

    now: float
    outcome: str


@dataclass(frozen=True, slots=True)
class SyncRequested:
    """A peer whose causal context is ``context`` asks for this replica's state;
    ``reply_to``: the driver's handle for the answer (opaque). Answered with the full state
    when ``full`` or when the asker lacks a dot seen here, else with an empty delta."""

    now: float
    context: CausalContext
    reply_to: Any
    full: bool = False
    """The asker wants the full state even if it lacks no dot (it may have missed a
    removal: removals issue no dot, so its context cannot show it)."""


@dataclass(frozen=True, slots=True)
class AnnounceReceived:
    """Peer ``peer`` announced what it has seen (``context``) and the sequence of the last
    batch it published (``sequence``; 0 when unknown)."""

    now: float
    peer: str
    context: CausalContext
    sequence: int = 0


@dataclass(frozen=True, slots=True)
class StateEvidence:
    """A catch-up answer came with ``writer``'s own full state (sealed by ``writer``, as a
    relay kept it from an earlier catch-up): join what ``writer`` vouches for in it (its own
    dots, and other writers' already seen here). ``hlc``: its envelope timestamp."""

    now: float
    writer: str
    document: ORMap
    raw: bytes
    hlc: int


@dataclass(frozen=True, slots=True)
class RepairApplied:
    """The driver logged a healer's repair delta as store record ``record_seq``: join it.
    ``stripped``: writers whose dots the repair's source could not vouch for (dropped,
    ``relayed``): each is owed a catch-up, which brings them under their own signature."""

    now: float
    delta: ORMap
    record_seq: int
    stripped: tuple[str, ...] = ()
    hlc: int | None = None
    """The timestamp of the voucher the repair was computed from (None: unknown)."""


@dataclass(frozen=True, slots=True)
class SnapshotTaken:
    """A snapshot holding every store record up to ``upto`` was written. ``received_mark``:
    ``ReplicationMachine.received_mark()`` read when the state was encoded (None: now, for a
    driver that encodes and reports without anything joined in between); the envelopes
    joined before it are in the snapshot and need no logging."""

    now: float
    upto: int
    received_mark: int | None = None


@dataclass(frozen=True, slots=True)
class ReceivedLogged:
    """Store records up to ``upto`` were appended (received state, with or without a local
    write): a snapshot may cover them."""

    now: float
    upto: int


@dataclass(frozen=True, slots=True)
class TimerFired:
    """The timer named ``name`` (from ``ScheduleTimer``) is due."""

    now: float
    name: str


Event = (
    Started | Committed | CommitFailed | SyncWanted | FlushWanted | Published | PublishFailed
    | DeltaReceived | CatchupWanted | SlowConsumer | Reconnected | CatchupReplied
    | CatchupFailed | SyncRequested | AnnounceReceived | RepairApplied | SnapshotTaken
    | ReceivedLogged | TimerFired | StateEvidence
)
"""Everything a replication machine reacts to."""


# -- actions -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Publish:
    """Seal ``document`` as batch ``sequence`` and publish it on the delta subject; then
    report ``Published`` or ``PublishFailed``. ``record``: ``document`` already encoded."""

    sequence: int
    document: ORMap
    ops: int
    record: bytes | None = None


@dataclass(frozen=True, slots=True)
class SaveProgress:
    """Persist the publish progress: batch ``sequence`` published, records <= ``upto`` too."""

    sequence: int
    upto: int


@dataclass(frozen=True, slots=True)
class RequestCatchup:
    """Ask ``peer`` (or any) for its state with this replica's context; wait ``timeout``
    seconds; then report ``CatchupReplied`` or ``CatchupFailed``."""

    peer: str | None
    timeout: float
    full: bool = True
    """Ask for the full state even when no dot is lacking (see ``SyncRequested.full``);
    False only when every reason for this catch-up was a peer's announce of dots."""


@dataclass(frozen=True, slots=True)
class SendState:
    """Answer the sync request ``reply_to`` with ``document`` (a full state, or an empty
    delta meaning "nothing you lack")."""

    reply_to: Any
    document: ORMap
    evidence: tuple[bytes, ...] = ()
    """Other writers' signed batches, as they arrived here, that the asker lacks dots of:
    send them before ``document`` (the asker keeps of a relayed state only this replica's
    own dots and what it saw; the rest travels under its writers' own signatures)."""
    cut: tuple[str, ...] = ()
    """Writers whose dots or claims ``document`` leaves out (the asker had not seen them and
    no evidence of them went with it): the asker asks those writers, then this replica
    again (its removals of their dots can be joined only once the asker has seen them).
    Sent with the answer (``Worknode-Cut``, under the reply's signature)."""


@dataclass(frozen=True, slots=True)
class Announce:
    """Publish this replica's context on the sync subject (no answer expected)."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Write a snapshot of the state (records up to ``Machine.snapshot_upto()``); report
    ``SnapshotTaken``."""


@dataclass(frozen=True, slots=True)
class Clipped:
    """A received envelope of which only ``document`` was joined (a relayed state cut to
    what its relay vouches for): ``document`` is what to log, never the envelope."""

    raw: bytes
    document: ORMap


Received = bytes | Clipped
"""A received envelope joined whole (its bytes), or in part (``Clipped``)."""


@dataclass(frozen=True, slots=True)
class LogReceived:
    """Log ``envelopes`` (received, joined here, kept past ``max_unlogged_bytes``) as store
    records marked received, in order with local writes' commits (after the commits already
    queued, before any queued later); report ``ReceivedLogged``."""

    envelopes: tuple[Received, ...]


@dataclass(frozen=True, slots=True)
class ScheduleTimer:
    """Report ``TimerFired(name)`` at monotonic time ``at`` (replaces a timer of that name)."""

    name: str
    at: float


@dataclass(frozen=True, slots=True)
class Changed:
    """The state changed: the top-level ``keys`` a delta touched, or None (any key)."""

    keys: tuple[str, ...] | None


@dataclass(frozen=True, slots=True)
class Report:
    """Tell the observer: ``observer.<event>(subject, *args)`` (see ``ReplicaObserver``)."""

    event: str
    args: tuple[Any, ...]


Action = (
    Publish | SaveProgress | RequestCatchup | SendState | Announce | Snapshot | LogReceived
    | ScheduleTimer | Changed | Report
)
"""Everything a replication machine asks its driver to do."""
