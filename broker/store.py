"""The durable store a replica writes before it acknowledges anything.

One SQLite file per node holds many subjects. For each subject the store keeps an append-only
log of *records* (opaque bytes: the replica stores packed Cap'n Proto deltas), numbered by a
per-subject sequence, plus at most one *snapshot* covering every record up to its sequence,
and a small key/value *meta* table (per subject, or node-wide). The store knows nothing about
CRDTs: it never looks inside the bytes.

Invariants (kept by every method; checked by ``tests/unit/test_store.py`` and, under
SIGKILL, by ``tests/integration/test_store_durability.py``):

- ``append`` is atomic: after any crash, either every record of a call is present with its
  exact bytes, or none is. A call that raised may or may not have reached the disk (a failed
  fsync does not say); callers treat it as not acknowledged, and replaying a CRDT delta is
  harmless because join is idempotent.
- Sequence numbers of a subject start at 1, grow by one per record, and are never reused,
  not even after compaction: ``load`` returns the snapshot and then exactly the records
  ``snapshot_seq + 1 .. last_seq``, in order, without gaps.
- ``write_snapshot(subject, state, upto_seq)`` atomically replaces the snapshot and deletes the
  records it covers, so the file stays bounded by the live data plus the records written since
  the last compaction (freed pages are reused; the file does not shrink by itself).
- Every record and snapshot carries a CRC-32 written with it; ``load`` verifies it, so silent
  corruption of stored bytes is reported as a :class:`~broker.errors.StoreError` instead of
  being handed to the decoder.
- No ``sqlite3`` exception escapes: every one becomes a ``StoreError`` naming the file and the
  operation. Busy, full-disk, I/O and out-of-memory errors are marked ``retriable``; the
  transaction is rolled back and the store stays usable once the cause is gone.

Fsync policy (SQLite in WAL mode):

- ``synchronous="full"`` (default): every committing call (``append``, ``write_snapshot``,
  ``set_meta``) fsyncs the write-ahead log before it returns, so what it wrote survives
  ``kill -9`` of the process *and* an OS crash or power loss. On macOS ``F_FULLFSYNC`` is used
  as well. Checkpoints fsync the log before copying pages into the database file and fsync the
  database file afterwards.
- ``synchronous="normal"``: a commit is written to the log (into the OS page cache) before it
  returns, but the log is fsynced only at checkpoints (about every 4 MiB of log). What a call
  wrote survives ``kill -9`` of the process, not an OS crash or power loss: those may lose the
  last commits (never corrupt the file, never keep half of a call).

In both modes ``open()`` fsyncs the directory of a file it created, SQLite fsyncs it when it
creates the log, and a crash never leaves part of a call behind. Both hold only if the disk
honours flush requests; a drive cache that lies about them defeats any fsync policy.

Threads: a store is synchronous and blocking; a replica calls it from the store's own thread
(``broker._store_thread``), never on the event loop. The connection is opened with
``check_same_thread=False`` and every public method holds an internal lock, so a store may be
handed between threads and calls from different threads are serialized, one at a time.
Several stores or processes may open one file: SQLite serializes their writes, and a writer
that waits longer than ``busy_timeout`` for the lock gets a retriable ``StoreError``. A node
should still own its file alone (one identity, one writer); the store does not enforce that.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import zlib
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal, Self

from broker.errors import InvalidArgumentError, PayloadTooLargeError, StoreError

__all__ = [
    "APPLICATION_ID",
    "DEFAULT_MAX_RECORD_BYTES",
    "DEFAULT_MAX_SNAPSHOT_BYTES",
    "SCHEMA_VERSION",
    "BytesLike",
    "DurableStore",
    "Loaded",
    "Synchronous",
]

BytesLike = bytes | bytearray | memoryview
"""What the store accepts as content; it always hands back ``bytes``."""

Synchronous = Literal["full", "normal"]
"""When a commit reaches the disk: ``full`` before the call returns, ``normal`` at checkpoints."""

SCHEMA_VERSION = 2
"""The schema version this code writes; :data:`_MIGRATIONS` brings older files up to it."""

APPLICATION_ID = 0x574B4E44  # "WKND" in the SQLite header: refuses other programs' databases
"""Written to the SQLite header (``PRAGMA application_id``) of every worknode store."""

DEFAULT_MAX_RECORD_BYTES = 8 * 1024 * 1024
"""Default bound on one record (and one meta value)."""

DEFAULT_MAX_SNAPSHOT_BYTES = 256 * 1024 * 1024
"""Default bound on one snapshot; SQLite itself refuses blobs above about 1 GB."""

_JOURNAL_SIZE_LIMIT = 32 * 1024 * 1024  # the log is truncated back to this after checkpoints

# SQLite primary result codes after which the same call may succeed later.
_RETRIABLE_CODES = frozenset(
    {
        5,  # SQLITE_BUSY: another connection holds the write lock past the busy timeout
        6,  # SQLITE_LOCKED
        7,  # SQLITE_NOMEM
        9,  # SQLITE_INTERRUPT
        10,  # SQLITE_IOERR: transient on network file systems; the disk may come back
        13,  # SQLITE_FULL: disk full, or the max_file_bytes bound
        15,  # SQLITE_PROTOCOL: WAL lock race
    }
)


@dataclass(frozen=True, slots=True)
class Loaded:
    """What :meth:`DurableStore.load` returns for one subject.

    ``snapshot`` covers every record up to ``snapshot_seq`` (``None`` and ``0`` if the subject
    was never compacted); ``records`` are the ``(seq, bytes)`` written after it, in order;
    ``received``: the sequence numbers among them appended as received (``append(...,
    received=...)``), i.e. not this node's own writes.
    """

    snapshot: bytes | None
    snapshot_seq: int
    records: list[tuple[int, bytes]]
    received: frozenset[int] = frozenset()

    @property
    def last_seq(self) -> int:
        """The sequence number of the last record written (``0`` for an empty subject)."""
        return self.records[-1][0] if self.records else self.snapshot_seq


# -- schema -----------------------------------------------------------------------------------


def _schema_v1(conn: sqlite3.Connection) -> None:
    # The snapshot lives in its own table: SQLite rewrites a whole row on UPDATE, and the
    # subjects row is updated on every append.
    for statement in (
        """CREATE TABLE subjects (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            last_seq INTEGER NOT NULL DEFAULT 0 CHECK (last_seq >= 0),
            snapshot_seq INTEGER NOT NULL DEFAULT 0
                CHECK (snapshot_seq >= 0 AND snapshot_seq <= last_seq)
        )""",
        """CREATE TABLE records (
            subject_id INTEGER NOT NULL REFERENCES subjects (id) ON DELETE CASCADE,
            seq INTEGER NOT NULL CHECK (seq > 0),
            crc INTEGER NOT NULL,
            data BLOB NOT NULL,
            PRIMARY KEY (subject_id, seq)
        )""",
        """CREATE TABLE snapshots (
            subject_id INTEGER PRIMARY KEY REFERENCES subjects (id) ON DELETE CASCADE,
            crc INTEGER NOT NULL,
            data BLOB NOT NULL
        )""",
        """CREATE TABLE meta (
            scope TEXT NOT NULL,
            key TEXT NOT NULL,
            value BLOB NOT NULL,
            PRIMARY KEY (scope, key)
        ) WITHOUT ROWID""",
    ):
        conn.execute(statement)


def _schema_v2(conn: sqlite3.Connection) -> None:
    # Records that hold what this node received (peers' state logged with a local write
    # that depends on it, healer repairs) rather than its own writes: a replica republishes
    # only its own unpublished records after a crash.
    conn.execute(
        "ALTER TABLE records ADD COLUMN received INTEGER NOT NULL DEFAULT 0"
        " CHECK (received IN (0, 1))"
    )


_MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {1: _schema_v1, 2: _schema_v2}
"""Migration hook: entry ``n`` turns a version ``n - 1`` file (0: empty) into version ``n``.

All pending steps run in one transaction with the version bump, so a crash mid-migration
leaves the file at its old version. Add a step and raise :data:`SCHEMA_VERSION`; never edit
a released step.
"""

_NODE_SCOPE = ""  # meta scope of node-wide values; subjects are never empty


# -- the store --------------------------------------------------------------------------------


class DurableStore:
    """A node's durable store: per-subject record logs, snapshots and meta in one SQLite file.

    ``open()`` creates the file (not its directory) if needed; ``close()`` checkpoints and
    releases it. Both are idempotent, and the store is a context manager. Settings:

    - ``synchronous``: the fsync policy, see the module docstring;
    - ``busy_timeout``: seconds to wait for a lock held by another connection;
    - ``max_record_bytes``: larger records and meta values raise ``PayloadTooLargeError``;
    - ``max_snapshot_bytes``: the same for snapshots;
    - ``max_file_bytes``: if set, writes that would grow the database file beyond it fail with
      a retriable ``StoreError`` (as on a full disk) until compaction frees pages.
    """

    def __init__(
        self,
        path: Path,
        *,
        synchronous: Synchronous = "full",
        busy_timeout: float = 5.0,
        max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
        max_snapshot_bytes: int = DEFAULT_MAX_SNAPSHOT_BYTES,
        max_file_bytes: int | None = None,
    ) -> None:
        if synchronous not in ("full", "normal"):
            raise InvalidArgumentError(
                f"synchronous must be 'full' or 'normal', not {synchronous!r}"
            )
        if busy_timeout < 0:
            raise InvalidArgumentError(f"busy_timeout must be >= 0, not {busy_timeout!r}")
        for name, bound in (
            ("max_record_bytes", max_record_bytes),
            ("max_snapshot_bytes", max_snapshot_bytes),
            ("max_file_bytes", max_file_bytes),
        ):
            if bound is not None and bound <= 0:
                raise InvalidArgumentError(f"{name} must be positive, not {bound!r}")
        self._path = Path(path)
        self._synchronous: Synchronous = synchronous
        self._busy_timeout = busy_timeout
        self._max_record_bytes = max_record_bytes
        self._max_snapshot_bytes = max_snapshot_bytes
        self._max_file_bytes = max_file_bytes
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.RLock()

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def path(self) -> Path:
        """The SQLite file (its ``-wal`` and ``-shm`` companions live beside it)."""
        return self._path

    @property
    def synchronous(self) -> Synchronous:
        """The fsync policy this store was opened with."""
        return self._synchronous

    @property
    def max_record_bytes(self) -> int:
        """The largest record (or meta value) :meth:`append` accepts."""
        return self._max_record_bytes

    @property
    def is_open(self) -> bool:
        """Whether :meth:`open` succeeded and :meth:`close` has not been called since."""
        return self._conn is not None

    def open(self) -> None:
        """Open (creating if needed) and migrate the file. Does nothing if already open.

        Raises ``StoreError`` if the file cannot be opened or written, is not a worknode
        store, is corrupt, or was written by a newer schema version.
        """
        with self._lock:
            if self._conn is not None:
                return
            created = not self._path.exists()
            try:
                if created:  # owner only: SQLite gives its -wal and -shm files the same mode
                    with contextlib.suppress(OSError):  # sqlite3 says why it cannot open it
                        os.close(os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600))
                conn = sqlite3.connect(
                    self._path,
                    timeout=self._busy_timeout,
                    isolation_level=None,  # transactions are explicit: BEGIN IMMEDIATE .. COMMIT
                    check_same_thread=False,  # serialized by self._lock instead
                )
            except sqlite3.Error as exc:
                raise self._error("open", exc) from exc
            try:
                self._configure(conn)
                self._migrate(conn)
                if created:
                    _fsync_directory(self._path.parent)
            except sqlite3.Error as exc:
                conn.close()
                raise self._error("open", exc) from exc
            except OSError as exc:
                conn.close()
                raise StoreError(f"store {self._path}: open failed: {exc}") from exc
            except BaseException:
                conn.close()
                raise
            self._conn = conn

    def close(self) -> None:
        """Checkpoint the log into the database file and close it. Idempotent.

        Everything committed is already durable per the policy before ``close``; closing only
        tidies up (an unclean exit loses nothing that was acknowledged).
        """
        with self._lock:
            conn, self._conn = self._conn, None
            if conn is None:
                return
            try:
                conn.close()
            except sqlite3.Error as exc:
                raise self._error("close", exc) from exc

    def __enter__(self) -> Self:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- records and snapshots ----------------------------------------------------------------

    def append(
        self, subject: str, records: Sequence[BytesLike], *, received: Collection[int] = ()
    ) -> int:
        """Durably append ``records`` to ``subject``'s log in one transaction.

        ``received``: indexes into ``records`` of those that hold state this node received
        rather than wrote (``load`` reports their sequence numbers in ``Loaded.received``).

        Returns the sequence number of the last record (the subject's current last sequence
        if ``records`` is empty; nothing is written then). When it returns, every record is
        durable per the fsync policy; if it raises, none was acknowledged (see the module
        docstring). One call is one commit and one fsync, so batching concurrent writers into
        one call (group commit) multiplies throughput.

        Raises ``PayloadTooLargeError`` (nothing written) if a record exceeds
        ``max_record_bytes``, ``InvalidArgumentError`` for an empty subject or a record that
        is not bytes, ``StoreError`` if SQLite fails.
        """
        _check_subject(subject)
        sizes = [_byte_size(r, "record") for r in records]
        marked = frozenset(received)
        if any(type(i) is not int or not 0 <= i < len(records) for i in marked):
            raise InvalidArgumentError(
                f"received must index the {len(records)} records, not {sorted(marked)!r}"
            )
        for i, size in enumerate(sizes):
            if size > self._max_record_bytes:
                raise PayloadTooLargeError(
                    f"record {i} for {subject!r} is {size:,} bytes; the store accepts at most "
                    f"{self._max_record_bytes:,} (max_record_bytes); nothing was written"
                )
        with self._transaction(f"append to {subject!r}") as conn:
            sid, last = self._subject_row(conn, subject, create=bool(records))
            if not records:
                return last
            conn.executemany(
                "INSERT INTO records (subject_id, seq, crc, data, received)"
                " VALUES (?, ?, ?, ?, ?)",
                (
                    (sid, last + i, zlib.crc32(r), r, int(i - 1 in marked))
                    for i, r in enumerate(records, 1)
                ),
            )
            last += len(records)
            conn.execute("UPDATE subjects SET last_seq = ? WHERE id = ?", (last, sid))
            return last

    def load(self, subject: str) -> Loaded:
        """The subject's latest snapshot and every record after it, in sequence order.

        An unknown subject loads as ``Loaded(None, 0, [])``. Raises ``StoreError`` if SQLite
        fails or a stored checksum does not match (corruption).
        """
        _check_subject(subject)
        with self._transaction(f"load {subject!r}", write=False) as conn:
            row = conn.execute(
                "SELECT id, snapshot_seq, last_seq FROM subjects WHERE name = ?", (subject,)
            ).fetchone()
            if row is None:
                return Loaded(None, 0, [])
            sid, snapshot_seq, last_seq = row
            snapshot: bytes | None = None
            snap = conn.execute(
                "SELECT crc, data FROM snapshots WHERE subject_id = ?", (sid,)
            ).fetchone()
            if snap is not None:
                if zlib.crc32(snap[1]) != snap[0]:
                    raise StoreError(
                        f"store {self._path}: the snapshot of {subject!r} (up to seq "
                        f"{snapshot_seq}) fails its checksum: the file is corrupt"
                    )
                snapshot = snap[1]
            records: list[tuple[int, bytes]] = []
            received: set[int] = set()
            expected = snapshot_seq + 1
            for seq, crc, data, rec in conn.execute(
                "SELECT seq, crc, data, received FROM records"
                " WHERE subject_id = ? AND seq > ? ORDER BY seq",
                (sid, snapshot_seq),
            ):
                if rec:
                    received.add(seq)
                if seq != expected or zlib.crc32(data) != crc:
                    what = "fails its checksum" if seq == expected else f"follows {expected - 1}"
                    raise StoreError(
                        f"store {self._path}: record {seq} of {subject!r} {what}: "
                        "the file is corrupt"
                    )
                records.append((seq, data))
                expected += 1
            if expected - 1 != last_seq:
                raise StoreError(
                    f"store {self._path}: {subject!r} ends at record {expected - 1}, "
                    f"expected {last_seq}: the file is corrupt"
                )
            return Loaded(snapshot, snapshot_seq, records, frozenset(received))

    def write_snapshot(self, subject: str, state: BytesLike, upto_seq: int) -> None:
        """Atomically store ``state`` as the snapshot covering records ``<= upto_seq`` and
        delete those records (compaction).

        ``upto_seq`` must lie between the current snapshot's sequence and the subject's last
        sequence (``0`` is valid for a subject with no records: an initial state); a snapshot
        older than the current one is refused with ``InvalidArgumentError`` because the
        records it would need are gone. Raises ``PayloadTooLargeError`` above
        ``max_snapshot_bytes``, ``StoreError`` if SQLite fails.
        """
        _check_subject(subject)
        size = _byte_size(state, "snapshot")
        if size > self._max_snapshot_bytes:
            raise PayloadTooLargeError(
                f"snapshot for {subject!r} is {size:,} bytes; the store accepts at most "
                f"{self._max_snapshot_bytes:,} (max_snapshot_bytes); nothing was written"
            )
        if type(upto_seq) is not int or upto_seq < 0:
            raise InvalidArgumentError(f"upto_seq must be an int >= 0, not {upto_seq!r}")
        with self._transaction(f"snapshot {subject!r}") as conn:
            sid, last = self._subject_row(conn, subject, create=True)
            current = conn.execute(
                "SELECT snapshot_seq FROM subjects WHERE id = ?", (sid,)
            ).fetchone()[0]
            if not current <= upto_seq <= last:
                raise InvalidArgumentError(
                    f"snapshot of {subject!r} up to seq {upto_seq}: must lie between the "
                    f"current snapshot ({current}) and the last record ({last})"
                )
            # Free pages before taking new ones, so compaction also works on a full disk.
            conn.execute("DELETE FROM records WHERE subject_id = ? AND seq <= ?", (sid, upto_seq))
            conn.execute("DELETE FROM snapshots WHERE subject_id = ?", (sid,))
            conn.execute(
                "INSERT INTO snapshots (subject_id, crc, data) VALUES (?, ?, ?)",
                (sid, zlib.crc32(state), state),
            )
            conn.execute("UPDATE subjects SET snapshot_seq = ? WHERE id = ?", (upto_seq, sid))

    # -- inspection ---------------------------------------------------------------------------

    def subjects(self) -> list[str]:
        """Every subject that has records or a snapshot, sorted."""
        with self._transaction("list subjects", write=False) as conn:
            return [name for (name,) in conn.execute("SELECT name FROM subjects ORDER BY name")]

    def last_seq(self, subject: str) -> int:
        """The sequence number of the subject's last record (``0`` if it has none)."""
        _check_subject(subject)
        with self._transaction(f"read {subject!r}", write=False) as conn:
            row = conn.execute(
                "SELECT last_seq FROM subjects WHERE name = ?", (subject,)
            ).fetchone()
            return 0 if row is None else int(row[0])

    def record_count(self, subject: str) -> int:
        """How many records the subject holds after its snapshot (what compaction removes)."""
        _check_subject(subject)
        with self._transaction(f"count {subject!r}", write=False) as conn:
            row = conn.execute(
                "SELECT count(*) FROM records JOIN subjects ON subjects.id = records.subject_id "
                "WHERE subjects.name = ?",
                (subject,),
            ).fetchone()
            return int(row[0])

    def size_bytes(self) -> int:
        """Bytes the store occupies on disk now: the database file plus its write-ahead log."""
        with self._lock:
            self._require_open()
            total = 0
            for suffix in ("", "-wal"):
                try:
                    total += os.stat(f"{self._path}{suffix}").st_size
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    raise StoreError(f"store {self._path}: size failed: {exc}") from exc
            return total

    # -- meta ---------------------------------------------------------------------------------

    def get_meta(self, subject: str | None, key: str) -> bytes | None:
        """The meta value stored under ``key`` for ``subject`` (``None``: node-wide), or
        ``None`` if there is none."""
        scope = _meta_scope(subject, key)
        with self._transaction(f"read meta {key!r}", write=False) as conn:
            row = conn.execute(
                "SELECT value FROM meta WHERE scope = ? AND key = ?", (scope, key)
            ).fetchone()
            return None if row is None else bytes(row[0])

    def set_meta(self, subject: str | None, key: str, value: BytesLike | None) -> None:
        """Durably store ``value`` under ``key`` for ``subject`` (``None``: node-wide, e.g. the
        node's signing seed); ``value=None`` deletes the key. Durable per the fsync policy
        when it returns. Values are bounded by ``max_record_bytes``."""
        scope = _meta_scope(subject, key)
        if value is not None:
            size = _byte_size(value, "meta value")
            if size > self._max_record_bytes:
                raise PayloadTooLargeError(
                    f"meta value {key!r} is {size:,} bytes; the store accepts at most "
                    f"{self._max_record_bytes:,} (max_record_bytes)"
                )
        with self._transaction(f"write meta {key!r}") as conn:
            if value is None:
                conn.execute("DELETE FROM meta WHERE scope = ? AND key = ?", (scope, key))
            else:
                conn.execute(
                    "INSERT INTO meta (scope, key, value) VALUES (?, ?, ?) "
                    "ON CONFLICT (scope, key) DO UPDATE SET value = excluded.value",
                    (scope, key, value),
                )

    # -- internals ----------------------------------------------------------------------------

    def _require_open(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError(f"store {self._path} is not open; call open() first")
        return self._conn

    @contextmanager
    def _transaction(self, what: str, *, write: bool = True) -> Iterator[sqlite3.Connection]:
        """Run the body in one transaction under the lock; map and roll back on error.

        Writes take the write lock up front (``BEGIN IMMEDIATE``) so a busy file fails at the
        start, not at commit; reads use a deferred transaction for a consistent view.
        """
        with self._lock:
            conn = self._require_open()
            try:
                conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                yield conn
                conn.execute("COMMIT")
            except BaseException as exc:
                if conn.in_transaction:
                    try:
                        conn.execute("ROLLBACK")
                    except sqlite3.Error:
                        # The connection is unusable; the next open() starts afresh.
                        self._conn = None
                        conn.close()
                if isinstance(exc, sqlite3.Error):
                    raise self._error(what, exc) from exc
                raise

    def _subject_row(
        self, conn: sqlite3.Connection, subject: str, *, create: bool
    ) -> tuple[int, int]:
        row = conn.execute(
            "SELECT id, last_seq FROM subjects WHERE name = ?", (subject,)
        ).fetchone()
        if row is not None:
            return int(row[0]), int(row[1])
        if not create:
            return 0, 0
        cur = conn.execute("INSERT INTO subjects (name) VALUES (?)", (subject,))
        assert cur.lastrowid is not None
        return cur.lastrowid, 0

    def _configure(self, conn: sqlite3.Connection) -> None:
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        if app_id != APPLICATION_ID and (app_id != 0 or tables):
            raise StoreError(
                f"store {self._path}: not a worknode store (SQLite application_id "
                f"{app_id:#x}); refusing to touch it"
            )
        if not tables:
            # Only effective on an empty file; lets a later version return free pages to the
            # file system with PRAGMA incremental_vacuum, without a full VACUUM.
            conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StoreError(
                f"store {self._path}: cannot switch to WAL mode (got {mode!r}); "
                "is the file system read-only or a network share?"
            )
        full = self._synchronous == "full"
        conn.execute(f"PRAGMA synchronous = {'FULL' if full else 'NORMAL'}")
        conn.execute(f"PRAGMA fullfsync = {int(full)}")  # macOS: F_FULLFSYNC, else no-op
        conn.execute(f"PRAGMA checkpoint_fullfsync = {int(full)}")
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute(f"PRAGMA journal_size_limit = {_JOURNAL_SIZE_LIMIT}")
        if self._max_file_bytes is not None:
            page_size = conn.execute("PRAGMA page_size").fetchone()[0]
            conn.execute(f"PRAGMA max_page_count = {max(1, self._max_file_bytes // page_size)}")

    def _migrate(self, conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            has_table = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
            ).fetchone()
            if has_table is None:
                conn.execute(
                    "CREATE TABLE schema_version ("
                    "id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER NOT NULL)"
                )
                conn.execute("INSERT INTO schema_version (id, version) VALUES (1, 0)")
                conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            version = conn.execute("SELECT version FROM schema_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"store {self._path}: schema version {version} was written by a newer "
                    f"worknode (this one reads up to {SCHEMA_VERSION}); upgrade worknode"
                )
            for step in range(version + 1, SCHEMA_VERSION + 1):
                _MIGRATIONS[step](conn)
            # Always write: SQLite silently opens a write-protected file read-only, and a
            # store that cannot write must fail at open, not at the first acknowledgement.
            conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _error(self, what: str, exc: sqlite3.Error) -> StoreError:
        code = getattr(exc, "sqlite_errorcode", None)
        name = getattr(exc, "sqlite_errorname", None) or type(exc).__name__
        retriable = code is not None and (code & 0xFF) in _RETRIABLE_CODES
        hint = " (retriable)" if retriable else ""
        err = StoreError(f"store {self._path}: {what} failed: {exc} [{name}]{hint}")
        err.retriable = retriable
        return err


# -- helpers ----------------------------------------------------------------------------------


def _check_subject(subject: object) -> None:
    if not isinstance(subject, str) or not subject:
        raise InvalidArgumentError(f"subject must be a non-empty str, not {subject!r}")


def _meta_scope(subject: str | None, key: object) -> str:
    if subject is not None:
        _check_subject(subject)
    if not isinstance(key, str) or not key:
        raise InvalidArgumentError(f"meta key must be a non-empty str, not {key!r}")
    return _NODE_SCOPE if subject is None else subject


def _byte_size(value: object, what: str) -> int:
    if isinstance(value, bytes | bytearray):
        return len(value)
    if isinstance(value, memoryview):
        return value.nbytes
    raise InvalidArgumentError(f"a {what} must be bytes, not {type(value).__name__}")


def _fsync_directory(directory: Path) -> None:
    """Make a new file's directory entry durable (SQLite syncs the directory only for its
    journal files)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open directories; nothing more to do there
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
