"""STRONG benchmark: worknode STRONG writes and reads beside raw nats-py JetStream.

    python -m bench.strong_bench [--quick] [--rounds N] [--out FILE]

One embedded nats-server (JetStream, ``sync_interval: always``, as ``worknode up`` runs it)
and, in this process, one worknode service whose subject declares STRONG worknodes (its
stream R1: one server), beside a raw nats-py client publishing to a stream with the same
settings (file storage, one message per subject, atomic/direct on) and the same
compare-and-set header (``Nats-Expected-Last-Subject-Sequence``, tracked per subject), with
payloads of the size of worknode's log entries.

Each round runs both sides back to back, in alternating order:

- *write latency*: sequential writes (an increment of one STRONG counter / a raw CAS
  publish to one subject), p50;
- *write throughput*: 32 writers in flight, each on its own key / subject, writes/s;
- *read latency*: a STRONG read (fence + the replica applying the log up to it) beside a
  raw read of the subject's last message from the stream leader (``$JS.API.STREAM.MSG.GET``,
  the fastest read JetStream offers that is not a possibly-stale direct get), p50.

A third side, the *floor*, does what any durable, signed, followed STRONG write must do in
Python: an Ed25519 signature of the entry, the same compare-and-set publish, and an ordered
consumer in this process receiving it (every replica follows the log); worknode is reported
against it too.

The summary gives the median of the per-round ratios worknode / raw and their spread (these
CPUs change speed by about 2x every few seconds: the interleaved ratio is what counts).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

DEFAULT_OUT = Path("bench/results/strong.md")
NS = "bench"
SUBJECT = "accts"
IN_FLIGHT = 32


def _pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(p * len(s)))]


async def _latency(call: Any, n: int) -> float:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        await call()
        out.append(time.perf_counter() - t)
    return _pct(out, 0.5)


async def _throughput(calls: list[Any], n: int) -> float:
    async def worker(call: Any) -> None:
        for _ in range(n):
            await call()

    t = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in calls))
    return len(calls) * n / (time.perf_counter() - t)


async def _run(rounds: int, n: int, out: Path) -> None:
    import nacl.signing
    import nats
    from nats.js import api

    from broker.crdt import Increment
    from broker.replica import Consistency
    from broker.transport import EmbeddedNatsServer
    from services.worknode import WorknodeService, WorknodeSettings

    with tempfile.TemporaryDirectory() as tmp:
        server = EmbeddedNatsServer(Path(tmp) / "nats", sync_interval="always")
        await server.start()
        svc = WorknodeService(WorknodeSettings(
            node_id="bench", namespace=NS, subjects=[SUBJECT], nats_urls=[server.url],
            state_dir=Path(tmp) / "node", metrics_port=None, nats_insecure=True,
            strong={SUBJECT: ["acct-"]}))
        nc = await nats.connect(server.url)
        try:
            await svc.start()
            replica = svc.replica(SUBJECT)
            strong = replica.strong
            assert strong is not None
            keys = [f"acct-{i}" for i in range(IN_FLIGHT)]
            for k in keys:
                await strong.create_if_absent(k, "root")
            entry = len(replica.codec.seal(
                replica.signer, subject="x", hlc=1, sequence=0,
                document=replica.machine.state)) // max(1, len(keys))
            payload = b"x" * max(64, entry)

            js = nc.jetstream()
            await js.add_stream(
                name="RAW", subjects=["raw.>"], storage="file", max_msgs_per_subject=1,
                allow_direct=True)
            last: dict[str, int] = {}

            async def raw_write(subject: str = "raw.k.0") -> None:
                ack = await js.publish(subject, payload, headers={
                    "Nats-Expected-Last-Subject-Sequence": str(last.get(subject, 0))})
                last[subject] = ack.seq

            # The floor: what any durable, signed, followed STRONG write must do in Python —
            # sign the entry (Ed25519), publish it with the compare-and-set header, and have
            # this process's follower receive it from the log (an ordered consumer).
            signing = nacl.signing.SigningKey(os.urandom(32))
            await js.add_stream(
                name="FLOOR", subjects=["floor.>"], storage="file", max_msgs_per_subject=1,
                allow_direct=True)
            followed = 0

            async def follow(msg: Any) -> None:
                nonlocal followed
                followed += 1

            await js.subscribe("floor.>", cb=follow, ordered_consumer=True,
                               deliver_policy=api.DeliverPolicy.NEW)

            async def floor_write(subject: str = "floor.k.0") -> None:
                body = signing.sign(payload).signature + payload
                ack = await js.publish(subject, body, headers={
                    "Nats-Expected-Last-Subject-Sequence": str(last.get(subject, 0))})
                last[subject] = ack.seq

            async def wn_write(key: str = "acct-0") -> None:
                await replica.write(Increment(key, ("n",), 1), Consistency.STRONG)

            async def raw_read() -> None:
                await nc.request("$JS.API.STREAM.MSG.GET.RAW",
                                 json.dumps({"last_by_subj": "raw.k.0"}).encode(), timeout=5)

            async def wn_read() -> None:
                await strong.read(["acct-0"])

            await raw_write()
            rows: list[dict[str, float]] = []
            for r in range(rounds):
                figs: dict[str, float] = {}
                order = ("raw", "floor", "wn") if r % 2 == 0 else ("wn", "floor", "raw")
                writers = {"raw": raw_write, "floor": floor_write, "wn": wn_write}
                for side in order:
                    figs[f"{side}_write_p50"] = await _latency(writers[side], n)
                for side in order:
                    if side == "raw":
                        calls = [lambda s=f"raw.k.{i}": raw_write(s) for i in range(IN_FLIGHT)]
                    elif side == "floor":
                        calls = [lambda s=f"floor.k.{i}": floor_write(s)
                                 for i in range(IN_FLIGHT)]
                    else:
                        calls = [lambda k=k: wn_write(k) for k in keys]
                    figs[f"{side}_write_tput"] = await _throughput(calls, max(2, n // 8))
                for side in ("raw", "wn") if r % 2 == 0 else ("wn", "raw"):
                    figs[f"{side}_read_p50"] = await _latency(
                        raw_read if side == "raw" else wn_read, n)
                rows.append(figs)
                print(json.dumps({"round": r, **{k: round(v, 6) for k, v in figs.items()}}),
                      flush=True)
        finally:
            await nc.close()
            await svc.stop()
            await server.stop()
    _write(out, rows, rounds, n, len(payload))


def _write(out: Path, rows: list[dict[str, float]], rounds: int, n: int, size: int) -> None:
    def ratio(a: str, b: str) -> tuple[float, float, float]:
        rs = [row[a] / row[b] for row in rows]
        return statistics.median(rs), min(rs), max(rs)

    lines = [
        "# STRONG benchmark",
        "",
        f"`python -m bench.strong_bench --rounds {rounds}` — {platform.python_version()}, "
        f"{n} operations per figure per round, log entries of about {size} bytes, one "
        "embedded nats-server (R1, sync_interval always), interleaved rounds.",
        "",
        "| figure | worknode (median) | raw (median) | ratio worknode/raw (median) | spread |",
        "|---|---|---|---|---|",
    ]
    for name, unit, scale in (
        ("write_p50", "ms", 1000), ("write_tput", "ops/s", 1), ("read_p50", "ms", 1000),
    ):
        med, lo, hi = ratio(f"wn_{name}", f"raw_{name}")
        wn = statistics.median(row[f"wn_{name}"] for row in rows) * scale
        raw = statistics.median(row[f"raw_{name}"] for row in rows) * scale
        lines.append(f"| {name} | {wn:.3f} {unit} | {raw:.3f} {unit} | {med:.2f}x | "
                     f"{lo:.2f}-{hi:.2f} |")
    lines += [
        "",
        "The floor: the least a durable, signed, followed STRONG write costs in Python, same "
        "run — an Ed25519 signature of the entry, the same compare-and-set publish, and an "
        "ordered consumer in the same process receiving it (every replica follows the log).",
        "",
        "| figure | worknode (median) | floor (median) | ratio worknode/floor (median) | "
        "spread |",
        "|---|---|---|---|---|",
    ]
    for name, unit, scale in (("write_p50", "ms", 1000), ("write_tput", "ops/s", 1)):
        med, lo, hi = ratio(f"wn_{name}", f"floor_{name}")
        wn = statistics.median(row[f"wn_{name}"] for row in rows) * scale
        floor = statistics.median(row[f"floor_{name}"] for row in rows) * scale
        lines.append(f"| {name} | {wn:.3f} {unit} | {floor:.3f} {unit} | {med:.2f}x | "
                     f"{lo:.2f}-{hi:.2f} |")
    lines += [
        "",
        "Targets (issue 18): write p50 <= 1.3x raw, write throughput >= 0.7x raw. The raw read "
        "is a leader get, which can be stale after an election; a STRONG read is a fence "
        "(one log entry, acknowledged by the quorum) plus applying the log up to it: "
        "linearizable, at the cost of a write.",
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    """Entry point (see the module doc)."""
    p = argparse.ArgumentParser(prog="python -m bench.strong_bench")
    p.add_argument("--quick", action="store_true", help="2 rounds of 50 operations")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--n", type=int, default=300, help="operations per figure per round")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    a = p.parse_args(argv)
    rounds, n = (2, 50) if a.quick else (a.rounds, a.n)
    asyncio.run(_run(rounds, n, a.out))


if __name__ == "__main__":
    main()
