"""The long Jepsen-style run: ``python -m tests.jepsen --minutes 10 --summary
tests/jepsen/results/summary.md`` (see README.md here).

Runs the STRONG workload under the full random nemesis for ``--minutes``, then the EVENTUAL
control, checks both, writes a Markdown summary, saves each history as JSON lines beside it
(replay: ``python -m broker.lincheck FILE``) and exits 0 only when the STRONG history is
linearizable, no STRONG operation succeeded in a minority, and the control was flagged.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

from broker.lincheck import Verdict
from tests.jepsen._harness import run, save_history, summary


async def _main(args: argparse.Namespace) -> int:
    out = Path(args.summary)
    with tempfile.TemporaryDirectory(prefix="jepsen-") as tmp:
        strong = await run(Path(tmp) / "strong", mode="strong", seed=args.seed,
                           seconds=args.minutes * 60, keys=args.keys,
                           clients_per_node=args.clients, check_budget=args.budget)
        control = await run(Path(tmp) / "eventual", mode="eventual", seed=args.seed,
                            seconds=5, keys=4, schedule=("minority",),
                            check_budget=args.budget)
    command = " ".join(["python -m tests.jepsen", *sys.argv[1:]])
    text = summary([strong, control], command=command)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)  # noqa: ASYNC240
    for res in (strong, control):
        save_history(res, out.with_name(f"history-{res.mode}-seed{res.seed}.jsonl"))
    print(text)
    assert strong.result is not None
    assert control.result is not None
    ok = (strong.result.verdict is Verdict.OK and not strong.violations
          and control.result.verdict is Verdict.ILLEGAL)
    return 0 if ok else 1


def main() -> int:
    """Parse the arguments and run."""
    p = argparse.ArgumentParser(prog="python -m tests.jepsen")
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--keys", type=int, default=16)
    p.add_argument("--clients", type=int, default=2, help="clients per worknode")
    p.add_argument("--budget", type=float, default=300.0, help="checker seconds")
    p.add_argument("--summary", default="tests/jepsen/results/summary.md")
    return asyncio.run(_main(p.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
