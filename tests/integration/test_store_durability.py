"""The kill -9 proof: every record the store acknowledged survives SIGKILL of the writer.

A child process appends records in small groups (now and then a group of large records, so a
kill often lands inside a long commit), compacts with a snapshot from time to time, and
prints ``begin N`` before each append and ``ack N`` after it returns, flushing stdout each
time. The parent kills it with SIGKILL at a random moment, then reopens the store and checks:

- every acknowledged record is there with its exact bytes, or covered by the snapshot;
- nothing was half-written: the log ends at an acknowledged group boundary or at the end of
  the one group in flight, and every record's bytes match the content its header names;
- the acknowledged meta value survived as well.

Several rounds run on the same file, so each child also recovers the previous child's file.
A SIGKILL of the process tests what ``synchronous="normal"`` promises and part of what
``"full"`` promises; surviving power loss would need a machine whose power can be cut.
"""

from __future__ import annotations

import hashlib
import random
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from broker.store import DurableStore, Loaded

REPO = Path(__file__).resolve().parents[2]
SUBJECT = "wn.durability.test"
ROUNDS = 5
_HEADER = struct.Struct(">QI")  # seq, length of the body


def payload(seq: int, length: int) -> bytes:
    """Record content that names its own sequence and length, so damage is detectable."""
    block = hashlib.sha256(seq.to_bytes(8, "big")).digest()
    body = (block * (length // len(block) + 1))[:length]
    return _HEADER.pack(seq, length) + body


def check_payload(seq: int, data: bytes) -> None:
    """Fail unless ``data`` is exactly ``payload(seq, n)`` for the length it declares."""
    assert len(data) >= _HEADER.size, f"record {seq} is truncated to {len(data)} bytes"
    named_seq, length = _HEADER.unpack_from(data)
    assert named_seq == seq, f"record {seq} holds the content of record {named_seq}"
    assert data == payload(seq, length), f"record {seq} is damaged"


def snapshot_for(upto: int) -> bytes:
    """Snapshot content for a compaction up to ``upto``."""
    return b"snapshot:" + upto.to_bytes(8, "big") + hashlib.sha256(b"s%d" % upto).digest() * 64


def child_main() -> None:
    """The writer: ``python -c '...child_main()' PATH SYNCHRONOUS SEED``. Runs until killed."""
    path, synchronous, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    rng = random.Random(seed)
    with DurableStore(Path(path), synchronous=synchronous) as store:  # type: ignore[arg-type]
        last = store.load(SUBJECT).last_seq
        print(f"start {last}", flush=True)
        while True:
            if rng.random() < 0.1:  # a long commit: a few large records
                lengths = [rng.randrange(64_000, 512_000) for _ in range(rng.randint(1, 3))]
            else:
                lengths = [rng.randrange(0, 2_000) for _ in range(rng.randint(1, 4))]
            records = [payload(last + i, n) for i, n in enumerate(lengths, 1)]
            print(f"begin {last + len(records)}", flush=True)
            last = store.append(SUBJECT, records)
            print(f"ack {last}", flush=True)
            if rng.random() < 0.05:
                store.write_snapshot(SUBJECT, snapshot_for(last), last)
            if rng.random() < 0.1:
                store.set_meta(SUBJECT, "acked", str(last).encode())
                print(f"meta {last}", flush=True)


@dataclass
class Child:
    """One writer process and what it printed (complete lines only)."""

    proc: subprocess.Popen[bytes]
    lines: list[str] = field(default_factory=list)
    reader: threading.Thread | None = None
    started: threading.Event = field(default_factory=threading.Event)

    def read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            if raw.endswith(b"\n"):  # a line cut by the kill was never acknowledged
                self.lines.append(raw.decode().strip())
                if self.lines[-1].startswith("start"):
                    self.started.set()
        self.started.set()  # EOF: do not keep the parent waiting

    def values(self, kind: str) -> list[int]:
        return [int(line.split()[1]) for line in self.lines if line.startswith(kind + " ")]


@pytest.fixture
def spawn() -> Iterator[Callable[[Path, str, int], Child]]:
    """Start writer children; every one is killed and reaped, even if the test fails."""
    children: list[Child] = []

    def _spawn(path: Path, synchronous: str, seed: int) -> Child:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from tests.integration.test_store_durability import child_main; child_main()",
                str(path),
                synchronous,
                str(seed),
            ],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        child = Child(proc)
        children.append(child)
        child.reader = threading.Thread(target=child.read, daemon=True)
        child.reader.start()
        return child

    try:
        yield _spawn
    finally:
        for child in children:
            if child.proc.poll() is None:
                child.proc.kill()
            child.proc.wait(timeout=10)
            if child.reader is not None:
                child.reader.join(timeout=10)
            for stream in (child.proc.stdout, child.proc.stderr):
                if stream is not None:
                    stream.close()


def _kill(child: Child) -> None:
    child.proc.send_signal(signal.SIGKILL)
    child.proc.wait(timeout=10)
    assert child.reader is not None
    child.reader.join(timeout=10)
    assert child.proc.returncode == -signal.SIGKILL


def _verify(loaded: Loaded, child: Child) -> None:
    acks, begins = child.values("ack"), child.values("begin")
    acked = acks[-1] if acks else child.values("start")[0]
    # the one group in flight may or may not have committed, but never in part
    boundaries = {acked} | ({begins[-1]} if begins and begins[-1] > acked else set())
    assert loaded.last_seq in boundaries, (
        f"log ends at {loaded.last_seq}; acknowledged {acked}, in flight {sorted(boundaries)}"
    )
    if loaded.snapshot is not None:
        assert loaded.snapshot == snapshot_for(loaded.snapshot_seq)
    assert [seq for seq, _ in loaded.records] == list(
        range(loaded.snapshot_seq + 1, loaded.last_seq + 1)
    )
    for seq, data in loaded.records:
        check_payload(seq, data)


@pytest.mark.parametrize("synchronous", ["full", "normal"])
def test_acknowledged_records_survive_sigkill(
    tmp_path: Path, spawn: Callable[[Path, str, int], Child], synchronous: str
) -> None:
    path = tmp_path / "node.db"
    rng = random.Random(f"kill-9-{synchronous}")
    expected_start = 0
    total_acked = 0
    for round_ in range(ROUNDS):
        child = spawn(path, synchronous, rng.randrange(2**32))
        assert child.started.wait(timeout=30), "the writer did not start"
        assert child.proc.poll() is None, child.proc.stderr.read().decode()  # type: ignore[union-attr]
        assert child.values("start") == [expected_start], "a restart lost the previous round"
        time.sleep(rng.uniform(0.0, 0.4))  # the kill lands anywhere in the write loop
        assert child.proc.poll() is None, child.proc.stderr.read().decode()  # type: ignore[union-attr]
        _kill(child)

        with DurableStore(path, synchronous=synchronous) as store:  # type: ignore[arg-type]
            loaded = store.load(SUBJECT)
            _verify(loaded, child)
            metas = child.values("meta")
            if metas:
                value = store.get_meta(SUBJECT, "acked")
                assert value is not None
                assert metas[-1] <= int(value) <= loaded.last_seq, f"round {round_}"
        acks = child.values("ack")
        total_acked += len(acks)
        expected_start = loaded.last_seq
    assert total_acked > ROUNDS  # the kills landed while the writer was writing
