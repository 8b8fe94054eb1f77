"""Typed-kind overhead benchmark: a write and a read through a ``KindView`` against the same
untyped operations, per op, interleaved in the same run.

    python -m bench.kinds_bench [--quick] [--out bench/results/kinds.md]

Cases, each against a worknode tree of ``NODES`` worknodes (the pure CRDT path: no store, no
network, so the typed layer's cost is not hidden behind a commit):

- write, untyped: ``Assign`` of a register and ``Increment`` of a counter, built and applied;
- write, typed: ``view.ops(node, title=..., total=1)`` (pydantic validation, then the same
  two ops), applied;
- write, typed, through a lens: the same on version 2 (``total`` renamed ``amount``);
- read, untyped: ``tree.fields(node)`` (a dict of plain values);
- read, typed: ``view.read(tree, node)`` (a model instance, validated).

Rounds alternate the order of the cases, because these CPUs change speed over seconds; each
row reports the median per-op time over rounds and the typed/untyped ratio's median with its
min-max (the issue's target: at most 1.5x per op).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from broker.crdt import Assign, Increment, Tree, TreeOp
from broker.kinds import LWW, Counter, KindModel, KindView, ORSet, RenameField

DEFAULT_OUT = Path("bench/results/kinds.md")
NODES = 1_000


class Order(KindModel, kind="order", version=1):
    """The benchmark's kind."""

    title: LWW[str] = ""
    total: Counter = 0
    tags: ORSet[str] = frozenset()


class OrderV2(KindModel, kind="order", version=2, lens=[RenameField(("total",), "amount")]):
    """Version 2: a rename."""

    title: LWW[str] = ""
    amount: Counter = 0
    tags: ORSet[str] = frozenset()


def _tree(view: KindView) -> Tree:
    tree = Tree()
    for i in range(NODES):
        for op in view.create_ops(f"n{i}", title="start", total=1, tags={"a"}):
            assert isinstance(op, TreeOp)
            op.apply(tree, "setup", i + 1)
    return tree


def _cases() -> dict[str, Callable[[int], None]]:
    v1, v2 = KindView(Order), KindView(OrderV2, [Order])
    trees = {name: _tree(v1) for name in ("untyped", "typed", "lens")}
    ts = [10_000]

    def apply(tree: Tree, ops: list[object]) -> None:
        ts[0] += 1
        for op in ops:
            if isinstance(op, TreeOp):
                op.apply(tree, "bench", ts[0])
            else:  # the typed write's counter guard (a mutator): as write_many runs it
                tree.merge(op(tree, "bench", ts[0]))  # type: ignore[operator]

    def write_untyped(i: int) -> None:
        node = f"n{i % NODES}"
        apply(trees["untyped"], [Assign(node, ("title",), f"t{i}"),
                                 Increment(node, ("total",), 1)])

    def write_typed(i: int) -> None:
        apply(trees["typed"], list(v1.ops(f"n{i % NODES}", title=f"t{i}", total=1)))

    def write_lens(i: int) -> None:
        apply(trees["lens"], list(v2.ops(f"n{i % NODES}", title=f"t{i}", amount=1)))

    read_tree = trees["typed"]

    def read_untyped(i: int) -> None:
        read_tree.fields(f"n{i % NODES}")

    def read_typed(i: int) -> None:
        v1.read(read_tree, f"n{i % NODES}")

    return {"write, untyped": write_untyped, "write, typed": write_typed,
            "write, typed through a lens": write_lens, "read, untyped": read_untyped,
            "read, typed": read_typed}


def run(rounds: int, ops: int) -> dict[str, list[float]]:
    """Seconds per op of every case, one value per round (cases interleaved)."""
    cases = _cases()
    names = list(cases)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            fn = cases[name]
            start = time.perf_counter()
            for i in range(ops):
                fn(i)
            out[name].append((time.perf_counter() - start) / ops)
    return out


def _ratio(typed: list[float], untyped: list[float]) -> tuple[float, float, float]:
    ratios = [t / u for t, u in zip(typed, untyped, strict=True)]
    return statistics.median(ratios), min(ratios), max(ratios)


def report(times: dict[str, list[float]], argv: list[str], rounds: int, ops: int) -> str:
    """The Markdown report."""
    lines = [
        "# Typed kinds: overhead per op",
        "",
        f"`python -m bench.kinds_bench {' '.join(argv)}` on {platform.python_implementation()} "
        f"{platform.python_version()}: {rounds} interleaved rounds of {ops} ops per case, "
        f"{NODES} worknodes.",
        "",
        "| Case | µs per op (median) |",
        "|---|---|",
    ]
    for name, values in times.items():
        lines.append(f"| {name} | {statistics.median(values) * 1e6:.2f} |")
    lines += ["", "| Ratio | median | min-max |", "|---|---|---|"]
    for label, typed, untyped in (
        ("write: typed / untyped", "write, typed", "write, untyped"),
        ("write through a lens / untyped", "write, typed through a lens", "write, untyped"),
        ("read: typed / untyped", "read, typed", "read, untyped"),
    ):
        med, lo, hi = _ratio(times[typed], times[untyped])
        lines.append(f"| {label} | {med:.2f}x | {lo:.2f}-{hi:.2f}x |")
    lines += ["", "Target: at most 1.5x per op. The pure CRDT path is the strictest "
              "comparison: through a replica, a write's durable commit dwarfs both.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the report and write it to ``--out``."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 short rounds (smoke test)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    rounds, ops = (3, 200) if args.quick else (9, 20_000)
    times = run(rounds, ops)
    text = report(times, list(argv if argv is not None else sys.argv[1:]), rounds, ops)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
