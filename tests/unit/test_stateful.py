"""A stateful model of replicas that diverge, exchange deltas or states, and must converge."""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from broker.crdt import ORMap
from tests.unit.strategies import REPLICAS, Op, mutate, ops


class DivergingReplicas(RuleBasedStateMachine):
    """Three replicas write concurrently; deltas may be delayed, duplicated or batched."""

    def __init__(self) -> None:
        super().__init__()
        self.states = [ORMap() for _ in REPLICAS]
        # outbox[i][j]: deltas from i not yet delivered to j (i != j)
        self.outbox: list[list[list[ORMap]]] = [[[] for _ in REPLICAS] for _ in REPLICAS]
        self.delivered: list[ORMap] = []
        self.ts = 0

    @rule(i=st.integers(0, 2), op=ops(ORMap))
    def write(self, i: int, op: Op) -> None:
        self.ts += 1
        d = mutate(self.states[i], REPLICAS[i], op, self.ts)
        self.states[i].merge(d)
        for j in range(len(REPLICAS)):
            if j != i:
                self.outbox[i][j].append(d)

    @rule(i=st.integers(0, 2), j=st.integers(0, 2), k=st.integers(0, 5), batch=st.booleans())
    def deliver(self, i: int, j: int, k: int, batch: bool) -> None:
        """Deliver up to k pending deltas i -> j, one by one or joined into one batch."""
        pending, self.outbox[i][j] = self.outbox[i][j][:k], self.outbox[i][j][k:]
        if batch and pending:
            b = ORMap(is_delta=True)
            for d in pending:
                b.merge(d)
            pending = [b]
        for d in pending:
            self.states[j].merge(d)
            self.delivered.append(d)

    @rule(j=st.integers(0, 2))
    @precondition(lambda self: bool(self.delivered))
    def duplicate(self, j: int) -> None:
        """Redeliver an old delta (replays are harmless)."""
        self.states[j].merge(self.delivered[len(self.delivered) // 2])

    @rule(i=st.integers(0, 2), j=st.integers(0, 2))
    def anti_entropy(self, i: int, j: int) -> None:
        """Full-state transfer i -> j (what catch-up and the healer do)."""
        self.states[j].merge(self.states[i])

    @invariant()
    def flushing_everything_converges(self) -> None:
        finals = [s.copy() for s in self.states]
        for i in range(len(REPLICAS)):
            for j in range(len(REPLICAS)):
                for d in self.outbox[i][j]:
                    finals[j].merge(d)
        digests = {f.digest() for f in finals}
        assert len(digests) == 1, [f.value() for f in finals]


TestDivergingReplicas = DivergingReplicas.TestCase
TestDivergingReplicas.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
