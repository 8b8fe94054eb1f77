"""The simulation's Byzantine node: a roster *node* key (its signatures verify) that plays
issue 17's attacks on a seeded schedule, and the checks of the goal's properties.

What the Byzantine node does (``Byzantine.attack``, one schedule step ``["byz", attack,
target, salt]`` each; target -1 sends to every honest node):

- ``forge``: a delta batch it signs carrying dots of an honest node ``(h, n)``, n just above
  the highest it saw, with fabricated values (forged attribution);
- ``silence``: an empty delta, or full state, whose context claims ``h``'s next 10**6 dots;
- ``wipe``: a full state (``is_delta`` False) with an empty store and a context of every
  version vector it knows + 10**4;
- ``brick``: a context claiming ``{h: 2**63-1}``, or an entry of its own at a counter between
  2**62 and 2**63;
- ``clock``: an entry of its own stamped near 2**63 (the envelope's timestamp honest, or near
  2**63 as well);
- ``garbage``: random bytes as a signed envelope's body; a forged envelope's body with bytes
  flipped, signed again (sent only if it still decodes to a document with a foreign dot, or
  does not decode); a valid envelope holding a random document built around forged entries;
- ``replay``: an honest delta it captured sent again (from its own connection), an honest
  announce, catch-up request or catch-up reply relayed as its own, or one of its own forged
  envelopes again; ``dup`` sends one forged envelope twice at once;
- ``announce``: a signed announce whose context is forged (silence or brick claims);
- with ``setup["byz_relay"]`` (attack (h)): it answers honest catch-up requests (as
  ``World._send_state`` does) with forged *states*: forged attribution, silence, wipe, brick,
  timestamps near 2**63;
- with ``setup["byz_preclaim"]``: ``preclaim``, an empty delta claiming an honest writer's
  next 1-3 dots *before it issues them*: a removal of writes the signer cannot have
  observed, which the causal gate holds until the writer's own batch backs the claim;
- with ``setup["byz_repair"]`` (attack (i), a compromised healer key): ``repair`` pushes a
  forged repair delta through the simulator's repair path (``World._push``: sealed by the
  healer's identity, opened by the replica, ``RepairApplied``).

It never issues a legitimate-but-malicious write (a removal of entries it observed, a write
under its own next dot): every document it sends holds an entry no honest node could have
signed, or claims dots no honest node will ever issue in a run, or is not decodable. So the
sequential model of the *honest* acknowledged writes stays exact, and any trace of the
Byzantine node in an honest replica is a failure.

Checks (``check_final``), over honest replicas only: the model and convergence checks of
``World`` (the Byzantine node has no replica there); **attribution**: every entry under an
honest writer's dot equals an entry that writer's own write put there (``dot_entries`` of
the writers' deltas), and no entry holds a dot of the Byzantine node; **claims**: no honest
replica's context claims a dot of an honest writer beyond the last it issued; **no brick**:
every replica reloads from its store, its next dot and clock stay in range, and it writes and
publishes once more. **Counted**: every forged envelope delivered to a live replica is
rejected and reported against the Byzantine id (``Report("rejected", (reason, "byz"))`` or a
driver rejection naming it), or held by the causal gate and rejected when its hold ends, or
lost with the replica's memory at a crash; none is ever applied.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Final

from broker.codec import CURRENT_VERSION, Signer, WireCodec
from broker.crdt import CausalContext, HybridClock, ORMap
from broker.crdt._hlc import LOGICAL_BITS
from broker.crdt._stores import KindStore, MapStore, SetStore, Whole
from broker.errors import CodecError, WorknodeError

if TYPE_CHECKING:
    from tests.sim.world import World

__all__ = [
    "ATTACKS",
    "BYZ",
    "REPAIR_ATTACKS",
    "Byzantine",
    "byz_step",
    "dot_entries",
]

BYZ: Final = "byzantine"
"""The Byzantine node's id (a roster node). Longer than any honest id (``n0``..``n6``), so a
flipped byte of a forged body never turns an honest id into it."""
ATTACKS: Final = ("forge", "silence", "wipe", "brick", "clock", "garbage", "replay", "dup",
                  "announce")
"""Attacks on the delta and sync paths, always on in Byzantine mode."""
REPAIR_ATTACKS: Final = ("repair",)
"""Attacks through the healer's repair path (``setup["byz_repair"]``)."""
PRECLAIM_ATTACKS: Final = ("preclaim",)
"""A removal claiming an honest writer's next 1-3 dots before they exist
(``setup["byz_preclaim"]``): the gate holds it until the writer issues them, then joins it."""
FAR: Final = 10**6
"""How far past an honest writer's last dot a silence claim reaches (never issued in a run)."""
WIPE_AHEAD: Final = 10**4
"""How far past every version vector a wipe claims (no honest writer issues that many dots
in a run: ``check_final`` asserts it)."""
FORGED_VALUE: Final = 10**6
"""Fabricated register values start here (honest writes use values below 100)."""

Dot = tuple[str, int]
TOP: Final = 2**63 - 1


def byz_step(rng: random.Random, n: int, *, repair: bool, preclaim: bool = False) -> list[Any]:
    """One Byzantine schedule step: ``["byz", attack, target (-1: all), salt]``."""
    attacks = ATTACKS + (REPAIR_ATTACKS if repair else ()) + (
        PRECLAIM_ATTACKS if preclaim else ())
    target = rng.randrange(n) if rng.random() < 0.5 else -1
    return ["byz", rng.choice(attacks), target, rng.randrange(2**31)]


def dot_entries(entry: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Dot, tuple[Any, ...]]]:
    """Every ``(dot, (path, kind, payload))`` held under ``entry``: what a dot stands for."""
    if entry is None:
        return
    t = type(entry)
    if t is Whole:
        yield from dot_entries(entry.store, path)
    elif t is MapStore:
        for k, child in entry.items():
            yield from dot_entries(child, (*path, k))
    elif t is KindStore:
        for kind, store in entry.items():
            yield from dot_entries(store, (*path, int(kind)))
    elif t is SetStore:
        for element, ds in entry.items():
            for i in range(0, len(ds), 2):
                yield (ds[i], ds[i + 1]), (path, "set", element)
    else:
        s = entry.STRIDE
        for i in range(0, len(entry), s):
            yield (entry[i], entry[i + 1]), (path, int(entry.KIND), tuple(entry[i + 2 : i + s]))


class Byzantine:
    """The Byzantine node of one run (see the module doc)."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.signer = Signer(BYZ, hashlib.sha256(BYZ.encode()).digest())
        self.codec = WireCodec(CURRENT_VERSION, peer_version=1)
        self.clock = HybridClock()
        self.rng = random.Random(f"byz-{world.seed}")
        self.sequence = 0
        self.relay = bool(world.setup.get("byz_relay"))
        self.answer_rate = float(world.setup.get("byz_answer", 0.5))
        # What it saw: the join of every honest context it captured, per subject.
        self.seen: dict[str, CausalContext] = {s: CausalContext() for s in world.subjects}
        self.deltas: list[tuple[str, bytes, int]] = []  # honest deltas: subject, bytes, bid
        self.syncs: list[tuple[str, str, bytes]] = []  # honest announces/replies: kind, ...
        self.own: list[tuple[str, str, bytes, int, str]] = []  # what, subject, bytes, bid, kind
        self.requests: list[tuple[str, str, int]] = []  # honest catch-ups: node, subject, req

    # -- what it hears ------------------------------------------------------------------------

    def receive(self, src: str, what: str, subject: str, data: bytes, *args: Any) -> None:
        """A message the network delivered to the Byzantine node."""
        try:
            env = self.codec.open(data, self.world.roster)
        except CodecError:
            return
        if isinstance(env.document, ORMap):
            self.seen[subject].merge(env.document.context)
        if what == "delta":
            self.deltas = [*self.deltas[-63:], (subject, data, args[0])]
        elif what in ("announce", "reply"):
            self.syncs = [*self.syncs[-63:], (what, subject, data)]
        elif what == "request":
            self.syncs = [*self.syncs[-63:], (what, subject, data)]
            req, target = args[0], args[1]
            self.requests = [*self.requests[-15:], (src, subject, req)]
            if self.relay and target in (None, BYZ) and self.rng.random() < self.answer_rate:
                self._answer(src, subject, req)

    # -- forged documents ---------------------------------------------------------------------

    def _honest(self) -> str:
        return self.rng.choice([n.name for n in self.world.nodes])

    def _top(self, subject: str, h: str) -> int:
        """The highest dot of ``h`` it saw (bounded: a forged claim an honest replica took
        and announced must not make its next forgery unencodable)."""
        return min(self.seen[subject].max_counter(h), 2**62)

    def _next_base(self, subject: str, h: str) -> int:
        """The dot below ``h``'s next one as forgeries use it: past every dot ``h`` issued so
        far (the run's truth, not only what this node saw). A forged entry under a dot ``h``
        had already issued is another attack: the receiver has seen that dot, so the forged
        entry is never joined, but the state's claim of it removes ``h``'s real entry — a
        removal of what a writer could have read, which a stolen key may do (README,
        "Byzantine writers") and which the model of honest writes does not play."""
        return max(self._top(subject, h), min(self.world.issued[h], 2**62))

    def _hlc(self) -> int:
        return self.clock.now(self.world._wall_byz())

    def _forge(self, subject: str) -> ORMap:
        """A batch of fabricated writes under an honest writer's next dots."""
        h = self._honest()
        top = self._next_base(subject, h)
        base = ORMap(None, CausalContext({h: top}) if top else CausalContext())
        out = ORMap(is_delta=True)
        nid = self.rng.choice(("a", "b", "c", "zforged"))
        for _ in range(self.rng.randint(1, 3)):
            op = self.rng.randrange(4)
            value = FORGED_VALUE + self.rng.randrange(1000)
            if op == 0:
                d = base.assign(h, (nid, "fields", "lww"), value, self._hlc())
            elif op == 1:
                d = base.increment(h, (nid, "fields", "cnt"), self.rng.randint(1, 99))
            elif op == 2:
                d = base.add(h, (nid, "fields", "set"), self.rng.randrange(50, 60))
            else:
                d = base.assign(h, (nid, "parent"), "root", self._hlc())
            base.merge(d)
            out.merge(d)
        return out

    def _silence(self, subject: str, full: bool) -> ORMap:
        h = self._honest()
        return ORMap(None, CausalContext({h: self._top(subject, h) + FAR}), is_delta=not full)

    def _wipe(self, subject: str) -> ORMap:
        vv = self.seen[subject].version_vector
        names = {n.name for n in self.world.nodes} | set(vv)
        return ORMap(None, CausalContext({n: min(vv.get(n, 0) + WIPE_AHEAD, TOP)
                                          for n in names}), is_delta=False)

    def _brick(self, subject: str) -> ORMap:
        if self.rng.random() < 0.5:
            return ORMap(None, CausalContext({self._honest(): 2**63 - 1}),
                         is_delta=self.rng.random() < 0.5)
        counter = self.rng.randrange(2**62, 2**63 - 2)
        base = ORMap(None, CausalContext({BYZ: counter}))
        return base.assign(BYZ, (self.rng.choice(("a", "zb")), "fields", "lww"),
                           FORGED_VALUE, self._hlc())

    def _clock_doc(self, subject: str) -> ORMap:
        base = ORMap(None, CausalContext())
        return base.assign(BYZ, ("a", "fields", "lww"), FORGED_VALUE,
                           2**63 - 1 - self.rng.randrange(2**20))

    def _random_doc(self, subject: str) -> ORMap:
        """Forged entries (always at least one) with random claims and random nesting."""
        doc = self._forge(subject)
        for _ in range(self.rng.randint(0, 3)):
            pick = self.rng.randrange(3)
            if pick == 0:
                doc.merge(self._forge(subject))
            elif pick == 1:
                h = self._honest()
                ctx = CausalContext({h: self._top(subject, h) + FAR + self.rng.randrange(FAR)})
                doc.merge(ORMap(None, ctx, is_delta=True))
            else:
                h = self._honest()
                top = self._next_base(subject, h)
                base = ORMap(None, CausalContext({h: top}) if top else CausalContext())
                depth = self.rng.randint(1, 6)
                path = tuple(self.rng.choice("xyz") for _ in range(depth))
                doc.merge(base.assign_multi(h, ("a", "fields", *path), self.rng.randrange(9)))
        return doc

    def _state_doc(self, subject: str) -> ORMap:
        """A forged full state (a catch-up reply of attack (h))."""
        pick = self.rng.randrange(5)
        if pick == 0:
            doc = self._forge(subject)
        elif pick == 1:
            doc = self._silence(subject, True)
        elif pick == 2:
            return self._wipe(subject)
        elif pick == 3:
            doc = self._brick(subject)
        else:
            doc = self._clock_doc(subject)
        return ORMap(doc.store, doc.context.copy(), is_delta=False)

    # -- sending ------------------------------------------------------------------------------

    def _seal(self, subject: str, doc: ORMap, *, hlc: int | None = None,
              prefix: str = "delta") -> bytes:
        self.sequence += 1
        return self.codec.seal(
            self.signer, subject=f"{prefix}.{subject}",
            hlc=self._hlc() if hlc is None else hlc, sequence=self.sequence, document=doc,
            is_state=not doc.is_delta,
        )

    def _targets(self, target: int) -> list[str]:
        names = [n.name for n in self.world.nodes]
        return names if target < 0 else [names[target % len(names)]]

    def _send_forged(self, kind: str, subject: str, data: bytes, targets: list[str]) -> None:
        bid = self.world.byz_bid(kind)
        self.own = [*self.own[-31:], ("delta", subject, data, bid, kind)]
        for t in targets:
            self.world.send(BYZ, t, "delta", (subject, data, bid))
        self.world.stats[f"byz.sent.{kind}"] += len(targets)

    def attack(self, step: list[Any]) -> None:
        """Play one ``["byz", attack, target, salt]`` step."""
        _, kind, target, salt = step
        self.rng.seed(f"byz-{self.world.seed}-{salt}")
        subject = self.rng.choice(self.world.subjects)
        targets = self._targets(target)
        if kind == "forge":
            self._send_forged(kind, subject, self._seal(subject, self._forge(subject)), targets)
        elif kind == "silence":
            doc = self._silence(subject, self.rng.random() < 0.5)
            self._send_forged(kind, subject, self._seal(subject, doc), targets)
        elif kind == "wipe":
            self._send_forged(kind, subject, self._seal(subject, self._wipe(subject)), targets)
        elif kind == "brick":
            self._send_forged(kind, subject, self._seal(subject, self._brick(subject)), targets)
        elif kind == "clock":
            doc = self._clock_doc(subject)
            hlc = None if self.rng.random() < 0.7 else 2**63 - 1 - self.rng.randrange(2**10)
            self._send_forged(kind, subject, self._seal(subject, doc, hlc=hlc), targets)
        elif kind == "garbage":
            self._garbage(subject, targets)
        elif kind == "replay":
            self._replay(targets)
        elif kind == "dup":
            data = self._seal(subject, self._random_doc(subject))
            self._send_forged(kind, subject, data, targets)
            self._send_forged(kind, subject, data, targets)
        elif kind == "announce":
            doc = self._silence(subject, False) if self.rng.random() < 0.5 else ORMap(
                None, CausalContext({self._honest(): 2**63 - 1}), is_delta=True)
            data = self._seal(subject, ORMap(None, doc.context, is_delta=True), prefix="sync")
            for t in targets:
                self.world.send(BYZ, t, "announce", (subject, data))
            self.world.stats["byz.sent.announce"] += len(targets)
        elif kind == "preclaim":
            # Dots the honest writer has not issued yet (its own replica's count: a claim of
            # a write that exists, unseen by the claimer, is a removal no receiver can tell
            # from an observed one), in an envelope stamped 5 s before now: no later
            # write of the writer's can be stamped before it, whatever the clock skews. (A
            # stolen key stamping up to the drift bound ahead is the README's stated limit.)
            h = self._honest()
            m = self.world.by_name[h].replicas[subject].machine
            top = max(self._top(subject, h), m.state.context.max_counter(h) if m else 0)
            ctx = CausalContext.from_dots(
                (h, top + k) for k in range(1, self.rng.randint(2, 4)))
            doc = ORMap(None, ctx, is_delta=True)
            past = (self.world._wall_byz() - 5_000) << LOGICAL_BITS
            self._send_forged(kind, subject, self._seal(subject, doc, hlc=past), targets)
        elif kind == "repair":
            for t in targets:
                self.world.push_forged(t, subject, self._repair_doc(subject))
            self.world.stats["byz.sent.repair"] += len(targets)

    def _repair_doc(self, subject: str) -> ORMap:
        pick = self.rng.randrange(4)
        if pick == 0:
            return self._forge(subject)
        if pick == 1:
            return self._silence(subject, False)
        if pick == 2:
            w = self._wipe(subject)
            return ORMap(None, w.context, is_delta=True)
        return ORMap(None, CausalContext({self._honest(): 2**63 - 1}), is_delta=True)

    def _garbage(self, subject: str, targets: list[str]) -> None:
        schema = self.codec.schema
        pick = self.rng.randrange(3)
        if pick == 0:  # random bytes, validly signed
            body = self.rng.randbytes(self.rng.randint(1, 300))
        elif pick == 1:  # a forged envelope's body, bytes flipped, signed again
            sealed = self._seal(subject, self._forge(subject))
            outer = schema.envelope.SignedEnvelope.from_bytes_packed(sealed)
            raw = bytearray(outer.body)
            for _ in range(self.rng.randint(1, 4)):
                raw[self.rng.randrange(len(raw))] = self.rng.randrange(256)
            body = bytes(raw)
            try:
                env = self.codec.open(self._sign(body), None)
            except (CodecError, WorknodeError):
                pass  # undecodable: a rejection by the codec
            else:
                doc = env.document
                if not isinstance(doc, ORMap) or not any(
                    d[0] != BYZ for d, _ in dot_entries(doc.store)
                ):
                    self.world.stats["byz.garbage_skipped"] += 1
                    return  # no forged entry left: it might read as a removal it observed
        else:  # a valid envelope holding a random forged document
            self._send_forged("garbage", subject,
                              self._seal(subject, self._random_doc(subject)), targets)
            return
        self._send_forged("garbage", subject, self._sign(body), targets)

    def _sign(self, body: bytes) -> bytes:
        outer = self.codec.schema.envelope.SignedEnvelope.new_message()
        outer.signer = BYZ
        outer.signature = self.signer.sign(body)
        outer.body = body
        data: bytes = outer.to_bytes_packed()
        return data

    def _replay(self, targets: list[str]) -> None:
        if not any(what == "reply" for what, _, _ in self.syncs):
            self._request()  # material for later replays: honest catch-up states
        pick = self.rng.randrange(3)
        if pick == 0 and self.deltas:
            subject, data, bid = self.rng.choice(self.deltas)
            for t in targets:  # an honest batch again, from another connection: harmless
                self.world.send(BYZ, t, "delta", (subject, data, bid))
            self.world.stats["byz.sent.replay_honest"] += len(targets)
        elif pick == 1 and self.syncs:
            what, subject, data = self.rng.choice(self.syncs)
            for t in targets:
                if what == "announce":
                    self.world.send(BYZ, t, "announce", (subject, data))
                elif what == "request":  # another node's request, as its own
                    req = self.world.next_req
                    self.world.next_req += 1
                    self.world.send(BYZ, t, "request", (subject, data, req, None, True))
                else:  # relayed as the answer to the node's latest catch-up request
                    reqs = [q for q in self.requests if q[0] == t and q[1] == subject]
                    if reqs:
                        bid = self.world.byz_bid("replay_reply")
                        self.world.send(BYZ, t, "reply", (subject, data, reqs[-1][2], bid))
            self.world.stats[f"byz.sent.replay_{what}"] += len(targets)
        elif self.own:
            _, subject, data, bid, _ = self.rng.choice(self.own)
            for t in targets:
                self.world.send(BYZ, t, "delta", (subject, data, bid))
            self.world.stats["byz.sent.replay_own"] += len(targets)

    def _request(self) -> None:
        """Ask an honest node for its full state (a roster node may): it answers."""
        w = self.world
        subject = self.rng.choice(w.subjects)
        probe = ORMap(None, CausalContext(), is_delta=True)
        data = self._seal(subject, probe, prefix="sync")
        req = w.next_req
        w.next_req += 1
        w.send(BYZ, self._honest(), "request", (subject, data, req, None, True))

    def _answer(self, dst: str, subject: str, req: int) -> None:
        """Attack (h): answer a catch-up request with a forged state."""
        doc = self._state_doc(subject)
        data = self._seal(subject, doc, prefix="sync")
        bid = self.world.byz_bid("relay")
        self.world.stats["byz.sent.relay"] += 1
        self.world.send(BYZ, dst, "reply", (subject, data, req, bid), fast=True)
