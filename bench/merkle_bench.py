"""Merkle benchmark: incremental maintenance against a full rebuild, and the bytes and round
trips a reconciliation needs to find k differing keys among 100k, per tree shape.

    python -m bench.merkle_bench [--quick] [--out bench/results/merkle.md]

Method. These CPUs change speed about 2x every few seconds, so every timed figure comes from
interleaved rounds: each round times one batch of every workload back to back, in an order
reversed every other round, and a row reports the median over rounds with the min-max. A
ratio between two workloads is the median of per-round ratios. The 1M-key rebuild is measured
once (it is the build that creates the 1M tree). Bytes and round trips are counted, not timed,
so they are exact for the seeded data.

Workloads:

- *change*: ``MerkleTree.set`` of an existing key to a fresh digest (tree scheme 2: one keyed
  hash for the leaf choice, the old and new digests read as integers, then ``depth + 1``
  node updates; random keys, so at 1M keys most of the time goes to cache misses);
- *rebuild*: ``MerkleTree.build`` of every item (a cold start);
- *hashed inner nodes*: the alternative design, where an inner node is a keyed BLAKE2b of its
  children's values instead of their sum (a prototype here, same leaves), to show what the
  sum saves;
- *reconciliation*: a replica pair sharing 100k keys, of which k differ (a third only on the
  left, a third only on the right, a third changed on both sides), driven through
  ``Reconciliation`` in process.

Byte accounting (what a compact wire format would carry; Cap'n Proto framing comes on top):
root reply = 32-byte root + 8-byte count per side; a request = 4-byte count + each prefix's
digits packed at log2(fanout) bits; a node reply = ``fanout`` values per requested prefix, in
digit order (no prefixes repeated); a leaf reply = 4-byte count per leaf + per item a 2-byte
key length, the UTF-8 key and the 32-byte digest. "8-byte values" is the same exchange with
node values truncated to 8 bytes on the wire (leaf digests stay whole). The naive row sends
every ``(key, digest)`` pair in the same item encoding.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from broker.merkle import (
    DIGEST_SIZE,
    HASH_SIZE,
    MerkleTree,
    NodeRequest,
    Reconciliation,
    RootInfo,
    Side,
)

__all__ = ["main"]

DEFAULT_OUT = Path("bench/results/merkle.md")
SECRET = b"merkle-bench-cluster-secret-0001"
SHAPES: tuple[tuple[int, int], ...] = ((4, 8), (16, 4), (64, 3))
DEFAULT_SHAPE = (16, 4)
TRUNCATED = 8


@dataclass(frozen=True)
class Config:
    """Sizes of one run."""

    rounds: int
    batch: int
    sizes: tuple[int, ...]
    rebuild_sizes: tuple[int, ...]
    once_sizes: tuple[int, ...]
    recon_keys: int
    ks: tuple[int, ...]


FULL = Config(
    rounds=7,
    batch=20_000,
    sizes=(10_000, 100_000, 1_000_000),
    rebuild_sizes=(10_000, 100_000),
    once_sizes=(1_000_000,),
    recon_keys=100_000,
    ks=(1, 10, 100, 1_000),
)
QUICK = Config(
    rounds=2,
    batch=300,
    sizes=(1_000, 5_000),
    rebuild_sizes=(1_000, 5_000),
    once_sizes=(),
    recon_keys=5_000,
    ks=(1, 10, 100),
)


def key_name(i: int) -> str:
    return f"node-{i:07d}"


def items_of(n: int, seed: int) -> list[tuple[str, bytes]]:
    rng = random.Random(seed)
    return [(key_name(i), rng.randbytes(DIGEST_SIZE)) for i in range(n)]


# --------------------------------------------------------------------------------------------
# the alternative design, for comparison only


class HashedInnerTree:
    """Prototype: leaves as in MerkleTree (sum of keyed item hashes), but each inner node is
    a keyed BLAKE2b of its children's 32-byte values. Only what a write costs is modelled."""

    def __init__(self, items: list[tuple[str, bytes]], fanout: int, depth: int) -> None:
        self.core = MerkleTree(SECRET, fanout=fanout, depth=depth)  # leaf choice, item values
        self.bits = fanout.bit_length() - 1
        self.fanout, self.depth = fanout, depth
        self.base = hashlib.blake2b(digest_size=HASH_SIZE, key=SECRET, person=b"bench-inner")
        self.digests: dict[str, bytes] = {}
        self.leaf_sums: dict[int, int] = {}
        self.values: list[dict[int, bytes]] = [{} for _ in range(depth + 1)]
        for k, d in items:
            self.set(k, d)

    def set(self, key: str, digest: bytes) -> None:
        core = self.core
        kb = key.encode()
        leaf = core._leaf_of(kb)
        old = self.digests.get(key)
        delta = core._item_hash(kb, digest) - (core._item_hash(kb, old) if old else 0)
        self.digests[key] = digest
        total = (self.leaf_sums.get(leaf, 0) + delta) % 2**256
        self.leaf_sums[leaf] = total
        values = self.values
        values[self.depth][leaf] = total.to_bytes(HASH_SIZE, "big")
        index, bits, zero = leaf, self.bits, bytes(HASH_SIZE)
        for level in range(self.depth - 1, -1, -1):
            index >>= bits
            below = values[level + 1]
            first = index << bits
            h = self.base.copy()
            h.update(b"".join(below.get(i, zero) for i in range(first, first + self.fanout)))
            values[level][index] = h.digest()


# --------------------------------------------------------------------------------------------
# timing


@dataclass
class Series:
    """One timed workload: a rate or a duration per round."""

    name: str
    values: list[float] = field(default_factory=list)

    def median(self) -> float:
        return statistics.median(self.values)

    def spread(self) -> tuple[float, float]:
        return min(self.values), max(self.values)


def _reconcile_only(
    left: MerkleTree, right: MerkleTree, k: int, want: tuple[tuple[str, ...], ...]
) -> None:
    reconcile_counted(left, right, k, want)


def _timed(fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _change_batch(
    tree: MerkleTree | HashedInnerTree, names: list[str], rng: random.Random, batch: int
) -> Callable[[], None]:
    chosen = [names[rng.randrange(len(names))] for _ in range(batch)]
    fresh = [rng.randbytes(DIGEST_SIZE) for _ in range(batch)]
    pairs = list(zip(chosen, fresh, strict=True))
    set_ = tree.set

    def run() -> None:
        for k, d in pairs:
            set_(k, d)

    return run


def _rebuild(items: list[tuple[str, bytes]]) -> Callable[[], None]:
    def run() -> None:
        MerkleTree.build(items, key=SECRET)

    return run


@dataclass
class Timings:
    """Everything timed, by workload name."""

    series: dict[str, Series] = field(default_factory=dict)
    once: dict[int, float] = field(default_factory=dict)  # size -> rebuild seconds

    def add(self, name: str, value: float) -> None:
        self.series.setdefault(name, Series(name)).values.append(value)


def run_timings(cfg: Config, log: Callable[[str], None]) -> Timings:
    timings = Timings()
    trees: dict[int, MerkleTree] = {}
    items: dict[int, list[tuple[str, bytes]]] = {}
    for n in cfg.sizes:
        items[n] = items_of(n, seed=n)
        gc.collect()
        t0 = time.perf_counter()
        trees[n] = MerkleTree.build(items[n], key=SECRET)
        seconds = time.perf_counter() - t0
        if n in cfg.once_sizes:
            timings.once[n] = seconds
        log(f"built {n:,} keys in {seconds:.2f} s")
    mid = cfg.sizes[1]
    names = {n: [k for k, _ in items[n]] for n in cfg.sizes}
    shaped = {
        shape: MerkleTree.build(items[mid], key=SECRET, fanout=shape[0], depth=shape[1])
        for shape in SHAPES
        if shape != DEFAULT_SHAPE
    }
    hashed = HashedInnerTree(items[mid], *DEFAULT_SHAPE)
    rng = random.Random(7)

    # (name, untimed preparation returning the timed batch, writes per batch or 0 for a
    # duration)
    workloads: list[tuple[str, Callable[[], Callable[[], None]], int]] = []
    for n in cfg.sizes:
        workloads.append(
            (
                f"change:{n}",
                partial(_change_batch, trees[n], names[n], rng, cfg.batch),
                cfg.batch,
            )
        )
    for shape, tree in shaped.items():
        workloads.append(
            (
                f"change:{mid}:{shape[0]}/{shape[1]}",
                partial(_change_batch, tree, names[mid], rng, cfg.batch),
                cfg.batch,
            )
        )
    workloads.append(
        (f"hashed:{mid}", partial(_change_batch, hashed, names[mid], rng, cfg.batch), cfg.batch)
    )
    for n in cfg.rebuild_sizes:
        workloads.append((f"rebuild:{n}", partial(_rebuild, items[n]), 0))

    for r in range(cfg.rounds):
        for name, prepare, writes in workloads if r % 2 == 0 else workloads[::-1]:
            batch = prepare()
            gc.collect()
            seconds = _timed(batch)
            timings.add(name, writes / seconds if writes else seconds)
        log(f"round {r + 1}/{cfg.rounds} done")
    # every tree still matches a rebuild of what it holds: a fast but wrong path cannot pass
    for n, tree in trees.items():
        if n <= mid:
            assert tree.root() == MerkleTree.build(tree.items(), key=SECRET).root()
    return timings


# --------------------------------------------------------------------------------------------
# reconciliation bytes


@dataclass(frozen=True)
class Exchange:
    """What one reconciliation cost on the wire, by part."""

    shape: tuple[int, int]
    k: int
    round_trips: int  # including the root fetch
    nodes_compared: int
    items_compared: int
    root_bytes: int
    request_bytes: int
    node_values: int  # node values sent, both sides
    leaf_bytes: int

    def total(self, value_bytes: int) -> int:
        return (
            self.root_bytes + self.request_bytes + self.node_values * value_bytes + self.leaf_bytes
        )


def _item_bytes(key: str) -> int:
    return 2 + len(key.encode()) + DIGEST_SIZE


def _prefix_bytes(prefix: tuple[int, ...], fanout: int) -> int:
    bits = fanout.bit_length() - 1
    return (len(prefix) * bits + 7) // 8


def reconcile_counted(
    left: MerkleTree, right: MerkleTree, k: int, want: tuple[tuple[str, ...], ...]
) -> Exchange:
    """Drive a reconciliation, count every byte, and check it found exactly ``want``."""
    rec = Reconciliation(RootInfo.of(left), RootInfo.of(right))
    trees = {Side.LEFT: left, Side.RIGHT: right}
    request_bytes = node_values = leaf_bytes = 0
    while not rec.done:
        for req in rec.next_requests():
            tree = trees[req.side]
            request_bytes += 4 + sum(_prefix_bytes(p, tree.fanout) for p in req.prefixes)
            if isinstance(req, NodeRequest):
                answer = tree.child_hashes(req.prefixes)
                node_values += len(answer)
                rec.receive_nodes(req.side, answer)
            else:
                leaves = tree.leaves(req.prefixes)
                leaf_bytes += sum(
                    4 + sum(_item_bytes(key) for key, _ in items) for items in leaves.values()
                )
                rec.receive_leaves(req.side, leaves)
    result = rec.result()
    got = (result.only_left, result.only_right, result.different)
    assert got == want, "reconciliation missed or invented a difference"
    return Exchange(
        shape=(left.fanout, left.depth),
        k=k,
        round_trips=result.round_trips + 1,
        nodes_compared=result.nodes_compared,
        items_compared=result.items_compared,
        root_bytes=2 * (HASH_SIZE + 8),
        request_bytes=request_bytes,
        node_values=node_values,
        leaf_bytes=leaf_bytes,
    )


def diverge(
    right: MerkleTree, base: dict[str, bytes], k: int, rng: random.Random
) -> tuple[tuple[tuple[str, ...], ...], Callable[[], None]]:
    """Make ``right`` differ from ``base`` in ``k`` keys; return the expected diff and an undo."""
    picked = rng.sample(sorted(base), k)
    only_left, only_right, changed = picked[0::3], picked[1::3], picked[2::3]
    fresh = [f"{name}-new" for name in only_right]
    for name in only_left:
        right.remove(name)
    for name in fresh:
        right.set(name, rng.randbytes(DIGEST_SIZE))
    for name in changed:
        right.set(name, rng.randbytes(DIGEST_SIZE))

    def undo() -> None:
        for name in only_left + changed:
            right.set(name, base[name])
        for name in fresh:
            right.remove(name)

    want = (tuple(sorted(only_left)), tuple(sorted(fresh)), tuple(sorted(changed)))
    return want, undo


def run_exchanges(
    cfg: Config, log: Callable[[str], None]
) -> tuple[list[Exchange], int, dict[int, Series]]:
    items = items_of(cfg.recon_keys, seed=1)
    base = dict(items)
    naive = sum(_item_bytes(k) for k, _ in items)
    exchanges: list[Exchange] = []
    diff_time: dict[int, Series] = {k: Series(f"diff:{k}") for k in cfg.ks}
    for fanout, depth in SHAPES:
        left = MerkleTree.build(items, key=SECRET, fanout=fanout, depth=depth)
        right = MerkleTree.build(items, key=SECRET, fanout=fanout, depth=depth)
        for k in cfg.ks:
            want, undo = diverge(right, base, k, random.Random(k))
            exchanges.append(reconcile_counted(left, right, k, want))
            undo()
        assert left.root() == right.root()
        if (fanout, depth) == DEFAULT_SHAPE:
            # warm diff time: the whole exchange in one process (both sides + state machine)
            for r in range(cfg.rounds):
                for k in cfg.ks if r % 2 == 0 else cfg.ks[::-1]:
                    want, undo = diverge(right, base, k, random.Random(k))
                    gc.collect()
                    diff_time[k].values.append(
                        _timed(partial(_reconcile_only, left, right, k, want))
                    )
                    undo()
        log(f"reconciliations with fanout {fanout}, depth {depth} done")
    return exchanges, naive, diff_time


# --------------------------------------------------------------------------------------------
# report


def _rate(s: Series) -> str:
    lo, hi = s.spread()
    return f"{s.median():,.0f} | {lo:,.0f} - {hi:,.0f}"


def _secs(s: Series) -> str:
    lo, hi = s.spread()
    return f"{s.median() * 1e3:,.1f} | {lo * 1e3:,.1f} - {hi * 1e3:,.1f}"


def _ratio(a: Series, b: Series) -> str:
    ratios = [x / y for x, y in zip(a.values, b.values, strict=True)]
    return f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}x - {max(ratios):.2f}x)"


def _kb(n: float) -> str:
    return f"{n / 1000:,.1f}"


def report(
    cfg: Config,
    argv: list[str],
    timings: Timings,
    exchanges: list[Exchange],
    naive: int,
    diff_time: dict[int, Series],
) -> str:
    s = timings.series
    mid = cfg.sizes[1]
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    out = [
        "# worknode Merkle tree benchmark",
        "",
        "Command: `" + " ".join(["python -m bench.merkle_bench", *argv]) + "`",
        "",
        f"- Python: {platform.python_implementation()} {platform.python_version()}; "
        f"{platform.platform()}; {os.cpu_count()} CPUs",
        f"- Load average when the run started (other processes share these CPUs): {load}",
        f"- {cfg.rounds} interleaved rounds; {cfg.batch:,} writes per batch; keys "
        f"`node-NNNNNNN` (12 bytes), random 32-byte digests; default shape fan-out "
        f"{DEFAULT_SHAPE[0]}, depth {DEFAULT_SHAPE[1]}.",
        "",
        "## Incremental maintenance against a full rebuild",
        "",
        "| Keys | Changes/s (median) | Min - max | Rebuild ms (median) | Min - max | "
        "Changes per rebuild time |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for n in cfg.sizes:
        change = s[f"change:{n}"]
        if n in cfg.once_sizes:
            rebuild = f"{timings.once[n] * 1e3:,.0f} | measured once"
            per = f"{timings.once[n] * change.median():,.0f}"
        else:
            rb = s[f"rebuild:{n}"]
            rebuild = _secs(rb)
            per = f"{rb.median() * change.median():,.0f}"
        out.append(f"| {n:,} | {_rate(change)} | {rebuild} | {per} |")
    out += [
        "",
        "A change is `set(existing key, new digest)` (tree scheme 2): one keyed hash for the "
        "leaf choice, the digests themselves as item values, then `depth + 1` integer "
        "additions; the keys are random, so at 1M keys memory misses dominate. The last "
        "column is how many "
        "changes fit in the time of one rebuild: what a tree kept up to date saves on each "
        "healing round.",
        "",
        f"### Design alternatives at {mid:,} keys (same rounds)",
        "",
        "| Tree | Changes/s (median) | Min - max | vs sum-of-children, 16/4 (per round) |",
        "|---|---:|---:|---:|",
        f"| inner node = sum of children, fan-out 16, depth 4 (chosen) | "
        f"{_rate(s[f'change:{mid}'])} | 1.00x |",
    ]
    for fanout, depth in SHAPES:
        if (fanout, depth) == DEFAULT_SHAPE:
            continue
        series = s[f"change:{mid}:{fanout}/{depth}"]
        out.append(
            f"| inner node = sum of children, fan-out {fanout}, depth {depth} | "
            f"{_rate(series)} | {_ratio(series, s[f'change:{mid}'])} |"
        )
    hashed = s[f"hashed:{mid}"]
    out += [
        f"| inner node = keyed BLAKE2b of children, fan-out 16, depth 4 (prototype) | "
        f"{_rate(hashed)} | {_ratio(hashed, s[f'change:{mid}'])} |",
        "",
        f"## Reconciliation: bytes to find k differing keys among {cfg.recon_keys:,}",
        "",
        "k keys differ: a third only on the left, a third only on the right, a third changed "
        "on both sides. Round trips include the root fetch; every round asks both sides in "
        f"parallel. The naive alternative sends all {cfg.recon_keys:,} `(key, digest)` pairs: "
        f"{_kb(naive)} KB from one side, {_kb(2 * naive)} KB when a third-party healer "
        "fetches both. This models the plain descent (level by level from the root, leaves "
        "with keys and whole digests); the healer's wire v3 protocol (top levels with the "
        "root, digest-only leaves, 4 round trips) is measured end to end in "
        "`bench/results/heal.md`.",
        "",
        f"### Default shape (fan-out {DEFAULT_SHAPE[0]}, depth {DEFAULT_SHAPE[1]})",
        "",
        "| k | Round trips | Nodes compared | Items compared | Node values KB | "
        "Leaf items KB | Requests + roots KB | Total KB | Total KB, 8-byte values | "
        "Naive (both sides) / total |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for e in exchanges:
        if e.shape != DEFAULT_SHAPE:
            continue
        out.append(
            f"| {e.k:,} | {e.round_trips} | {e.nodes_compared:,} | {e.items_compared:,} | "
            f"{_kb(e.node_values * HASH_SIZE)} | {_kb(e.leaf_bytes)} | "
            f"{_kb(e.request_bytes + e.root_bytes)} | {_kb(e.total(HASH_SIZE))} | "
            f"{_kb(e.total(TRUNCATED))} | {2 * naive / e.total(HASH_SIZE):,.0f}x |"
        )
    out += [
        "",
        "### Fan-out comparison (same data)",
        "",
        "Depths give 65,536 leaves for fan-out 4 and 16; fan-out 64 takes depth 3 (262,144 "
        "leaves) because depth 2 would leave 4,096 leaves of ~24 items each.",
        "",
        "| k | "
        + " | ".join(f"{f}/{d}: round trips, total KB (8-byte values)" for f, d in SHAPES)
        + " |",
        "|---:|" + "---:|" * len(SHAPES),
    ]
    by = {(e.shape, e.k): e for e in exchanges}
    for k in cfg.ks:
        cells = [
            f"{by[(shape, k)].round_trips}, {_kb(by[(shape, k)].total(HASH_SIZE))} "
            f"({_kb(by[(shape, k)].total(TRUNCATED))})"
            for shape in SHAPES
        ]
        out.append(f"| {k:,} | " + " | ".join(cells) + " |")
    out += [
        "",
        "### Warm diff time, default shape (in process: both trees answer, the state machine "
        "compares; no wire)",
        "",
        "| k | ms (median) | Min - max |",
        "|---:|---:|---:|",
    ]
    for k in cfg.ks:
        out.append(f"| {k:,} | {_secs(diff_time[k])} |")
    out += [
        "",
        "## Reading",
        "",
        "- Bytes grow with k, not with the number of keys: each differing key costs about "
        "`2 sides x fan-out x value size` per level below the point where the differing "
        "paths separate, plus its leaf's items. Node values are most of the bytes once k "
        "reaches 10; sending them truncated to 8 bytes (the state machine compares opaque "
        "bytes) cuts the total about 2.7x at k = 1,000.",
        "- Fan-out 4 sends 0.55-0.7x the bytes of fan-out 16 but needs 10 round "
        "trips instead of 6, and each write walks 9 levels instead of 5. Fan-out 64 saves "
        "one round trip and sends 2.5-3x the bytes. Fan-out 16 stays the default.",
        "- An inner node kept as the sum of its children costs integer additions per write; "
        "rehashing 16 children per level costs several times more per write (row above), "
        "for no gain in collision resistance (see `broker/merkle/_tree.py`).",
        "",
    ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the report and write it to ``--out``."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else FULL

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    timings = run_timings(cfg, log)
    exchanges, naive, diff_time = run_exchanges(cfg, log)
    text = report(
        cfg,
        list(argv if argv is not None else sys.argv[1:]),
        timings,
        exchanges,
        naive,
        diff_time,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
