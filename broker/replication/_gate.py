"""The causal gate: which dots a delta claims that its receiver can neither see nor receive.

A delta's causal context says "these dots were seen by the writer": joining it removes, on
the receiver, every entry whose dot the context holds but the delta's store does not. A claim
of a dot the receiver has never seen (its context does not cover it) and that the delta does
not carry (no entry of the delta's store holds it) runs ahead of the receiver: the write
behind that dot is missing here, and joining now would record it as seen (so that its delta
is discarded when it arrives) or let a replica's entries be judged against a history the
receiver lacks. Such a delta waits until the claim is covered (the missing delta or a state
holding it arrived).

One exemption: a writer's claims of its *own* dots, when every earlier batch of that writer
was applied here. A batch joins the deltas of one flush window; a write in it that a later
write of the same window overwrote leaves its dot in the batch's context and no entry holding
it. Those dots were issued inside the batch's own interval, which the receiver can only know
from the publish sequence: all earlier batches applied means every own dot the batch claims
and lacks was issued and overwritten within it. A batch that follows a lost one gets no such
exemption and waits (``d3`` of the issue's example).

Byzantine writers (issue 17, the delta path). A node publishes on its delta subject only
batches of its own writes (received state is logged marked received and never republished),
so ``forged`` refuses a delta outright when its signer could not have written it honestly:

- ``foreign_dot``: its store holds a dot of another replica. A dot belongs to its signer; an
  entry with dot ``(r, n)`` signed by anyone but ``r`` is a forged attribution (relays of
  others' writes travel by catch-up and repair, never as a delta).
- ``dot_range``: a dot or a claim of replica ``r`` above ``MAX_DOT_GAP`` past the highest dot
  of ``r`` the receiver has seen, or above ``MAX_COUNTER``. No honest writer gets that far
  ahead of a peer (2**32 writes unseen), and a counter near 2**63 would make the owner's next
  dot overflow the wire's and the digests' int64 (``struct.error``): a peer can never put one
  into this replica's context this way.
- ``clock_range``: a last-writer-wins timestamp above the envelope's own (which the receiver
  checked against its clock). An honest writer seals after it writes, with the same
  monotonic clock; a register stamped near 2**63 would win over every later write for good,
  and a replica's clock that witnessed it (a full state, a restart reading the state's
  highest timestamp) could issue no timestamp again.

Claims within range but not backed (neither seen here nor carried) are left to the gate
(held); the machine holds one at most ``ReplicationConfig.max_hold`` seconds, then rejects it
as ``unbacked_context``.

Relayed state (catch-up replies, healer repairs). A replica's whole state holds every
writer's entries, signed only by the replica that serves it: its signature vouches for its
*own* dots and for what it saw removed, nothing more. ``relayed`` keeps of such a state what
its relay can vouch for, measured against what the receiver has seen:

- the relay's own entries and claims (a relay can forge only its own writes);
- entries and claims of other writers' dots the receiver has already seen. Joining those
  removes, on the receiver, only entries whose dots the relay claims and lacks: what the
  relay saw removed, which is no more than the relay could do by deleting the keys itself.
  A relay that claims a writer's dots past the newest one the receiver has seen
  (over-claims: the shape of a wipe or a silence, or of a relay simply ahead) proves no
  removal of that writer's entries: none of its claims of that writer are kept;
- nothing else: another writer's dot the receiver has not seen (an entry or a claim) is
  stripped, its owner named in ``Relayed.stripped``. It arrives with its owner's own
  signature instead (the owner's catch-up, or the owner's signed batch that a relay kept as
  evidence and forwards unchanged, checked like any delta).

A relay's claim or dot out of range (``dot_range``) or a timestamp above its envelope's
(``clock_range``) refuses the whole state, as for a delta.

Invariants: ``unseen_claims`` costs O(size of the delta's context) (its version vector read as
ranges beyond the receiver's, stopping at the ``limit``-th missing dot) plus, only when some
claim is neither covered nor exempt, one walk of the delta's store; it never walks the
receiver's state. Pure: no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Final

from broker.crdt import CausalContext, ORMap
from broker.crdt._stores import (
    MAX_NESTING_DEPTH,
    KindStore,
    LWWStore,
    MapStore,
    SetStore,
    Whole,
    dots_of,
)
from broker.errors import CodecError, NestingDepthError

__all__ = [
    "BYZANTINE_REASONS",
    "MAX_COUNTER",
    "MAX_DOT_GAP",
    "Relayed",
    "SequenceWindow",
    "forged",
    "held_dots",
    "own_claims",
    "relayed",
    "unseen_claims",
]

Dot = tuple[str, int]

MAX_DOT_GAP: Final = 2**32
"""Most dots of one replica a delta may run ahead of what its receiver has seen of that
replica: four billion writes never seen here is no partition, it is a forged counter."""
MAX_COUNTER: Final = 2**62
"""Highest dot counter a delta may hold or claim: far below the int64 the wire, the digests
and the Merkle leaves pack counters in, so the owner's next dot can never overflow."""
BYZANTINE_REASONS: Final = (
    "foreign_dot", "dot_range", "clock_range", "unbacked_context", "removal",
    "unvouched_repair", "unvouched_state",
)
"""Rejection reasons that name a Byzantine signer (a roster key sending what it cannot have
written honestly). ``removal``: a document whose join would remove a dot on an add-only
subject (``_addonly.removes``). ``unvouched_repair``: a repair sealed by a healer (or any key
but a roster node's fetch reply): a healer never vouches for state, it forwards a source
replica's signed fetch reply (``broker.healing``, "Vouched repairs"). ``unvouched_state``: a
catch-up answer carrying another writer's dots (or claims) its asker had not seen and that no
evidence sent ahead of it backs (an honest answer is cut to what it can vouch for)."""


def forged(
    delta: ORMap,
    signer: str,
    seen: CausalContext,
    *,
    hlc: int | None = None,
    max_gap: int = MAX_DOT_GAP,
) -> str | None:
    """Why ``delta``, signed by ``signer``, cannot be an honest delta batch (a reason from
    ``BYZANTINE_REASONS``), or None. ``seen``: the receiver's context; ``hlc``: the
    envelope's hybrid timestamp (already checked against the receiver's clock drift), which
    every last-writer-wins timestamp in an honest batch is below. See the module doc.

    Costs one walk of the delta's store plus O(its context's size); never walks ``seen``."""
    tops: dict[str, int] = {}

    def top(r: str) -> int:
        t = tops.get(r)
        if t is None:
            t = tops[r] = min(seen.max_counter(r) + max_gap, MAX_COUNTER)
        return t

    if delta.store:
        reason = _store_reason(delta.store, signer, top(signer), hlc, 1)
        if reason is not None:
            return reason
    ctx = delta.context
    # The context's fields read directly (as the store join does): a batch's context holds
    # one cloud dot per op, and the highest of each replica is all this needs.
    for r, n in ctx._vv.items():
        if n > top(r):
            return "dot_range"
    for r, ns in ctx._cloud.items():
        if max(ns) > top(r):
            return "dot_range"
    return None


def _store_reason(entry: Any, signer: str, top: int, hlc: int | None, depth: int) -> str | None:
    """``forged``'s walk of a store: every dot ``signer``'s and at most ``top``, every
    last-writer-wins timestamp at most ``hlc``."""
    t = type(entry)
    if t is MapStore:
        if depth > MAX_NESTING_DEPTH:
            raise NestingDepthError(f"maps nest deeper than {MAX_NESTING_DEPTH}")
        for child in entry.values():
            reason = _store_reason(child, signer, top, hlc, depth + 1)
            if reason is not None:
                return reason
        return None
    if t is Whole:
        return None if entry.store is None else _store_reason(
            entry.store, signer, top, hlc, depth)
    if t is KindStore:
        for store in entry.values():
            reason = _store_reason(store, signer, top, hlc, depth)
            if reason is not None:
                return reason
        return None
    if t is SetStore:
        for ds in entry.values():
            for i in range(0, len(ds), 2):
                if ds[i] != signer:
                    return "foreign_dot"
                if ds[i + 1] > top:
                    return "dot_range"
        return None
    if entry is None:
        return None
    stride = entry.STRIDE  # a dot function: (replica, counter, ...) entries
    for i in range(0, len(entry), stride):
        if entry[i] != signer:
            return "foreign_dot"
        if entry[i + 1] > top:
            return "dot_range"
    if t is LWWStore and hlc is not None:
        for i in range(2, len(entry), 4):
            if entry[i] > hlc:
                return "clock_range"
    return None


@dataclass(slots=True)
class Relayed:
    """What ``relayed`` keeps of a relayed state."""

    document: ORMap | None
    """The part the relay vouches for (None: refused, see ``reason``)."""
    reason: str | None = None
    """Why the whole state was refused (a ``BYZANTINE_REASONS`` member), or None."""
    stripped: dict[str, int] = field(default_factory=dict)
    """Owner -> the highest of its dots stripped (unseen here, not vouched by the relay)."""


def relayed(
    doc: ORMap,
    relay: str,
    seen: CausalContext,
    *,
    hlc: int | None = None,
    max_gap: int = MAX_DOT_GAP,
) -> Relayed:
    """Keep of ``doc`` (a state or delta served by ``relay``) what ``relay`` vouches for,
    measured against ``seen`` (the receiver's context); see the module doc. ``hlc``: the
    relay's envelope timestamp (checked against the receiver's clock), above which no
    last-writer-wins timestamp may be.

    Costs one walk of ``doc``'s store plus O(its context's size + ``seen``'s cloud); never
    walks the receiver's state. Pure: ``doc`` is not modified."""
    tops: dict[str, int] = {}
    stripped: dict[str, int] = {}
    ctx = doc.context
    for r, n in ctx._vv.items():
        if n > _top(tops, seen, r, max_gap):
            return Relayed(None, "dot_range")
    for r, ns in ctx._cloud.items():
        if max(ns) > _top(tops, seen, r, max_gap):
            return Relayed(None, "dot_range")
    try:
        store = None if doc.store is None else _keep(
            doc.store, relay, seen, tops, max_gap, hlc, stripped, 1)
    except _Refused as exc:
        return Relayed(None, exc.reason)
    # The context: the relay's own claims as they are; another writer's only as far as the
    # receiver has seen them (their intersection) — and none at all of a writer whose dots
    # it claims past the newest one the receiver has seen (an over-claim: a wipe or silence
    # context, or a relay ahead of this replica): such a state proves no removal of that
    # writer's entries here (its claims are not joined, so its missing entries remove
    # nothing); the writer's own state, or a later answer, does.
    over = {
        r for r, n in ctx._vv.items() if r != relay and n > seen.max_counter(r)
    } | {
        r for r, ns in ctx._cloud.items() if r != relay and max(ns) > seen.max_counter(r)
    }
    for r in over:
        top = max(ctx._vv.get(r, 0), max(ctx._cloud.get(r, ()), default=0))
        stripped[r] = max(stripped.get(r, 0), top)
    vv: dict[str, int] = {}
    cloud: list[Dot] = []
    seen_vv = seen._vv
    for r, n in ctx._vv.items():
        if r == relay:
            vv[r] = n
            continue
        if r in over:
            continue
        mine = seen_vv.get(r, 0)
        vv[r] = min(n, mine)
        if n > mine:
            # The receiver's out-of-order dots the relay's vector covers: seen by both.
            unseen = [k for k in seen._cloud.get(r, ()) if mine < k <= n]
            if len(unseen) < n - mine:
                stripped[r] = max(stripped.get(r, 0), n)
            cloud += [(r, k) for k in unseen]
    for r, ns in ctx._cloud.items():
        if r in over:
            continue
        for k in ns:
            if r == relay or seen.covers(r, k):
                cloud.append((r, k))
            else:
                stripped[r] = max(stripped.get(r, 0), k)
    out = ORMap(store, CausalContext(vv, cloud), is_delta=doc.is_delta)
    return Relayed(out, None, stripped)


class _Refused(CodecError):
    """A relayed store's dot or timestamp out of range (internal to ``relayed``)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _top(tops: dict[str, int], seen: CausalContext, r: str, max_gap: int) -> int:
    t = tops.get(r)
    if t is None:
        t = tops[r] = min(seen.max_counter(r) + max_gap, MAX_COUNTER)
    return t


def _keep(
    entry: Any,
    relay: str,
    seen: CausalContext,
    tops: dict[str, int],
    max_gap: int,
    hlc: int | None,
    stripped: dict[str, int],
    depth: int,
) -> Any:
    """``entry`` without the dots ``relay`` cannot vouch for (None if nothing is left)."""
    t = type(entry)
    if t is MapStore:
        if depth > MAX_NESTING_DEPTH:
            raise NestingDepthError(f"maps nest deeper than {MAX_NESTING_DEPTH}")
        out = MapStore()
        for key, child in entry.items():
            kept = _keep(child, relay, seen, tops, max_gap, hlc, stripped, depth + 1)
            if kept is not None:
                out[key] = kept
        return out or None
    if t is Whole:
        if entry.store is None:
            return entry
        kept = _keep(entry.store, relay, seen, tops, max_gap, hlc, stripped, depth)
        return None if kept is None else Whole(kept)
    if t is KindStore:
        kinds = KindStore()
        for kind, store in entry.items():
            kept = _keep(store, relay, seen, tops, max_gap, hlc, stripped, depth)
            if kept is not None:
                kinds[kind] = kept
        if len(kinds) > 1:
            return kinds
        return next(iter(kinds.values())) if kinds else None
    if t is SetStore:
        elements = SetStore()
        for element, ds in entry.items():
            keep: list[Any] = []
            for i in range(0, len(ds), 2):
                if _vouched(ds[i], ds[i + 1], relay, seen, tops, max_gap, stripped):
                    keep += ds[i : i + 2]
            if keep:
                elements[element] = tuple(keep)
        return elements or None
    if entry is None:
        return None
    stride = entry.STRIDE
    if t is LWWStore and hlc is not None:
        for i in range(2, len(entry), 4):
            if entry[i] > hlc:
                raise _Refused("clock_range")
    kept_fun: list[Any] = []
    for i in range(0, len(entry), stride):
        if _vouched(entry[i], entry[i + 1], relay, seen, tops, max_gap, stripped):
            kept_fun += entry[i : i + stride]
    if len(kept_fun) == len(entry):
        return entry
    return t(kept_fun) if kept_fun else None


def _vouched(
    r: str,
    n: int,
    relay: str,
    seen: CausalContext,
    tops: dict[str, int],
    max_gap: int,
    stripped: dict[str, int],
) -> bool:
    """Whether the dot ``(r, n)`` of a relayed entry may be joined (range-checked)."""
    if n > _top(tops, seen, r, max_gap):
        raise _Refused("dot_range")
    if r == relay or seen.covers(r, n):
        return True
    stripped[r] = max(stripped.get(r, 0), n)
    return False


def own_claims(context: CausalContext, writer: str) -> CausalContext:
    """``writer``'s own dots in ``context``: what a signed batch or state of ``writer``'s
    vouches for (its claims of other writers' dots vouch for nothing)."""
    extra = context._cloud.get(writer, ())
    top = context._vv.get(writer)
    return CausalContext({writer: top} if top else {}, [(writer, k) for k in extra])


def held_dots(delta: ORMap) -> set[Dot]:
    """Every dot held by an entry somewhere in ``delta``'s store (walks the delta only)."""
    return set(dots_of(delta.store)) if delta.store else set()


def unseen_claims(
    delta: ORMap, seen: CausalContext, *, exempt: str | None = None, limit: int = 8
) -> list[Dot]:
    """Up to ``limit`` dots that ``delta``'s context claims, ``seen`` does not cover and no
    entry of ``delta`` holds, in context order. Claims of replica ``exempt``'s own dots are
    not checked (see the module doc). Empty: the delta may be joined now.

    Stops at the ``limit``-th missing dot, so a receiver far behind a writer pays for the
    dots the delta holds, not for every dot of the writer it never saw."""
    ctx = delta.context
    vv = seen.version_vector
    held: set[Dot] | None = None
    missing: list[Dot] = []
    for r, k in _claims(ctx, vv, exempt):
        if seen.covers(r, k):
            continue
        if held is None:
            held = held_dots(delta)  # walked once, only when some claim is not covered
        if (r, k) not in held:
            missing.append((r, k))
            if len(missing) >= limit:
                break
    return missing


def _claims(ctx: CausalContext, vv: dict[str, int], exempt: str | None) -> Iterator[Dot]:
    """The dots ``ctx`` claims beyond ``vv`` (the receiver's version vector), except
    ``exempt``'s."""
    for r, n in ctx.version_vector.items():
        if r != exempt:
            for k in range(vv.get(r, 0) + 1, n + 1):
                yield r, k
    for r, k in ctx.cloud:
        if r != exempt and k > vv.get(r, 0):
            yield r, k


class SequenceWindow:
    """Which publish sequences of one writer were applied: a watermark below which all
    were, and the ones above it applied out of order."""

    __slots__ = ("_above", "top")

    def __init__(self, top: int = 0) -> None:
        self.top = top
        """Every sequence <= ``top`` was applied."""
        self._above: set[int] = set()

    def follows(self, sequence: int) -> bool:
        """Whether every sequence before ``sequence`` was applied."""
        return sequence - 1 <= self.top

    def add(self, sequence: int) -> None:
        """Record ``sequence`` as applied."""
        if sequence <= self.top:
            return
        if sequence == self.top + 1:
            self.top = sequence
            while self.top + 1 in self._above:
                self.top += 1
                self._above.discard(self.top)
        else:
            self._above.add(sequence)

    def raise_to(self, sequence: int) -> None:
        """Record every sequence <= ``sequence`` as applied (a state that holds them)."""
        if sequence > self.top:
            self.top = sequence
            self._above = {s for s in self._above if s > sequence}
            while self.top + 1 in self._above:
                self.top += 1
                self._above.discard(self.top)
