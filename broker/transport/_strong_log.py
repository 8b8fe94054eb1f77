"""``StrongLog``: a JetStream stream used as a totally ordered, replicated log (STRONG writes).

Every STRONG operation goes through one JetStream stream whose Raft group (R3 in a cluster,
R1 on a single embedded server) orders the writes; this module never decides an order
itself. What it guarantees, and why:

- **Compare-and-set.** ``publish(..., expected_last_subject_seq=n)`` sends
  ``Nats-Expected-Last-Subject-Sequence: n``; with ``expected_subject_filter=f`` also
  ``Nats-Expected-Last-Subject-Sequence-Subject: f`` (nats-server 2.11+), so the check is on
  the last message of every subject matching ``f`` (a worknode subtree). ``n = 0`` means
  "no message yet" (create-if-absent). A refusal raises ``ConflictError`` with the current
  sequence (read just after the refusal: the server's reply carries it only in its text).
  On R3 the leader checks the expected sequence *before* the Raft proposal, against what it
  applied; it refuses a check whose exact subject (or exact filter string) has a write in
  flight (err_code 10164), but it does not match a filter against in-flight writes to
  other subjects. So a subtree CAS is only safe when **every** write under that subtree is a
  CAS naming the very same filter (measured: with plain writes beside a filtered CAS, 1047
  of 1462 successful CAS writes on R3 overwrote a write they had not seen; with one filter
  for all, none). R1 checks under the stream's lock and has no such window.
- **Atomic batches** (nats-server 2.12+, stream option ``allow_atomic``): every entry
  carries ``Nats-Batch-Id`` and ``Nats-Batch-Sequence`` (1..n), the last one
  ``Nats-Batch-Commit: 1``; the leader checks every entry's expected sequence at the commit
  and stores all of them or none.
- **Fences** for linearizable reads. ``fence()`` publishes an empty message to the fence
  subject and returns its stream sequence. The publish is acknowledged only once the
  stream's Raft group committed it, so every write acknowledged before ``fence()`` began
  has a smaller sequence: a reader that applied the log up to the fence has seen them.
  Reading the server instead is not enough: a direct get is answered by any replica,
  possibly behind; a leader get is answered by whoever believes it leads, and a deposed
  leader in a minority keeps believing so for a while (measured: cut off alone, it still
  answered ``last_subject_seq`` at once from its old state); and the
  read-after-write option (``min_last_seq``) was removed from nats-server. A fence costs
  one log entry; it carries ``Nats-TTL`` (when the stream allows per-message TTLs) so
  fences do not pile up.
- **Bounded time.** Every operation gives up after ``timeout`` seconds: a write that got
  no answer raises ``OutcomeUnknownError`` (it may have been applied: read, or retry a
  CAS), anything else that cannot reach a stream leader with a quorum raises
  ``UnavailableError``. A minority therefore fails fast instead of hanging.
- **Replay.** ``read_from(seq)`` yields the entries from ``seq`` on, in stream order, with
  an ordered consumer (it recreates itself after a lost delivery). Entries the stream no
  longer holds (age, size or count limits) raise ``LogTruncatedError`` naming the first
  sequence left, so the caller takes a snapshot instead of silently skipping writes.
  Removed messages *inside* the log (expired fences, ``max_msgs_per_subject``) are
  skipped, as JetStream skips them.
- No nats-py exception escapes: they are mapped at this boundary, by JetStream error code
  (``err_code``), never by message text.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple, Self

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg as NatsMsg
from nats.js import api

from broker.errors import (
    BoundsError,
    ConflictError,
    InvalidArgumentError,
    LogTruncatedError,
    OutcomeUnknownError,
    PayloadTooLargeError,
    TransportTimeoutError,
    UnavailableError,
    UnsupportedByServerError,
    WorknodeError,
)
from broker.transport._nats import NatsTransport
from broker.transport._subjects import subject_matches, validate_pattern, validate_subject

__all__ = [
    "BATCH_COMMIT_HEADER",
    "BATCH_ID_HEADER",
    "BATCH_SEQUENCE_HEADER",
    "DEFAULT_STRONG_TIMEOUT",
    "EXPECTED_LAST_SUBJECT_SEQUENCE_HEADER",
    "EXPECTED_LAST_SUBJECT_SEQUENCE_SUBJECT_HEADER",
    "EXPECTED_STREAM_HEADER",
    "MAX_ATOMIC_BATCH",
    "MSG_ID_HEADER",
    "MSG_TTL_HEADER",
    "BatchEntry",
    "LogEntry",
    "LogReader",
    "StrongLog",
    "StrongLogStats",
    "StrongLogSupport",
]

EXPECTED_STREAM_HEADER: Final = "Nats-Expected-Stream"
EXPECTED_LAST_SUBJECT_SEQUENCE_HEADER: Final = "Nats-Expected-Last-Subject-Sequence"
EXPECTED_LAST_SUBJECT_SEQUENCE_SUBJECT_HEADER: Final = "Nats-Expected-Last-Subject-Sequence-Subject"
MSG_ID_HEADER: Final = "Nats-Msg-Id"
MSG_TTL_HEADER: Final = "Nats-TTL"
BATCH_ID_HEADER: Final = "Nats-Batch-Id"
BATCH_SEQUENCE_HEADER: Final = "Nats-Batch-Sequence"
BATCH_COMMIT_HEADER: Final = "Nats-Batch-Commit"

#: nats-server's default bound on the entries of one atomic batch
#: (``streamDefaultMaxAtomicBatchSize``; ``jetstream { limits { max_batch_size } }``).
MAX_ATOMIC_BATCH: Final = 1000
#: Seconds a STRONG operation may take before it fails.
DEFAULT_STRONG_TIMEOUT: Final = 2.0

_API: Final = "$JS.API"
_NS: Final = 1_000_000_000
_MAX_BATCH_ID: Final = 64  # the server refuses longer batch ids

# JetStream error codes (nats-server server/errors.json), the only thing errors are told by.
_WRONG_LAST_SEQUENCE: Final = 10071  # JSStreamWrongLastSequenceErrF: "wrong last sequence: N"
_WRONG_LAST_SEQUENCE_CONSTANT: Final = 10164  # the subject has a write in flight
_NO_MESSAGE_FOUND: Final = 10037
_STREAM_NOT_FOUND: Final = 10059
_MSG_SIZE_EXCEEDED: Final = 10054
_ATOMIC_DISABLED: Final = 10174
_ATOMIC_TOO_LARGE: Final = 10199
_MSG_TTL_DISABLED: Final = 10166
_EXPECTED_SUBJECT_INVALID: Final = 10193
_STREAM_FULL: Final = (10077,)  # "maximum messages exceeded" (measured: a stream at max_msgs)
_RETRIABLE_CODES: Final = frozenset({
    10008,  # JSClusterNotAvailErr: no meta leader / temporarily unavailable
    10009,  # JSClusterNotLeaderErr
    10023,  # insufficient resources
    10077,  # store failed
    10158,  # the same message id is in flight
    10163,  # expected-last-subject-sequence temporarily unavailable
    10176,  # atomic batch incomplete (the leader lost its staged entries)
    10210,  # too many atomic batches in flight
})


class LogEntry(NamedTuple):
    """One entry of the log: its stream ``seq``, ``subject``, ``headers`` and ``payload``.
    ``pending`` is how many entries followed it in the stream when it was delivered (0:
    the reader had caught up then); ``fence`` tells a fence from a write."""

    seq: int
    subject: str
    headers: Mapping[str, str]
    payload: bytes
    pending: int
    fence: bool


class BatchEntry(NamedTuple):
    """One write of an atomic batch: like ``StrongLog.publish``'s arguments. A plain
    ``(subject, payload, expected_seq)`` tuple is accepted too."""

    subject: str
    payload: bytes
    expected_last_subject_seq: int | None = None
    expected_subject_filter: str | None = None


@dataclass(frozen=True)
class StrongLogSupport:
    """What the server and the stream support, as ``ensure()`` found them."""

    server_version: str
    replicas: int
    #: Atomic batch publish (``allow_atomic`` echoed back by the server).
    atomic_batch: bool
    #: The ``...-Subject`` (wildcard) form of the expected-sequence check (server 2.11+).
    subject_filter_cas: bool
    #: Per-message TTLs (``allow_msg_ttl`` echoed back): fences expire.
    msg_ttl: bool
    #: Direct gets (``allow_direct`` echoed back).
    direct_get: bool
    #: The server leading the stream's Raft group when ``ensure()`` ran (None for R1 on a
    #: single server).
    leader: str | None
    #: Whether ``ensure()`` created the stream (False: it existed or was updated).
    created: bool


@dataclass
class StrongLogStats:
    """Counters of one ``StrongLog``; the service turns them into metrics."""

    publishes: int = 0
    duplicates: int = 0
    conflicts: int = 0
    unavailable: int = 0
    outcome_unknown: int = 0
    batches: int = 0
    batch_entries: int = 0
    fences: int = 0
    entries_read: int = 0
    truncations: int = 0
    by_error_code: dict[int, int] = field(default_factory=dict)


def _check_seq(value: object, what: str) -> int:
    if type(value) is not int or value < 0:
        raise InvalidArgumentError(f"{what} must be an int >= 0, got {value!r}")
    return value


def _check_payload(payload: object) -> bytes:
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise InvalidArgumentError(f"payload must be bytes, not {type(payload).__name__}")
    return bytes(payload)


def _version(nc: Client) -> tuple[str, tuple[int, int]]:
    v = nc.connected_server_version
    try:
        return f"{v.major}.{v.minor}.{v.patch}", (int(v.major), int(v.minor))
    except (TypeError, ValueError):  # "0.0.0-unknown" before the first INFO
        return "unknown", (0, 0)


class StrongLog:
    """A JetStream stream as the STRONG log. See the module docstring for the guarantees.

    ``connection`` is a started ``NatsTransport`` (or a connected nats-py ``Client``).
    ``subjects`` are the stream's subject patterns; ``fence_subject`` (a literal subject,
    added to the stream's subjects when none covers it) receives the fences; keep it out of
    every subtree a CAS filters on. Limits: ``max_age`` seconds (0 = none), ``max_bytes``,
    ``max_msgs``, ``max_msgs_per_subject`` (-1 = none; beware: per-subject removals are not
    reported as gaps to readers), ``max_msg_size``; ``discard_new`` refuses writes when the
    stream is full instead of dropping its oldest entries. ``duplicate_window`` (seconds)
    is how long a ``msg_id`` deduplicates. ``fence_ttl`` (seconds, >= 1) is how long fences
    stay. ``timeout`` bounds every operation; ``max_batch`` bounds ``publish_batch``.
    """

    def __init__(
        self,
        connection: NatsTransport | Client,
        *,
        stream: str,
        subjects: Sequence[str],
        fence_subject: str,
        replicas: int = 1,
        max_age: float = 0.0,
        max_bytes: int = -1,
        max_msgs: int = -1,
        max_msgs_per_subject: int = -1,
        max_msg_size: int = -1,
        discard_new: bool = False,
        duplicate_window: float = 120.0,
        fence_ttl: float = 60.0,
        timeout: float = DEFAULT_STRONG_TIMEOUT,
        max_batch: int = MAX_ATOMIC_BATCH,
    ) -> None:
        if not stream or any(c in stream for c in ".*> \t\r\n/\\") or len(stream) > 255:
            raise InvalidArgumentError(f"invalid stream name {stream!r}")
        if isinstance(subjects, str) or not subjects:
            raise InvalidArgumentError("subjects must be a non-empty list of subject patterns")
        patterns = [validate_pattern(s, "stream subject") for s in subjects]
        validate_subject(fence_subject, "fence subject")
        if not any(subject_matches(p, fence_subject) for p in patterns):
            patterns.append(fence_subject)
        if replicas not in (1, 3, 5):
            raise InvalidArgumentError(f"replicas must be 1, 3 or 5, got {replicas!r}")
        for what, value in (("max_age", max_age), ("duplicate_window", duplicate_window)):
            if not value >= 0:
                raise InvalidArgumentError(f"{what} must be >= 0, got {value!r}")
        if max_age and duplicate_window > max_age:
            raise InvalidArgumentError("duplicate_window must not exceed max_age")
        for what, count in (("max_bytes", max_bytes), ("max_msgs", max_msgs),
                            ("max_msgs_per_subject", max_msgs_per_subject),
                            ("max_msg_size", max_msg_size)):
            if type(count) is not int or (count < 1 and count != -1):
                raise InvalidArgumentError(f"{what} must be -1 (none) or >= 1, got {count!r}")
        if not fence_ttl >= 1:
            raise InvalidArgumentError(f"fence_ttl must be >= 1 second, got {fence_ttl!r}")
        if not timeout > 0:
            raise InvalidArgumentError(f"timeout must be > 0, got {timeout!r}")
        if not 1 <= max_batch <= MAX_ATOMIC_BATCH:
            raise InvalidArgumentError(f"max_batch must be within 1..{MAX_ATOMIC_BATCH}")
        self._connection = connection
        self._stream = stream
        self._subjects = tuple(patterns)
        self._fence_subject = fence_subject
        self._replicas = replicas
        self._max_age = max_age
        self._max_bytes = max_bytes
        self._max_msgs = max_msgs
        self._max_msgs_per_subject = max_msgs_per_subject
        self._max_msg_size = max_msg_size
        self._discard_new = discard_new
        self._duplicate_window = duplicate_window
        self._fence_ttl = fence_ttl
        self._timeout = timeout
        self._max_batch = max_batch
        self._support: StrongLogSupport | None = None
        self.stats = StrongLogStats()

    # -- where things are ---------------------------------------------------------------------

    @property
    def stream(self) -> str:
        """The stream's name."""
        return self._stream

    @property
    def subjects(self) -> tuple[str, ...]:
        """The stream's subject patterns (the fence subject included)."""
        return self._subjects

    @property
    def fence_subject(self) -> str:
        """Where fences are published."""
        return self._fence_subject

    @property
    def timeout(self) -> float:
        """Seconds every operation may take."""
        return self._timeout

    @property
    def support(self) -> StrongLogSupport | None:
        """What ``ensure()`` found, or None before it ran."""
        return self._support

    def _nc(self) -> Client:
        nc = (self._connection.nats_client() if isinstance(self._connection, NatsTransport)
              else self._connection)
        if not nc.is_connected:
            # nats-py would buffer a request while reconnecting and send it after our
            # timeout: refuse it now, so that "unavailable" means "not written".
            self.stats.unavailable += 1
            raise UnavailableError("not connected to NATS (reconnecting or closed)")
        return nc

    # -- the stream -----------------------------------------------------------------------------

    def _config(self) -> dict[str, Any]:
        """The stream configuration, every option that matters stated explicitly."""
        return {
            "name": self._stream,
            "subjects": list(self._subjects),
            "retention": "limits",
            "storage": "file",
            "num_replicas": self._replicas,
            "discard": "new" if self._discard_new else "old",
            "max_age": int(self._max_age * _NS),
            "max_bytes": self._max_bytes,
            "max_msgs": self._max_msgs,
            "max_msgs_per_subject": self._max_msgs_per_subject,
            "max_msg_size": self._max_msg_size,
            "max_consumers": -1,
            "duplicate_window": int(self._duplicate_window * _NS),
            "compression": "none",
            # Any replica may answer a direct get (fast, possibly stale: never a STRONG read).
            "allow_direct": True,
            "mirror_direct": False,
            "allow_atomic": True,
            "allow_msg_ttl": True,  # fences expire
            # Nobody erases entries of the log but its limits: not another writer's delete
            # or purge, not a rollup header.
            "deny_delete": True,
            "deny_purge": True,
            "allow_rollup_hdrs": False,
            "sealed": False,
        }

    async def ensure(self, *, wait: float = 0.0) -> StrongLogSupport:
        """Create the stream, or update it to this configuration; return what the server
        supports. ``wait`` seconds: keep retrying while JetStream is unavailable (a cluster
        still electing its meta leader). Raises ``UnavailableError`` after that,
        ``InvalidArgumentError`` when the server refuses the configuration (for example a
        change of storage or of subjects that overlap another stream)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            try:
                return await self._ensure_once()
            except UnavailableError:
                if loop.time() >= deadline:
                    raise
                await asyncio.sleep(min(0.25, max(0.0, deadline - loop.time())))

    async def _ensure_once(self) -> StrongLogSupport:
        config = self._config()
        # Update first: the server's create answers "created" for an existing stream too.
        created = False
        resp, err = await self._api(f"STREAM.UPDATE.{self._stream}", config)
        if err is not None:
            if err.err_code != _STREAM_NOT_FOUND:
                raise err.mapped(f"update stream {self._stream}")
            created = True
            resp, err = await self._api(f"STREAM.CREATE.{self._stream}", config)
            if err is not None:
                raise err.mapped(f"create stream {self._stream}")
        got = resp.get("config") or {}
        version, (major, minor) = _version(self._nc())
        cluster = resp.get("cluster") or {}
        self._support = StrongLogSupport(
            server_version=version,
            replicas=int(got.get("num_replicas") or 1),
            atomic_batch=bool(got.get("allow_atomic")),
            subject_filter_cas=(major, minor) >= (2, 11),
            msg_ttl=bool(got.get("allow_msg_ttl")),
            direct_get=bool(got.get("allow_direct")),
            leader=cluster.get("leader") or None,
            created=created,
        )
        return self._support

    async def state(self) -> tuple[int, int]:
        """``(first_seq, last_seq)`` of the stream, from its leader. An empty stream has
        ``first_seq == last_seq + 1``. Raises ``UnavailableError``."""
        resp, err = await self._api(f"STREAM.INFO.{self._stream}", {})
        if err is not None:
            raise err.mapped(f"stream info {self._stream}")
        st = resp.get("state") or {}
        return int(st.get("first_seq") or 0), int(st.get("last_seq") or 0)

    async def leader(self) -> str | None:
        """The server leading the stream's Raft group now (None: no leader, or R1 on a single
        server). Raises ``UnavailableError``."""
        resp, err = await self._api(f"STREAM.INFO.{self._stream}", {})
        if err is not None:
            raise err.mapped(f"stream info {self._stream}")
        leader = (resp.get("cluster") or {}).get("leader")
        return str(leader) if leader else None

    # -- writes -----------------------------------------------------------------------------------

    def _check_subject(self, subject: str) -> str:
        validate_subject(subject)
        if subject == self._fence_subject:
            raise InvalidArgumentError(f"{subject!r} is the fence subject: not for writes")
        if not any(subject_matches(p, subject) for p in self._subjects):
            raise InvalidArgumentError(
                f"subject {subject!r} is not in stream {self._stream}'s subjects {self._subjects}"
            )
        return subject

    def _cas_headers(
        self, expected: int | None, subject_filter: str | None, headers: dict[str, str]
    ) -> None:
        if subject_filter is not None:
            validate_pattern(subject_filter, "expected subject filter")
            if expected is None:
                raise InvalidArgumentError(
                    "expected_subject_filter needs expected_last_subject_seq"
                )
            if self._support is not None and not self._support.subject_filter_cas:
                raise UnsupportedByServerError(
                    f"nats-server {self._support.server_version} lacks the "
                    f"{EXPECTED_LAST_SUBJECT_SEQUENCE_SUBJECT_HEADER} check (2.11+)"
                )
            headers[EXPECTED_LAST_SUBJECT_SEQUENCE_SUBJECT_HEADER] = subject_filter
        if expected is not None:
            headers[EXPECTED_LAST_SUBJECT_SEQUENCE_HEADER] = str(
                _check_seq(expected, "expected_last_subject_seq")
            )

    async def publish(
        self,
        subject: str,
        payload: bytes,
        *,
        expected_last_subject_seq: int | None = None,
        expected_subject_filter: str | None = None,
        msg_id: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> int:
        """Append one entry and return its stream sequence once the stream's Raft group
        committed it.

        ``expected_last_subject_seq=n`` makes it a compare-and-set: it is stored only if the
        last entry on ``subject`` (or, with ``expected_subject_filter``, on any subject
        matching that pattern) has sequence ``n`` (0: none). ``msg_id`` deduplicates within
        the duplicate window (a repeat returns the first one's sequence). Raises
        ``ConflictError`` (nothing written), ``UnavailableError`` (nothing written: no
        leader, no quorum, server refusal that may pass later), ``OutcomeUnknownError`` (no
        answer within ``timeout``: it may have been written), ``InvalidArgumentError``.
        """
        self._check_subject(subject)
        data = _check_payload(payload)
        hdrs = dict(headers or {})
        hdrs[EXPECTED_STREAM_HEADER] = self._stream
        self._cas_headers(expected_last_subject_seq, expected_subject_filter, hdrs)
        if msg_id is not None:
            if not isinstance(msg_id, str) or not msg_id:
                raise InvalidArgumentError("msg_id must be a non-empty str")
            hdrs[MSG_ID_HEADER] = msg_id
        checks = []
        if expected_last_subject_seq is not None:
            checks.append((expected_subject_filter or subject, expected_last_subject_seq))
        ack = await self._write(subject, data, hdrs, what=f"publish to {subject}", checks=checks)
        if ack.get("duplicate"):
            self.stats.duplicates += 1
        self.stats.publishes += 1
        return int(ack["seq"])

    async def publish_batch(self, entries: Sequence[BatchEntry | tuple[Any, ...]]) -> int:
        """Append ``entries`` atomically, all or none, in their order; return the last one's
        sequence (they occupy the ``len(entries)`` sequences up to it).

        Every entry's expected sequence is checked against the log as it was before the
        batch; one failed check stores nothing and raises ``ConflictError`` (``current`` is
        that entry's current sequence). An entry's check must come before any write to the
        same subject in the batch (the server cannot check it after). Raises
        ``UnsupportedByServerError`` when the server or the stream lacks atomic batches,
        ``BoundsError`` beyond ``max_batch`` entries, and what ``publish`` raises.
        """
        batch = [e if isinstance(e, BatchEntry) else BatchEntry(*e) for e in entries]
        if not batch:
            raise InvalidArgumentError("an atomic batch needs at least one entry")
        if len(batch) > self._max_batch:
            raise BoundsError(
                f"atomic batch of {len(batch)} entries exceeds max_batch={self._max_batch}"
            )
        if self._support is not None and not self._support.atomic_batch:
            raise UnsupportedByServerError(
                f"stream {self._stream} on nats-server {self._support.server_version} does not "
                "allow atomic batch publish (needs nats-server 2.12+ and allow_atomic)"
            )
        batch_id = uuid.uuid4().hex
        assert len(batch_id) <= _MAX_BATCH_ID
        written: set[str] = set()
        checks: list[tuple[str, int]] = []
        messages: list[tuple[str, bytes, dict[str, str]]] = []
        for n, entry in enumerate(batch, start=1):
            self._check_subject(entry.subject)
            data = _check_payload(entry.payload)
            hdrs = {
                EXPECTED_STREAM_HEADER: self._stream,
                BATCH_ID_HEADER: batch_id,
                BATCH_SEQUENCE_HEADER: str(n),
            }
            self._cas_headers(entry.expected_last_subject_seq, entry.expected_subject_filter, hdrs)
            checked = entry.expected_subject_filter or entry.subject
            if entry.expected_last_subject_seq is not None and checked in written:
                raise InvalidArgumentError(
                    f"batch entry {n}: the expected-sequence check on {checked!r} comes after "
                    "a write to it in the same batch; check it in its first entry"
                )
            if entry.expected_last_subject_seq is not None:
                checks.append((checked, entry.expected_last_subject_seq))
            written.add(entry.subject)
            messages.append((entry.subject, data, hdrs))
        messages[-1][2][BATCH_COMMIT_HEADER] = "1"
        nc = self._nc()
        try:
            # Staged entries need no answer: the commit's answer covers the whole batch
            # (the server reports a refused entry there), and one connection keeps them in
            # order. Asking for one per entry would cost a round trip each.
            for subject, data, hdrs in messages[:-1]:
                await nc.publish(subject, data, headers=hdrs)
        except Exception as exc:
            self.stats.unavailable += 1
            raise UnavailableError(f"atomic batch on {self._stream}: {exc!r}") from exc
        subject, data, hdrs = messages[-1]
        ack = await self._write(
            subject, data, hdrs, what=f"atomic batch of {len(batch)} on {self._stream}",
            checks=checks,
        )
        self.stats.batches += 1
        self.stats.batch_entries += len(batch)
        return int(ack["seq"])

    async def fence(self) -> int:
        """Publish a fence and return its sequence: every write acknowledged before this call
        began has a smaller one. Apply the log up to it, then read locally: that read is
        linearizable. Raises ``UnavailableError`` / ``OutcomeUnknownError`` like a write
        (then the read must fail too)."""
        hdrs = {EXPECTED_STREAM_HEADER: self._stream}
        if self._support is None or self._support.msg_ttl:
            hdrs[MSG_TTL_HEADER] = f"{int(self._fence_ttl)}s"
        ack = await self._write(self._fence_subject, b"", hdrs, what="fence")
        self.stats.fences += 1
        return int(ack["seq"])

    async def _write(
        self,
        subject: str,
        data: bytes,
        headers: dict[str, str],
        *,
        what: str,
        checks: Sequence[tuple[str, int]] = (),
    ) -> dict[str, Any]:
        """Send one message that the stream answers with a PubAck; return the ack."""
        nc = self._nc()
        try:
            async with asyncio.timeout(self._timeout):
                reply = await nc.request(subject, data, timeout=self._timeout, headers=headers)
        except nats.errors.NoRespondersError as exc:
            # Nobody stores this subject on the server we reach: not written.
            self.stats.unavailable += 1
            raise UnavailableError(f"{what}: no stream answers (no responders)") from exc
        except (TimeoutError, nats.errors.TimeoutError) as exc:
            self.stats.outcome_unknown += 1
            raise OutcomeUnknownError(
                f"{what}: no answer within {self._timeout} s (no stream leader with a quorum "
                "reachable?); it may or may not have been written"
            ) from exc
        except nats.errors.MaxPayloadError as exc:
            raise PayloadTooLargeError(f"{what}: {exc}") from exc
        except Exception as exc:
            # A connection lost with the request sent: the server may have stored it.
            self.stats.outcome_unknown += 1
            raise OutcomeUnknownError(f"{what}: {type(exc).__name__}: {exc}") from exc
        try:
            ack = json.loads(reply.data) if reply.data else {}
        except ValueError:
            ack = {}
        if not isinstance(ack, dict):
            ack = {}
        error = ack.get("error")
        if error is not None:
            await self._refused(_ApiError.of(error), headers, what, checks)
        if not isinstance(ack.get("seq"), int):
            self.stats.outcome_unknown += 1
            raise OutcomeUnknownError(f"{what}: unexpected answer from the stream")
        return ack

    async def _refused(
        self,
        err: _ApiError,
        headers: Mapping[str, str],
        what: str,
        checks: Sequence[tuple[str, int]],
    ) -> None:
        """Raise the error for a stream's refusal of a write (nothing was written)."""
        codes = self.stats.by_error_code
        codes[err.err_code] = codes.get(err.err_code, 0) + 1
        if err.err_code in (_WRONG_LAST_SEQUENCE, _WRONG_LAST_SEQUENCE_CONSTANT):
            self.stats.conflicts += 1
            raise await self._conflict(what, checks)
        if err.err_code in (_ATOMIC_DISABLED,) or (
            err.err_code == _MSG_TTL_DISABLED and MSG_TTL_HEADER in headers
        ):
            raise UnsupportedByServerError(f"{what}: {err}")
        if err.err_code == _ATOMIC_TOO_LARGE or err.err_code in _STREAM_FULL:
            # A stream at its bound (discard new) refuses: not a lost quorum, a limit.
            raise BoundsError(f"{what}: {err}")
        if err.err_code == _MSG_SIZE_EXCEEDED:
            raise PayloadTooLargeError(f"{what}: {err}")
        if err.err_code == _EXPECTED_SUBJECT_INVALID:
            raise InvalidArgumentError(f"{what}: {err}")
        self.stats.unavailable += int(err.retriable)
        raise err.mapped(what)

    async def _conflict(self, what: str, checks: Sequence[tuple[str, int]]) -> ConflictError:
        """The ``ConflictError`` for a refused check: the server's answer carries the current
        sequence only in its text, so it is read again (from the leader); the first check
        found stale names it. ``current`` is None when none is found stale any more (a
        write in flight was refused, 10164) or the read fails."""
        for checked, expected in checks:
            try:
                current = await self.last_subject_seq(checked)
            except WorknodeError:
                return ConflictError(
                    f"{what}: expected last sequence {expected} on {checked!r} did not match",
                    expected=expected,
                    current=None,
                )
            if current != expected:
                return ConflictError(
                    f"{what}: expected last sequence {expected} on {checked!r}, found {current}",
                    expected=expected,
                    current=current,
                )
        expected = checks[0][1] if checks else 0
        return ConflictError(
            f"{what}: an expected sequence did not match (a write was in flight)",
            expected=expected,
            current=None,
        )

    # -- reads ----------------------------------------------------------------------------------

    async def last_subject_seq(self, subject: str) -> int:
        """The sequence of the last entry on ``subject`` (a literal subject, or a pattern:
        the last entry on any matching subject), 0 when there is none: the ``expected``
        value of a compare-and-set on it. Read from the stream leader; not a linearizable
        read by itself (the CAS that uses it is checked by the leader). Raises
        ``UnavailableError``."""
        validate_pattern(subject, "subject")
        resp, err = await self._api(f"STREAM.MSG.GET.{self._stream}", {"last_by_subj": subject})
        if err is not None:
            if err.err_code == _NO_MESSAGE_FOUND:
                return 0
            raise err.mapped(f"last sequence of {subject}")
        return int((resp.get("message") or {}).get("seq") or 0)

    def read_from(
        self, start_seq: int, *, heartbeat: float = 1.0, skip_gaps: bool = False
    ) -> LogReader:
        """A ``LogReader`` over the entries from ``start_seq`` on (use as ``async with``,
        then ``async for`` or ``next()``). Resume after a restart or a partition with the
        last applied sequence + 1. ``heartbeat`` (seconds) is how soon a lost consumer is
        noticed and recreated. ``skip_gaps``: entries the stream no longer holds are skipped
        silently (the caller sees the jump in sequences), for a log whose dropped entries
        are superseded by later ones (one whole-state entry per subject), instead of
        raising ``LogTruncatedError``."""
        if type(start_seq) is not int or start_seq < 1:
            raise InvalidArgumentError(f"start_seq must be an int >= 1, got {start_seq!r}")
        if not heartbeat > 0:
            raise InvalidArgumentError(f"heartbeat must be > 0, got {heartbeat!r}")
        return LogReader(self, start_seq, heartbeat=heartbeat, skip_gaps=skip_gaps)

    async def _api(
        self, what: str, body: Mapping[str, Any]
    ) -> tuple[dict[str, Any], _ApiError | None]:
        """One JetStream API request: its answer, and the error it carries (if any). Raises
        ``UnavailableError`` when no answer came (no JetStream, no quorum, timeout)."""
        nc = self._nc()
        try:
            async with asyncio.timeout(self._timeout):
                reply = await nc.request(
                    f"{_API}.{what}", json.dumps(body).encode(), timeout=self._timeout
                )
        except nats.errors.NoRespondersError as exc:
            raise UnavailableError(f"{what}: JetStream is not available") from exc
        except (TimeoutError, nats.errors.TimeoutError) as exc:
            raise UnavailableError(f"{what}: no answer within {self._timeout} s") from exc
        except Exception as exc:
            raise UnavailableError(f"{what}: {type(exc).__name__}: {exc}") from exc
        if reply.headers and reply.headers.get("Status") == "503":
            raise UnavailableError(f"{what}: JetStream is not available (503)")
        try:
            resp = json.loads(reply.data)
        except ValueError as exc:
            raise UnavailableError(f"{what}: unreadable answer") from exc
        if not isinstance(resp, dict):
            raise UnavailableError(f"{what}: unreadable answer")
        if resp.get("error") is not None:
            return resp, _ApiError.of(resp["error"])
        return resp, None

    def __repr__(self) -> str:
        subjects = list(self._subjects)
        return f"<StrongLog stream={self._stream} subjects={subjects} R{self._replicas}>"


@dataclass(frozen=True)
class _ApiError:
    """A JetStream error answer (a value, mapped to a worknode error before it leaves)."""

    status: int
    err_code: int
    description: str

    @classmethod
    def of(cls, error: object) -> _ApiError:
        e = error if isinstance(error, dict) else {}
        return cls(int(e.get("code") or 0), int(e.get("err_code") or 0),
                   str(e.get("description") or "JetStream error"))

    def __str__(self) -> str:
        return f"{self.description} (status {self.status}, err_code {self.err_code})"

    @property
    def retriable(self) -> bool:
        return self.err_code in _RETRIABLE_CODES or self.status >= 500

    def mapped(self, what: str) -> WorknodeError:
        """The worknode error for this answer."""
        if self.retriable:
            return UnavailableError(f"{what}: {self}")
        if self.err_code == _STREAM_NOT_FOUND:
            return UnavailableError(f"{what}: {self} (call ensure() first)")
        return InvalidArgumentError(f"{what}: {self}")


class LogReader:
    """The log's entries from a start sequence on, in stream order, through an ordered
    consumer. Use as ``async with``; iterate (``async for`` waits for new entries forever:
    a tail) or call ``next(timeout)``. ``last_seq`` is the last sequence delivered.

    Raises ``LogTruncatedError`` when entries it should deliver are gone (the caller takes a
    snapshot and resumes at ``first_seq``), ``UnavailableError`` when the consumer cannot be
    created (no quorum)."""

    def __init__(
        self, log: StrongLog, start_seq: int, *, heartbeat: float, skip_gaps: bool = False
    ) -> None:
        self._skip_gaps = skip_gaps
        self._log = log
        self._start = start_seq
        self._heartbeat = heartbeat
        self._next = start_seq
        self._sub: Any = None
        # Delivered messages, handed over by the subscription's callback: one task of
        # nats-py's delivers them all (``next_msg`` would start a task per message). Bounded:
        # a full queue holds the callback, and the rest wait in nats-py's pending queue
        # (its slow-consumer bound), as they would for ``next_msg``.
        self._queue: asyncio.Queue[NatsMsg] = asyncio.Queue(maxsize=1024)

    @property
    def last_seq(self) -> int:
        """The last sequence delivered (``start_seq - 1`` before the first)."""
        return self._next - 1

    async def start(self) -> None:
        """Check the start is still in the log and create the consumer. Idempotent."""
        if self._sub is not None:
            return
        await self._check_gap(self._next)
        log = self._log
        nc = log._nc()
        js = nc.jetstream(timeout=log.timeout)
        config = api.ConsumerConfig(
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=self._next,
            filter_subjects=list(log.subjects),
        )
        try:
            async with asyncio.timeout(log.timeout):
                self._sub = await js.subscribe(
                    log.subjects[0],
                    cb=self._queue.put,
                    stream=log.stream,
                    config=config,
                    ordered_consumer=True,
                    idle_heartbeat=self._heartbeat,
                    deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
                    inactive_threshold=max(5.0, 10 * self._heartbeat),
                )
        except (TimeoutError, nats.errors.Error, OSError) as exc:
            raise UnavailableError(
                f"cannot read stream {log.stream} from {self._next}: {type(exc).__name__}: {exc}"
            ) from exc

    async def _check_gap(self, wanted: int) -> None:
        if self._skip_gaps:
            return
        first, _last = await self._log.state()
        if wanted < first:
            self._log.stats.truncations += 1
            raise LogTruncatedError(
                f"stream {self._log.stream} no longer holds entries {wanted}..{first - 1}: "
                f"take a snapshot, then read from {first}",
                requested=wanted,
                first_seq=first,
            )

    async def next(self, timeout: float | None = None) -> LogEntry:  # noqa: ASYNC109 - as nats-py
        """The next entry; waits up to ``timeout`` seconds (None: forever). Raises
        ``TransportTimeoutError`` when none came in time, ``LogTruncatedError`` on a gap."""
        await self.start()
        nc = self._log._nc()
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            try:
                msg = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                if nc.is_closed:
                    raise UnavailableError(
                        f"reading stream {self._log.stream}: the connection is closed"
                    ) from None
                # Wake at least every second to notice a closed connection.
                left = 1.0 if deadline is None else min(1.0, max(0.001, deadline - loop.time()))
                try:
                    async with asyncio.timeout(left):
                        msg = await self._queue.get()
                except TimeoutError:
                    if deadline is not None and loop.time() >= deadline:
                        raise TransportTimeoutError(
                            f"no log entry after {self.last_seq} within {timeout} s"
                        ) from None
                    continue
            meta = msg.metadata
            seq = meta.sequence.stream
            if seq < self._next:
                continue  # delivered again after a consumer reset
            if seq > self._next:
                # Removed entries were skipped: harmless inside the log (expired fences),
                # a gap when the log's head moved past them.
                await self._check_gap(self._next)
            self._next = seq + 1
            self._log.stats.entries_read += 1
            subject = msg.subject
            return LogEntry(
                seq=seq,
                subject=subject,
                headers=dict(msg.headers or {}),
                payload=msg.data,
                pending=int(meta.num_pending),
                fence=subject == self._log.fence_subject,
            )

    async def stop(self) -> None:
        """Unsubscribe (the server drops the consumer). Idempotent."""
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
            # Undelivered ones come again from the next consumer (``_next`` on).
            self._queue = asyncio.Queue(maxsize=1024)

    async def __aenter__(self) -> Self:
        """Start and return the reader."""
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        """Stop the reader."""
        await self.stop()

    def __aiter__(self) -> AsyncIterator[LogEntry]:
        """Iterate over the entries, waiting for new ones (a tail)."""
        return self._entries()

    async def _entries(self) -> AsyncIterator[LogEntry]:
        while True:
            yield await self.next()
