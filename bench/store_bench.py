"""Durable store benchmark: commits/s and records/s for append groups of 1, 10 and 100
records of 200 bytes, with ``synchronous="full"`` and ``"normal"`` — all in the same run.

    python -m bench.store_bench [--quick] [--out bench/results/store.md] [--dir DIR]

One call to ``DurableStore.append`` is one commit, so a group is what a replica's group commit
hands the store at once. Cases run interleaved in rounds (order alternated each round),
because these CPUs and disks change speed over seconds; each row reports the median over
rounds with the min-max, and commit latency percentiles over every commit of the run. After
each timed slice the subject is compacted (untimed), as a replica would, so the file stays
small. The files live in a temporary directory under ``--dir`` (default: the system temporary
directory): run it on the file system the state directory will use.
"""

from __future__ import annotations

import argparse
import os
import platform
import sqlite3
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from broker.store import DurableStore, Synchronous

DEFAULT_OUT = Path("bench/results/store.md")
RECORD_BYTES = 200
GROUPS = (1, 10, 100)
MODES: tuple[Synchronous, ...] = ("full", "normal")


@dataclass
class Case:
    """One (fsync policy, group size) pair and what its rounds measured."""

    synchronous: Synchronous
    group: int
    commits_per_s: list[float] = field(default_factory=list)
    latencies_ns: list[int] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.synchronous}, {self.group} per commit"


def _slice(store: DurableStore, case: Case, seconds: float) -> None:
    subject = f"bench.g{case.group}"
    records = [os.urandom(RECORD_BYTES) for _ in range(case.group)]
    commits = 0
    lat = case.latencies_ns
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        t0 = time.perf_counter_ns()
        last = store.append(subject, records)
        lat.append(time.perf_counter_ns() - t0)
        commits += 1
        if commits >= 3 and time.perf_counter() >= deadline:
            break
    case.commits_per_s.append(commits / (time.perf_counter() - start))
    store.write_snapshot(subject, b"state", last)  # untimed compaction


def run(rounds: int, seconds: float, directory: Path) -> list[Case]:
    """Measure every case in ``rounds`` interleaved rounds of ``seconds`` each."""
    cases = [Case(mode, group) for mode in MODES for group in GROUPS]
    with tempfile.TemporaryDirectory(prefix="store-bench-", dir=directory) as tmp:
        stores = {mode: DurableStore(Path(tmp) / f"{mode}.db", synchronous=mode) for mode in MODES}
        try:
            for s in stores.values():
                s.open()
            for case in cases:  # warm up: create subjects, fault in pages
                _slice(stores[case.synchronous], case, seconds / 4)
                case.commits_per_s.clear()
                case.latencies_ns.clear()
            for rnd in range(rounds):
                for case in cases if rnd % 2 == 0 else reversed(cases):
                    _slice(stores[case.synchronous], case, seconds)
        finally:
            for s in stores.values():
                s.close()
    return cases


def _pct(values: list[int], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1e6


def _ratio(a: Case, b: Case, per_record: bool) -> tuple[float, float, float]:
    scale = a.group / b.group if per_record else 1.0
    ratios = [x * scale / y for x, y in zip(a.commits_per_s, b.commits_per_s, strict=True)]
    return statistics.median(ratios), min(ratios), max(ratios)


def report(cases: list[Case], argv: list[str], rounds: int, seconds: float, where: Path) -> str:
    """The results as Markdown."""
    out = [
        "# worknode durable store benchmark",
        "",
        "Command: `" + " ".join(["python -m bench.store_bench", *argv]) + "`",
        "",
        f"- Python: {platform.python_implementation()} {platform.python_version()}; "
        f"SQLite {sqlite3.sqlite_version}; {platform.platform()}; {os.cpu_count()} CPUs",
        f"- Files under: `{where}` (WAL mode, one SQLite file per fsync policy)",
        "",
        f"## Appends of {RECORD_BYTES}-byte records",
        "",
        f"{rounds} interleaved rounds of {seconds:g} s per case. One commit is one "
        "`append` call; with `full` it returns after the write-ahead log is fsynced.",
        "",
        "| Fsync policy, records per commit | Median commits/s | Min - max | "
        "Median records/s | Min - max | Commit p50 ms | Commit p99 ms |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for c in cases:
        med = statistics.median(c.commits_per_s)
        lo, hi = min(c.commits_per_s), max(c.commits_per_s)
        out.append(
            f"| {c.name} | {med:,.0f} | {lo:,.0f} - {hi:,.0f} | {med * c.group:,.0f} | "
            f"{lo * c.group:,.0f} - {hi * c.group:,.0f} | {_pct(c.latencies_ns, 0.5):.3f} | "
            f"{_pct(c.latencies_ns, 0.99):.3f} |"
        )
    by = {(c.synchronous, c.group): c for c in cases}
    out += [
        "",
        "| Comparison (per-round ratio) | Median | Min - max |",
        "|---|---:|---:|",
    ]
    for mode in MODES:
        med, lo, hi = _ratio(by[(mode, GROUPS[-1])], by[(mode, 1)], per_record=True)
        out.append(
            f"| {mode}: records/s, {GROUPS[-1]} per commit / 1 per commit | {med:.1f}x | "
            f"{lo:.1f}x - {hi:.1f}x |"
        )
    for group in GROUPS:
        med, lo, hi = _ratio(by[("normal", group)], by[("full", group)], per_record=False)
        out.append(
            f"| {group} per commit: commits/s, normal / full | {med:.2f}x | {lo:.2f}x - {hi:.2f}x |"
        )
    out += [
        "",
        "`full` survives kill -9 and power loss; `normal` survives kill -9 only (see the fsync "
        "policy in `broker/store.py`). Figures depend on the disk's fsync latency far more "
        "than on the CPU: a virtual disk whose host caches writes fsyncs in well under a "
        "millisecond, a consumer SSD in one to several milliseconds, a spinning disk in about "
        "ten. Group commit divides that cost by the number of records per commit; at 100 "
        "records per commit the fsync is no longer the larger part of a commit. The p99 "
        "includes the WAL checkpoints (about every 4 MiB of log) that SQLite runs inside the "
        "commit that crosses the threshold; with `normal` that is also where the log is "
        "fsynced.",
        "",
    ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the report and write it to ``--out``."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 short rounds (smoke test)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args(argv)
    rounds, seconds = (3, 0.02) if args.quick else (9, 0.4)
    cases = run(rounds, seconds, args.dir)
    text = report(
        cases, list(argv if argv is not None else sys.argv[1:]), rounds, seconds, args.dir
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
