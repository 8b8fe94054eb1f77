"""Delta-CRDT benchmark: ``broker.crdt`` throughput, digests, metadata and memory, with a
pycrdt (Yrs / Yjs bindings) comparison row measured in the same run.

Run from the repository root::

    python -m bench.crdt_bench                # full run (a few minutes at most)
    python -m bench.crdt_bench --quick        # tiny sizes: a smoke test, figures meaningless
    python -m bench.crdt_bench --out PATH     # default: bench/results/crdt.md

The Markdown report is printed to stdout and written to ``--out``.

Method. CPU clocks on the benchmark machines change speed by ~2x every few seconds, so every
throughput figure is measured in *rounds*: each round runs one batch (~0.25 s) of every
workload, back to back, with the two sides of each pair (local update / delta join,
worknode / pycrdt) adjacent and their order alternated every round (ABBA). Each row reports
the median ops/s over the rounds and the min-max; the worknode/pycrdt ratio is the median of
the per-round ratios, so a frequency switch shifts both sides of a round together. Batch
sizes are calibrated once per workload (that run doubles as warm-up). ``gc`` stays enabled
with default thresholds throughout. After timing, every pair is checked to have converged
(equal digests / equal documents), so a fast but wrong path cannot pass unnoticed.

Headline. Replica 1 writes with ``ORMap.apply_assign``, the fused local write a replica uses
for its own writes (``assign`` and the local ``merge`` of its delta in one walk: the same state
and delta, property-tested in ``tests/unit/test_fused.py``); replica 2 joins each delta with the
general ``merge``. The *local update* rows keep timing the unfused ``assign`` + ``merge``.

RSS per key is measured in a separate interpreter (``--rss-child N``) so that nothing else
allocated by this process pollutes the figure.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from broker.crdt import HybridClock, MVRegister, ORMap, ORSet, PNCounter

__all__ = ["ROW_NAMES", "main"]

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = Path("bench/results/crdt.md")
RID = "r1"
"""Replica id of the writing replica in throughput workloads."""

HEADLINE_TARGET_OPS = 100_000
RSS_TARGET_BYTES = 300

# Row names of the summary table (stable across --quick and full runs; the smoke test
# checks each one appears in the report).
ROW_LOCAL = "local update: {}"
ROW_JOIN = "delta join on replica 2: {}"
KIND_LWW = "LWW register in OR-map key"
KIND_MV = "MV register assign"
KIND_COUNTER = "PN-counter increment"
KIND_SET = "OR-set add"
KIND_NESTED = "nested OR-map depth-3 field (LWW)"
KIND_LABELS = (KIND_LWW, KIND_MV, KIND_COUNTER, KIND_SET, KIND_NESTED)
ROW_HEADLINE = "HEADLINE worknode: nested depth-3 update + join on replica 2"
ROW_PYCRDT = "pycrdt: nested Map depth-3 set + apply_update on doc 2"
ROW_RATIO = "ratio worknode / pycrdt (per-round)"
ROW_DIGEST_NESTED = "digest: small nested OR-map state"
ROW_DIGEST_REGISTER = "digest: per-key LWW register state"
ROW_META = "metadata per key after all updates (3 replicas)"
ROW_RSS = "RSS per key, 1 LWW register per OR-map key (subprocess)"

ROW_NAMES: tuple[str, ...] = (
    *(ROW_LOCAL.format(k) for k in KIND_LABELS),
    *(ROW_JOIN.format(k) for k in KIND_LABELS),
    ROW_HEADLINE,
    ROW_PYCRDT,
    ROW_RATIO,
    ROW_DIGEST_NESTED,
    ROW_DIGEST_REGISTER,
    ROW_META,
    ROW_RSS,
)

# Canonical size of one dot or context entry: type-tagged replica id (tag byte, u32 length,
# UTF-8 bytes) plus an int64 counter, as the digest encoding writes them.
_ENTRY_BYTES = 1 + 4 + len(RID.encode()) + 8


@dataclass(frozen=True)
class Config:
    """Sizes of one run."""

    rounds: int
    batch_s: float
    calib_ops: int
    keys: int
    nested_digest_leaves: int
    meta_keys: int
    meta_checkpoints: tuple[int, ...]
    meta_tick: int
    rss_keys: int


FULL = Config(
    rounds=7,
    batch_s=0.25,
    calib_ops=3_000,
    keys=1_000,
    nested_digest_leaves=16,
    meta_keys=1_000,
    meta_checkpoints=(10_000, 100_000, 1_000_000),
    meta_tick=16,
    rss_keys=1_000_000,
)
QUICK = Config(
    rounds=3,
    batch_s=0.005,
    calib_ops=100,
    keys=100,
    nested_digest_leaves=16,
    meta_keys=100,
    meta_checkpoints=(600, 6_000),
    meta_tick=16,
    rss_keys=20_000,
)

# --------------------------------------------------------------------------------------------
# workloads


class Side(Protocol):
    """One timed workload. ``run(n)`` does ``n`` operations; returns (ops, seconds)."""

    name: str

    def run(self, n: int) -> tuple[int, float]: ...

    def check(self) -> None:
        """Raise AssertionError if the workload's replicas did not converge."""


Mutator = Callable[[Any, int, HybridClock], Any]
"""(state, op index, clock) -> delta; the state is left unchanged."""


@dataclass(frozen=True)
class KindSpec:
    label: str
    factory: Callable[[], Any]
    mutate: Mutator


def kind_specs(keys: Sequence[str]) -> list[KindSpec]:
    """The five per-kind workloads of rows (a) and (b)."""
    nk = len(keys)

    def lww(s: ORMap, i: int, clock: HybridClock) -> ORMap:
        return s.assign(RID, (keys[i % nk],), i, clock.now(i))

    def mv(s: MVRegister, i: int, clock: HybridClock) -> MVRegister:
        return s.assign(RID, i)

    def counter(s: PNCounter, i: int, clock: HybridClock) -> PNCounter:
        return s.increment(RID, 1)

    def orset(s: ORSet, i: int, clock: HybridClock) -> ORSet:
        return s.add(RID, keys[i % nk])

    def nested(s: ORMap, i: int, clock: HybridClock) -> ORMap:
        return s.assign(RID, ("a", "b", keys[i % nk]), i, clock.now(i))

    return [
        KindSpec(KIND_LWW, ORMap, lww),
        KindSpec(KIND_MV, MVRegister, mv),
        KindSpec(KIND_COUNTER, PNCounter, counter),
        KindSpec(KIND_SET, ORSet, orset),
        KindSpec(KIND_NESTED, ORMap, nested),
    ]


class LocalUpdate:
    """Create a delta and merge it into the local state."""

    def __init__(self, spec: KindSpec) -> None:
        self.name = ROW_LOCAL.format(spec.label)
        self.state = spec.factory()
        self.mutate = spec.mutate
        self.clock = HybridClock()
        self.i = 0

    def run(self, n: int) -> tuple[int, float]:
        state, mutate, clock = self.state, self.mutate, self.clock
        start = self.i
        t0 = time.perf_counter()
        for i in range(start, start + n):
            state.merge(mutate(state, i, clock))
        dt = time.perf_counter() - t0
        self.i = start + n
        return n, dt

    def check(self) -> None:
        assert self.state.metadata_size() > 0


class DeltaJoin:
    """Merge deltas made by replica 1 into replica 2; only the merges are timed."""

    def __init__(self, spec: KindSpec) -> None:
        self.name = ROW_JOIN.format(spec.label)
        self.source = spec.factory()
        self.sink = spec.factory()
        self.mutate = spec.mutate
        self.clock = HybridClock()
        self.i = 0

    def run(self, n: int) -> tuple[int, float]:
        source, mutate, clock = self.source, self.mutate, self.clock
        deltas = []
        for i in range(self.i, self.i + n):
            d = mutate(source, i, clock)
            source.merge(d)
            deltas.append(d)
        self.i += n
        sink = self.sink
        t0 = time.perf_counter()
        for d in deltas:
            sink.merge(d)
        return n, time.perf_counter() - t0

    def check(self) -> None:
        assert self.source.digest() == self.sink.digest(), f"{self.name}: replicas diverged"


class WorknodeNested:
    """Headline: ``d = r1.apply_assign(...); r2.merge(d)`` at depth 3.

    ``apply_assign`` is the fused local write (``assign`` and the local ``merge`` of its
    delta in one walk; same state and delta, property-tested): what a replica uses for its
    own writes. Replica 2 joins the delta with the general ``merge``.
    """

    def __init__(self, keys: Sequence[str]) -> None:
        self.name = ROW_HEADLINE
        self.keys = tuple(keys)
        self.r1 = ORMap()
        self.r2 = ORMap()
        self.clock = HybridClock()
        self.i = 0

    def run(self, n: int) -> tuple[int, float]:
        r1, r2, clock, keys = self.r1, self.r2, self.clock, self.keys
        nk = len(keys)
        start = self.i
        t0 = time.perf_counter()
        for i in range(start, start + n):
            d = r1.apply_assign(RID, ("a", "b", keys[i % nk]), i, clock.now(i))
            r2.merge(d)
        dt = time.perf_counter() - t0
        self.i = start + n
        return n, dt

    def check(self) -> None:
        assert self.r1.digest() == self.r2.digest(), "worknode replicas diverged"
        assert self.r1.value() == self.r2.value()


class PycrdtNested:
    """The same workload on pycrdt: set a key of the innermost of three nested Maps on doc 1,
    take the transaction's incremental update (``Doc.observe`` -> ``event.update``, the
    cheapest incremental path: ~9x faster than ``get_update(state_vector)`` here) and apply
    it to doc 2. The innermost Map handle is looked up once (favours pycrdt: worknode walks
    the path on every write)."""

    def __init__(self, keys: Sequence[str]) -> None:
        import pycrdt

        self.pycrdt = pycrdt
        self.name = ROW_PYCRDT
        self.keys = tuple(keys)
        self.doc1: Any = pycrdt.Doc()
        self.doc2: Any = pycrdt.Doc()
        root: Any = pycrdt.Map()
        self.doc1["root"] = root
        root["a"] = pycrdt.Map({"b": pycrdt.Map()})
        self.doc2.apply_update(self.doc1.get_update())
        self.inner = root["a"]["b"]
        self.updates: list[bytes] = []
        self.subscription = self.doc1.observe(self._on_update)
        self.i = 0

    def _on_update(self, event: Any) -> None:
        self.updates.append(event.update)

    def run(self, n: int) -> tuple[int, float]:
        inner, apply, updates, keys = self.inner, self.doc2.apply_update, self.updates, self.keys
        nk = len(keys)
        start = self.i
        t0 = time.perf_counter()
        for i in range(start, start + n):
            inner[keys[i % nk]] = i
            apply(updates.pop())  # IndexError if a write produced no update
        dt = time.perf_counter() - t0
        self.i = start + n
        return n, dt

    def check(self) -> None:
        assert not self.updates
        mine = self.doc1["root"].to_py()
        theirs = self.doc2.get("root", type=self.pycrdt.Map).to_py()
        assert mine == theirs, "pycrdt documents diverged"


class Digest:
    """``state.digest()`` of a fixed state."""

    def __init__(self, name: str, state: Any) -> None:
        self.name = name
        self.state = state

    def run(self, n: int) -> tuple[int, float]:
        state = self.state
        t0 = time.perf_counter()
        for _ in range(n):
            state.digest()
        return n, time.perf_counter() - t0

    def check(self) -> None:
        assert len(self.state.digest()) == 32


def small_nested_state(leaves: int) -> ORMap:
    """A small document: depth-3 LWW fields, plus a counter and a set beside them."""
    doc = ORMap()
    clock = HybridClock()
    for j in range(leaves):
        doc.merge(doc.assign(RID, ("a", f"g{j % 4}", f"f{j}"), j, clock.now(j)))
    doc.merge(doc.increment(RID, ("a", "count"), 3))
    doc.merge(doc.add(RID, ("a", "tags"), "x"))
    return doc


def register_state() -> ORMap:
    """A per-key register state: one OR-map key holding one LWW register."""
    doc = ORMap()
    doc.merge(doc.assign(RID, ("k0000001",), 12345, HybridClock().now(1)))
    return doc


# --------------------------------------------------------------------------------------------
# rounds


@dataclass
class Series:
    """Per-round ops/s of one side."""

    name: str
    rates: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.rates)


def calibrate(side: Side, cfg: Config) -> int:
    """Ops per batch so a batch lasts about ``cfg.batch_s``; doubles as warm-up."""
    ops, dt = side.run(cfg.calib_ops)
    ops2, dt2 = side.run(cfg.calib_ops)
    rate = (ops + ops2) / max(dt + dt2, 1e-9)
    return max(cfg.calib_ops, int(rate * cfg.batch_s))


def run_rounds(groups: list[list[Side]], cfg: Config) -> dict[str, Series]:
    """Each round runs every group; the sides of a group are adjacent, order alternated."""
    sizes = {side.name: calibrate(side, cfg) for group in groups for side in group}
    series = {side.name: Series(side.name) for group in groups for side in group}
    for rnd in range(cfg.rounds):
        for group in groups:
            ordered = group if rnd % 2 == 0 else list(reversed(group))
            for side in ordered:
                ops, dt = side.run(sizes[side.name])
                series[side.name].rates.append(ops / dt)
    for group in groups:
        for side in group:
            side.check()
    return series


# --------------------------------------------------------------------------------------------
# metadata growth


@dataclass(frozen=True)
class MetaPoint:
    updates: int
    keys: int
    entries_max: int
    dots_max: int
    context_max: int
    cloud_max: int
    seconds: float

    @property
    def entries_per_key(self) -> float:
        return self.entries_max / self.keys

    @property
    def bytes_per_key(self) -> float:
        return self.entries_max * _ENTRY_BYTES / self.keys


def metadata_growth(cfg: Config) -> list[MetaPoint]:
    """Three replicas write LWW registers under random keys, ``meta_tick`` updates each per
    tick; at the end of a tick each replica's tick is joined into one batch delta and merged
    by the other two (so concurrent writes to one key happen). At each checkpoint every
    replica has merged everything; we check they converged and record their metadata."""
    rids = ("r1", "r2", "r3")
    reps = [ORMap() for _ in rids]
    clocks = [HybridClock() for _ in rids]
    keys = [f"k{j:04d}" for j in range(cfg.meta_keys)]
    rng = random.Random(20240601)
    done = 0
    tick = 0
    points: list[MetaPoint] = []
    t0 = time.perf_counter()
    for limit in sorted(cfg.meta_checkpoints):
        while done < limit:
            tick += 1
            batches = []
            for rid, rep, clock in zip(rids, reps, clocks, strict=True):
                batch = ORMap(is_delta=True)
                for _ in range(min(cfg.meta_tick, limit - done)):
                    done += 1
                    d = rep.assign(rid, (keys[rng.randrange(len(keys))],), done, clock.now(tick))
                    rep.merge(d)
                    batch.merge(d)
                batches.append(batch)
            for s, batch in enumerate(batches):
                for r, rep in enumerate(reps):
                    if r != s:
                        rep.merge(batch)
        elapsed = time.perf_counter() - t0
        digests = {rep.digest() for rep in reps}
        assert len(digests) == 1, f"replicas diverged after {done} updates"
        nkeys = max(len(rep) for rep in reps)
        points.append(
            MetaPoint(
                updates=done,
                keys=nkeys,
                entries_max=max(rep.metadata_size() for rep in reps),
                dots_max=max(rep.metadata_size() - rep.context.size() for rep in reps),
                context_max=max(rep.context.size() for rep in reps),
                cloud_max=max(len(rep.context.cloud) for rep in reps),
                seconds=elapsed,
            )
        )
    return points


# --------------------------------------------------------------------------------------------
# RSS (in a child interpreter)


def rss_child(n: int) -> dict[str, float]:
    """Build an OR-map of ``n`` LWW keys via delta + merge; RSS before and after."""
    import psutil

    proc = psutil.Process()
    doc = ORMap()
    clock = HybridClock()
    gc.collect()
    before = proc.memory_info().rss
    t0 = time.perf_counter()
    for i in range(n):
        doc.merge(doc.assign(RID, (f"k{i:07d}",), i, clock.now(i)))
    dt = time.perf_counter() - t0
    gc.collect()
    after = proc.memory_info().rss
    assert len(doc) == n
    return {
        "keys": n,
        "rss_before": before,
        "rss_after": after,
        "bytes_per_key": (after - before) / n,
        "build_ops_per_s": n / dt,
        "metadata_size": doc.metadata_size(),
    }


def measure_rss(n: int) -> dict[str, float]:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.crdt_bench", "--rss-child", str(n)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=900,
    )
    result: dict[str, float] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


# --------------------------------------------------------------------------------------------
# report


def machine_facts() -> list[str]:
    cpu_model = "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count() or 0
    versions = []
    for dist in ("pycrdt", "psutil"):
        try:
            versions.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{dist} (not installed)")
    return [
        f"- Python: {platform.python_implementation()} {platform.python_version()} "
        f"({sys.executable})",
        f"- Platform: {platform.platform()}",
        f"- CPU: {cpu_model}; os.cpu_count() = {os.cpu_count()}, usable = {usable}",
        f"- Libraries: {', '.join(versions)}",
        f"- gc: enabled during timed loops (thresholds {gc.get_threshold()})",
    ]


def _ops(x: float) -> str:
    return f"{x:,.0f}"


def _verdict(ok: bool) -> str:
    return "met" if ok else "**NOT met**"


def render(
    *,
    command: str,
    cfg: Config,
    quick: bool,
    series: dict[str, Series],
    ratios: list[float],
    meta: list[MetaPoint],
    rss: dict[str, float],
    elapsed: float,
) -> str:
    lines = ["# worknode CRDT benchmark", ""]
    if quick:
        lines += ["**--quick smoke run: tiny sizes, figures are not meaningful.**", ""]
    lines += [f"Command: `{command}`", "", "Machine:", "", *machine_facts(), ""]
    lines += [
        f"Throughput: {cfg.rounds} interleaved rounds, batches of ~{cfg.batch_s:g} s, "
        f"{cfg.keys:,} distinct keys per workload; median ops/s and min-max over rounds "
        "(pairs adjacent in each round, order alternated).",
        "",
        "## Summary",
        "",
        "| Figure | Median | Min - max | Unit | Target |",
        "|---|---:|---:|---|---|",
    ]

    def row(name: str, unit: str = "ops/s", target: str = "") -> None:
        s = series[name]
        lines.append(
            f"| {name} | {_ops(s.median)} | {_ops(min(s.rates))} - {_ops(max(s.rates))} "
            f"| {unit} | {target} |"
        )

    for label in KIND_LABELS:
        row(ROW_LOCAL.format(label))
    for label in KIND_LABELS:
        row(ROW_JOIN.format(label))
    head = series[ROW_HEADLINE].median
    row(ROW_HEADLINE, target=f">= {HEADLINE_TARGET_OPS:,}: {_verdict(head >= HEADLINE_TARGET_OPS)}")
    row(ROW_PYCRDT)
    lines.append(
        f"| {ROW_RATIO} | {statistics.median(ratios):.2f}x | "
        f"{min(ratios):.2f}x - {max(ratios):.2f}x | worknode/pycrdt | |"
    )
    row(ROW_DIGEST_NESTED, "digests/s")
    row(ROW_DIGEST_REGISTER, "digests/s")
    last = meta[-1]
    lines.append(
        f"| {ROW_META} | {last.bytes_per_key:.1f} | {last.entries_per_key:.3f} entries/key "
        f"after {last.updates:,} updates | bytes/key | flat in #updates (see below) |"
    )
    bpk = rss["bytes_per_key"]
    lines.append(
        f"| {ROW_RSS} | {bpk:.0f} | at {int(rss['keys']):,} keys | bytes/key "
        f"| <= {RSS_TARGET_BYTES}: {_verdict(bpk <= RSS_TARGET_BYTES)} |"
    )

    lines += [
        "",
        "Workloads (all replicas checked to converge after timing):",
        "",
        "- *local update*: `d = state.<mutator>(...)`; `state.merge(d)` on one replica "
        "(LWW rows include `HybridClock.now()`). MV/counter/set rows use the standalone "
        "`MVRegister`/`PNCounter`/`ORSet`; the LWW row writes `ORMap` key `(k,)`, the nested "
        'row `("a", "b", k)`.',
        "- *delta join on replica 2*: replica 2 merges deltas made (untimed) by replica 1.",
        '- *HEADLINE*: `d = r1.apply_assign("r1", ("a", "b", k), i, clock.now(i))`; '
        "`r2.merge(d)`. `apply_assign` is the fused local write a replica uses for its own "
        "writes: `assign` plus the local `merge` of its delta in one walk (same state and "
        "delta, property-tested); the *local update* rows time the unfused "
        "`assign` + `merge`.",
        "- *pycrdt*: `inner[k] = i` on doc 1 (innermost of 3 nested Maps, handle looked up "
        "once), the transaction's update taken from `Doc.observe` (`event.update`; "
        "`get_update(state_vector)` was ~9x slower in a probe), `doc2.apply_update(update)`.",
        "",
        "## worknode vs pycrdt, per round",
        "",
        "| Round | worknode ops/s | pycrdt ops/s | ratio |",
        "|---:|---:|---:|---:|",
    ]
    wk, py = series[ROW_HEADLINE].rates, series[ROW_PYCRDT].rates
    for i, (a, b, r) in enumerate(zip(wk, py, ratios, strict=True), 1):
        lines.append(f"| {i} | {_ops(a)} | {_ops(b)} | {r:.2f}x |")

    lines += [
        "",
        "## Metadata growth (3 replicas, LWW registers, deltas exchanged)",
        "",
        f"{last.updates:,} updates spread at random over {cfg.meta_keys:,} keys by 3 replicas; "
        f"each replica writes {cfg.meta_tick} updates per tick, joins them into one batch "
        "delta and the other two merge it (so concurrent writes to a key occur). Measured "
        "after a full exchange; max over the 3 replicas (all 3 digests equal). Entries = "
        "`metadata_size()` = dots in the store + context entries; bytes = entries x "
        f"{_ENTRY_BYTES} (canonical replica id + int64 counter).",
        "",
        "| Updates | Updates/key | Entries/key | Bytes/key | Dots | Context entries | "
        "Cloud dots | Elapsed s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in meta:
        lines.append(
            f"| {p.updates:,} | {p.updates / p.keys:,.0f} | {p.entries_per_key:.3f} | "
            f"{p.bytes_per_key:.1f} | {p.dots_max:,} | {p.context_max} | {p.cloud_max} | "
            f"{p.seconds:.1f} |"
        )
    first = meta[0]
    growth = (last.entries_per_key / first.entries_per_key - 1) * 100
    lines += [
        "",
        f"Metadata per key from {first.updates:,} to {last.updates:,} updates "
        f"({last.updates // first.updates}x more operations): {growth:+.1f}%.",
        "",
        "## RSS",
        "",
        f"Child interpreter: {int(rss['keys']):,} keys `k0000000`.. each assigned an int via "
        f"delta + merge; RSS {rss['rss_before'] / 2**20:.1f} MiB -> "
        f"{rss['rss_after'] / 2**20:.1f} MiB (gc.collect() before each reading) = "
        f"**{bpk:.0f} bytes/key**; built at {_ops(rss['build_ops_per_s'])} ops/s; "
        f"metadata_size() = {int(rss['metadata_size']):,}.",
        "",
        f"Total wall time: {elapsed:.0f} s.",
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# entry point


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.crdt_bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="tiny sizes: a fast smoke run")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="Markdown report path")
    p.add_argument("--rss-child", type=int, metavar="N", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(args_list)
    if args.rss_child is not None:
        print(json.dumps(rss_child(args.rss_child)))
        return 0
    cfg = QUICK if args.quick else FULL
    command = " ".join([sys.executable, "-m", "bench.crdt_bench", *args_list])
    t0 = time.perf_counter()

    keys = [f"k{j:03d}" for j in range(cfg.keys)]
    groups: list[list[Side]] = [[LocalUpdate(s), DeltaJoin(s)] for s in kind_specs(keys)]
    groups.append([WorknodeNested(keys), PycrdtNested(keys)])
    groups.append(
        [
            Digest(ROW_DIGEST_NESTED, small_nested_state(cfg.nested_digest_leaves)),
            Digest(ROW_DIGEST_REGISTER, register_state()),
        ]
    )
    series = run_rounds(groups, cfg)
    ratios = [
        a / b for a, b in zip(series[ROW_HEADLINE].rates, series[ROW_PYCRDT].rates, strict=True)
    ]
    meta = metadata_growth(cfg)
    rss = measure_rss(cfg.rss_keys)

    report = render(
        command=command,
        cfg=cfg,
        quick=args.quick,
        series=series,
        ratios=ratios,
        meta=meta,
        rss=rss,
        elapsed=time.perf_counter() - t0,
    )
    print(report)
    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
