"""The durable store against real SQLite files: order, compaction, meta, reopen, errors,
bounds, threads, and a stateful model of appends, snapshots and reopens.

The kill -9 proof lives in ``tests/integration/test_store_durability.py``.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import tempfile
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from broker import store as store_module
from broker.errors import InvalidArgumentError, PayloadTooLargeError, StoreError
from broker.store import APPLICATION_ID, SCHEMA_VERSION, DurableStore, Loaded


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "node.db"


@pytest.fixture
def store(path: Path) -> Iterator[DurableStore]:
    with DurableStore(path, synchronous="normal") as s:
        yield s


# -- records and snapshots --------------------------------------------------------------------


def test_append_returns_last_seq_and_load_keeps_order(store: DurableStore) -> None:
    assert store.append("a", [b"1", b"2", b"3"]) == 3
    assert store.append("b", [b"x"]) == 1  # sequences are per subject
    assert store.append("a", [b"4"]) == 4
    assert store.load("a") == Loaded(None, 0, [(1, b"1"), (2, b"2"), (3, b"3"), (4, b"4")])
    assert store.load("b").records == [(1, b"x")]
    assert store.load("a").last_seq == store.last_seq("a") == 4


def test_received_records_are_marked_and_survive_reopen(path: Path) -> None:
    with DurableStore(path) as s:
        s.append("a", [b"own"])
        assert s.append("a", [b"theirs", b"theirs2", b"mine"], received=[0, 1]) == 4
        assert s.load("a") == Loaded(
            None, 0, [(1, b"own"), (2, b"theirs"), (3, b"theirs2"), (4, b"mine")],
            frozenset({2, 3}),
        )
        with pytest.raises(InvalidArgumentError, match="received must index"):
            s.append("a", [b"x"], received=[1])
        assert s.last_seq("a") == 4  # the refused call wrote nothing
    with DurableStore(path) as s:
        assert s.load("a").received == frozenset({2, 3})
        s.write_snapshot("a", b"state", 3)  # compaction drops the marks with the records
        assert s.load("a") == Loaded(b"state", 3, [(4, b"mine")], frozenset())


def test_a_version_1_file_is_migrated_with_its_records_own(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with monkeypatch.context() as m:
        m.setattr(store_module, "SCHEMA_VERSION", 1)
        with DurableStore(path):
            pass
    conn = sqlite3.connect(path)  # records as version 1 wrote them (no received column)
    try:
        with conn:
            conn.execute("INSERT INTO subjects (id, name, last_seq) VALUES (1, 'a', 2)")
            for seq, data in ((1, b"1"), (2, b"2")):
                conn.execute("INSERT INTO records (subject_id, seq, crc, data) "
                             "VALUES (1, ?, ?, ?)", (seq, zlib.crc32(data), data))
    finally:
        conn.close()
    with DurableStore(path) as s:
        assert s.load("a") == Loaded(None, 0, [(1, b"1"), (2, b"2")], frozenset())
        s.append("a", [b"3"], received=[0])
        assert s.load("a").received == frozenset({3})


def test_unknown_subject_loads_empty(store: DurableStore) -> None:
    assert store.load("nobody") == Loaded(None, 0, [])
    assert store.last_seq("nobody") == 0
    assert store.record_count("nobody") == 0


def test_empty_append_writes_nothing(store: DurableStore) -> None:
    assert store.append("a", []) == 0
    assert store.subjects() == []
    store.append("a", [b"x"])
    assert store.append("a", []) == 1
    assert store.load("a").records == [(1, b"x")]


def test_bytes_like_records_come_back_as_bytes(store: DurableStore) -> None:
    store.append("a", [bytearray(b"ba"), memoryview(b"mv"), b""])
    assert store.load("a").records == [(1, b"ba"), (2, b"mv"), (3, b"")]
    assert all(type(data) is bytes for _, data in store.load("a").records)


def test_snapshot_compacts_and_sequences_continue(store: DurableStore) -> None:
    store.append("a", [b"1", b"2", b"3"])
    store.write_snapshot("a", b"state<=2", 2)
    assert store.load("a") == Loaded(b"state<=2", 2, [(3, b"3")])
    assert store.record_count("a") == 1
    store.write_snapshot("a", b"state<=3", 3)
    assert store.load("a") == Loaded(b"state<=3", 3, [])
    assert store.load("a").last_seq == 3
    assert store.record_count("a") == 0
    # sequence numbers are never reused after compaction
    assert store.append("a", [b"4"]) == 4
    assert store.load("a") == Loaded(b"state<=3", 3, [(4, b"4")])


def test_snapshot_may_be_replaced_at_the_same_seq(store: DurableStore) -> None:
    store.append("a", [b"1"])
    store.write_snapshot("a", b"first", 1)
    store.write_snapshot("a", b"second", 1)
    assert store.load("a") == Loaded(b"second", 1, [])


def test_initial_snapshot_of_a_new_subject(store: DurableStore) -> None:
    store.write_snapshot("a", b"from a peer", 0)
    assert store.load("a") == Loaded(b"from a peer", 0, [])
    assert store.subjects() == ["a"]
    assert store.append("a", [b"1"]) == 1


@pytest.mark.parametrize("upto", [-1, 4, 1])
def test_snapshot_outside_the_valid_range_is_refused(store: DurableStore, upto: int) -> None:
    store.append("a", [b"1", b"2", b"3"])
    store.write_snapshot("a", b"s2", 2)
    before = store.load("a")
    with pytest.raises(InvalidArgumentError):
        store.write_snapshot("a", b"bad", upto)  # before the current snapshot, or past the end
    assert store.load("a") == before


def test_refused_snapshot_of_unknown_subject_creates_nothing(store: DurableStore) -> None:
    with pytest.raises(InvalidArgumentError):
        store.write_snapshot("a", b"s", 1)
    assert store.subjects() == []


def test_compaction_keeps_the_file_bounded(store: DurableStore) -> None:
    record = os.urandom(1024)
    written = 0
    for _ in range(400):
        last = store.append("a", [record] * 50)
        written += 50 * len(record)
        store.write_snapshot("a", b"state", last)
    assert store.record_count("a") == 0
    # 20 MB went through the log; what stays is the live data plus a bounded write-ahead log
    assert written > 20_000_000
    assert store.size_bytes() < 8 * 1024 * 1024


def test_subjects_are_listed_sorted(store: DurableStore) -> None:
    for name in ("b", "a", "wn.orders.eu"):
        store.append(name, [b"x"])
    store.set_meta("only-meta", "k", b"v")  # meta alone does not make a subject
    assert store.subjects() == ["a", "b", "wn.orders.eu"]


# -- meta ---------------------------------------------------------------------------------------


def test_meta_is_scoped_per_subject_and_node(store: DurableStore) -> None:
    store.set_meta(None, "signing-seed", b"s" * 32)
    store.set_meta("a", "writer-seq", b"7")
    store.set_meta("b", "writer-seq", b"9")
    assert store.get_meta(None, "signing-seed") == b"s" * 32
    assert store.get_meta("a", "signing-seed") is None
    assert store.get_meta("a", "writer-seq") == b"7"
    assert store.get_meta("b", "writer-seq") == b"9"
    assert store.get_meta(None, "writer-seq") is None
    store.set_meta("a", "writer-seq", b"8")
    assert store.get_meta("a", "writer-seq") == b"8"
    store.set_meta("a", "writer-seq", None)
    assert store.get_meta("a", "writer-seq") is None
    assert store.get_meta("b", "writer-seq") == b"9"


@pytest.mark.parametrize(("subject", "key"), [("", "k"), ("a", ""), (None, ""), ("a", 1)])
def test_meta_refuses_empty_names(store: DurableStore, subject: str | None, key: object) -> None:
    with pytest.raises(InvalidArgumentError):
        store.set_meta(subject, key, b"v")  # type: ignore[arg-type]


# -- lifecycle and reopen ---------------------------------------------------------------------


@pytest.mark.parametrize("synchronous", ["full", "normal"])
def test_reopen_keeps_everything(path: Path, synchronous: str) -> None:
    with DurableStore(path, synchronous=synchronous) as s:  # type: ignore[arg-type]
        s.append("a", [b"1", b"2"])
        s.write_snapshot("a", b"s1", 1)
        s.append("b", [b"x"])
        s.set_meta(None, "seed", b"k")
        s.set_meta("a", "writer", b"3")
    with DurableStore(path, synchronous=synchronous) as s:  # type: ignore[arg-type]
        assert s.load("a") == Loaded(b"s1", 1, [(2, b"2")])
        assert s.load("b") == Loaded(None, 0, [(1, b"x")])
        assert s.subjects() == ["a", "b"]
        assert s.get_meta(None, "seed") == b"k"
        assert s.get_meta("a", "writer") == b"3"
        assert s.append("a", [b"3"]) == 3


def test_open_and_close_are_idempotent(path: Path) -> None:
    s = DurableStore(path)
    assert not s.is_open
    s.open()
    s.open()
    assert s.is_open
    s.append("a", [b"1"])
    s.close()
    s.close()
    assert not s.is_open
    with pytest.raises(StoreError, match="not open"):
        s.append("a", [b"2"])
    with pytest.raises(StoreError, match="not open"):
        s.size_bytes()
    s.open()  # a closed store can be opened again
    assert s.load("a").records == [(1, b"1")]
    s.close()


def test_new_file_is_wal_with_the_current_schema(path: Path, store: DurableStore) -> None:
    store.append("a", [b"1"])
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
        assert conn.execute("SELECT version FROM schema_version").fetchone()[0] == SCHEMA_VERSION
    finally:
        conn.close()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"synchronous": "off"},
        {"busy_timeout": -1},
        {"max_record_bytes": 0},
        {"max_snapshot_bytes": -5},
        {"max_file_bytes": 0},
    ],
)
def test_bad_settings_are_refused(path: Path, kwargs: dict[str, object]) -> None:
    with pytest.raises(InvalidArgumentError):
        DurableStore(path, **kwargs)  # type: ignore[arg-type]


# -- bounds and invalid input ------------------------------------------------------------------


def test_record_over_the_bound_refuses_the_whole_batch(path: Path) -> None:
    with DurableStore(path, max_record_bytes=100) as s:
        s.append("a", [b"x" * 100])  # exactly at the bound is fine
        with pytest.raises(PayloadTooLargeError, match="max_record_bytes"):
            s.append("a", [b"ok", b"x" * 101, b"ok"])
        assert s.load("a").records == [(1, b"x" * 100)]
        with pytest.raises(PayloadTooLargeError):
            s.set_meta("a", "k", b"x" * 101)
        assert s.get_meta("a", "k") is None


def test_default_record_bound_is_8_mib(store: DurableStore) -> None:
    assert store.max_record_bytes == 8 * 1024 * 1024
    with pytest.raises(PayloadTooLargeError):
        store.append("a", [bytes(8 * 1024 * 1024 + 1)])
    assert store.append("a", [bytes(8 * 1024 * 1024)]) == 1


def test_snapshot_over_the_bound_is_refused(path: Path) -> None:
    with DurableStore(path, max_snapshot_bytes=10) as s:
        s.append("a", [b"1"])
        with pytest.raises(PayloadTooLargeError, match="max_snapshot_bytes"):
            s.write_snapshot("a", b"x" * 11, 1)
        assert s.load("a") == Loaded(None, 0, [(1, b"1")])


@pytest.mark.parametrize("records", [["text"], [None], [1]])
def test_records_must_be_bytes(store: DurableStore, records: list[object]) -> None:
    with pytest.raises(InvalidArgumentError, match="must be bytes"):
        store.append("a", records)  # type: ignore[arg-type]
    assert store.subjects() == []


@pytest.mark.parametrize("subject", ["", None, b"a"])
def test_subject_must_be_a_non_empty_str(store: DurableStore, subject: object) -> None:
    with pytest.raises(InvalidArgumentError):
        store.append(subject, [b"x"])  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError):
        store.load(subject)  # type: ignore[arg-type]


# -- errors mapped at the boundary --------------------------------------------------------------


def test_garbage_file_gives_store_error(path: Path) -> None:
    path.write_bytes(b"definitely not sqlite " * 500)
    with pytest.raises(StoreError, match="not a database") as info:
        DurableStore(path).open()
    assert not info.value.retriable
    assert path.read_bytes() == b"definitely not sqlite " * 500  # untouched


def test_truncated_file_gives_store_error(path: Path) -> None:
    with DurableStore(path) as s:
        for i in range(200):
            s.append(f"s{i % 7}", [os.urandom(3000)])
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size // 2)
    s = DurableStore(path)

    def open_and_load_everything() -> None:
        s.open()  # if the damage is not in what open() reads, loading must find it
        for name in s.subjects():
            s.load(name)

    with pytest.raises(StoreError):
        open_and_load_everything()
    s.close()


def test_flipped_record_bytes_fail_the_checksum(path: Path) -> None:
    marker = b"MARKER-0123456789" * 8
    with DurableStore(path) as s:
        s.append("a", [b"before", marker, b"after"])
    # close() checkpointed the log into the database file
    raw = path.read_bytes()
    assert marker in raw
    damaged = marker[:40] + bytes([marker[40] ^ 0x01]) + marker[41:]
    path.write_bytes(raw.replace(marker, damaged))
    with DurableStore(path) as s, pytest.raises(StoreError, match="record 2 of 'a' fails"):
        s.load("a")


def test_other_sqlite_databases_are_refused_untouched(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE theirs (x)")
    conn.commit()
    conn.close()
    before = path.read_bytes()
    with pytest.raises(StoreError, match="not a worknode store"):
        DurableStore(path).open()
    assert path.read_bytes() == before


def test_newer_schema_version_is_refused(path: Path) -> None:
    with DurableStore(path) as s:
        s.append("a", [b"1"])
    conn = sqlite3.connect(path)
    conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="newer worknode"):
        DurableStore(path).open()


def test_migration_hook_runs_once_and_atomically(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with DurableStore(path) as s:
        s.append("a", [b"1"])
    version = SCHEMA_VERSION + 1

    def broken(conn: sqlite3.Connection) -> None:
        conn.execute("CREATE TABLE half_done (x)")
        raise RuntimeError("migration bug")

    monkeypatch.setattr(store_module, "SCHEMA_VERSION", version)
    monkeypatch.setitem(store_module._MIGRATIONS, version, broken)
    with pytest.raises(RuntimeError, match="migration bug"):
        DurableStore(path).open()

    calls: list[int] = []

    def add_index(conn: sqlite3.Connection) -> None:
        calls.append(1)
        conn.execute("CREATE INDEX records_by_crc ON records (crc)")

    monkeypatch.setitem(store_module._MIGRATIONS, version, add_index)
    with DurableStore(path) as s:
        assert s.load("a").records == [(1, b"1")]
    with DurableStore(path):
        pass
    assert calls == [1]
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("SELECT version FROM schema_version").fetchone()[0] == version
        names = {n for (n,) in conn.execute("SELECT name FROM sqlite_master")}
        assert "records_by_crc" in names
        assert "half_done" not in names  # the failed attempt left nothing behind
    finally:
        conn.close()


@pytest.mark.parametrize("target", ["missing-dir/node.db", "."])
def test_unopenable_path_gives_store_error(tmp_path: Path, target: str) -> None:
    with pytest.raises(StoreError, match="unable to open"):
        DurableStore(tmp_path / target).open()


def test_busy_file_gives_retriable_error_and_the_store_recovers(path: Path) -> None:
    with DurableStore(path, busy_timeout=0.05) as s:
        s.append("a", [b"1"])
        other = sqlite3.connect(path, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")  # another writer holds the lock too long
            with pytest.raises(StoreError, match="locked") as info:
                s.append("a", [b"2"])
            assert info.value.retriable
            assert s.load("a").records == [(1, b"1")]  # readers are not blocked in WAL mode
            other.execute("ROLLBACK")
        finally:
            other.close()
        assert s.append("a", [b"2"]) == 2


def test_full_disk_gives_retriable_error_and_compaction_recovers(path: Path) -> None:
    record = os.urandom(16 * 1024)
    with DurableStore(path, max_file_bytes=512 * 1024) as s:
        acked = 0

        def fill() -> None:
            nonlocal acked
            for _ in range(100):
                acked = s.append("a", [record, record])

        with pytest.raises(StoreError, match="full") as info:
            fill()
        assert info.value.retriable
        assert 0 < acked < 200
        loaded = s.load("a")
        assert loaded.records == [(seq, record) for seq in range(1, acked + 1)]  # no half batch
        s.write_snapshot("a", b"compacted", acked)  # works on a full file: frees before it takes
        assert s.append("a", [record]) == acked + 1


@dataclass
class _ReadOnly:
    """Makes a path read-only for the test, even for root (via ``chattr +i``)."""

    undo: list[list[str]] = field(default_factory=list)

    def apply(self, target: Path) -> None:
        if os.geteuid() != 0:
            target.chmod(0o555 if target.is_dir() else 0o444)
            self.undo.append(["chmod", "755" if target.is_dir() else "644", str(target)])
            return
        if shutil.which("chattr") is None:
            pytest.skip("running as root without chattr: cannot make a path read-only")
        done = subprocess.run(["chattr", "+i", str(target)], capture_output=True, check=False)
        if done.returncode != 0:
            pytest.skip(f"chattr +i not permitted here: {done.stderr.decode().strip()}")
        self.undo.append(["chattr", "-i", str(target)])


@pytest.fixture
def read_only() -> Iterator[_ReadOnly]:
    ro = _ReadOnly()
    try:
        yield ro
    finally:
        for cmd in reversed(ro.undo):
            subprocess.run(cmd, check=True)


def test_read_only_directory_gives_store_error(tmp_path: Path, read_only: _ReadOnly) -> None:
    directory = tmp_path / "state"
    directory.mkdir()
    read_only.apply(directory)
    with pytest.raises(StoreError, match="unable to open"):
        DurableStore(directory / "node.db").open()


def test_read_only_file_is_refused_at_open(path: Path, read_only: _ReadOnly) -> None:
    with DurableStore(path) as s:
        s.append("a", [b"1"])
    read_only.apply(path)
    store = DurableStore(path)
    # SQLite would silently open it read-only; the store must refuse before any acknowledgement
    with pytest.raises(StoreError, match=r"readonly|unable to open"):
        store.open()
    assert not store.is_open


# -- threads ----------------------------------------------------------------------------------


def test_calls_from_many_threads_are_serialized(store: DurableStore) -> None:
    results: dict[int, list[int]] = {t: [] for t in range(4)}
    errors: list[BaseException] = []

    def writer(t: int) -> None:
        try:
            for i in range(50):
                results[t].append(store.append("a", [f"{t}:{i}".encode()]))
                store.load("a")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    seqs = sorted(s for r in results.values() for s in r)
    assert seqs == list(range(1, 201))
    records = dict(store.load("a").records)
    for t, acked in results.items():
        assert [records[seq] for seq in acked] == [f"{t}:{i}".encode() for i in range(50)]


# -- a stateful model ----------------------------------------------------------------------------


@dataclass
class _Subject:
    snapshot: bytes | None = None
    snapshot_seq: int = 0
    records: list[tuple[int, bytes]] = field(default_factory=list)
    last: int = 0


SUBJECTS = st.sampled_from(["a", "b", "wn.c"])
RECORDS = st.lists(st.binary(max_size=64), max_size=5)


class StoreModel(RuleBasedStateMachine):
    """Appends, snapshots, meta and reopens against an in-memory model."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="store-model-")
        self.store = DurableStore(Path(self.dir) / "node.db", synchronous="normal")
        self.store.open()
        self.model: dict[str, _Subject] = {}
        self.meta: dict[tuple[str | None, str], bytes] = {}

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.dir)

    @rule(subject=SUBJECTS, records=RECORDS)
    def append(self, subject: str, records: list[bytes]) -> None:
        m = self.model.setdefault(subject, _Subject()) if records else None
        last = self.store.append(subject, records)
        if m is not None:
            m.records += [(m.last + i, r) for i, r in enumerate(records, 1)]
            m.last += len(records)
        assert last == (m.last if m is not None else self.store.last_seq(subject))

    @rule(subject=SUBJECTS, fraction=st.floats(0, 1), state=st.binary(max_size=32))
    def snapshot(self, subject: str, fraction: float, state: bytes) -> None:
        m = self.model.setdefault(subject, _Subject())
        upto = m.snapshot_seq + round(fraction * (m.last - m.snapshot_seq))
        self.store.write_snapshot(subject, state, upto)
        m.snapshot, m.snapshot_seq = state, upto
        m.records = [(s, r) for s, r in m.records if s > upto]

    @rule(subject=SUBJECTS, past_end=st.integers(1, 3))
    def bad_snapshot(self, subject: str, past_end: int) -> None:
        m = self.model.get(subject, _Subject())
        with pytest.raises(InvalidArgumentError):
            self.store.write_snapshot(subject, b"bad", m.last + past_end)

    @rule(
        subject=st.none() | SUBJECTS,
        key=st.sampled_from(["seq", "seed"]),
        value=st.none() | st.binary(max_size=16),
    )
    def set_meta(self, subject: str | None, key: str, value: bytes | None) -> None:
        self.store.set_meta(subject, key, value)
        if value is None:
            self.meta.pop((subject, key), None)
        else:
            self.meta[(subject, key)] = value

    @rule()
    def reopen(self) -> None:
        self.store.close()
        self.store.open()

    @precondition(lambda self: self.model)
    @invariant()
    def matches_the_model(self) -> None:
        assert self.store.subjects() == sorted(self.model)
        for name, m in self.model.items():
            assert self.store.load(name) == Loaded(m.snapshot, m.snapshot_seq, m.records)
            assert self.store.record_count(name) == len(m.records)
            assert self.store.last_seq(name) == m.last
        for (subject, key), value in self.meta.items():
            assert self.store.get_meta(subject, key) == value


TestStoreModel = StoreModel.TestCase
TestStoreModel.settings = settings(max_examples=40, stateful_step_count=25, deadline=None)
