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

Invariants: ``unseen_claims`` costs O(size of the delta's context) (its version vector read as
ranges beyond the receiver's, stopping at the ``limit``-th missing dot) plus, only when some
claim is neither covered nor exempt, one walk of the delta's store; it never walks the
receiver's state. Pure: no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Iterator

from broker.crdt import CausalContext, ORMap
from broker.crdt._stores import dots_of

__all__ = ["SequenceWindow", "held_dots", "unseen_claims"]

Dot = tuple[str, int]


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
