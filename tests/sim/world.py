"""The simulated world: replicas driving ``ReplicationMachine``, a durable store, a faulty
network, per-node clocks, a healer, and one run from a seed to a verdict.

Invariants:

- ``run(seed, ...)`` depends on its arguments only: the schedule comes from ``make_schedule``
  (seeded), every network decision from ``random.Random(seed)``, every signing key from the
  node's name; the trace hash covers every message's bytes and every delivery;
- every envelope crosses the network as real bytes: sealed by the sender's ``WireCodec``
  (its pinned wire version) and opened by the receiver's, on every path (delta batches,
  catch-up requests and states, announces, heal fetches and repairs, snapshot reloads);
- the store loses on a crash exactly what was not committed: local writes are logged before
  they are acknowledged; remote deltas and catch-up states live only in memory until a
  snapshot; a restart reloads snapshot + later records (``broker/store.py`` semantics,
  ``broker/replica.py`` ``_load``);
- the simulator tracks, beside the bytes, which acknowledged writes each replica has joined
  (``ghost``); the model (``tests.sim.model``) judges values from those histories alone.

Bounds stated here (checked on every run): a catch-up reply is at most the responder's
encoded state plus ``ENVELOPE_SLACK`` bytes; a replica starts at most
``MAX_QUIET_CATCHUPS`` catch-ups once faults stop; a heal (``broker.healing.HealPlanner``)
converges within ``MAX_HEAL_PASSES`` rounds, the next heal finds nothing, and a repaired pair
moves at most ``HEAL_BYTES_FACTOR`` times the replicas' encoded states plus
``ENVELOPE_SLACK`` per push.
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import math
import random
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from broker.codec import CURRENT_VERSION, Envelope, Signer, TrustRoster, WireCodec
from broker.crdt import (
    ROOT_ID,
    Add,
    Assign,
    CausalContext,
    Create,
    Increment,
    Move,
    ORMap,
    Tree,
    TreeOp,
)
from broker.crdt._stores import LWWStore, Whole, canonical_bytes
from broker.errors import ClockSkewError, CodecError, TreeError, WorknodeError
from broker.healing import (
    AskRoots,
    HealPlanner,
    HealPolicy,
    HealResult,
    PairResult,
    RepairPair,
    RootView,
)
from broker.merkle import (
    TREE_SCHEME,
    LeafRequest,
    MerkleTree,
    Reconciliation,
    RootInfo,
    Side,
    node_answer,
)
from broker.repair import item_digest, repair_deltas, subset, vouched
from broker.replication import (
    Action,
    Announce,
    AnnounceReceived,
    CatchupFailed,
    CatchupReplied,
    Changed,
    Clipped,
    Committed,
    DeltaReceived,
    Event,
    Loaded,
    LogReceived,
    Publish,
    Published,
    Received,
    ReceivedLogged,
    Reconnected,
    RepairApplied,
    ReplicationConfig,
    ReplicationMachine,
    Report,
    RequestCatchup,
    SaveProgress,
    ScheduleTimer,
    SendState,
    Snapshot,
    SnapshotTaken,
    Started,
    StateEvidence,
    SyncRequested,
    TimerFired,
    own_claims,
)
from tests.sim.byzantine import BYZ, Byzantine, byz_step, dot_entries
from tests.sim.byzantine import WIPE_AHEAD as BYZ_WIPE_AHEAD
from tests.sim.model import Write, expected_value, normal, tree_problems

__all__ = ["VERSIONS", "Result", "make_schedule", "run"]

VERSIONS: Final = (1, 2, 3, CURRENT_VERSION)
"""Frozen wire releases a node may be pinned to (v1, v2, v3 and current; current is 3 today,
so it is drawn twice as often)."""
EPOCH_MS: Final = 1_700_000_000_000
SECRET: Final = b"sim-cluster-secret-0123456789abcdef"
ENVELOPE_SLACK: Final = 2048
MAX_QUIET_CATCHUPS: Final = 40
MAX_HEAL_PASSES: Final = 3
CONFIG_MAX_BACKOFF: Final = 2.0
HEAL_BYTES_FACTOR: Final = 4
BYZ_QUIET_CATCHUPS: Final = math.ceil(30.0 / (CONFIG_MAX_BACKOFF * 0.5)) + 10
"""More catch-ups allowed once faults stop in Byzantine mode: a forged batch the causal gate
holds wants catch-ups (from its signer, then any peer) until its hold (``max_hold``, 30 s)
ends, at most one per half the maximum backoff (jitter), plus the ramp up to it."""
QUIET_LIMIT_MS: Final = 600_000
"""Simulated time allowed after the faults stop for catch-up to settle."""
SUBJECTS: Final = ("s0", "s1")
TREE_NODES: Final = ("a", "b", "c", "d", "e")
FIELDS: Final = {
    "lww": (("lww",), ("m", "lww")),
    "mv": (("mv",), ("m", "mv")),
    "inc": (("cnt",), ("m", "cnt")),
    "add": (("set",), ("m", "set")),
    "discard": (("set",), ("m", "set")),
    "enable": (("flag",), ("m", "flag")),
    "disable": (("flag",), ("m", "flag")),
    "rmfield": (("m",), ("lww",), ("cnt",), ("set",), ("flag",), ("mv",)),
}
CONFIG: Final = ReplicationConfig(
    flush_interval=0.005,
    snapshot_every=7,
    catchup_timeout=0.2,
    catchup_min_interval=0.05,
    catchup_max_backoff=CONFIG_MAX_BACKOFF,
    max_unlogged_bytes=1_200,
)
"""Small snapshot interval, unlogged bound and short timeouts: every mechanism runs within a
short run."""

Step = list[Any]
"""One schedule step (JSON-friendly): ``["w", node, subject, op, *args]``, ``["crash", node]``,
``["restart", node, version]``, ``["burst", node, subject, worknode, path, n]`` (n
increments of one counter in consecutive batches), ``["part", groups]``, ``["unpart"]``,
``["faults", drop, dup]``, ``["calm"]``, ``["tick", ms]``."""


# -- schedule ---------------------------------------------------------------------------------


def make_schedule(
    seed: int, steps: int = 60, nodes: int | None = None, *, byzantine: int = 0,
    relay: bool = False, repair: bool = False, preclaim: bool = False,
) -> tuple[dict[str, Any], list[Step]]:
    """``(setup, steps)`` for ``seed``: node count, versions, skews, subjects, and the steps.
    ``byzantine``: 1 adds the Byzantine node (``tests.sim.byzantine``) and its attack steps;
    ``relay`` and ``repair`` switch on its forged catch-up replies (h) and forged heal
    repairs (i), ``preclaim`` its removals of dots not issued yet. The honest part of the
    schedule is the same with or without it."""
    rng = random.Random(f"schedule-{seed}")
    n = nodes if nodes is not None else rng.randint(3, 7)
    subjects = rng.randint(1, 2)
    setup: dict[str, Any] = {
        "nodes": n,
        "versions": [rng.choice(VERSIONS) for _ in range(n)],
        "skews": [rng.randint(-300, 300) for _ in range(n)],
        "subjects": subjects,
        # Half the runs end with one write per node (every loss then shows as a gap or a
        # hole); the others end with reconnects and announces only.
        "epilogue": rng.random() < 0.5,
        # Odd seeds run the replicas' adaptive (Nagle-style) publishing, even seeds the fixed
        # flush window: both policies meet every kind of schedule. (Saved schedules without
        # the key ran the fixed window.)
        "adaptive_flush": seed % 2 == 1,
        # Every third seed publishes a commit of 120 record bytes or more at once and alone
        # (``publish_alone_bytes``; replicas default to 8 KiB, which the simulation's small
        # writes rarely reach). (Saved schedules without the key never did.)
        "publish_alone": 120 if seed % 3 == 0 else 0,
    }
    if byzantine:
        setup.update(byzantine=1, byz_relay=relay, byz_repair=repair, byz_preclaim=preclaim)
    brng = random.Random(f"byz-schedule-{seed}")
    out: list[Step] = []
    down: set[int] = set()
    for _ in range(steps):
        r = rng.random()
        node = rng.randrange(n)
        subj = rng.randrange(subjects)
        if r < 0.06:
            # A hot counter: one writer increments it in consecutive batches.
            fpath = list(rng.choice(FIELDS["inc"]))
            out.append(["burst", node, subj, TREE_NODES[0], fpath, rng.randint(2, 5)])
        elif r < 0.62:
            out.append(["w", node, subj, *_random_op(rng)])
        elif r < 0.70:
            if down and rng.random() < 0.6:
                back = rng.choice(sorted(down))
                out.append(["restart", back, rng.choice(VERSIONS)])
                down.discard(back)
            elif node not in down and len(down) < n // 2:
                out.append(["crash", node])
                down.add(node)
        elif r < 0.76:
            members = list(range(n))
            rng.shuffle(members)
            cut = rng.randint(1, n - 1)
            out.append(["part", [sorted(members[:cut]), sorted(members[cut:])]])
        elif r < 0.80:
            out.append(["unpart"])
        elif r < 0.86:
            out.append(["faults", rng.choice((0.1, 0.3, 0.6)), rng.choice((0.0, 0.1, 0.3))])
        elif r < 0.90:
            out.append(["calm"])
        else:
            out.append(["tick", rng.choice((1, 5, 20, 100, 500, 2000))])
        # Attack steps come from their own generator: the honest steps stay those of the
        # seed without a Byzantine node.
        if byzantine and brng.random() < 0.5:
            out.append(byz_step(brng, n, repair=repair, preclaim=preclaim))
    return setup, out


def _random_op(rng: random.Random) -> list[Any]:
    kind = rng.choices(
        ("create", "move", "delete", "lww", "mv", "inc", "add", "discard", "enable",
         "disable", "rmfield"),
        weights=(4, 2, 1, 3, 2, 6, 3, 2, 2, 1, 1),
    )[0]
    # Field writes favour one worknode, so writers meet on the same registers and counters.
    nid = rng.choice(TREE_NODES) if kind in ("create", "move", "delete") or rng.random() < 0.4 \
        else TREE_NODES[0]
    if kind in ("create", "move"):
        return [kind, nid, rng.choice((ROOT_ID, *TREE_NODES))]
    if kind == "delete":
        return [kind, nid]
    fpath = list(rng.choice(FIELDS[kind]))
    arg: Any = None
    if kind in ("lww", "mv"):
        arg = rng.randrange(100)
    elif kind == "inc":
        arg = rng.choice((1, 1, 2, 5, -1, -3))
    elif kind in ("add", "discard"):
        arg = rng.randrange(4)
    return [kind, nid, fpath, arg]


# -- durable store ----------------------------------------------------------------------------


@dataclass
class SimStore:
    """One subject's durable store on one node: what survives a crash.

    ``records``: committed records ``(seq, bytes, ghost)``; ``snapshot``: ``(bytes, upto,
    ghost)`` replacing records <= upto; ``progress``: ``(sequence, upto)`` published."""

    records: list[tuple[int, bytes, frozenset[int]]] = field(default_factory=list)
    snapshot: tuple[bytes, int, frozenset[int]] | None = None
    progress: tuple[int, int] = (0, 0)
    last_seq: int = 0
    received: set[int] = field(default_factory=set)
    """Sequence numbers of records holding received state (never republished)."""

    def append(self, data: bytes, ghost: frozenset[int], *, received: bool = False) -> int:
        self.last_seq += 1
        self.records.append((self.last_seq, data, ghost))
        if received:
            self.received.add(self.last_seq)
        return self.last_seq

    def write_snapshot(self, data: bytes, upto: int, ghost: frozenset[int]) -> None:
        self.snapshot = (data, upto, ghost)
        self.records = [r for r in self.records if r[0] > upto]


# -- replicas ---------------------------------------------------------------------------------


class _Roster(TrustRoster):
    """A roster that remembers signatures it verified: a broadcast is verified once, not
    once per receiver (the same bytes, the same key: the same answer, only faster)."""

    __slots__ = ("_ok",)

    def __init__(self) -> None:
        super().__init__()
        self._ok: set[tuple[str, bytes, bytes, bytes]] = set()

    def verify(self, signer: str, body: bytes, signature: bytes, domain: bytes = b"") -> None:
        memo = (signer, signature, body, domain)
        if memo in self._ok:
            return
        if domain:
            super().verify(signer, body, signature, domain)
        else:
            super().verify(signer, body, signature)
        self._ok.add(memo)


class Failure(Exception):
    """A check failed: the run's verdict."""


@dataclass
class Replica:
    """One subject on one node: the machine, its ghost history, its catch-up in flight."""

    node: Node
    subject: str
    store: SimStore
    machine: ReplicationMachine | None = None
    ghost: set[int] = field(default_factory=set)
    unpublished: set[int] = field(default_factory=set)
    catchup_id: int = 0
    catchup_waiting: bool = False
    catchup_asked: CausalContext | None = None  # the context the running request carried
    quiet_catchups: int = 0
    byz_held: int = 0
    """Forged batches the causal gate holds (each must end rejected, or lost by a crash)."""


@dataclass
class Node:
    """A process: pinned wire version, clock skew, signer, up or down, its replicas."""

    name: str
    version: int
    skew_ms: int
    signer: Signer
    codec: WireCodec
    up: bool = True
    incarnation: int = 0
    replicas: dict[str, Replica] = field(default_factory=dict)


def _codec(version: int) -> WireCodec:
    return WireCodec(version, peer_version=1)


def _stable(text: str) -> int:
    """A 32-bit seed from ``text`` (``hash`` of a str changes between processes)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=4).digest(), "big")


def _max_hlc(entry: Any, depth: int = 0) -> int:
    """The greatest LWW timestamp under ``entry`` (as the driver restores its clock)."""
    if entry is None or depth > 16:
        return 0
    if isinstance(entry, LWWStore):
        return max((entry[i] for i in range(2, len(entry), 4)), default=0)
    if isinstance(entry, dict):
        return max((_max_hlc(v, depth + 1) for v in entry.values()), default=0)
    if isinstance(entry, Whole):
        return _max_hlc(entry.store, depth + 1)
    return 0


@dataclass
class Result:
    """The verdict of one run."""

    seed: int
    ok: bool
    failure: str
    trace_hash: str
    stats: Counter[str]
    steps: int
    nodes: int
    versions: tuple[int, ...]


# -- the world --------------------------------------------------------------------------------


class World:
    """Everything of one run (see the module doc)."""

    def __init__(self, seed: int, setup: dict[str, Any]) -> None:
        self.seed = seed
        self.setup = setup
        self.rng = random.Random(f"net-{seed}")
        self.now_ms = 0
        self.queue: list[tuple[int, int, str, tuple[Any, ...]]] = []
        self.qseq = 0
        self.trace = hashlib.blake2b(digest_size=16)
        self.stats: Counter[str] = Counter()
        self.writes: dict[str, list[Write]] = {s: [] for s in SUBJECTS[: setup["subjects"]]}
        self.batches: dict[int, frozenset[int]] = {}
        # Envelope bytes a replica received -> the writes they carry (logged with a write).
        self.raw_ghost: dict[bytes, frozenset[int]] = {}
        # Envelope bytes of a delta -> the batch id it was first delivered as (a relay
        # forwards kept batches as evidence: the same writes).
        self.raw_bid: dict[bytes, int] = {}
        # Write id -> the dots it issued (its writer's): what a replica must have seen to
        # hold it (a relayed state keeps only the dots its relay vouches for).
        self.wid_dots: dict[int, frozenset[tuple[str, int]]] = {}
        self.next_wid = 1
        self.next_batch = 1
        self.next_req = 1
        self.groups: list[set[str]] | None = None
        self.drop = 0.0
        self.dup = 0.0
        self.quiet = False
        self.failures: list[str] = []
        self.subjects = SUBJECTS[: setup["subjects"]]
        self.nodes: list[Node] = []
        roster = _Roster()
        for i in range(setup["nodes"]):
            name = f"n{i}"
            signer = Signer(name, hashlib.sha256(name.encode()).digest())
            roster.add(name, signer.public_key)
            node = Node(name, setup["versions"][i], setup["skews"][i], signer,
                        _codec(setup["versions"][i]))
            for s in self.subjects:
                node.replicas[s] = Replica(node, s, SimStore())
            self.nodes.append(node)
        self.roster = roster
        self.by_name = {n.name: n for n in self.nodes}
        self.healer_signer = Signer("healer", hashlib.sha256(b"healer").digest())
        roster.add("healer", self.healer_signer.public_key)
        self.healer_codec = _codec(CURRENT_VERSION)
        # Byzantine mode: the attacker's roster key, the forged envelopes' batch ids (bid ->
        # attack), rejections per signer, and what honest writers put under each dot.
        self.byz: Byzantine | None = None
        self.byz_bids: dict[int, str] = {}
        self.byz_cut: set[int] = set()  # forged batches whose claims the gate cut
        self.rejections: Counter[tuple[str, str]] = Counter()
        self.honest_dots: dict[tuple[str, int], set[tuple[Any, ...]]] = {}
        self.issued: Counter[str] = Counter()
        self.byz_failures: set[str] = set()
        if setup.get("byzantine"):
            self.byz = Byzantine(self)
            roster.add(BYZ, self.byz.signer.public_key)
        for node in self.nodes:
            for r in node.replicas.values():
                self._load(r)

    # -- time and events --------------------------------------------------------------------

    def _log(self, *parts: Any) -> None:
        # Sets print in hash order, which changes with PYTHONHASHSEED: sorted, a trace is
        # the same in every process.
        self.trace.update(repr(tuple(
            sorted(p) if isinstance(p, (set, frozenset)) else p for p in parts
        )).encode())

    def _at(self, t_ms: int, kind: str, args: tuple[Any, ...]) -> None:
        self.qseq += 1
        heapq.heappush(self.queue, (max(t_ms, self.now_ms), self.qseq, kind, args))

    def advance(self, until_ms: int) -> None:
        """Deliver every event due up to ``until_ms``."""
        while self.queue and self.queue[0][0] <= until_ms:
            t, _, kind, args = heapq.heappop(self.queue)
            self.now_ms = t
            self._log(t, kind, args[:3] if kind != "deliver" else args[:4])
            self.stats["events"] += 1
            getattr(self, "_ev_" + kind)(*args)
        self.now_ms = max(self.now_ms, until_ms)

    def settle(self, limit_ms: int) -> bool:
        """Run until no event is pending (True) or ``limit_ms`` passed (False)."""
        end = self.now_ms + limit_ms
        while self.queue:
            if self.queue[0][0] > end:
                return False
            self.advance(self.queue[0][0])
        return True

    def _secs(self) -> float:
        return self.now_ms / 1000.0

    def _wall(self, node: Node) -> int:
        return EPOCH_MS + self.now_ms + node.skew_ms

    def _wall_byz(self) -> int:
        return EPOCH_MS + self.now_ms

    # -- network ----------------------------------------------------------------------------

    def _reachable(self, a: str, b: str) -> bool:
        if self.groups is None or BYZ in (a, b):
            return True  # the attacker bridges every partition
        return any(a in g and b in g for g in self.groups)

    def send(self, src: str, dst: str, what: str, args: tuple[Any, ...], *,
             fast: bool = False) -> None:
        """Put a message on the network: dropped, duplicated and delayed by the faults
        (``fast``: the Byzantine node's answers, 1 ms, to beat honest ones)."""
        self.stats["msgs"] += 1
        copies = 1
        if not self.quiet and self.drop and self.rng.random() < self.drop:
            self.stats["dropped"] += 1
            return
        if not self.quiet and self.dup and self.rng.random() < self.dup:
            self.stats["duplicated"] += 1
            copies = 2
        for _ in range(copies):
            delay = self.rng.randint(1, 200 if self.drop and not self.quiet else 20)
            if fast:
                delay = 1
            self._at(self.now_ms + delay, "deliver", (src, dst, what, *args))

    def _ev_deliver(self, src: str, dst: str, what: str, *args: Any) -> None:
        if dst == BYZ:
            assert self.byz is not None
            self.byz.receive(src, what, *args)
            return
        node = self.by_name[dst]
        if not node.up or not self._reachable(src, dst):
            self.stats["lost_in_flight"] += 1
            return
        getattr(self, "_on_" + what)(node, src, *args)

    # -- replica plumbing ---------------------------------------------------------------------

    def _load(self, r: Replica) -> None:
        """Build the replica's machine from its store (``Replica._load``)."""
        codec = r.node.codec
        store = r.store
        state = ORMap()
        ghost: set[int] = set()
        if store.snapshot is not None:
            try:
                state = self._decode_stored(codec, store.snapshot[0])
            except CodecError as exc:
                raise Failure(
                    f"{r.node.name}/{r.subject}: snapshot does not reload: {exc}"
                ) from exc
            ghost |= store.snapshot[2]
        for _, data, g in store.records:
            try:
                state.merge(self._decode_stored(codec, data))
            except CodecError as exc:
                raise Failure(f"{r.node.name}/{r.subject}: record does not reload: {exc}") from exc
            ghost |= g
        sequence, upto = store.progress
        unpublished = [
            (n, d, g) for n, d, g in store.records if n > upto and n not in store.received
        ]
        batch: ORMap | None = None
        r.unpublished = set()
        if unpublished:
            batch = ORMap(is_delta=True)
            for _, d, g in unpublished:
                batch.merge(self._decode_stored(codec, d))
                r.unpublished |= g
        r.machine = ReplicationMachine(
            f"{r.node.name}",
            dataclasses.replace(CONFIG, adaptive_flush=self.setup.get("adaptive_flush", False),
                                publish_alone_bytes=self.setup.get("publish_alone", 0)),
            seed=_stable(f"{self.seed}/{r.node.name}/{r.node.incarnation}/{r.subject}"),
            loaded=Loaded(
                state,
                clock_last=_max_hlc(state.store),
                last_record_seq=store.records[-1][0] if store.records else (
                    store.snapshot[1] if store.snapshot else 0),
                snapshot_seq=store.snapshot[1] if store.snapshot else 0,
                sequence=sequence,
                published_upto=upto,
                unpublished=batch,
                unpublished_ops=len(unpublished),
            ),
        )
        r.ghost = ghost
        r.catchup_waiting = False
        self.handle(r, Started(self._secs(), self._wall(r.node)))

    @staticmethod
    def _decode_stored(codec: WireCodec, data: bytes) -> ORMap:
        doc = codec.decode_document(data, ORMap)
        assert isinstance(doc, ORMap)
        return doc

    def handle(self, r: Replica, event: Event) -> list[Action]:
        """Feed ``event`` to ``r``'s machine and execute the actions."""
        assert r.machine is not None
        actions = r.machine.handle(event)
        self.execute(r, actions)
        return actions

    def execute(self, r: Replica, actions: list[Action]) -> None:
        """Execute a machine's actions as the asyncio driver would, synchronously."""
        node, m = r.node, r.machine
        assert m is not None
        # The machine has joined everything it reports applied before it returns: the ghost
        # history must say so before any action (a snapshot, a catch-up answer) reads it,
        # whatever the order of the actions in the list (F10 was this, in the simulator).
        cut = any(isinstance(a, Report) and a.event == "gated" and a.args == ("cut",)
                  for a in actions)
        for a in actions:
            if isinstance(a, Report) and a.event == "applied" and a.args \
                    and isinstance(a.args[0], int):
                if a.args[0] in self.byz_bids:
                    r.byz_held -= 1  # drained (``_on_delta`` makes up for a direct join)
                    if cut or a.args[0] in self.byz_cut:
                        # Joined once the gate cut its claims of others' unseen dots: its
                        # harm (if any) shows in the final checks.
                        self.stats["byz.cut_applied"] += 1
                        continue
                    # Recorded; the final checks show the harm.
                    self._byz_failure(f"{node.name}/{r.subject}: a forged envelope "
                                      f"({self.byz_bids[a.args[0]]}) of {BYZ} was applied")
                r.ghost |= self.batches.get(a.args[0], frozenset())
        for a in actions:
            if isinstance(a, Report):
                self.stats[f"report.{a.event}"] += 1
                if a.event == "catchup":
                    self.stats[f"catchup.{a.args[0]}"] += 1
                if a.event == "rejected":
                    self.stats[f"rejected.{a.args[0]}"] += 1
                    self.rejections[(a.args[1], a.args[0])] += 1
                    if a.args[1] == BYZ and a.args[0] == "unbacked_context":
                        r.byz_held -= 1
                    if a.args[0] in ("foreign_dot", "dot_range", "clock_range",
                                     "unvouched_state") \
                            and a.args[1] in self.by_name:
                        # Every other simulated writer is honest: its batches hold its own
                        # dots.
                        raise Failure(f"{node.name}: honest batch of {a.args[1]} rejected "
                                      f"as {a.args[0]}")
                continue
            if isinstance(a, Changed):
                continue
            if isinstance(a, ScheduleTimer):
                at = math.ceil(a.at * 1000)
                self._at(at, "timer", (node.name, node.incarnation, r.subject, a.name, a.at))
            elif isinstance(a, Publish):
                self._publish(r, a)
            elif isinstance(a, SaveProgress):
                r.store.progress = (a.sequence, a.upto)
            elif isinstance(a, RequestCatchup):
                self._request_catchup(r, a)
            elif isinstance(a, SendState):
                self._send_state(r, a)
            elif isinstance(a, Announce):
                data = self._probe(r)
                for other in self._peers(node):
                    self.send(node.name, other, "announce", (r.subject, data))
            elif isinstance(a, Snapshot):
                upto = m.snapshot_upto()
                data = node.codec.encode_document(m.state)
                try:  # every snapshot must reload, not only the ones a crash happens to read
                    self._decode_stored(node.codec, data)
                except CodecError as exc:
                    raise Failure(
                        f"{node.name}/{r.subject}: snapshot does not reload: {exc}"
                    ) from exc
                r.store.write_snapshot(data, upto, frozenset(r.ghost))
                self.stats["snapshots"] += 1
                self.handle(r, SnapshotTaken(self._secs(), upto))
            elif isinstance(a, LogReceived):
                for raw in a.envelopes:
                    packed, ghost = self._received_record(node, raw)
                    r.store.append(packed, ghost, received=True)
                self.handle(r, ReceivedLogged(self._secs(), r.store.last_seq))
            else:  # pragma: no cover - a new action kind the simulator must learn
                raise Failure(f"unknown action {a!r}")

    def _held(self, ghost: frozenset[int], context: CausalContext) -> frozenset[int]:
        """The writes of ``ghost`` whose dots ``context`` covers (a dotless write, a
        removal, is taken as held: what it removed was clipped with the dots)."""
        return frozenset(
            w for w in ghost if all(context.covers(*d) for d in self.wid_dots.get(w, ()))
        )

    def _received_record(self, node: Node, raw: Received) -> tuple[bytes, frozenset[int]]:
        """A received envelope as the store record a driver logs, and its ghost."""
        if isinstance(raw, Clipped):
            return (node.codec.encode_document(raw.document),
                    self._held(self.raw_ghost[raw.raw], raw.document.context))
        return node.codec.open(raw, None, keep_packed=True).packed_document, self.raw_ghost[raw]

    def _probe(self, r: Replica) -> bytes:
        assert r.machine is not None
        node = r.node
        probe = ORMap(None, r.machine.state.context.copy(), is_delta=True)
        return node.codec.seal(
            node.signer, subject=f"sync.{r.subject}", hlc=r.machine.clock.now(self._wall(node)),
            sequence=r.machine.sequence, document=probe,
        )

    def _publish(self, r: Replica, a: Publish) -> None:
        node, m = r.node, r.machine
        assert m is not None
        data = node.codec.seal(
            node.signer, subject=f"delta.{r.subject}", hlc=m.clock.now(self._wall(node)),
            sequence=a.sequence, document=a.document, packed=a.record,
        )
        bid = self.next_batch
        self.next_batch += 1
        self.batches[bid] = frozenset(r.unpublished)
        r.unpublished = set()
        self.trace.update(data)
        self.stats["published"] += 1
        for other in self._peers(node):
            self.send(node.name, other, "delta", (r.subject, data, bid))
        self.handle(r, Published(self._secs(), a.sequence, len(data)))

    def _peers(self, node: Node) -> list[str]:
        """Who a node's broadcasts reach: every other node, the Byzantine one included."""
        out = [o.name for o in self.nodes if o is not node]
        return [*out, BYZ] if self.byz is not None else out

    def _record_honest(self, node: Node, record: bytes) -> None:
        """What ``node``'s own write (its logged ``record``) puts under its dots, as the
        newest release reads it: the attribution check's reference."""
        newest = self._decode_stored(_codec(CURRENT_VERSION), record)
        for dot, entry in dot_entries(newest.store):
            self.honest_dots.setdefault(dot, set()).add(entry)
        for r, n in newest.context.dots():
            if r == node.name:
                self.issued[r] = max(self.issued[r], n)

    def _rejected(self, signer: str, reason: str) -> None:
        """A rejection by the driver (codec, clock drift, relay), counted against the signer
        the message claims (as ``broker/replica.py`` reports it)."""
        self.stats[f"rejected.{reason}"] += 1
        self.rejections[(signer, reason)] += 1

    def byz_bid(self, kind: str) -> int:
        """A batch id for a forged envelope of attack ``kind`` (it carries no honest write)."""
        bid = self.next_batch
        self.next_batch += 1
        self.batches[bid] = frozenset()
        self.byz_bids[bid] = kind
        return bid

    def _byz_failure(self, what: str) -> None:
        """Record a Byzantine-mode failure once per kind of failure (the run goes on, so the
        final checks show what the attack did)."""
        key = what.split(":", 1)[-1]
        if key not in self.byz_failures:
            self.byz_failures.add(key)
            self.failures.append(what)

    def _on_delta(self, node: Node, src: str, subject: str, data: bytes, bid: int) -> None:
        r = node.replicas[subject]
        assert r.machine is not None
        try:
            env = node.codec.open(data, self.roster)
            if env.subject != f"delta.{subject}" or not isinstance(env.document, ORMap):
                if env.writer == BYZ:  # the replica counts it against the signer
                    self._rejected(BYZ, "wrong_subject")
                    return
                raise Failure(f"{node.name}: wrong subject or kind on delta.{subject}")
            r.machine.clock.observe(env.hlc, self._wall(node))
        except (CodecError, ClockSkewError) as exc:
            self._rejected(src, type(exc).__name__)
            return
        self.stats["delivered"] += 1
        self.raw_bid.setdefault(data, bid)
        self.raw_ghost[data] = self.batches.get(bid, frozenset())
        actions = self.handle(r, DeltaReceived(self._secs(), env.writer, env.sequence,
                                               env.document, len(data), (bid,), raw=data,
                                               hlc=env.hlc))
        if env.writer == BYZ:
            # Every forged batch is rejected against its signer at once, or held by the
            # causal gate (then rejected when its hold ends, or lost with a crash), or its
            # claims of other writers' unseen dots are cut (a gate that cuts, not holds).
            if any(isinstance(a, Report) and a.event == "gated" and a.args == ("cut",)
                   for a in actions):
                self.byz_cut.add(bid)
            if any(isinstance(a, Report) and a.event == "gated" and a.args == ("held",)
                   for a in actions):
                r.byz_held += 1
            elif any(isinstance(a, Report) and a.event == "applied" and a.args == (bid,)
                     for a in actions):
                r.byz_held += 1  # joined at once (a failure, recorded by ``execute``)
            elif bid not in self.byz_cut and not any(
                isinstance(a, Report) and a.event == "rejected" and a.args[1] == BYZ
                for a in actions
            ):
                raise Failure(f"{node.name}/{subject}: a forged batch "
                              f"({self.byz_bids.get(bid)}) of {BYZ} was neither rejected "
                              "against it nor held")

    def _request_catchup(self, r: Replica, a: RequestCatchup) -> None:
        node = r.node
        req = self.next_req
        self.next_req += 1
        r.catchup_id, r.catchup_waiting = req, True
        self.stats["catchup_requests"] += 1
        if self.quiet:
            r.quiet_catchups += 1
        assert r.machine is not None
        r.catchup_asked = r.machine.state.context.copy()
        data = self._probe(r)
        for other in self._peers(node):
            self.send(node.name, other, "request",
                      (r.subject, data, req, a.peer, getattr(a, "full", False)))
        at = self.now_ms + int(a.timeout * 1000)
        self._at(at, "catchup_timeout", (node.name, node.incarnation, r.subject, req))

    def _on_request(
        self, node: Node, src: str, subject: str, data: bytes, req: int, target: str | None,
        full: bool,
    ) -> None:
        if target is not None and target != node.name:
            return
        r = node.replicas[subject]
        env = self._open_sync(node, src, subject, data)
        if env is None:
            return
        self.handle(r, SyncRequested(self._secs(), env.document.context, (src, req), full=full))

    def _send_state(self, r: Replica, a: SendState) -> None:
        node, m = r.node, r.machine
        assert m is not None
        doc = a.document
        packed = node.codec.encode_document(doc)
        data = node.codec.seal(
            node.signer, subject=f"sync.{r.subject}", hlc=m.clock.now(self._wall(node)),
            sequence=m.sequence, document=doc, is_state=not doc.is_delta, packed=packed,
        )
        if not doc.is_delta:
            # The bound: the responder's state (``doc`` is its live state) plus the envelope.
            bound = len(packed) + ENVELOPE_SLACK
            if len(data) > bound:
                raise Failure(f"catch-up reply of {len(data)} bytes over its bound {bound}")
            self.stats["catchup_bytes"] += len(data)
        bid = self.next_batch
        self.next_batch += 1
        self.batches[bid] = frozenset(r.ghost) if not doc.is_delta else frozenset()
        dst, req = a.reply_to
        # Other writers' signed batches and states, as they came, travel ahead of the answer
        # in the same message (the driver sends them first on the same inbox, in order).
        evidence = tuple((raw, self.raw_bid.get(raw, -1)) for raw in a.evidence)
        self.stats["evidence_sent"] += len(evidence)
        self.send(node.name, dst, "reply", (r.subject, data, req, bid, evidence, a.cut))

    def _on_reply(
        self, node: Node, src: str, subject: str, data: bytes, req: int, bid: int,
        evidence: tuple[tuple[bytes, int], ...] = (), cut: tuple[str, ...] = (),
    ) -> None:
        r = node.replicas[subject]
        if not r.catchup_waiting or r.catchup_id != req:
            return
        vouch = r.catchup_asked.copy() if r.catchup_asked is not None else None
        for raw, ebid in evidence:
            if r.machine is None:
                return
            if vouch is not None:  # as the driver: each writer's own dots in its evidence
                try:
                    eenv = node.codec.open(raw, self.roster)
                    if isinstance(eenv.document, ORMap):
                        vouch.merge(own_claims(eenv.document.context, eenv.writer))
                except CodecError:
                    pass  # refused: vouches for nothing (the handlers below count it)
            if raw in self.raw_bid:
                self._on_delta(node, src, subject, raw, ebid)
            else:
                self._on_state_evidence(node, src, subject, raw, ebid)
        r.catchup_waiting = False
        event: Event
        try:
            env = node.codec.open(data, self.roster, subject=f"sync.{subject}")
            doc = env.document
            if not isinstance(doc, ORMap) or (
                doc.is_delta and (doc.store or doc.context.size())
            ):
                raise Failure(f"{src} answered a catch-up with a bare context")
            if env.writer != src:
                # A state sealed by another replica, relayed as this one's answer: the
                # replica refuses it (its reply binding names the replier) and waits on.
                self._rejected(src, "relayed_reply")
                r.catchup_waiting = True
                return
            assert r.machine is not None
            try:  # as the driver's accept: an answer stamped past the drift bound is refused
                r.machine.clock.observe(env.hlc, self._wall(node))
            except ClockSkewError:
                self._rejected(src, "ClockSkewError")
                r.catchup_waiting = True
                return
            event = CatchupReplied(
                self._secs(), env.writer, env.sequence, doc, raw=data, hlc=env.hlc,
                vouch=vouch, cut=cut)
            self.raw_ghost[data] = self.batches[bid]
        except CodecError as exc:
            self._rejected(src, type(exc).__name__)
            event = CatchupFailed(self._secs(), "rejected")
        assert r.machine is not None
        actions = r.machine.handle(event)
        if bid in self.byz_bids and isinstance(event, CatchupReplied) and not any(
            isinstance(a, Report) and a.event in ("rejected", "stripped") and a.args[0 if
            a.event == "stripped" else 1] == BYZ
            for a in actions
        ):
            self._byz_failure(f"{node.name}/{subject}: attack (h): a forged catch-up state of "
                              f"{BYZ} was taken without a rejection against it")
        if any(isinstance(a, Report) and a.event == "catchup" and a.args == ("ok",)
               for a in actions):
            r.ghost |= self._held(self.batches[bid], r.machine.state.context)
        self.execute(r, actions)

    def _on_state_evidence(
        self, node: Node, src: str, subject: str, data: bytes, bid: int
    ) -> None:
        """A writer's own full state, forwarded by ``src`` as evidence with its answer."""
        r = node.replicas[subject]
        if r.machine is None:
            return
        try:
            env = node.codec.open(data, self.roster, subject=f"sync.{subject}")
            if not isinstance(env.document, ORMap) or env.document.is_delta:
                raise Failure(f"{src} forwarded evidence that is not a full state")
        except CodecError as exc:
            self.stats[f"rejected.{type(exc).__name__}"] += 1
            return
        self.stats["state_evidence"] += 1
        actions = r.machine.handle(
            StateEvidence(self._secs(), env.writer, env.document, data, env.hlc))
        r.ghost |= self._held(self.raw_ghost.get(data, frozenset()), r.machine.state.context)
        self.execute(r, actions)

    def _open_sync(self, node: Node, src: str, subject: str, data: bytes) -> Envelope | None:
        """A peer's sync-subject envelope (request or announce) as ``node`` reads it; None
        when refused (counted) or not a peer's OR-map."""
        try:
            env = node.codec.open(data, self.roster, subject=f"sync.{subject}")
        except CodecError as exc:
            self._rejected(src, type(exc).__name__)
            return None
        if env.writer == node.name or not isinstance(env.document, ORMap):
            return None
        if env.writer != src:  # another's announce or request, relayed: not its signer's
            self._rejected(src, "relayed_sync")
            return None
        return env

    def _on_announce(self, node: Node, src: str, subject: str, data: bytes) -> None:
        r = node.replicas[subject]
        env = self._open_sync(node, src, subject, data)
        if env is None:
            return
        self.handle(
            r, AnnounceReceived(self._secs(), env.writer, env.document.context, env.sequence)
        )

    def _ev_timer(self, name: str, inc: int, subject: str, timer: str, at: float) -> None:
        node = self.by_name[name]
        if node.up and node.incarnation == inc:
            # A timer fires at its time or later, never a rounding error before it.
            self.handle(node.replicas[subject], TimerFired(max(self._secs(), at), timer))

    def _ev_catchup_timeout(self, name: str, inc: int, subject: str, req: int) -> None:
        node = self.by_name[name]
        r = node.replicas[subject]
        if node.up and node.incarnation == inc and r.catchup_waiting and r.catchup_id == req:
            r.catchup_waiting = False
            self.handle(r, CatchupFailed(self._secs(), "no_peer"))

    # -- steps ------------------------------------------------------------------------------

    def step(self, s: Step) -> None:
        """Apply one schedule step (then time moves on by 3 ms)."""
        kind = s[0]
        self.stats[f"step.{kind}"] += 1
        if kind == "w":
            self.write(self.nodes[s[1]], self.subjects[s[2] % len(self.subjects)], s[3:])
        elif kind == "burst":
            for i in range(s[5]):
                self.write(self.nodes[s[1]], self.subjects[s[2] % len(self.subjects)],
                           ["inc", s[3], s[4], 1 + i % 2])
                self.advance(self.now_ms + 10)  # past the flush window: one batch each
        elif kind == "crash":
            node = self.nodes[s[1]]
            if node.up:
                node.up = False
                node.incarnation += 1
                for r in node.replicas.values():
                    r.machine = None
                    r.catchup_waiting = False
                    r.byz_held = 0  # held deltas live in memory: lost with it
        elif kind == "restart":
            node = self.nodes[s[1]]
            if not node.up:
                self.restart(node, s[2])
        elif kind == "part":
            names = [{self.nodes[i].name for i in g if i < len(self.nodes)} for g in s[1]]
            self.groups = names
        elif kind == "unpart":
            # A partition is a lost connection: each node's client reconnects when it heals.
            if self.groups is not None:
                self.groups = None
                self._reconnect_all()
        elif kind == "faults":
            self.drop, self.dup = s[1], s[2]
        elif kind == "calm":
            # Losses come from connection trouble (a server restart, a slow consumer): the
            # client sees its connection come back when they end. Silent loss without any
            # such sign is left to the healer by design and not simulated.
            if self.drop or self.dup:
                self.drop = self.dup = 0.0
                self._reconnect_all()
        elif kind == "tick":
            self.advance(self.now_ms + s[1])
        elif kind == "byz" and self.byz is not None:
            self.byz.attack(s)
        self.advance(self.now_ms + 3)

    def _reconnect_all(self) -> None:
        for node in self.nodes:
            if node.up:
                for r in node.replicas.values():
                    self.handle(r, Reconnected(self._secs()))

    def restart(self, node: Node, version: int) -> None:
        """Start a node again, pinned to ``version`` (an upgrade or downgrade)."""
        node.up = True
        node.incarnation += 1
        if version != node.version:
            self.stats["version_changes"] += 1
        node.version = version
        node.codec = _codec(version)
        for r in node.replicas.values():
            self._load(r)

    def write(self, node: Node, subject: str, op: list[Any]) -> None:
        """One local write, committed (logged) and then acknowledged."""
        if not node.up:
            return
        r = node.replicas[subject]
        m = r.machine
        assert m is not None
        tree = m.tree
        kind, nid = op[0], op[1]
        fn: TreeOp | Callable[[Tree, str, int], ORMap]
        path: tuple[str, ...]
        arg: Any = None
        if kind in ("enable", "disable") and node.version < 2:
            return  # a v1 release has no flags
        if kind == "create":
            if nid in tree or op[2] not in tree:
                return
            fn, path, arg = Create(nid, op[2]), (nid, "parent"), op[2]
        elif kind == "move":
            if nid not in tree or op[2] not in tree or op[2] == nid:
                return
            if op[2] in tree.descendants(nid):
                return
            fn, path, arg = Move(nid, op[2]), (nid, "parent"), op[2]
        elif nid not in tree:
            # A field write on a worknode this writer does not see creates it first.
            fn, path, arg, kind = Create(nid, ROOT_ID), (nid, "parent"), ROOT_ID, "create"
        elif kind == "delete":
            doomed = (nid, *tree.descendants(nid))

            def fn(t: Tree, rid: str, ts: int, nid: str = nid) -> ORMap:
                return t.delete(nid)

            path, arg = (nid,), frozenset(doomed)
        else:
            fpath = tuple(op[2])
            path, arg = (nid, "fields", *fpath), op[3]
            full = path
            if kind == "lww":
                fn = Assign(nid, fpath, arg)
            elif kind == "inc":
                fn = Increment(nid, fpath, arg)
            elif kind == "add":
                fn = Add(nid, fpath, arg)
            elif kind == "mv":
                def fn(t: Tree, rid: str, ts: int, p: Any = fpath, v: Any = arg) -> ORMap:
                    return t.assign_multi(rid, nid, p, v)
            elif kind == "discard":
                def fn(t: Tree, rid: str, ts: int, p: Any = fpath, v: Any = arg) -> ORMap:
                    return t.discard(rid, nid, p, v)
            elif kind == "enable":
                def fn(t: Tree, rid: str, ts: int, p: Any = full) -> ORMap:
                    return t.state.enable(rid, p)
            elif kind == "disable":
                def fn(t: Tree, rid: str, ts: int, p: Any = full) -> ORMap:
                    return t.state.disable(p)
            elif kind == "rmfield":
                def fn(t: Tree, rid: str, ts: int, p: Any = fpath) -> ORMap:
                    return t.remove_field(nid, p)
            else:  # pragma: no cover
                raise Failure(f"unknown op {kind}")
        wall = self._wall(node)
        try:
            written = m.write([fn], lambda: wall)
        except (WorknodeError, TreeError) as exc:
            self.stats[f"write_refused.{type(exc).__name__}"] += 1
            return
        record = node.codec.encode_document(written.delta)
        if self.byz is not None:
            self._record_honest(node, record)
        # The received state the write was applied over is logged first (finding F9).
        for raw in written.received:
            packed, ghost = self._received_record(node, raw)
            r.store.append(packed, ghost, received=True)
        wid = self.next_wid
        self.next_wid += 1
        self.wid_dots[wid] = frozenset(
            d for d in written.delta.context.dots() if d[0] == node.name)
        seq = r.store.append(record, frozenset({wid}))
        # Committed: acknowledged now. What the writer had joined is the write's history.
        mkind = "lww" if kind in ("create", "move") else kind  # a parent is an LWW register
        self.writes[subject].append(
            Write(wid, node.name, mkind, path, arg, m.clock.last, frozenset(r.ghost))
        )
        r.ghost.add(wid)
        r.unpublished.add(wid)
        self.stats["acked"] += 1
        self._log("ack", wid, node.name, kind, path, arg, m.clock.last)
        self.handle(r, Committed(self._secs(), written.delta, written.ops, len(record), seq,
                                 record))

    # -- end of run: quiesce, catch-up check, heal, verdict -----------------------------------

    def finish(self) -> None:
        """Stop the faults, restart every node, let catch-up settle, check, heal, check."""
        self.step(["calm"])
        self.step(["unpart"])
        self.quiet = True
        for node in self.nodes:
            if not node.up:
                self.restart(node, node.version)
        if not self.settle(QUIET_LIMIT_MS):
            raise Failure("catch-up did not settle (events still pending) after the faults stopped")
        # One write per node and subject after the faults: every loss becomes a visible gap.
        for node in self.nodes if self.setup.get("epilogue", True) else ():
            for s in self.subjects:
                self.write(node, s, ["create", f"z{node.name}", ROOT_ID])
            self.advance(self.now_ms + 3)
        if not self.settle(QUIET_LIMIT_MS):
            raise Failure("catch-up did not settle (events still pending) after the last writes")
        bound = MAX_QUIET_CATCHUPS + (BYZ_QUIET_CATCHUPS if self.byz is not None else 0)
        for node in self.nodes:
            for r in node.replicas.values():
                self.stats["max_quiet_catchups"] = max(self.stats["max_quiet_catchups"],
                                                       r.quiet_catchups)
                if r.quiet_catchups > bound:
                    raise Failure(f"{node.name}/{r.subject}: {r.quiet_catchups} catch-ups once "
                                  f"faults stopped (bound {bound})")
        for s in self.subjects:
            for node in self.nodes:
                self._check_reload(node.replicas[s])
            try:
                self._check_converged(s, "without the healer (catch-up)")
            except Failure as exc:  # recorded; the healer and the model are still checked
                self.failures.append(str(exc))
        for s in self.subjects:
            self.heal(s)
            self._check_converged(s, "after healing")
            if self.byz is not None:
                self._check_attribution(s)
            self._check_model(s)
        if self.byz is not None:
            self._check_byzantine()

    # -- Byzantine mode (tests.sim.byzantine) -------------------------------------------------

    def push_forged(self, target: str, subject: str, delta: ORMap) -> None:
        """Attack (i): a forged repair delta pushed to ``target`` through the heal's own path
        (``_push``: sealed by the healer's identity), as a compromised healer key would. It
        must be rejected and counted against the healer (or the Byzantine node)."""
        node = self.by_name[target]
        if not node.up:
            return
        before = sum(v for (w, _), v in self.rejections.items() if w in (BYZ, "healer"))
        self._push(node.replicas[subject], delta)
        after = sum(v for (w, _), v in self.rejections.items() if w in (BYZ, "healer"))
        if after == before:
            self._byz_failure(f"{target}/{subject}: attack (i): a forged repair pushed by the "
                              "healer's key was applied without a rejection against it")

    def _check_attribution(self, s: str) -> None:
        """Attribution and claims on every honest replica of ``s`` (``tests.sim.byzantine``):
        checked before the model, so that a forged entry is named as such."""
        honest = {n.name for n in self.nodes}
        for node in self.nodes:
            r = node.replicas[s]
            if r.byz_held:
                raise Failure(f"{node.name}/{s}: {r.byz_held} forged batches of {BYZ} "
                              "still held at the end (neither rejected nor applied)")
            newest = self._newest(r)
            for dot, entry in dot_entries(newest.store):
                if dot[0] not in honest:
                    raise Failure(f"{node.name}/{s}: an entry under {dot}, a dot of no "
                                  f"honest writer: {entry!r}")
                if entry not in self.honest_dots.get(dot, ()):
                    raise Failure(f"{node.name}/{s}: forged attribution: {dot[0]} never "
                                  f"wrote {entry!r} under {dot}")
            ctx = newest.context
            for w in {*ctx.version_vector, *(d[0] for d in ctx.cloud)}:
                if w not in honest or ctx.max_counter(w) > self.issued[w]:
                    raise Failure(f"{node.name}/{s}: context claims {w}'s dot "
                                  f"{ctx.max_counter(w)}, past the last it issued "
                                  f"({self.issued[w]})")

    def _check_byzantine(self) -> None:
        """The rest of the goal's properties (see ``tests.sim.byzantine``): the attacks were
        counted, and no honest node is bricked."""
        for w, n in self.issued.items():
            if n * 2 > BYZ_WIPE_AHEAD:  # the wipe's claims must stay unbacked in a run
                raise Failure(f"{w} issued {n} dots: too many for the wipe attack's bound")
        sent = sum(v for k, v in self.stats.items() if k.startswith("byz.sent."))
        counted = sum(v for (w, _), v in self.rejections.items() if w == BYZ)
        self.stats["byz.rejected"] += counted
        if sent and not counted:
            raise Failure(f"{sent} forged messages sent, none rejected against {BYZ}")
        # No brick: every honest replica reloads from its store, keeps its next dot and its
        # clock in range, and writes and publishes once more; all converge on the model.
        for node in self.nodes:
            node.up = False
            node.incarnation += 1
            self.restart(node, node.version)
        for node in self.nodes:
            for s in self.subjects:
                m = node.replicas[s].machine
                assert m is not None
                if m.clock.last >= 2**62 or m.state.context.max_counter(node.name) >= 2**62:
                    raise Failure(f"{node.name}/{s}: clock or own dot bricked after reload "
                                  f"(clock {m.clock.last})")
                before = self.stats["acked"]
                self.write(node, s, ["create", f"y{node.name}", ROOT_ID])
                if self.stats["acked"] == before:
                    raise Failure(f"{node.name}/{s}: cannot write after the attacks")
            self.advance(self.now_ms + 3)
        if not self.settle(QUIET_LIMIT_MS):
            raise Failure("catch-up did not settle after the Byzantine checks' writes")
        for s in self.subjects:
            self._check_converged(s, "after the attacks, a reload and one write each")
            self._check_attribution(s)
            self._check_model(s)

    def _newest(self, r: Replica) -> ORMap:
        """The replica's state as the newest release reads it (through the codecs)."""
        assert r.machine is not None
        data = r.node.codec.encode_document(r.machine.state)
        return self._decode_stored(_codec(CURRENT_VERSION), data)

    def _check_converged(self, subject: str, when: str) -> None:
        digests = {}
        contents = set()
        contexts = set()
        for node in self.nodes:
            newest = self._newest(node.replicas[subject])
            digests[node.name] = newest.digest()
            contents.add(canonical_bytes(newest.store))
            ctx = newest.context
            contexts.add(repr((sorted(ctx.version_vector.items()), sorted(ctx.cloud))))
        if len(set(digests.values())) > 1:
            groups: dict[bytes, list[str]] = {}
            for n, d in digests.items():
                groups.setdefault(d, []).append(n)
            what = ""
            if len(contents) == 1:
                what = " (equal contents, causal contexts differ)"
            elif len(contexts) == 1:
                what = " (equal causal contexts, contents differ)"
            raise Failure(f"{subject}: replicas differ {when}{what}: "
                          + " | ".join(",".join(g) for g in groups.values()))

    def _check_reload(self, r: Replica) -> None:
        """The state passes through its own codec (as a snapshot would) naming no bad key."""
        data = r.node.codec.encode_document(self._state(r))
        bad: list[tuple[str, str]] = []
        r.node.codec.decode_document(data, ORMap, bad_keys=bad)
        if bad:
            raise Failure(f"{r.node.name}/{r.subject}: state refused by its own codec: {bad}")

    def _check_model(self, subject: str) -> None:
        expected = expected_value(self.writes[subject])
        for node in self.nodes:
            r = node.replicas[subject]
            assert r.machine is not None
            self._check_reload(r)
            newest = self._newest(r)
            actual = normal(newest.value())
            if actual != expected:
                raise Failure(f"{node.name}/{subject}: value differs from the model:\n"
                              f"  replica {actual!r}\n  model   {expected!r}")
            problems = tree_problems(Tree(newest))
            if problems:
                raise Failure(f"{node.name}/{subject}: tree invariants: {problems}")
        for w in self.writes[subject]:
            for v in self.writes[subject]:
                if v.wid in w.seen and v.kind == w.kind == "lww" and v.path == w.path \
                        and (v.hlc, v.writer) >= (w.hlc, w.writer):
                    self.stats["hlc_inversions"] += 1

    def heal(self, subject: str) -> None:
        """Heal ``subject`` with ``broker.healing.HealPlanner`` (hub, groups, rounds, stop
        rules): root views from each replica's Merkle tree over ``item_digest``, pairs
        reconciled with ``Reconciliation`` at the planner's widths, entries fetched as sealed
        bytes (replica codec -> healer codec), repairs pushed as sealed bytes (healer codec
        -> replica codec) and logged. Then a second heal must find nothing to do."""
        result = self._heal_once(subject, b"")
        for _ in range(3):
            # A heal whose receivers owe a catch-up (dots their repair's source could not
            # vouch for) ends "catchup": the network runs it, then the heal goes on.
            if result.converged or result.reason != "catchup":
                break
            self.stats["heal_catchups"] += 1
            self.settle(QUIET_LIMIT_MS)
            result = self._heal_once(subject, b"")
        if not result.converged:
            raise Failure(f"{subject}: heal did not converge ({result.reason}: "
                          f"{result.keys_repaired} repaired in {result.rounds} rounds)")
        self.stats["heal_rounds"] += result.rounds
        again = self._heal_once(subject, result.agreed)
        if not again.converged or again.keys_repaired or again.divergent_keys:
            raise Failure(f"{subject}: the heal after a converged heal found "
                          f"{again.divergent_keys} keys differing ({again.reason})")

    def _tree(self, r: Replica) -> MerkleTree:
        store = self._state(r).store or {}
        return MerkleTree.build([(k, item_digest(k, v, SECRET)) for k, v in store.items()],
                                key=SECRET)

    def _heal_once(self, subject: str, agreed: bytes) -> HealResult:
        replicas = {n.name: n.replicas[subject] for n in self.nodes}
        planner = HealPlanner(subject, sorted(replicas), HealPolicy(max_rounds=MAX_HEAL_PASSES),
                              agreed=agreed)
        while not planner.done:
            for action in planner.next_actions():
                if isinstance(action, AskRoots):
                    planner.receive_roots(
                        {n: self._root_view(replicas[n], action) for n in action.nodes}
                    )
                else:
                    planner.receive_repair(action, self._repair(replicas, action))
        return planner.result()

    def _root_view(self, r: Replica, ask: AskRoots) -> RootView:
        t = self._tree(r)
        levels: tuple[bytes, ...] = ()
        if t.root() != ask.unless:
            levels = tuple(
                t.level_values(level, range(t.fanout**level), ask.width)
                for level in range(1, min(ask.levels, t.depth - 1) + 1)
            )
        return RootView(r.node.name, t.root(), t.count(),
                        dict(self._state(r).context.version_vector), TREE_SCHEME, t.fanout,
                        t.depth, levels, ask.width)

    def _repair(self, replicas: dict[str, Replica], pair: RepairPair) -> PairResult:
        left, right = pair.left, pair.right
        width = left.width
        rec = Reconciliation(
            RootInfo(left.root, left.count, left.fanout, left.depth, left.versions,
                     left.levels, width, left.scheme),
            RootInfo(right.root, right.count, right.fanout, right.depth, right.versions,
                     right.levels, width, right.scheme),
        )
        trees = {Side.LEFT: self._tree(replicas[left.node]),
                 Side.RIGHT: self._tree(replicas[right.node])}
        waves = 0
        while not rec.done:
            waves += 1
            for req in rec.next_requests():
                t = trees[req.side]
                if isinstance(req, LeafRequest):
                    leaves = t.leaves(req.prefixes)
                    rec.receive_leaves(
                        req.side, {p: [(k, d[-width:]) for k, d in v] for p, v in leaves.items()}
                    )
                else:
                    rec.receive_nodes(req.side, node_answer(t, req.prefixes, width))
        keys = tuple(sorted(rec.result().keys))
        if not keys:
            return PairResult(0, 0, waves)
        (a, raw_a, hlc_a) = self._fetch(replicas[left.node], keys)
        (b, raw_b, hlc_b) = self._fetch(replicas[right.node], keys)
        to_left, to_right = repair_deltas(a, b, keys)  # what to push (the healer decides)
        bound = HEAL_BYTES_FACTOR * sum(
            len(r.node.codec.encode_document(self._state(r))) for r in replicas.values()
        ) + ENVELOPE_SLACK * 2 * len(replicas)
        moved = pushed = owed = 0
        # Vouched repairs: each group gets the other side's own signed fetch reply, and
        # computes and keeps of it what that source vouches for (``Replica.apply_voucher``).
        for group, delta, (raw, hlc) in ((pair.left_group, to_left, (raw_b, hlc_b)),
                                         (pair.right_group, to_right, (raw_a, hlc_a))):
            if not delta.store:
                continue
            for name in group:
                got, stripped = self._push_voucher(replicas[name], raw, hlc)
                moved += got
                owed += stripped
                pushed += len(delta.store or ())
        if moved > bound:
            raise Failure(f"{pair.subject}: a heal pair moved {moved} bytes, over its bound "
                          f"{bound}")
        self.stats["heal_keys"] += len(keys)
        self.stats["heal_bytes"] += moved
        return PairResult(len(keys), pushed, waves + 2, owed)

    @staticmethod
    def _state(r: Replica) -> ORMap:
        assert r.machine is not None
        return r.machine.state

    def _fetch(self, r: Replica, keys: tuple[str, ...]) -> tuple[ORMap, bytes, int]:
        """A replica's fetch reply (its ``subset`` of ``keys``, absent keys named), sealed
        by it: the document as the healer reads it, the envelope, its timestamp."""
        node = r.node
        assert r.machine is not None
        hlc = r.machine.clock.now(self._wall(node))
        data = node.codec.seal(node.signer, subject=f"fetch.{r.subject}", hlc=hlc, sequence=0,
                               document=subset(r.machine.state, keys, absent=True))
        self.stats["heal_bytes"] += len(data)
        env = self.healer_codec.open(data, self.roster, subject=f"fetch.{r.subject}")
        assert isinstance(env.document, ORMap)
        return env.document, data, hlc

    def _push_voucher(self, r: Replica, data: bytes, hlc: int) -> tuple[int, int]:
        """Repair ``r`` from a source's fetch reply ``data`` as the apply endpoint does:
        sealed by a roster node other than ``r``'s, then ``vouched`` against ``r``'s state,
        claims of later writes dropped, the kept delta logged and joined. Returns (bytes
        moved, writers owed a catch-up)."""
        node = r.node
        m = r.machine
        assert m is not None
        env = node.codec.open(data, self.roster, subject=f"fetch.{r.subject}")
        if env.writer == node.name or not isinstance(env.document, ORMap):
            raise Failure(f"{node.name}/{r.subject}: a voucher of its own or not an OR-map")
        kept = vouched(env.document, env.writer, m.state, hlc)
        if kept.document is None:
            raise Failure(f"{node.name}/{r.subject}: an honest voucher of {env.writer} refused "
                          f"({kept.reason})")
        document = m.without_later_claims(kept.document, env.writer, hlc)
        stripped = tuple(sorted(kept.stripped))
        seq = r.store.append(node.codec.encode_document(document), frozenset(), received=True)
        self.handle(r, RepairApplied(self._secs(), document, seq, stripped, hlc))
        return len(data), len(stripped)

    def _push(self, r: Replica, delta: ORMap) -> int:
        """A repair sealed by the healer itself (only attack (i) sends one): the apply
        endpoint refuses it, counted against the healer (``unvouched_repair``)."""
        node = r.node
        data = self.healer_codec.seal(self.healer_signer, subject=f"apply.{r.subject}", hlc=0,
                                      sequence=0, document=delta)
        env = node.codec.open(data, self.roster, subject=f"apply.{r.subject}")
        if env.writer == "healer":
            self._rejected("healer", "unvouched_repair")
            return 0
        raise Failure(f"{node.name}/{r.subject}: a healer-sealed repair of {env.writer}")


def run(
    seed: int,
    steps: int = 60,
    *,
    nodes: int | None = None,
    schedule: tuple[dict[str, Any], list[Step]] | None = None,
    byzantine: int = 0,
    relay: bool = False,
    repair: bool = False,
    preclaim: bool = False,
) -> Result:
    """One simulated run; never raises: failed checks and escaped exceptions are the verdict
    (``Result.failure``, one line per failed check). ``byzantine``/``relay``/``repair``: see
    ``make_schedule``."""
    setup, sched = schedule if schedule is not None else make_schedule(
        seed, steps, nodes, byzantine=byzantine, relay=relay, repair=repair,
        preclaim=preclaim)
    failures: list[str] = []
    world: World | None = None
    try:
        world = World(seed, setup)
        for s in sched:
            world.step(s)
        world.finish()
    except Failure as exc:
        failures.append(str(exc))
    except Exception as exc:
        tb = traceback.format_exc(limit=-4)
        failures.append(f"exception escaped: {type(exc).__name__}: {exc}\n{tb}")
    if world is not None:
        failures[:0] = world.failures
    stats: Counter[str] = world.stats if world is not None else Counter()
    trace = world.trace.hexdigest() if world is not None else ""
    return Result(seed, not failures, "\n".join(failures), trace, stats, len(sched),
                  setup["nodes"], tuple(setup["versions"]))
