"""Healing benchmark: two replicas of N keys that differ in d keys (a third only on A, a third
only on B, a third changed on both), with the naive full transfer and identical replicas beside.

    python -m bench.heal_bench [--keys 1000000] [--diff 1000] [--rounds 5]
                               [--e2e-keys 100000] [--no-e2e] [--out bench/results/heal.md]

Method. These CPUs change speed about 2x every few seconds and other work shares them, so
every timed figure is a median over ``--rounds`` rounds with its min-max, CPU time
(``time.process_time``) where one side's work is meant, and beside each absolute figure a
ratio against a raw baseline measured interleaved in the same round (the baseline: the keyed
BLAKE2b leaf hash of the same keys in a plain loop; it is the floor of a cold build, which
hashes every key once). Bytes and round trips are counted on the real messages, so they are
exact for the seeded data.

Parts:

- *identification* (N keys): two replicas' Merkle endpoints (``broker.healing.HealEndpoints``,
  the real Cap'n Proto handlers) on an in-memory transport, serving trees built from seeded
  digests, driven by the healer's own calls (``HealClient.root`` then ``identify``). Bytes are
  every request and reply body (NATS framing not included); a round trip is one wave of
  calls sent in parallel (the root fetch is the first). CPU per side is the replica
  handlers' process time; the healer's is the rest. Rows: the current protocol (top two
  levels with the root, packed 8-byte values), whole values, and the v2 protocol (no levels,
  whole values, one Cap'n Proto struct per node);
- *cold build*: ``MerkleTree.build`` of N ``(key, digest)`` pairs (the digests given: a
  replica computes them from its entries first, see the e2e part for that cost);
- *incremental maintenance*: ``MerkleTree.set`` of an existing key to a new digest, batches
  of 100,000 (the first batch after a cold build also copies each leaf it touches out of the
  build's arrays; reported apart);
- *end to end* (``--e2e-keys``, real embedded ``nats-server``, two real worknode services
  with their stores and a real healer): common keys written on A and replicated to B, the
  d differences written with ``Consistency.LOCAL`` (applied and stored, never published), then
  one ``HealerService.heal_subject`` timed from the first root request to converged roots.
  The naive row there is a full state transfer each way (seal, open, join), in process:
  over NATS it would not even fit one message (``max_payload`` 1 MB).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from broker.codec import Signer, TrustRoster, WireCodec
from broker.healing import HealClient, HealEndpoints, RootView
from broker.merkle import HASH_SIZE, MerkleTree
from broker.transport import MemoryNetwork

__all__ = ["main"]

DEFAULT_OUT = Path("bench/results/heal.md")
SECRET = b"heal-bench-cluster-secret-000001"
SUBJECT = "orders"
NS = "bench"
BATCH = 100_000


# -- data --------------------------------------------------------------------------------------


def _digest(i: int, salt: bytes = b"") -> bytes:
    # Stand-in for item_digest: 32 pseudo-random bytes per (key, content).
    return hashlib.blake2b(salt + i.to_bytes(8, "big"), digest_size=32).digest()


def make_pair(n: int, d: int) -> tuple[list[tuple[str, bytes]], list[tuple[str, bytes]]]:
    """Left and right items: n keys each side, d differing (a third only left, a third only
    right, a third changed on both), spread over the key space."""
    items = [(f"node-{i:07d}", _digest(i)) for i in range(n)]
    step = max(1, n // max(1, d))
    picked = list(range(0, n, step))[:d]
    third = len(picked) // 3
    only_left = set(picked[:third])
    changed = set(picked[third : len(picked) - third])
    right = [
        (k, _digest(i, b"changed") if i in changed else v)
        for i, (k, v) in enumerate(items)
        if i not in only_left
    ]
    # as many keys only on the right as only on the left: both sides hold n keys
    right += [(f"node-{n + j:07d}", _digest(n + j)) for j in range(third)]
    return items, right


# -- timing helpers --------------------------------------------------------------------------


def _median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _spread(xs: Sequence[float], fmt: str = "{:,.1f}") -> str:
    if not xs:
        return "-"
    return f"{fmt.format(min(xs))} - {fmt.format(max(xs))}"


def _leaf_hash_baseline(keys: Sequence[str]) -> float:
    """CPU seconds of the raw keyed leaf hash over ``keys`` (the cold build's floor)."""
    base = hashlib.blake2b(digest_size=8, key=SECRET, person=b"wn-merkle-leaf")
    copy = base.copy
    t = time.process_time()
    for k in keys:
        h = copy()
        h.update(k.encode())
        h.digest()
    return time.process_time() - t


# -- identification over the real endpoints ------------------------------------------------


class _TreeReplica:
    """What HealEndpoints reads from a replica, for a tree built from given digests."""

    def __init__(self) -> None:
        self.state = SimpleNamespace(
            store={}, context=SimpleNamespace(version_vector={"bench": 1})
        )

    def add_change_listener(self, listener: Callable[..., None]) -> None:
        """Never changes."""


@dataclass
class _Side:
    endpoints: HealEndpoints
    cpu: float = 0.0


def _timed(side: _Side, fn: Callable[..., Any]) -> Callable[..., Any]:
    async def wrapper(*args: Any) -> Any:
        t = time.process_time()
        try:
            return await fn(*args)
        finally:
            side.cpu += time.process_time() - t

    return wrapper


@dataclass
class IdRun:
    """One identification: what it cost."""

    bytes_total: int
    round_trips: int
    calls: int
    keys: int
    cpu_left: float
    cpu_right: float
    cpu_healer: float


class IdentBench:
    """Two endpoint services serving fixed trees on an in-memory network, and a healer
    client."""

    def __init__(self, left: MerkleTree, right: MerkleTree) -> None:
        self.net = MemoryNetwork(max_payload=8 * 1024 * 1024)
        self.codec = WireCodec(max_payload=8 * 1024 * 1024)
        self.healer = Signer("healer", b"h" * 32)
        self.roster = TrustRoster({"healer": self.healer.public_key})
        self.sides: dict[str, _Side] = {}
        self.trees = {"a": left, "b": right}

    async def __aenter__(self) -> IdentBench:
        for node, tree in self.trees.items():
            transport = self.net.transport(f"replica-{node}")
            await transport.start()
            signer = Signer(node, node.encode() * 32)
            self.roster.add(node, signer.public_key)
            ep = HealEndpoints(
                transport=transport, namespace=NS, replicas={SUBJECT: _TreeReplica()},  # type: ignore[dict-item]
                signer=signer, roster=self.roster, codec=self.codec, secret=SECRET,
            )
            ep.trees[SUBJECT].tree = tree
            ep.trees[SUBJECT]._dirty = set()
            side = _Side(ep)
            for verb in ("root", "nodes", "leaves"):
                setattr(ep, f"_{verb}", _timed(side, getattr(ep, f"_{verb}")))
            await ep.start()
            self.sides[node] = side
        self.transport = self.net.transport("healer")
        await self.transport.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        for side in self.sides.values():
            await side.endpoints.stop()
            await side.endpoints.transport.stop()
        await self.transport.stop()

    def client(self) -> HealClient:
        return HealClient(
            self.transport, namespace=NS, codec=self.codec, signer=self.healer,
            roster=self.roster, timeout=120.0,
        )

    async def roots(
        self, client: HealClient, levels: int, width: int, unless: bytes = b""
    ) -> tuple[RootView, RootView]:
        a, b = await asyncio.gather(
            client.root(SUBJECT, "a", levels=levels, width=width, unless=unless),
            client.root(SUBJECT, "b", levels=levels, width=width, unless=unless),
        )
        return a, b

    async def identify(self, levels: int, width: int, item_width: int = 0) -> IdRun:
        for side in self.sides.values():
            side.cpu = 0.0
        client = self.client()
        t = time.process_time()
        a, b = await self.roots(client, levels, width)
        if (a.root, a.count) == (b.root, b.count):
            trips, keys = 1, 0
        else:
            diff = await client.identify(SUBJECT, a, b, SECRET, item_width)
            trips = 1 + diff.round_trips
            keys = len(diff.keys) + len(diff.left_items) + len(diff.right_items)
        total = time.process_time() - t
        left, right = self.sides["a"].cpu, self.sides["b"].cpu
        return IdRun(
            client.bytes_sent + client.bytes_received, trips, client.calls, keys,
            left, right, total - left - right,
        )


# -- end to end over nats-server -----------------------------------------------------------


@dataclass
class E2E:
    """The end-to-end run's figures."""

    keys: int
    diff: int
    load_s: float = 0.0
    heal_s: float = 0.0
    heal_bytes: int = 0
    heal_trips: int = 0
    found: int = 0
    repaired: int = 0
    converged: bool = False
    identical_bytes: int = 0
    identical_trips: int = 0
    identical_s: float = 0.0
    naive_bytes: int = 0
    naive_cpu_s: float = 0.0
    digest_us: float = 0.0
    tree_build_s: float = 0.0
    notes: list[str] = field(default_factory=list)


async def _write(replica: Any, keys: Sequence[str], value: str, consistency: Any) -> None:
    for i in range(0, len(keys), 1000):
        chunk = keys[i : i + 1000]
        await replica.write_many(
            [lambda t, rid, ts, k=k: t.state.assign(rid, (k, "v"), f"{value}{k}", ts)
             for k in chunk],
            consistency,
        )


async def run_e2e(n: int, d: int, tmp: Path) -> E2E:
    """Two worknode services on one embedded nats-server and a healer; see module doc."""
    from broker.crdt import ORMap
    from broker.repair import item_digest
    from broker.replica import Consistency
    from broker.testing import running_nats_server
    from services.healer import HealerService, HealerSettings
    from services.worknode import WorknodeService, WorknodeSettings, load_or_create_signer

    out = E2E(n, d)
    secret_file = tmp / "cluster.secret"
    secret_file.write_bytes(os.urandom(32))
    async with running_nats_server(tmp / "nats") as server:
        settings = {
            name: WorknodeSettings(
                node_id=name, subjects=[SUBJECT], nats_urls=[server.url], state_dir=tmp / name,
                metrics_port=None, store_sync="normal", cluster_secret_file=secret_file,
                flush_interval_ms=2,
            )
            for name in ("a", "b")
        }
        hs = HealerSettings(
            nats_urls=[server.url], state_dir=tmp / "healer", cluster_secret_file=secret_file,
            subjects=[SUBJECT], metrics_port=None, interval_s=3600, membership_poll_s=3600,
            fetch_batch=2000, bytes_per_second=1e12, request_timeout_s=60,
        )
        roster = TrustRoster(
            {k: load_or_create_signer(k, s.key_path()).public_key for k, s in settings.items()}
        )
        roster.add("healer", load_or_create_signer("healer", hs.key_path()).public_key)
        services = {k: WorknodeService(s, roster=roster) for k, s in settings.items()}
        healer = HealerService(hs, roster=roster)
        try:
            for svc in services.values():
                await svc.start()
            a, b = services["a"].replica(SUBJECT), services["b"].replica(SUBJECT)
            keys = [f"node-{i:07d}" for i in range(n)]
            t = time.monotonic()
            await _write(a, keys, "", Consistency.EVENTUAL)
            await a.flush()
            deadline = time.monotonic() + 120
            while len(b.state) < n and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            out.load_s = time.monotonic() - t
            if len(b.state) < n:
                out.notes.append(f"B held {len(b.state):,} of {n:,} keys after loading")
            # digests and a cold build, on a real state
            store = a.state.store or {}
            t = time.process_time()
            items = [(k, item_digest(k, v, SECRET)) for k, v in store.items()]
            out.digest_us = (time.process_time() - t) / max(1, len(items)) * 1e6
            t = time.process_time()
            MerkleTree.build(items, key=SECRET)
            out.tree_build_s = time.process_time() - t
            await healer.start()
            # identical replicas: one root compare (twice: before and after an agreed root)
            client = healer._client()
            first = await healer.heal_subject(SUBJECT, ["a", "b"])  # builds both trees
            again = await healer.heal_subject(SUBJECT, ["a", "b"])
            out.identical_s = again.duration_s
            out.identical_bytes = again.bytes_sent
            out.identical_trips = again.round_trips
            if not (first.converged and again.converged and not first.rounds):
                out.notes.append("replicas were not identical before the differences")
            del client
            # the d differences, never published
            step = max(1, n // max(1, d))
            picked = keys[::step][:d]
            third = len(picked) // 3
            await _write(a, [f"a-only-{k}" for k in picked[:third]], "", Consistency.LOCAL)
            await _write(b, [f"b-only-{k}" for k in picked[third : 2 * third]], "",
                         Consistency.LOCAL)
            both = picked[2 * third :]
            await _write(a, both, "a-", Consistency.LOCAL)
            await _write(b, both, "b-", Consistency.LOCAL)
            healed = await healer.heal_subject(SUBJECT, ["a", "b"])
            out.heal_s = healed.duration_s
            out.heal_bytes = healed.bytes_sent
            out.heal_trips = healed.round_trips
            out.found = healed.divergent_keys
            out.repaired = healed.keys_repaired
            out.converged = healed.converged
            # naive: each side's full state to the other (in process)
            codec = WireCodec(max_payload=1 << 30)
            signer = Signer("naive", b"n" * 32)
            naive_roster = TrustRoster({"naive": signer.public_key})
            targets = [b.state.copy(), a.state.copy()]
            t = time.process_time()
            nbytes = 0
            for src, target in zip((a, b), targets, strict=True):
                env = codec.seal(signer, subject="wn.bench.sync.orders", hlc=1, sequence=1,
                                 document=src.state, is_state=True)
                nbytes += len(env)
                doc = codec.open(env, naive_roster, subject="wn.bench.sync.orders").document
                assert isinstance(doc, ORMap)
                target.merge(doc)
            out.naive_cpu_s = time.process_time() - t
            out.naive_bytes = nbytes
        finally:
            await healer.stop()
            for svc in services.values():
                with contextlib.suppress(Exception):
                    await svc.stop()
    return out


# -- the run ---------------------------------------------------------------------------------


@dataclass
class Results:
    keys: int
    diff: int
    rounds: int
    builds: list[float] = field(default_factory=list)
    build_base: list[float] = field(default_factory=list)
    first_pass: list[float] = field(default_factory=list)
    changes: list[float] = field(default_factory=list)
    change_base: list[float] = field(default_factory=list)
    ident: dict[str, list[IdRun]] = field(default_factory=dict)
    identical: dict[str, IdRun] = field(default_factory=dict)
    e2e: E2E | None = None


ID_ROWS: tuple[tuple[str, int, int, int], ...] = (
    ("v3, the healer's default: top 2 levels with the root, 6-byte values, leaves as 4-byte "
     "item digests (keys named in the fetch)", 2, 6, 4),
    ("v3: the same with 8-byte values", 2, 8, 4),
    ("v3: 8-byte values, leaves with keys and 8-byte digests", 2, 8, 0),
    ("v3: whole (32-byte) values, leaves with keys (the healer's escalation)", 2, HASH_SIZE, 0),
    ("v2 protocol: no levels, whole values, one struct per node and item", 0, HASH_SIZE, 0),
)


async def run_identification(res: Results, left: MerkleTree, right: MerkleTree) -> None:
    async with IdentBench(left, right) as bench:
        for r in range(res.rounds):
            rows = ID_ROWS if r % 2 == 0 else ID_ROWS[::-1]
            for label, levels, width, item_width in rows:
                run = await bench.identify(levels, width, item_width)
                res.ident.setdefault(label, []).append(run)
    async with IdentBench(left, left) as same:
        client = same.client()
        a, _ = await same.roots(client, 2, 8)
        res.identical["first heal (no agreed root yet): root + top levels"] = IdRun(
            client.bytes_sent + client.bytes_received, 1, client.calls, 0, 0, 0, 0
        )
        client = same.client()
        await same.roots(client, 2, 8, unless=a.root)
        res.identical["steady state (root still the agreed one): root only"] = IdRun(
            client.bytes_sent + client.bytes_received, 1, client.calls, 0, 0, 0, 0
        )


def run_tree(res: Results, left_items: list[tuple[str, bytes]]) -> MerkleTree:
    keys = [k for k, _ in left_items]
    tree: MerkleTree | None = None
    for r in range(res.rounds):
        order = (0, 1) if r % 2 == 0 else (1, 0)
        for which in order:
            if which == 0:
                t = time.process_time()
                tree = MerkleTree.build(left_items, key=SECRET)
                res.builds.append(time.process_time() - t)
            else:
                res.build_base.append(_leaf_hash_baseline(keys))
    assert tree is not None
    batch = min(BATCH, len(left_items))
    step = max(1, len(left_items) // batch)
    targets = [k for k, _ in left_items[::step]][:batch]
    for r in range(res.rounds + 1):
        digests = [_digest(i, b"r%d" % r) for i in range(len(targets))]
        t = time.process_time()
        for k, dg in zip(targets, digests, strict=True):
            tree.set(k, dg)
        rate = len(targets) / (time.process_time() - t)
        if r == 0:
            res.first_pass.append(rate)
        else:
            res.changes.append(rate)
            res.change_base.append(len(targets) / _leaf_hash_baseline(targets))
    return tree


def render(res: Results, argv: Sequence[str]) -> str:
    n, d = res.keys, res.diff
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0, 0, 0)
    lines = [
        "# worknode healing benchmark",
        "",
        f"Command: `{' '.join(['python -m bench.heal_bench', *argv])}`",
        "",
        f"- Python: {platform.python_implementation()} {platform.python_version()}; "
        f"{platform.platform()}; {os.cpu_count()} CPUs",
        f"- Load average when the run ended (other processes share these CPUs): "
        f"{load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f}",
        f"- N = {n:,} keys per replica, d = {d:,} differing keys (a third only on A, a third "
        f"only on B, a third changed on both); {res.rounds} rounds; fan-out 16, depth 4; "
        "keys `node-NNNNNNN`, 32-byte keyed digests.",
        "",
        f"## Identification at N = {n:,}, d = {d:,} (real handlers, in-memory transport)",
        "",
        "Bytes: every request and reply body the healer sends and receives (both replicas). "
        "Round trips: waves of parallel calls, the root fetch included. CPU: median process "
        "time per replica (serving) and for the healer (descent, decoding, comparing).",
        "",
        "| Protocol | Bytes (KB) | Round trips | Calls | Keys (or items) found | CPU replica A "
        "ms (min-max) | CPU replica B ms (min-max) | CPU healer ms (min-max) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, _, _, _ in ID_ROWS:
        runs = res.ident.get(label, [])
        if not runs:
            continue
        r0 = runs[0]
        ca = [r.cpu_left * 1e3 for r in runs]
        cb = [r.cpu_right * 1e3 for r in runs]
        ch = [r.cpu_healer * 1e3 for r in runs]
        lines.append(
            f"| {label} | {r0.bytes_total / 1e3:,.1f} | {r0.round_trips} | {r0.calls} | "
            f"{r0.keys:,} | {_median(ca):,.1f} ({_spread(ca)}) | {_median(cb):,.1f} "
            f"({_spread(cb)}) | {_median(ch):,.1f} ({_spread(ch)}) |"
        )
    naive_id = 2 * sum(2 + len(f"node-{i:07d}") + 32 for i in range(n))
    lines.append(
        f"| naive: every (key, digest) pair from both sides | {naive_id / 1e3:,.1f} | 1 | 2 | "
        f"{d:,} | - | - | - |"
    )
    lines += [
        "",
        "Rows with item digests end knowing unmatched items, not keys: the fetch that follows "
        "names each item (4-byte leaf index and the 4 digest bytes, 8 bytes an item, "
        f"{8 * d / 1e3:,.1f} KB for {d:,} items each way at most) and the replica answers "
        "with the keys' states, so the keys travel once, with the state transfer.",
        "",
        "Identical replicas (one root compare per subject):",
        "",
        "| Case | Bytes | Round trips |",
        "|---|---:|---:|",
    ]
    for label, run in res.identical.items():
        lines.append(f"| {label} | {run.bytes_total:,} | {run.round_trips} |")
    lines += [
        "",
        "## Tree maintenance",
        "",
        "| Figure | Median | Min - max | Baseline (raw keyed leaf hash, same keys) | "
        "Ratio to baseline (median) |",
        "|---|---:|---:|---:|---:|",
    ]
    ratio = [b / x for b, x in zip(res.builds, res.build_base, strict=True)]
    lines.append(
        f"| cold build, {n:,} keys (CPU s) | {_median(res.builds):.2f} | "
        f"{_spread(res.builds, '{:.2f}')} | {_median(res.build_base):.2f} s | "
        f"{_median(ratio):.2f}x ({_spread(ratio, '{:.2f}')}) |"
    )
    cr = [c / b for c, b in zip(res.changes, res.change_base, strict=True)]
    lines.append(
        f"| incremental changes/s (steady state) | {_median(res.changes):,.0f} | "
        f"{_spread(res.changes, '{:,.0f}')} | {_median(res.change_base):,.0f} hashes/s | "
        f"{_median(cr):.2f}x ({_spread(cr, '{:.2f}')}) |"
    )
    lines.append(
        f"| incremental changes/s, first batch after a cold build | "
        f"{_median(res.first_pass):,.0f} | measured once | - | - |"
    )
    e = res.e2e
    if e is not None:
        lines += [
            "",
            f"## End to end at N = {e.keys:,}, d = {e.diff:,} (embedded nats-server, two "
            "worknode services, the healer service)",
            "",
            f"Loading {e.keys:,} keys on A and replicating them to B took {e.load_s:.1f} s "
            "through the write path, which is why this part runs at a smaller N than the "
            "identification above (1M keys would take minutes to load; `--e2e-keys` sets it). "
            "One heal, from the first root request to converged roots, state transfer "
            "included:",
            "",
            "| Row | Seconds | Bytes (KB) | Round trips | Keys found / pushed | Converged |",
            "|---|---:|---:|---:|---:|---:|",
            f"| healer (this branch) | {e.heal_s:.2f} | {e.heal_bytes / 1e3:,.1f} | "
            f"{e.heal_trips} | {e.found:,} / {e.repaired:,} | {e.converged} |",
            f"| naive: each full state to the other (seal, open, join; CPU, no network) | "
            f"{e.naive_cpu_s:.2f} | {e.naive_bytes / 1e3:,.1f} | 2 | - | - |",
            f"| identical replicas (steady state: root compare) | {e.identical_s:.3f} | "
            f"{e.identical_bytes / 1e3:,.2f} | {e.identical_trips} | 0 / 0 | True |",
            "",
            f"A replica's digests: {e.digest_us:.1f} us per entry (`item_digest`), so a first "
            f"tree of {e.keys:,} entries costs {e.digest_us * e.keys / 1e6:.2f} s of digests "
            f"plus {e.tree_build_s:.2f} s of `MerkleTree.build` (one run, CPU). "
            + " ".join(e.notes),
        ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; print and write the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--diff", type=int, default=1_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--e2e-keys", type=int, default=100_000)
    parser.add_argument("--no-e2e", action="store_true")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    argv_list = list(argv) if argv is not None else sys.argv[1:]
    res = Results(args.keys, args.diff, args.rounds)
    left_items, right_items = make_pair(args.keys, args.diff)
    left = run_tree(res, left_items)
    left = MerkleTree.build(left_items, key=SECRET)
    right = MerkleTree.build(right_items, key=SECRET)
    asyncio.run(run_identification(res, left, right))
    del left, right, left_items, right_items
    if not args.no_e2e:
        with tempfile.TemporaryDirectory(prefix="heal-bench-") as tmp:
            res.e2e = asyncio.run(run_e2e(min(args.e2e_keys, args.keys), args.diff, Path(tmp)))
    text = render(res, argv_list)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
