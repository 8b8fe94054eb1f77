"""STRONG consistency for a replica: its STRONG keys as a state machine over a JetStream log.

``StrongMode`` attaches to a ``Replica`` whose subject declares STRONG worknode ids
(``ReplicaConfig.strong_prefixes``) and follows the subject's STRONG log (``StrongLog``, one
JetStream stream per subject: R3 in a cluster, R1 on one server), applying every entry in
the stream's order through the machine (``ReplicationMachine.apply_log``; the rules are in
``broker.replication._strong``).

- **Writes** (``write``): each op's delta is computed against the key as this replica
  applied it, sealed (signed by this node) and published on the key's log subject with
  ``Nats-Expected-Last-Subject-Sequence`` = the key's version (the stream sequence of its
  last entry): a compare-and-set against the state it read. Several keys go as one atomic
  batch (all or none). ``if_version`` makes it conditional: a key that moved past it raises
  ``ConflictError`` carrying the current version; without it a conflict is retried after
  applying the log up to the current version (bounded). The write returns once the stream
  acknowledged it *and* this replica applied it.
- **Reads** (``read``) are linearizable: a fence (an empty entry) is published to the log;
  its acknowledgement comes after every write acknowledged before the read began, so once
  this replica applied the log up to the fence, its state of the STRONG keys includes them
  all. Reading the server instead is not enough (``broker.transport._strong_log``: a direct
  get may be answered by a replica behind; a deposed leader in a minority answers from its
  old state; nats-server removed its read-after-write option).
- **Minority**: a write or fence that cannot reach a stream leader with a quorum fails
  within ``timeout`` (``UnavailableError``; ``OutcomeUnknownError`` when the write may have
  been stored): STRONG never hangs and never succeeds there, while LOCAL and EVENTUAL go on.
  When the partition heals the follower replays the log from the last applied sequence
  (fast-forward); the healer reconciles the EVENTUAL part as usual.
- **Restart**: what the replica applied and made durable is in its state (the log's dots);
  the follower resumes from there.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Protocol

from broker.crdt import ORMap
from broker.crdt._ops import TreeOp
from broker.crdt._stores import dots_of
from broker.errors import (
    CodecError,
    ConflictError,
    InvalidArgumentError,
    OutcomeUnknownError,
    TreeError,
    UnavailableError,
    WorknodeError,
)
from broker.replication import STRONG_AUTHOR, is_strong, strong_entry
from broker.transport import StrongLog
from broker.transport._subjects import PREFIX, validate_token

if TYPE_CHECKING:
    from broker.replica import Replica

__all__ = [
    "MAX_CONFLICT_RETRIES",
    "STRONG_OPS",
    "STRONG_OUTCOMES",
    "NullStrongObserver",
    "StrongMode",
    "StrongObserver",
    "StrongRead",
    "strong_log_for",
    "strong_stream",
    "strong_subject",
]

log = logging.getLogger(__name__)

MAX_CONFLICT_RETRIES: Final = 64
"""Unconditional STRONG writes retried at most this many times after a conflict (another
writer got the key first; the write is recomputed on the newer state), and never past the
write's timeout."""
_WRITERS: Final = ("node", "writer")
STRONG_OPS: Final = ("write", "read", "cas")
"""What a STRONG operation was: a plain write, a linearizable read, a conditional write
(``if_version`` / ``if_versions`` / ``create_if_absent``): a bounded metric label set."""
STRONG_OUTCOMES: Final = ("ok", "conflict", "unavailable", "unknown")
"""How a STRONG operation ended: done, refused by a compare-and-set (``ConflictError``), no
quorum in time (``UnavailableError``: not done), may or may not be done
(``OutcomeUnknownError``). Invalid arguments are not counted: nothing was attempted."""


class StrongObserver(Protocol):
    """Events of a ``StrongMode``; the service turns them into Prometheus metrics."""

    def strong_op(self, subject: str, op: str, outcome: str, seconds: float) -> None:
        """A STRONG ``op`` (``STRONG_OPS``) ended with ``outcome`` (``STRONG_OUTCOMES``)
        after ``seconds``."""

    def strong_refused(self, subject: str, reason: str) -> None:
        """A log entry was refused before it reached the machine (``strong_entry``: not a
        sealed STRONG write of a writer or node)."""


class NullStrongObserver:
    """Discards every event."""

    def strong_op(self, subject: str, op: str, outcome: str, seconds: float) -> None:
        """Ignore."""

    def strong_refused(self, subject: str, reason: str) -> None:
        """Ignore."""


def _outcome(exc: BaseException | None) -> str | None:
    if exc is None:
        return "ok"
    if isinstance(exc, ConflictError):
        return "conflict"
    if isinstance(exc, OutcomeUnknownError):
        return "unknown"
    if isinstance(exc, UnavailableError):
        return "unavailable"
    return None


def strong_subject(namespace: str, subject: str, key: str | None = None) -> str:
    """``wn.<ns>.strong.<subject>.k.<key>``: a STRONG key's log subject (``key`` None: the
    pattern of them all, ``...k.*``)."""
    base = ".".join((PREFIX, validate_token(namespace, "namespace"), "strong",
                     validate_token(subject, "subject")))
    return f"{base}.k.{'*' if key is None else validate_token(key, 'worknode id')}"


def _fence_subject(namespace: str, subject: str) -> str:
    return strong_subject(namespace, subject, "x").rsplit(".", 2)[0] + ".fence"


def strong_stream(namespace: str, subject: str) -> str:
    """The JetStream stream name of a subject's STRONG log (tokens may hold ``-``; a short
    digest keeps distinct subjects apart whatever they are named)."""
    digest = hashlib.sha256(f"{namespace}\0{subject}".encode()).hexdigest()[:8]
    return f"WN_STRONG_{namespace}_{subject}_{digest}"[:200]


def strong_log_for(
    connection: object, namespace: str, subject: str, *, replicas: int = 1,
    timeout: float = 2.0, max_keys: int = -1, max_entry_bytes: int = -1,
) -> StrongLog:
    """The ``StrongLog`` of ``subject`` (call ``ensure()`` before use). The stream keeps
    the last entry of each STRONG worknode (its whole state) and nothing older, with no age
    or size limit (it is the STRONG keys' snapshot: dropping a key's last entry would lose
    it); ``max_keys`` bounds how many worknodes it holds (a write creating one more is
    refused), ``max_entry_bytes`` one entry's size."""
    return StrongLog(
        connection,  # type: ignore[arg-type]
        stream=strong_stream(namespace, subject),
        subjects=[strong_subject(namespace, subject)],
        fence_subject=_fence_subject(namespace, subject),
        replicas=replicas,
        timeout=timeout,
        # Each entry holds its key's whole state: the last one per key is the whole log.
        max_msgs_per_subject=1,
        max_msgs=max_keys if max_keys == -1 else max_keys + 1,  # + the last fence
        max_msg_size=max_entry_bytes,
        discard_new=max_keys != -1,
    )


@dataclass(frozen=True, slots=True)
class StrongRead:
    """A linearizable read: ``state`` (the STRONG keys asked for, as of log position
    ``seq``), and each key's ``versions`` (its last entry's sequence; 0: never written)."""

    state: ORMap
    versions: dict[str, int]
    seq: int


class StrongMode:
    """The STRONG side of one replica (see the module doc). ``start()`` / ``stop()``."""

    def __init__(
        self,
        replica: Replica,
        log_: StrongLog,
        *,
        timeout: float = 2.0,
        now: Callable[[], float] = time.monotonic,
        observer: StrongObserver | None = None,
    ) -> None:
        prefixes = replica.config.strong_prefixes
        if not prefixes:
            raise InvalidArgumentError(
                f"subject {replica.config.subject!r} declares no STRONG worknodes")
        if replica.node_id == STRONG_AUTHOR:
            raise InvalidArgumentError(f"{STRONG_AUTHOR!r} is reserved for the STRONG log")
        self.replica = replica
        self.log = log_
        self.prefixes = prefixes
        self.timeout = timeout
        self._now = now
        self.observer: StrongObserver = observer or NullStrongObserver()
        self._versions: dict[str, int] = {}
        self._applied = asyncio.Event()  # pulsed after every applied entry
        self._task: asyncio.Task[None] | None = None
        # After a gap (entries the stream dropped as superseded), the sequence this replica
        # must reach before its state is the log's again (see ``_follow``).
        self._barrier = 0
        self._skipped = False
        self.available = False
        """Whether the last STRONG operation reached a quorum (the mode metric)."""
        self.entries_applied = 0
        self.entries_refused = 0
        # This replica's own entries in flight, by log subject: the exact bytes it sealed
        # and the entry they hold. The log often delivers an entry before the publisher's
        # ack arrives; the follower then applies the entry it already holds instead of
        # verifying and decoding its own signature (the same bytes: the same entry).
        self._own: dict[str, tuple[bytes, ORMap]] = {}

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Make sure the stream exists (bounded by ``timeout``; a minority starts anyway and
        retries in the background) and follow it from the last applied sequence."""
        with contextlib.suppress(UnavailableError):
            await self.log.ensure()
            # The stream holds a fence from its start on, so that its message bound
            # (``strong_max_worknodes`` + 1) counts worknodes exactly.
            await self.log.fence()
            self.available = True
        self._task = asyncio.create_task(
            self._follow(), name=f"strong:{self.replica.config.subject}")

    async def stop(self) -> None:
        """Stop following (idempotent)."""
        task, self._task = self._task, None
        if task is None:
            return
        # Cancel until it ends: a cancellation that lands as an awaited request completes
        # can be swallowed (asyncio.wait_for in Python 3.11, nats-py's request) and the
        # follower would read on forever.
        while not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=0.1)
        with contextlib.suppress(asyncio.CancelledError):
            await task

    @property
    def applied(self) -> int:
        """The log sequence this replica applied up to."""
        return self.replica.machine.log_applied

    # -- following the log -----------------------------------------------------------------

    async def _follow(self) -> None:
        backoff = 0.05
        while True:
            try:
                if self.log.support is None:
                    await self.log.ensure()
                # Dropped entries were superseded (one whole-state entry per key): skipped,
                # the jump seen by ``_apply``.
                reader = self.log.read_from(self.applied + 1, skip_gaps=True)
                async with reader:
                    backoff = 0.05
                    async for entry in reader:
                        if entry.seq > self.applied + 1:
                            # The stream dropped entries before this one: superseded by later
                            # entries of their keys. Until those are applied too, this
                            # replica's state is not the log's up to any point: STRONG
                            # operations wait for the stream's head as it is now.
                            self._skipped = True
                            try:
                                await self._raise_barrier(entry.seq + entry.pending)
                                self._barrier = max(self._barrier, entry.seq)
                            finally:
                                self._skipped = False
                        self._apply(entry.seq, entry.subject, entry.payload, entry.fence)
            except asyncio.CancelledError:
                raise
            except WorknodeError as exc:
                log.debug("STRONG log of %s: %s (retrying)", self.replica.config.subject, exc)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 1.0)

    def _apply(self, seq: int, subject: str, payload: bytes, fence: bool) -> None:
        if seq <= self.applied:
            return
        key = subject.rsplit(".", 1)[1] if not fence else None
        delta: ORMap | None = None
        writer = "log"
        own = self._own.get(subject) if key is not None else None
        if (key is not None and own is not None and own[0] == payload
                and self.replica.roster.role_of(self.replica.node_id) in _WRITERS):
            # (The role check as for any entry: a key revoked since it sealed this one is
            # refused here as everywhere else, below.)
            del self._own[subject]
            self._versions[key] = seq
            delta, writer = own[1], self.replica.node_id
        elif key is not None:
            self._versions[key] = seq
            try:
                env = self.replica.codec.open(payload, self.replica.roster, subject=subject)
                writer = env.writer
                if self.replica.roster.role_of(env.writer) not in _WRITERS:
                    raise CodecError(f"{env.writer!r} may not write")
                if not isinstance(env.document, ORMap) or not is_strong(key, self.prefixes):
                    raise CodecError("not a STRONG write")
                delta = env.document
            except CodecError as exc:
                self.entries_refused += 1
                self.observer.strong_refused(self.replica.config.subject, "strong_entry")
                self.replica.observer.rejected(
                    self.replica.config.subject, "strong_entry", writer)
                log.warning("STRONG log entry %d of %s refused: %s",
                            seq, self.replica.config.subject, exc)
        self.replica.apply_log(seq, delta, key, writer)
        self.entries_applied += 1
        self._pulse()

    async def _raise_barrier(self, fallback: int) -> None:
        """After a gap: this replica serves no STRONG operation until it applied the
        stream's head as the stream reports it now (every entry that superseded a dropped
        one is at or below it); ``fallback`` (the delivering consumer's count of entries
        after it) when the stream cannot be asked."""
        try:
            _, last = await self.log.state()
        except WorknodeError:
            last = fallback
        self._barrier = max(self._barrier, last)

    async def _lower_barrier(self) -> None:
        """A barrier above the stream's head (a consumer's count from a server that lost
        its leadership, or a head that moved back when a deposed leader's uncommitted tail
        was dropped) would hold every STRONG operation here forever: bring it down to the
        head."""
        try:
            _, last = await self.log.state()
        except WorknodeError:
            return
        if last < self._barrier:
            self._barrier = max(self.applied, last)
            self._pulse()

    def _pulse(self) -> None:
        self._applied.set()
        self._applied = asyncio.Event()

    async def _wait_applied(self, seq: int, deadline: float) -> None:
        # ``_skipped``: the follower saw a gap (entries the stream dropped) and does not know
        # its barrier yet; until then ``applied`` says nothing about this replica's state (a
        # read returned a stale value once a jump passed its fence: tests/jepsen).
        while self._skipped or self.applied < max(seq, self._barrier):
            left = deadline - self._now()
            if left <= 0:
                raise UnavailableError(
                    f"STRONG log of {self.replica.config.subject!r} not applied up to {seq} "
                    f"within {self.timeout}s (at {self.applied})")
            event = self._applied
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), min(left, 0.5))
            if self.applied < self._barrier and self.applied >= seq and not self._skipped:
                await self._lower_barrier()  # only the barrier holds it: is it real?

    # -- versions --------------------------------------------------------------------------

    def version(self, key: str) -> int:
        """``key``'s version as applied here (its last log entry's sequence; 0: none seen).
        Every entry applied here records it; a key last written before this replica's
        snapshot has it in its entry's dots (read once)."""
        known = self._versions.get(key)
        if known is not None:
            return known
        state = self.replica.machine.state
        entry = state.store.get(key) if state.store else None
        held = max((n for r, n in dots_of(entry) if r == STRONG_AUTHOR), default=0)
        if held:
            self._versions[key] = held
        return held

    def _check_key(self, key: str) -> None:
        if not is_strong(key, self.prefixes):
            raise InvalidArgumentError(
                f"worknode {key!r} is not STRONG on {self.replica.config.subject!r}: write it "
                "LOCAL or EVENTUAL")

    # -- writes ----------------------------------------------------------------------------

    async def write(
        self, ops: Sequence[TreeOp], *, if_version: int | None = None,
        if_versions: dict[str, int] | None = None,
    ) -> int:
        """Write ``ops`` through the log (see ``_write``), reported to the observer."""
        op = "cas" if if_version is not None or if_versions else "write"
        start = self._now()
        try:
            seq = await self._write(ops, if_version=if_version, if_versions=if_versions)
        except WorknodeError as exc:
            self._report(op, exc, start)
            raise
        self._report(op, None, start)
        return seq

    def _report(self, op: str, exc: BaseException | None, start: float) -> None:
        outcome = _outcome(exc)
        if outcome is not None:
            self.observer.strong_op(
                self.replica.config.subject, op, outcome, self._now() - start)

    async def _write(
        self, ops: Sequence[TreeOp], *, if_version: int | None = None,
        if_versions: dict[str, int] | None = None,
    ) -> int:
        """Write ``ops`` (at most one per worknode) through the log; the last entry's
        sequence once applied here. ``if_version`` (one op) / ``if_versions`` (per key):
        the versions the caller read; a key past it raises ``ConflictError`` (nothing
        written). ``UnavailableError`` when no quorum answered within ``timeout``
        (``OutcomeUnknownError``: it may have been written)."""
        if not ops:
            raise InvalidArgumentError("a STRONG write needs at least one op")
        keys = [getattr(op, "node", None) for op in ops]
        if any(not isinstance(k, str) for k in keys):
            raise InvalidArgumentError("a STRONG write is a list of worknode ops")
        if len(set(keys)) != len(keys):
            raise InvalidArgumentError("a STRONG write takes at most one op per worknode")
        expect = dict(if_versions or {})
        if if_version is not None:
            if len(ops) != 1:
                raise InvalidArgumentError("if_version is for one op; use if_versions")
            expect[str(keys[0])] = if_version
        for k in keys:
            self._check_key(str(k))
        deadline = self._now() + self.timeout
        fenced = False
        for attempt in range(MAX_CONFLICT_RETRIES + 1):
            if attempt and self._now() >= deadline:
                break
            try:
                seq = await self._write_once(ops, expect, deadline)
            except (TreeError, InvalidArgumentError):
                # Invalid against this replica's state (an unknown worknode, say): it may only
                # lag the log. Once applied up to a fence, the verdict is the log's.
                if fenced:
                    raise
                fenced = True
                await self._wait_applied(await self._fence(), deadline)
                continue
            except ConflictError as exc:
                if expect:
                    raise
                # Another writer got a key first: apply the log past it, recompute, retry
                # (after a short random pause, so that two writers do not race in step).
                target = exc.current if exc.current else await self._fence()
                await self._wait_applied(target, deadline)
                await asyncio.sleep(random.uniform(0, 0.001 * min(attempt + 1, 20)))
                continue
            except UnavailableError:
                self.available = False
                raise
            self.available = True
            try:
                await self._wait_applied(seq, deadline)
            except UnavailableError as exc:
                # The stream stored it: not "unavailable" (a retry of an increment would
                # count it twice), but not acknowledged either, as it is not applied here.
                raise OutcomeUnknownError(
                    f"STRONG write stored at log position {seq} but not applied here within "
                    f"{self.timeout}s ({exc}); read to see it") from exc
            return seq
        raise ConflictError(
            f"STRONG write to {keys} lost every race within {self.timeout}s",
            expected=self.version(str(keys[0])), current=None)

    async def _write_once(
        self, ops: Sequence[TreeOp], expect: dict[str, int], deadline: float
    ) -> int:
        replica = self.replica
        entries: list[tuple[str, bytes, int]] = []
        owned: list[ORMap] = []
        last: tuple[str, ORMap, str] = ("", ORMap(), "")
        for op in ops:
            key = str(getattr(op, "node", ""))  # checked by write()
            want = expect.get(key)
            if want is not None and want > self.version(key):
                await self._wait_applied(want, deadline)  # the caller read a newer state
            version = self.version(key)
            if want is not None and version != want:
                raise ConflictError(
                    f"worknode {key!r} is at version {version}, not {want}",
                    expected=want, current=version)
            _, delta = strong_entry(replica.machine.tree, op, replica.hlc())
            subject = strong_subject(replica.config.namespace, replica.config.subject, key)
            data = replica.codec.seal(
                replica.signer, subject=subject, hlc=replica.hlc(),
                sequence=version, document=delta)
            entries.append((subject, data, version))
            owned.append(delta)
            last = (key, delta, subject)
        for (subject, data, _), delta in zip(entries, owned, strict=True):
            self._own[subject] = (data, delta)  # until applied (here or by the follower)
        try:
            if len(entries) == 1:
                subject, data, version = entries[0]
                seq = await self.log.publish(subject, data, expected_last_subject_seq=version)
                self._apply_own(seq, *last)
                return seq
            return await self.log.publish_batch(entries)
        except BaseException:
            for subject, data, _ in entries:
                if self._own.get(subject, (None,))[0] is data:
                    del self._own[subject]
            raise

    def _apply_own(self, seq: int, key: str, entry: ORMap, subject: str) -> None:
        """Apply this replica's own entry ``seq`` as soon as the stream acknowledged it, if
        every entry before it is applied here (else the follower applies it in order): the
        document it sealed, which every replica decodes alike (the codec's round trip is
        the identity: golden vectors), without waiting for the stream to deliver it back."""
        if self.applied != seq - 1 or self._barrier > self.applied:
            return  # the follower applies it, recognising its bytes (``_own``)
        self._own.pop(subject, None)
        self._versions[key] = seq
        self.replica.apply_log(seq, entry, key, self.replica.node_id)
        self._pulse()

    async def create_if_absent(self, node: str, parent: str) -> int:
        """Create worknode ``node`` under ``parent`` unless it was ever written
        (``ConflictError`` with its version otherwise)."""
        from broker.crdt import Create

        return await self.write([Create(node, parent)], if_version=0)

    # -- reads -----------------------------------------------------------------------------

    async def _fence(self) -> int:
        try:
            seq = await self.log.fence()
        except UnavailableError:
            self.available = False
            raise
        self.available = True
        if self.applied == seq - 1 and self._barrier <= self.applied:
            # Everything before the fence is applied here: so is the fence (it writes nothing).
            self.replica.apply_log(seq, None, None, "log")
            self._pulse()
        return seq

    async def read(self, keys: Iterable[str] | None = None) -> StrongRead:
        """A linearizable read of ``keys`` (None: every STRONG key) — see the module doc."""
        start = self._now()
        try:
            result = await self._read(keys)
        except WorknodeError as exc:
            self._report("read", exc, start)
            raise
        self._report("read", None, start)
        return result

    async def _read(self, keys: Iterable[str] | None = None) -> StrongRead:
        from broker.repair import subset

        wanted = None if keys is None else list(keys)
        for k in wanted or ():
            self._check_key(k)
        deadline = self._now() + self.timeout
        seq = await self._fence()
        await self._wait_applied(seq, deadline)
        state = self.replica.machine.state
        if wanted is None:
            wanted = [k for k in (state.store or {}) if is_strong(k, self.prefixes)]
        return StrongRead(subset(state, wanted), {k: self.version(k) for k in wanted}, seq)
