"""A Jepsen-style run against real processes: 3 clustered nats-servers (JetStream,
``sync_interval="always"``, every route through a cuttable proxy), 3 worknode services (each
connected to its own server only, STRONG streams R3), concurrent clients doing reads, writes
(unique values) and compare-and-set on a few keys, while a seeded nemesis partitions the
network (one server in a minority, a bridge), kills and restarts servers and worknode
services. The history is checked per key with ``broker.lincheck`` (model ``cas``).

Recording (``broker.lincheck``'s rules): one monotonic clock for every invocation and
completion; an operation whose outcome the API does not make definite is indeterminate
(``ret=None``); an operation known to have had no effect is left out.

- A read that fails is left out (a read changes nothing).
- A write or CAS that raises ``ConflictError`` did not happen: the log refused its expected
  sequence (or the replica saw the key past it before publishing). A CAS is recorded as a
  completed ``cas`` with ``out=False``; an unconditional write that lost every race is left out.
- ``OutcomeUnknownError``, a timeout of ours, any other error: indeterminate.
- ``UnavailableError`` on a write: also indeterminate, to be safe. ``StrongMode.write`` raises
  it when it reached no quorum (nothing stored: ``OutcomeUnknownError``, its subclass, when
  it cannot tell), and ``OutcomeUnknownError`` when the stream stored the write but this
  replica did not apply it within the timeout (it raised ``UnavailableError`` there until
  this harness pointed it out).

The CAS compares versions (``if_version`` = the version the client read); with unique values
and every key created once before the run, a key's version names its value, so
``cas(value read, new)`` is the register operation it performs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker.chaos import NatsCluster
from broker.codec import TrustRoster
from broker.crdt import Assign, Create
from broker.errors import ConflictError, WorknodeError
from broker.lincheck import CheckResult, Operation, check, dumps
from broker.replica import Consistency, Replica
from broker.strong import StrongMode
from services.worknode import WorknodeService, WorknodeSettings, load_or_create_signer

SUBJECT = "orders"
STRONG_PREFIX = "acct-"
KINDS = ("minority", "bridge", "kill-server", "kill-node")
"""The nemesis' faults: one server in a minority, a bridge (two servers cut from each other,
the third sees both), a server killed (SIGKILL) and restarted, a worknode service stopped
and started."""
TIMEOUT_S = 1.5
"""STRONG timeout of the services (short: a minority fails fast, the run sees more faults)."""


@dataclass
class Interval:
    """Node ``node``'s server is cut off from a quorum (a minority or killed) in
    ``[start, end)``; ``end`` None: until the end of the fault phase."""

    node: int
    start: float
    end: float | None = None
    why: str = ""


@dataclass
class RunResult:
    """What a run recorded and what the checks found."""

    mode: str
    seed: int
    history: list[Operation]
    events: list[tuple[float, str]]
    minority: list[Interval]
    violations: list[str]
    side_writes_ok: int
    side_writes_failed: list[str]
    final: dict[int, dict[str, Any]]
    result: CheckResult | None = None
    check_seconds: float = 0.0
    elapsed: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)
    faults: list[str] = field(default_factory=list)
    stuck: list[str] = field(default_factory=list)

    def tally(self) -> dict[str, int]:
        """Operations by outcome: ok, failed (definite no: a CAS that did not swap),
        indeterminate."""
        out = {"ok": 0, "failed": 0, "indeterminate": 0}
        for op in self.history:
            if op.indeterminate:
                out["indeterminate"] += 1
            elif op.f == "cas" and op.out is False:
                out["failed"] += 1
            else:
                out["ok"] += 1
        return out


class Clock:
    """The one monotonic clock of a run (seconds since its start)."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def __call__(self) -> float:
        return time.monotonic() - self.t0


def _settings(tmp: Path, url: str, name: str, secret: Path | None = None) -> WorknodeSettings:
    return WorknodeSettings(
        node_id=name, subjects=[SUBJECT], nats_urls=[url], state_dir=tmp / name,
        metrics_port=None, store_sync="normal", flush_interval_ms=2,
        strong={SUBJECT: [STRONG_PREFIX]}, strong_replicas=3, strong_timeout_s=TIMEOUT_S,
        cluster_secret_file=secret,
    )


def roster_of(settings: list[WorknodeSettings], extra: dict[str, bytes] | None = None
              ) -> TrustRoster:
    """The roster trusting every node of ``settings`` (and ``extra``)."""
    keys = {s.node_id: load_or_create_signer(s.node_id, s.key_path()).public_key
            for s in settings}
    return TrustRoster({**keys, **(extra or {})})


@asynccontextmanager
async def cluster(tmp: Path, size: int = 3) -> AsyncIterator[NatsCluster]:
    """``size`` clustered nats-servers fsyncing every write, routes up; stopped on exit."""
    async with NatsCluster(tmp / "cluster", size,
                           server_options={"sync_interval": "always"}) as c:
        await c.wait_routes(timeout=30)
        yield c


@asynccontextmanager
async def services(settings: list[WorknodeSettings], roster: TrustRoster
                   ) -> AsyncIterator[list[WorknodeService]]:
    """Started worknode services; every one stopped on exit (even after a test failed)."""
    svcs = [WorknodeService(s, roster=roster) for s in settings]
    try:
        await asyncio.gather(*(s.start() for s in svcs))
        yield svcs
    finally:
        for s in svcs:
            with contextlib.suppress(Exception):
                await s.stop()


def strong_of(r: Replica) -> StrongMode:
    """The replica's STRONG side."""
    assert r.strong is not None
    return r.strong


def field_of(value: dict[str, Any], key: str) -> Any:
    """The register ``v`` of worknode ``key`` in a state's ``value()`` (None: unset)."""
    return value.get(key, {}).get("fields", {}).get("v")


async def until(ok: Callable[..., Any], timeout: float, what: str) -> Any:
    """Retry ``ok()`` (an awaitable factory) until it returns without a WorknodeError or
    timeout; its last error is re-raised as an AssertionError naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await asyncio.wait_for(ok(), timeout)
        except (WorknodeError, TimeoutError) as exc:
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: {type(exc).__name__}: {exc}") from exc
            await asyncio.sleep(0.2)


class Run:
    """One run: clients, nemesis, recording (see the module doc)."""

    def __init__(self, c: NatsCluster, svcs: list[WorknodeService], *, mode: str, seed: int,
                 keys: int, clients_per_node: int, clock: Clock) -> None:
        self.c, self.svcs, self.mode, self.seed = c, svcs, mode, seed
        self.rng = random.Random(seed)
        self.keys = [f"{STRONG_PREFIX if mode == 'strong' else 'plain-'}{k}"
                     for k in range(keys)]
        self.clients_per_node = clients_per_node
        self.now = clock
        self.history: list[Operation] = []
        self.events: list[tuple[float, str]] = []
        self.minority: list[Interval] = []
        self.alive = [True] * len(svcs)
        self.stopping = False
        self.side_ok = 0
        self.side_failed: list[str] = []
        self.faults: list[str] = []
        self._n = 0

    def event(self, what: str) -> None:
        self.events.append((round(self.now(), 3), what))

    # -- setup ------------------------------------------------------------------------------

    async def setup(self) -> None:
        """Create every key once (its value None) and wait until every node sees them."""
        r0 = self.svcs[0].replica(SUBJECT)
        for key in self.keys:
            if self.mode == "strong":
                with contextlib.suppress(ConflictError):
                    await until(lambda k=key: strong_of(r0).create_if_absent(k, "root"),
                                30, f"create {key}")
            else:
                await r0.write(Create(key, "root"), Consistency.EVENTUAL)
        for svc in self.svcs:
            r = svc.replica(SUBJECT)
            if self.mode == "strong":
                await until(lambda r=r: strong_of(r).read(self.keys), 30, "first read")
            else:
                deadline = time.monotonic() + 30
                while any(k not in r.state.value() for k in self.keys):
                    assert time.monotonic() < deadline, "the keys did not reach every node"
                    await asyncio.sleep(0.05)

    # -- clients ----------------------------------------------------------------------------

    async def _read(self, r: Replica, key: str) -> tuple[Any, int]:
        if self.mode == "strong":
            got = await strong_of(r).read([key])
            return field_of(got.state.value(), key), got.versions[key]
        return field_of(r.state.value(), key), 0

    async def _op(self, client: str, node: int, f: str, key: str, arg: Any,
                  body: Callable[..., Any]) -> tuple[bool, Any]:
        """Run ``body`` and record it; (completed, its result)."""
        call = self.now()
        try:
            out = await asyncio.wait_for(body(), TIMEOUT_S * 4)
        except ConflictError:
            if f == "cas":
                self.history.append(Operation(client, call, self.now(), f, arg, False, key))
            return False, None
        except (WorknodeError, TimeoutError) as exc:
            if f != "read":
                self.history.append(Operation(client, call, None, f, arg, None, key))
            self._fail(node, f, type(exc).__name__)
            # Back off: in a minority every op fails fast, and each failed write is one
            # more indeterminate op for the checker to place.
            await asyncio.sleep(0.5)
            return False, None
        ret = self.now()
        self.history.append(Operation(client, call, ret, f, arg,
                                      True if f == "cas" else out, key))
        return True, out

    def _fail(self, node: int, f: str, why: str) -> None:
        self.counts_fail[f"{f}:{why}"] = self.counts_fail.get(f"{f}:{why}", 0) + 1

    counts_fail: dict[str, int] = {}  # noqa: RUF012 (replaced per instance in clients())

    async def client(self, node: int, idx: int) -> None:
        name = f"n{node}c{idx}"
        rng = random.Random(f"{self.seed}-{name}")
        while not self.stopping:
            if not self.alive[node]:
                await asyncio.sleep(0.05)
                continue
            r = self.svcs[node].replica(SUBJECT)
            key = rng.choice(self.keys)
            self._n += 1
            value = f"{name}-{self._n}"
            roll = rng.random()
            if roll < 0.4 or (self.mode != "strong" and roll < 0.5):
                await self._op(name, node, "read", key, None,
                                         lambda r=r, k=key: self._read_value(r, k))
            elif roll < 0.7 or self.mode != "strong":
                await self._op(name, node, "write", key, value,
                               lambda r=r, k=key, v=value: self._write(r, k, v))
            else:
                # CAS: read the value and its version, then swap conditionally on it.
                call = self.now()
                try:
                    seen, version = await asyncio.wait_for(self._read(r, key), TIMEOUT_S * 4)
                except (WorknodeError, TimeoutError) as exc:
                    self._fail(node, "read", type(exc).__name__)
                    await asyncio.sleep(0.5)
                    continue
                self.history.append(Operation(name, call, self.now(), "read", None, seen, key))
                await self._op(
                    name, node, "cas", key, (seen, value),
                    lambda r=r, k=key, v=value, ver=version: strong_of(r).write(
                        [Assign(k, ("v",), v)], if_version=ver))
            await asyncio.sleep(rng.uniform(0, 0.02))

    async def _read_value(self, r: Replica, key: str) -> Any:
        return (await self._read(r, key))[0]

    async def _write(self, r: Replica, key: str, value: str) -> None:
        if self.mode == "strong":
            await strong_of(r).write([Assign(key, ("v",), value)])
        else:
            await r.write(Assign(key, ("v",), value), Consistency.EVENTUAL)

    # -- nemesis ----------------------------------------------------------------------------

    async def _side_write(self, node: int) -> None:
        """An EVENTUAL and a LOCAL write on a node cut off from the quorum: they succeed."""
        if not self.alive[node]:
            return
        r = self.svcs[node].replica(SUBJECT)
        for level in (Consistency.EVENTUAL, Consistency.LOCAL):
            self._n += 1
            key = f"side-{node}-{self._n}"
            try:
                await asyncio.wait_for(r.write(Create(key, "root"), level), 10)
                self.side_ok += 1
            except (WorknodeError, TimeoutError) as exc:
                self.side_failed.append(f"node {node} {level.name}: {type(exc).__name__}")

    async def nemesis(self, seconds: float, *, kinds: tuple[str, ...],
                      schedule: tuple[str, ...] = ()) -> None:
        """A seeded schedule of faults, each held a while then repaired, until ``seconds``:
        first the faults of ``schedule`` in order, then ones drawn from ``kinds``."""
        end = self.now() + seconds
        planned = list(schedule)
        while self.now() < end or planned:
            await asyncio.sleep(self.rng.uniform(0.5, 1.5))
            if self.now() >= end and not planned:
                break
            kind = planned.pop(0) if planned else self.rng.choice(kinds)
            self.faults.append(kind)
            i = self.rng.randrange(3)
            hold = self.rng.uniform(1.5, 3.0)
            if kind == "minority":
                self.c.partition([{i}, {j for j in range(3) if j != i}])
                iv = Interval(i, self.now(), why=f"partition {i} | rest")
                self.minority.append(iv)
                self.event(f"partition {{{i}}} | rest")
                await asyncio.sleep(0.3)
                await self._side_write(i)
                await asyncio.sleep(max(0.0, hold - 0.3))
                iv.end = self.now()
                self.c.heal()
                self.event("heal")
            elif kind == "bridge":
                a, b = (j for j in range(3) if j != i)
                self.c.cut_link(a, b)
                self.event(f"bridge: {a} x {b}, {i} sees both")
                await asyncio.sleep(hold)
                self.c.heal()
                self.event("heal")
            elif kind == "kill-server":
                await self.c.kill(i)
                iv = Interval(i, self.now(), why=f"server {i} killed")
                self.minority.append(iv)
                self.event(f"kill server {i}")
                await asyncio.sleep(hold)
                iv.end = self.now()
                await self.c.restart(i)
                self.event(f"restart server {i}")
            elif kind == "kill-node":
                self.alive[i] = False
                await self.svcs[i].stop()
                self.event(f"stop worknode {i}")
                await asyncio.sleep(hold)
                await self.svcs[i].start()
                self.alive[i] = True
                self.event(f"start worknode {i}")
            with contextlib.suppress(TimeoutError, AssertionError, Exception):
                await self.c.wait_routes(timeout=10)

    # -- after ------------------------------------------------------------------------------

    def minority_violations(self) -> list[str]:
        """STRONG operations that succeeded on a node whose server was cut off from a quorum
        for their whole duration (a CAS answering 'no' is not a success)."""
        out = []
        for iv in self.minority:
            end = iv.end if iv.end is not None else float("inf")
            for op in self.history:
                if (str(op.client).startswith(f"n{iv.node}c") and not op.indeterminate
                        and op.call >= iv.start and op.ret is not None and op.ret < end
                        and not (op.f == "cas" and op.out is False)):
                    out.append(f"{op.describe()} during {iv.why}")
        return out

    async def final_reads(self) -> tuple[dict[int, dict[str, Any]], list[str]]:
        """After healing: a read of every key on every node (recorded), retried until the
        node is back; and the node's local state of the keys (no fence) right after. Also
        the nodes that could not read within a minute (with their log position)."""
        final: dict[int, dict[str, Any]] = {}
        stuck: list[str] = []
        for node, svc in enumerate(self.svcs):
            r = svc.replica(SUBJECT)
            try:
                if self.mode == "strong":
                    await until(lambda r=r: strong_of(r).read(self.keys), 60,
                                f"node {node} STRONG read after healing")
                final[node] = {}
                for key in self.keys:
                    call = self.now()
                    got, _ = await until(lambda r=r, k=key: self._read(r, k), 60,
                                         "final read")
                    self.history.append(Operation(f"final{node}", call, self.now(), "read",
                                                  None, got, key))
                    final[node][key] = got
            except AssertionError as exc:
                final.pop(node, None)
                where = ""
                if self.mode == "strong":
                    m = strong_of(r)
                    with contextlib.suppress(WorknodeError):
                        first, last = await m.log.state()
                        where = (f" (applied {m.applied}, barrier {m._barrier}, "
                                 f"stream {first}..{last})")
                stuck.append(f"{exc}{where}")
                continue
            final[node]["_local"] = {k: field_of(r.state.value(), k) for k in self.keys}
        return final, stuck


def last_acknowledged(history: list[Operation], key: str) -> tuple[bool, Any]:
    """(known, value): the value key must hold at the end when the history makes it
    definite: the last acknowledged write (or swapping CAS) began after every other write
    ended, and no indeterminate write began after it."""
    writes = [op for op in history if op.key == key and op.f in ("write", "cas")
              and not (op.f == "cas" and op.out is False)]
    acked = [op for op in writes if not op.indeterminate]
    if not acked:
        return False, None
    last = max(acked, key=lambda op: op.call)
    for op in writes:
        if op is last:
            continue
        if op.indeterminate and op.call >= last.call - 1e-9:
            return False, None
        if op.ret is not None and op.ret >= last.call:
            return False, None
        if op.indeterminate:
            # It began before ``last``; it may still take effect after it.
            return False, None
    return True, last.arg if last.f == "write" else last.arg[1]


async def run(tmp: Path, *, mode: str = "strong", seed: int = 1, seconds: float = 20.0,
              keys: int = 3, clients_per_node: int = 2,
              kinds: tuple[str, ...] = KINDS, schedule: tuple[str, ...] = (),
              check_budget: float = 30.0) -> RunResult:
    """One run (see the module doc); the checks' findings in the result, nothing asserted."""
    clock = Clock()
    async with cluster(tmp) as c:
        settings = [_settings(tmp, c.urls[i], f"w{i}") for i in range(3)]
        async with services(settings, roster_of(settings)) as svcs:
            r = Run(c, svcs, mode=mode, seed=seed, keys=keys,
                    clients_per_node=clients_per_node, clock=clock)
            r.counts_fail = {}
            await r.setup()
            r.event("workload starts")
            clients = [asyncio.create_task(r.client(n, k))
                       for n in range(3) for k in range(clients_per_node)]
            try:
                await r.nemesis(seconds, kinds=kinds, schedule=schedule)
            finally:
                r.stopping = True
                c.heal()
                for i, s in enumerate(c.servers):
                    if not s.running:
                        await c.restart(i)
                for i, svc in enumerate(svcs):
                    if not r.alive[i]:
                        await svc.start()
                        r.alive[i] = True
                await asyncio.gather(*clients, return_exceptions=True)
            r.event("healed, workload stopped")
            await c.wait_routes(timeout=30)
            final, stuck = await r.final_reads()
            r.event("final reads done")
    out = RunResult(mode, seed, r.history, r.events, r.minority, r.minority_violations(),
                    r.side_ok, r.side_failed, final, counts=r.counts_fail, faults=r.faults,
                    stuck=stuck)
    t = time.monotonic()
    out.result = check(out.history, "cas", now=time.monotonic, deadline=t + check_budget)
    out.check_seconds = time.monotonic() - t
    out.elapsed = clock()
    return out


def save_history(result: RunResult, path: Path) -> Path:
    """The run's history as JSON lines (``python -m broker.lincheck PATH`` replays it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in dumps(result.history)))
    path.with_suffix(".events.json").write_text(json.dumps(
        {"events": result.events, "counts": result.counts}, indent=1) + "\n")
    return path


def summary(results: list[RunResult], *, command: str) -> str:
    """A Markdown summary of runs."""
    lines = ["# Jepsen-style STRONG run: summary", "", f"Command: `{command}`", ""]
    for res in results:
        t = res.tally()
        n = max(1, len(res.history))
        assert res.result is not None
        lines += [
            f"## mode {res.mode}, seed {res.seed}: {res.elapsed:.0f} s",
            "",
            f"- operations: {len(res.history)} over {len({op.key for op in res.history})} "
            f"keys ({sum(op.f == 'read' for op in res.history)} reads, "
            f"{sum(op.f == 'write' for op in res.history)} writes, "
            f"{sum(op.f == 'cas' for op in res.history)} CAS)",
            f"- ok {t['ok'] / n:.1%}, failed (CAS refused) {t['failed'] / n:.1%}, "
            f"indeterminate {t['indeterminate'] / n:.1%}",
            f"- errors seen (op:error -> count): {json.dumps(res.counts, sort_keys=True)}",
            f"- nemesis faults: {len(res.faults)} ("
            + ", ".join(f"{k} x{res.faults.count(k)}" for k in sorted(set(res.faults))) + ")",
            f"- checker: {res.result.verdict.name} in {res.check_seconds:.2f} s, "
            f"{res.result.explored} states explored; {res.result.explain()}",
            (f"- STRONG ops that succeeded in a minority: {len(res.violations)}; "
             if res.mode == "strong" else
             f"- (EVENTUAL: ops in a minority succeed by design: {len(res.violations)}); ")
            + f"LOCAL/EVENTUAL writes in a minority: {res.side_writes_ok} ok, "
            f"{len(res.side_writes_failed)} failed",
            f"- nodes whose STRONG reads still failed a minute after healing: "
            f"{len(res.stuck)} {res.stuck}",
            "",
        ]
    return "\n".join(lines)
