"""What one replicated op costs a receiving replica, step by step, in-process.

Used by ``bench.replication_bench`` (issue 19: "CPU per replicated op on a receiving replica,
with a per-step breakdown"). A writer's machine makes ``batches`` batches of ``ops`` writes to
distinct registers (nothing joins: the costly workload), sealed as it publishes them; a
receiver then runs each step a replica runs per batch, timed in interleaved rounds (the CPUs
change speed every few seconds) and divided by ``ops``:

- *signature*: the Ed25519 verification of the envelope's body;
- *codec*: ``open`` without verification (parse, validate, build the CRDT objects);
- *checks + join*: the replication machine's ``DeltaReceived`` (Byzantine checks, causal
  gate, join into the state) on a fresh receiver per round;
- *store*: logging the envelope as a received record (SQLite, ``synchronous=normal``), one
  commit per batch as a replica's committer does when it writes.

The transport's share (nats-py parsing and delivering the message) is the raw benchmark's
per-message figure beside it.
"""

from __future__ import annotations

import functools
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from broker.codec import Signer, TrustRoster, WireCodec
from broker.crdt import Assign, Create, ORMap
from broker.replication import DeltaReceived, ReplicationMachine
from broker.store import DurableStore

_SUBJECT = "wn.bench.delta.s"
_WALL = 1_800_000_000_000


def _batches(ops: int, batches: int) -> tuple[list[tuple[bytes, int]], TrustRoster, WireCodec]:
    """The writer's sealed batches (with their timestamps): first the worknode's creation,
    then ``batches`` of ``ops`` distinct registers each."""
    signer = Signer("writer", os.urandom(32))
    roster = TrustRoster({"writer": signer.public_key})
    codec = WireCodec()
    writer = ReplicationMachine("writer")
    created = writer.write([Create("doc")], lambda: _WALL).delta
    hlc = writer.clock.now(_WALL)
    out = [(codec.seal(signer, subject=_SUBJECT, hlc=hlc, sequence=1, document=created), hlc)]
    for b in range(1, batches + 1):
        wall = _WALL + b
        w = writer.write([Assign("doc", (f"k{b * ops + i}",), i) for i in range(ops)],
                         functools.partial(int, wall))
        hlc = writer.clock.now(_WALL + b)
        out.append((codec.seal(signer, subject=_SUBJECT, hlc=hlc, sequence=b + 1,
                               document=w.delta), hlc))
    return out, roster, codec


def receive_cost(ops: int = 100, batches: int = 40, rounds: int = 5) -> dict[str, list[float]]:
    """Microseconds per op of each receiving step (see the module doc), one value per round."""
    (created, created_hlc), *sealed = (all_ := _batches(ops, batches))[0]
    roster, codec = all_[1], all_[2]
    signed = []
    for data, _ in sealed:
        outer = codec.schema.envelope.SignedEnvelope.from_bytes_packed(data)
        signed.append((bytes(outer.body), bytes(outer.signature)))
    out: dict[str, list[float]] = {
        "signature (Ed25519 verify)": [], "codec (decode, validate, build)": [],
        "checks + join (replication machine)": [], "store (received record, SQLite)": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        store = DurableStore(Path(tmp) / "bench.db", synchronous="normal")
        store.open()
        try:
            for _ in range(rounds):
                t0 = time.perf_counter()
                for body, signature in signed:
                    roster.verify("writer", body, signature)
                verified = time.perf_counter() - t0
                t0 = time.perf_counter()
                docs = [codec.open(data, None, subject=_SUBJECT).document for data, _ in sealed]
                decoded = time.perf_counter() - t0
                receiver = ReplicationMachine("r")
                first = codec.open(created, None, subject=_SUBJECT).document
                assert isinstance(first, ORMap)
                receiver.handle(DeltaReceived(1.0, "writer", 1, first, len(created),
                                              raw=created, hlc=created_hlc))
                t0 = time.perf_counter()
                for i, ((data, hlc), doc) in enumerate(zip(sealed, docs, strict=True)):
                    assert isinstance(doc, ORMap)
                    receiver.handle(DeltaReceived(1.0, "writer", i + 2, doc, len(data),
                                                  raw=data, hlc=hlc))
                joined = time.perf_counter() - t0
                assert len(receiver.tree.fields("doc")) == ops * len(sealed)  # all joined
                t0 = time.perf_counter()
                for data, _ in sealed:
                    store.append("s", [data], received=[0])
                stored = time.perf_counter() - t0
                n = ops * len(sealed) / 1e6
                for name, seconds in zip(out, (verified, decoded, joined, stored),
                                         strict=True):
                    out[name].append(seconds / n)
        finally:
            store.close()
    return out


def rows(costs: dict[str, list[float]], transport_us: float | None = None) -> list[str]:
    """Markdown rows: each step's median and spread (us per op), their sum, and the
    transport's share when given."""
    lines = []
    for name, xs in costs.items():
        lines.append(f"| {name} | {statistics.median(xs):.2f} | {min(xs):.2f} - {max(xs):.2f} |")
    sums = [sum(xs) for xs in zip(*costs.values(), strict=True)]
    lines.append(f"| **every step above (us per op)** | **{statistics.median(sums):.2f}** | "
                 f"{min(sums):.2f} - {max(sums):.2f} |")
    if transport_us is not None:
        lines.append(f"| transport: raw nats-py, per 64 B message delivered (us, for scale) | "
                     f"{transport_us:.2f} | |")
    return lines


def _main() -> Any:  # pragma: no cover - a manual look
    print("\n".join(rows(receive_cost())))


if __name__ == "__main__":  # pragma: no cover
    _main()
