"""The heal planner: what one heal of one subject does, as a pure state machine.

Everything the healer *decides* lives here: which replicas hold the same items (grouping by
root, item count and tree scheme), which replica is the hub, which pairs to reconcile in a
round, at what value width, when to ask the roots again, when the heal has converged, and
when it must stop and escalate instead of pushing the same repairs again. The driver
(``services.healer``, or a simulator) only moves requests and answers, exactly as
``broker.merkle.Reconciliation`` is driven within one pair.

Rules:

- a heal starts by asking every replica its root (``AskRoots``); the request asks for the
  top ``root_levels`` levels' values too, unless a replica's root is still ``agreed`` (the
  root all replicas held after the last converged heal), so replicas in sync cost one small
  reply each;
- equal ``(root, item count)`` everywhere: converged, nothing else is asked;
- otherwise one *round*: replicas are grouped by ``(root, count, scheme)`` (a group holds the
  same items); the hub is the replica with the most items among those of this code's tree
  scheme (``TREE_SCHEME``) if any (ties: the greatest node id); one
  ``RepairPair`` per other group reconciles the hub with that group's first member and pushes
  the repairs to every member of both groups. A group whose tree scheme differs from the
  hub's cannot be compared (a rolling upgrade): it is noted in ``HealResult.mismatches``
  (once per heal) instead;
- after a round the roots are asked again. Values travel cut to ``hash_bytes`` bytes; a
  round in which any pair found no key while its roots differed is followed by whole values
  for the rest of the heal, so a collision of cut values never hides a difference for good
  and costs at most one round (cut values are not salted per round: the same two trees
  collide the same way again);
- the heal ends: converged (all roots equal), or not converged with a reason:
  ``rounds`` (``max_rounds`` rounds and roots still differ: writes landing meanwhile; retry
  soon), ``stuck`` (a round pushed repairs, or compared whole values, and every replica's
  root is exactly what it was before: the next round would do the same again, so repeating
  is pointless — a defect such as two readings of equal content digesting differently, or a
  replica refusing repairs; escalate, do not retry at once), ``schemes`` (no group shares
  the hub's tree scheme; healed once they run the same release), ``failed`` (the driver
  reported an action it could not carry out), ``catchup`` (roots unchanged, but the round's
  repairs left receivers owing a catch-up of writers' dots their source could not vouch for,
  ``PairResult.owed``: retry soon).
  A heal that did not converge is never reported as success (``pass_status``).

How to drive it (the whole protocol; no asyncio, no clock, no randomness inside)::

    planner = HealPlanner(subject, nodes, HealPolicy(max_rounds=3, hash_bytes=6,
                                                     item_bytes=4), agreed=b"")
    while not planner.done:
        for action in planner.next_actions():   # one wave: run them in any order
            if isinstance(action, AskRoots):     # always alone in its wave
                views = {n: <RootView of n, asked with action.levels/width/unless>
                         for n in action.nodes}
                planner.receive_roots(views)
            elif isinstance(action, RepairPair):
                # reconcile action.left with action.right (Reconciliation; leaves as item
                # digests of action.item_width bytes when it is not 0, else keys), fetch both
                # sides' entries of what differs (their signed replies: vouchers), and where
                # broker.repair.repair_deltas says a side needs a repair, push the other
                # side's vouchers to every node of its group (each computes its repair);
                # then:
                planner.receive_repair(action, PairResult(found, pushed, waves))
        # an action that cannot be carried out: planner.receive_failure(action, "why")
    result = planner.result()                    # HealResult: counts, roots, converged, reason

Every action of a wave must be answered before ``next_actions`` is called again
(``InvalidArgumentError`` otherwise). A simulator gives ``RootView`` values computed from its
replicas' trees (``MerkleTree.root``, ``count``, ``fanout``, ``depth``, ``TREE_SCHEME``, the
asked ``width``, and ``level_values`` for the asked ``levels`` unless the root is ``unless``)
and counts ``found``/``pushed``/``waves`` as it likes: they feed the report, and ``found`` or
``pushed`` above 0 marks a round that should have changed a root (a round that changed none
ends the heal as ``stuck``). ``tests/unit/test_heal_planner.py`` (``_Cluster``) is a complete
driver in memory, ~60 lines. Pass ``result.agreed`` as the next heal's ``agreed``.

Version mixes: a replica pinned to an older wire version must read every pushed delta
through its own codec (``WireCodec(v).decode_document(WireCodec().encode_document(d))``), and
the healer must read that replica's fetched entries through the newest codec, as over NATS:
joining a newer kind's store into the opaque store an old reader holds is not defined (the
join raises). ``broker.repair.DIGEST_AS_NEWEST = False`` brings issue 13's bug 3 back (the
mutation check): such a heal then ends ``stuck``. In tests/unit/test_heal_planner.py,
``test_a_v1_reader_and_a_newer_one_with_flags_converge_in_one_heal`` shows both.

Pass level: ``subjects_to_heal`` groups discovered replicas by subject; ``pass_status`` is the
exit status of a one-shot pass (0 converged, 1 a heal failed, 2 a heal did not converge).

Pure: no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal, TypeAlias

from broker.errors import InvalidArgumentError
from broker.healing._wire import RootView
from broker.merkle import HASH_SIZE, TREE_SCHEME

__all__ = [
    "ROOT_LEVELS",
    "AskRoots",
    "HealAction",
    "HealPlanner",
    "HealPolicy",
    "HealResult",
    "PairResult",
    "RepairPair",
    "SchemeMismatch",
    "StopReason",
    "pass_status",
    "subjects_to_heal",
]

ROOT_LEVELS: Final = 2
"""Levels below the root a root request asks for (272 values at fan-out 16): two round trips
saved whenever roots differ."""

StopReason: TypeAlias = Literal[
    "", "rounds", "stuck", "schemes", "failed", "unverified", "unbacked", "catchup",
]
"""Why a heal did not converge. ``unverified`` and ``unbacked`` are the driver's own: a
replica's reply failed verification (a relay, a replay), so the heal went on without it and
cannot vouch for it; a replica refused another's fetch reply as Byzantine (its source served
state it cannot vouch for), so that difference stays. ``catchup``: roots unchanged after
a round whose repairs carried writers' dots a receiver keeps only from those writers' own
signed state (``PairResult.owed``): the receivers catch up, and a heal soon converges."""


@dataclass(frozen=True, slots=True)
class HealPolicy:
    """The settings a heal's decisions depend on."""

    max_rounds: int = 3
    hash_bytes: int = 6
    """Node values travel cut to this many low bytes (``HASH_SIZE``: whole)."""
    item_bytes: int = 4
    """Leaves travel as item digests of this many bytes while values are cut (0: keys)."""
    root_levels: int = ROOT_LEVELS

    def __post_init__(self) -> None:
        if self.max_rounds < 1:
            raise InvalidArgumentError("a heal needs at least one round")
        if not 1 <= self.hash_bytes <= HASH_SIZE or not 0 <= self.item_bytes <= HASH_SIZE:
            raise InvalidArgumentError(f"value widths lie in [1, {HASH_SIZE}]")


@dataclass(frozen=True, slots=True)
class AskRoots:
    """Ask every replica of ``nodes`` its root (with ``levels`` top levels of ``width``-byte
    values, unless its root is ``unless``); answer with ``HealPlanner.receive_roots``."""

    nodes: tuple[str, ...]
    levels: int
    width: int
    unless: bytes


@dataclass(frozen=True, slots=True)
class RepairPair:
    """Reconcile ``left`` (the hub) with ``right`` and push the repairs: the delta for the left
    to every node of ``left_group``, the one for the right to every node of ``right_group``.
    ``item_width``: leaves as item digests of that many bytes (0: as keys). Answer with
    ``HealPlanner.receive_repair``. This one object is what a driver's repair steps need."""

    subject: str
    left: RootView
    right: RootView
    left_group: tuple[str, ...]
    right_group: tuple[str, ...]
    item_width: int
    index: int = 0
    """Its place in the round (pairs of one round are told apart by it)."""


@dataclass(frozen=True, slots=True)
class SchemeMismatch:
    """Replicas ``members`` use tree scheme ``scheme`` and the hub ``hub`` scheme
    ``hub_scheme``: they cannot be compared until they run the same release (a note of
    ``HealResult.mismatches``, not an action)."""

    subject: str
    members: tuple[str, ...]
    scheme: int
    hub: str
    hub_scheme: int


HealAction: TypeAlias = AskRoots | RepairPair


@dataclass(frozen=True, slots=True)
class PairResult:
    """What a ``RepairPair`` did: keys found to differ, entries pushed, waves of calls;
    ``owed``: writers whose dots a receiver of the repairs will drop (its source could not
    vouch for them: ``broker.replication._gate.relayed``) and catch up on instead."""

    found: int
    pushed: int
    waves: int
    owed: int = 0


@dataclass
class HealResult:
    """The outcome of one heal (the counts of its report; timing and bytes are the driver's).

    ``agreed``: the root every replica holds, when converged (pass it to the next heal of
    the subject as ``agreed``)."""

    subject: str
    nodes: list[str]
    roots_before: list[bytes]
    roots_after: list[bytes] = field(default_factory=list)
    divergent_keys: int = 0
    keys_repaired: int = 0
    rounds: int = 0
    waves: int = 0
    converged: bool = False
    reason: StopReason = ""
    failure: str = ""
    agreed: bytes = b""
    mismatches: list[SchemeMismatch] = field(default_factory=list)

    @property
    def retry_soon(self) -> bool:
        """Whether another heal soon may do better: roots still moving, or a failure. A stuck
        heal, or one across tree schemes, would repeat itself: it waits for the interval."""
        return self.reason in ("rounds", "failed", "unverified", "catchup")


class HealPlanner:
    """One heal of one subject among ``nodes`` (see module doc)."""

    def __init__(
        self,
        subject: str,
        nodes: Sequence[str],
        policy: HealPolicy | None = None,
        *,
        agreed: bytes = b"",
    ) -> None:
        if len(set(nodes)) != len(nodes) or not nodes:
            raise InvalidArgumentError("a heal needs distinct replicas")
        self.subject = subject
        self.nodes = tuple(sorted(nodes))
        self.policy = policy if policy is not None else HealPolicy()
        self._agreed = agreed
        self._width = self.policy.hash_bytes
        self._views: dict[str, RootView] = {}
        self._before_round: dict[str, tuple[bytes, int]] = {}
        self._pending: list[HealAction] = [self._ask()]
        self._waiting: set[int] = set()  # ids of actions of the wave not answered yet
        self._asked_roots = False
        self._round_found = False
        self._round_missed = False  # a pair of the round found nothing at cut width
        self._round_pushed = 0
        self._round_owed = 0
        self._round_width = self._width
        self._wave: list[HealAction] = []
        self._result: HealResult | None = None
        self._out = HealResult(subject, list(self.nodes), [])

    # -- driver side ---------------------------------------------------------------------

    @property
    def done(self) -> bool:
        """Whether the heal has ended (``result()`` says how)."""
        return self._result is not None

    def next_actions(self) -> list[HealAction]:
        """The next wave of actions (empty once done). Each is returned once."""
        if self._waiting:
            raise InvalidArgumentError("the previous wave has unanswered actions")
        out, self._pending = self._pending, []
        self._waiting = {id(a) for a in out}
        self._wave = out
        return out

    def receive_roots(self, views: Mapping[str, RootView]) -> None:
        """The answer to ``AskRoots``: every replica's root view."""
        ask = self._waiting_for(AskRoots)
        if set(views) != set(ask.nodes):
            raise InvalidArgumentError("roots of exactly the replicas asked are expected")
        self._waiting.discard(id(ask))
        self._views = dict(views)
        self._out.waves += 1
        if not self._out.roots_before:
            self._out.roots_before = [views[n].root for n in self.nodes]
        else:
            self._after_round()
        if self._result is None:
            self._plan_round()

    def receive_repair(self, pair: RepairPair, result: PairResult) -> None:
        """The answer to one ``RepairPair`` of the current round."""
        self._waiting.discard(id(self._waiting_for(RepairPair, pair)))
        if self._out.rounds == 1:
            self._out.divergent_keys += result.found
        self._out.keys_repaired += result.pushed
        self._out.waves += result.waves
        self._round_found = self._round_found or result.found > 0
        # Per pair, not per round: a pair's roots differ (it is another group), so finding
        # nothing at cut width means its cut values collided. They are a pure function of the
        # two trees (no per-round salt), so the same pair at the same width would miss the same
        # difference again, round after round, while other pairs of the round find keys (a
        # round-wide "found nothing" let a 1-byte heal of 4 replicas run out of rounds).
        self._round_missed = self._round_missed or (
            result.found == 0 and pair.left.width < HASH_SIZE
        )
        self._round_pushed += result.pushed
        self._round_owed += result.owed
        if not self._waiting:
            # Cut values that found nothing while roots differed have collided: the rest of
            # this heal compares whole values. Going back to cut values after one whole round
            # let a second collision (other trees, same too-narrow width) waste another round,
            # so a 1-byte heal still ran out of rounds; staying wide bounds collisions to one
            # round per heal (the next heal starts cut again).
            if self._round_missed:
                self._width = HASH_SIZE
            self._pending = [self._ask()]

    def receive_failure(self, action: HealAction, failure: str) -> None:
        """``action`` could not be carried out: the heal ends, not converged (``failed``)."""
        del action  # whichever it was, the heal cannot go on with this wave
        self._waiting.clear()
        self._pending = []
        self._out.failure = failure
        self._finish("failed")

    def result(self) -> HealResult:
        """The outcome (only once ``done``)."""
        if self._result is None:
            raise InvalidArgumentError("the heal has not ended")
        return self._result

    # -- decisions -----------------------------------------------------------------------

    def _ask(self) -> AskRoots:
        return AskRoots(self.nodes, self.policy.root_levels, self._width, self._agreed)

    def _waiting_for(self, kind: type, action: HealAction | None = None) -> AskRoots:
        if self._result is not None:
            raise InvalidArgumentError("the heal has ended")
        if action is None:
            found = [a for a in self._wave if isinstance(a, kind) and id(a) in self._waiting]
            if not found:
                raise InvalidArgumentError(f"no {kind.__name__} is waiting for an answer")
            action = found[0]
        if id(action) not in self._waiting:
            raise InvalidArgumentError("an answer to an action not waiting for one")
        return action  # type: ignore[return-value]

    def _state(self) -> dict[str, tuple[bytes, int]]:
        return {n: (v.root, v.count) for n, v in self._views.items()}

    def _converged(self) -> bool:
        return len(set(self._state().values())) == 1

    def _after_round(self) -> None:
        if self._converged():
            return
        changed = self._state() != self._before_round
        # Unchanged roots after a round that found or pushed something, or compared whole
        # values: the next round would find and push the same again.
        looked_hard = (
            self._round_found or self._round_pushed > 0 or self._round_width >= HASH_SIZE
        )
        if not changed and self._round_owed:
            # Nothing moved, but receivers owe a catch-up of dots their sources could not
            # vouch for: no defect, a heal after that catch-up converges.
            self._finish("catchup")
        elif not changed and looked_hard:
            self._finish("stuck")
        elif self._out.rounds >= self.policy.max_rounds:
            self._finish("rounds")

    def _plan_round(self) -> None:
        if self._converged():
            self._finish("")
            return
        views = self._views
        groups: dict[tuple[bytes, int, int], list[str]] = {}
        for n in self.nodes:
            v = views[n]
            groups.setdefault((v.root, v.count, v.scheme), []).append(n)
        # The hub speaks this code's tree scheme whenever a replica does: an older-scheme
        # replica holding the most items would otherwise leave every other group
        # unpaired, and replicas that could be healed among themselves never were.
        hub = max(self.nodes, key=lambda n: (views[n].scheme == TREE_SCHEME,
                                             views[n].count, n))
        h = views[hub]
        hub_group = tuple(groups.pop((h.root, h.count, h.scheme)))
        item_width = self.policy.item_bytes if h.width < HASH_SIZE else 0
        actions: list[HealAction] = []
        for members in groups.values():
            other = views[members[0]]
            if other.scheme != h.scheme:
                note = SchemeMismatch(self.subject, tuple(members), other.scheme, hub, h.scheme)
                if note not in self._out.mismatches:
                    self._out.mismatches.append(note)
                continue
            actions.append(
                RepairPair(
                    self.subject, h, other, hub_group, tuple(members), item_width, len(actions)
                )
            )
        if not actions:
            self._finish("schemes")
            return
        self._out.rounds += 1
        self._before_round = self._state()
        self._round_found, self._round_pushed, self._round_width = False, 0, h.width
        self._round_missed, self._round_owed = False, 0
        self._pending = actions

    def _finish(self, reason: StopReason) -> None:
        out = self._out
        out.converged = reason == "" and self._converged()
        out.reason = reason
        if self._views:
            out.roots_after = [self._views[n].root for n in self.nodes]
        if out.converged:
            out.agreed = self._views[self.nodes[0]].root
        self._result = out


def subjects_to_heal(
    members: Iterable[tuple[str, Iterable[str]]], wanted: Collection[str] = ()
) -> dict[str, list[str]]:
    """``{subject: sorted replicas}`` from discovered ``(node, subjects served)``, limited to
    ``wanted`` when given. A subject with one replica is listed (nothing to compare)."""
    out: dict[str, set[str]] = {}
    for node, subjects in members:
        for subject in subjects:
            if not wanted or subject in wanted:
                out.setdefault(subject, set()).add(node)
    return {s: sorted(nodes) for s, nodes in sorted(out.items())}


def pass_status(converged: Iterable[bool], failed: Collection[str]) -> int:
    """Exit status of a one-shot heal pass: 0 every heal converged, 1 a heal failed, 2 a heal
    ended without converging (the runbook's "the next heal finds no divergence" would not
    hold: never report that as success)."""
    if failed:
        return 1
    return 0 if all(converged) else 2
