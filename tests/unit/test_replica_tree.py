"""A replica's Merkle tree built and refreshed in background steps (``broker.healing``),
a stand-in replica (the tree only reads ``state.store`` and listens to changes); the real
thing runs in ``tests/integration/test_healing.py``."""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

from broker.crdt import ORMap
from broker.healing import BUILD_CHUNK, ReplicaTree
from broker.merkle import MerkleTree
from broker.repair import item_digest

SECRET = b"k" * 32


class _Replica:
    def __init__(self) -> None:
        self.state = ORMap()
        self.listeners: list[Callable[[Collection[str] | None], None]] = []

    def add_change_listener(self, f: Callable[[Collection[str] | None], None]) -> None:
        self.listeners.append(f)

    def change(self, delta: ORMap, keys: Collection[str] | None) -> None:
        self.state.merge(delta)
        for f in self.listeners:
            f(keys)


def _fresh(state: ORMap) -> MerkleTree:
    store: dict[str, Any] = state.store or {}
    return MerkleTree.build([(k, item_digest(k, v, SECRET)) for k, v in store.items()],
                            key=SECRET)


def _drain(tree: ReplicaTree) -> int:
    steps = 0
    while tree._dirty != set():
        tree._step()
        steps += 1
    return steps


def test_a_chunked_build_with_changes_in_between_equals_a_fresh_build() -> None:
    replica = _Replica()
    n = 2 * BUILD_CHUNK + 123
    for i in range(n):
        replica.state.apply_assign("r", (f"k{i}", "v"), i, i + 1)
    tree = ReplicaTree(replica, SECRET)  # type: ignore[arg-type]
    tree._step()  # the first chunk's digests are taken
    assert tree._todo is not None
    assert tree._dirty is None
    # Meanwhile: a digested key changes, a pending one is removed, a new one is added.
    digested = tree._digests[0][0]
    pending = tree._todo[0]
    replica.change(replica.state.assign("r", (digested, "v"), "new", 10**6), [digested])
    replica.change(replica.state.remove((pending,)), [pending])
    replica.change(replica.state.assign("r", ("late", "v"), 1, 10**6 + 1), ["late"])
    steps = _drain(tree)
    assert steps >= 2
    assert tree.background_keys >= n
    assert tree.tree.root() == _fresh(replica.state).root()
    assert tree.tree.count() == n  # one removed, one added


def test_a_full_join_during_a_build_starts_it_over() -> None:
    replica = _Replica()
    for i in range(BUILD_CHUNK + 10):
        replica.state.apply_assign("r", (f"k{i}", "v"), i, i + 1)
    tree = ReplicaTree(replica, SECRET)  # type: ignore[arg-type]
    tree._step()
    other = ORMap()
    other.apply_assign("s", ("from-peer", "v"), 1, 1)
    replica.change(other, None)  # a catch-up: any key may have changed
    assert tree._todo is None
    _drain(tree)
    assert tree.tree.root() == _fresh(replica.state).root()


def test_an_on_demand_refresh_during_a_build_is_complete() -> None:
    replica = _Replica()
    for i in range(BUILD_CHUNK + 10):
        replica.state.apply_assign("r", (f"k{i}", "v"), i, i + 1)
    tree = ReplicaTree(replica, SECRET)  # type: ignore[arg-type]
    tree._step()
    assert tree.current().root() == _fresh(replica.state).root()
    assert tree._todo is None
    assert tree._dirty == set()


def test_a_failed_step_loses_no_key(monkeypatch, caplog) -> None:
    import broker.healing._tree as healing

    replica = _Replica()
    for i in range(50):
        replica.state.apply_assign("r", (f"k{i}", "v"), i, i + 1)
    tree = ReplicaTree(replica, SECRET)  # type: ignore[arg-type]
    _drain(tree)
    replica.change(replica.state.assign("r", ("k1", "v"), "new", 10**6), ["k1"])
    real = healing.item_digest

    def broken(*args: Any) -> bytes:
        raise RuntimeError("digest bug")

    monkeypatch.setattr(healing, "item_digest", broken)
    tree._step()  # fails: logged, and the tree will be rebuilt whole
    assert "digest bug" in caplog.text
    assert tree._dirty is None
    monkeypatch.setattr(healing, "item_digest", real)
    _drain(tree)
    assert tree.tree.root() == _fresh(replica.state).root()
    assert tree._pause == tree._delay  # caught up: the next change waits only the delay
