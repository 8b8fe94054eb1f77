"""Command line of the fuzz targets (see ``tests/fuzz/__init__.py``).

    python -m tests.fuzz --target heal-apply --cases 1000 --seed 1
    python -m tests.fuzz --target all --cases 100000 --seed 1 --summary bench/results/fuzz.md
    python -m tests.fuzz --target heal-apply --seed 1 --replay 1234

Exit status: 0 when no case aborted, hung or raised anything but a refusal; 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tests.fuzz._runner import replay, run_campaign, run_worker, summary_markdown
from tests.fuzz._targets import SELF_TESTS, TARGETS


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run (see module doc)."""
    p = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", required=True,
                   help=f"one of {', '.join(TARGETS)}, or 'all'")
    p.add_argument("--cases", type=int, default=1000, help="cases per target")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--batch", type=int, default=500, help="cases per worker process")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="seconds a worker may run before it counts as hung")
    p.add_argument("--summary", type=Path, help="write the counts as Markdown here")
    p.add_argument("--note", default="", help="a line for the summary (what this run was)")
    p.add_argument("--replay", type=int, metavar="CASE", help="run one case here, verbosely")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    names = list(TARGETS) if a.target == "all" else [a.target]
    for name in names:
        if name not in TARGETS and name not in SELF_TESTS:
            p.error(f"unknown target {name!r}")
    if a.worker:
        run_worker(names[0], a.seed, a.start, a.cases)
        return 0
    if a.replay is not None:
        return replay(names[0], a.seed, a.replay)
    campaigns = []
    for name in names:
        c = run_campaign(name, a.cases, a.seed, batch=a.batch, timeout=a.timeout)
        campaigns.append(c)
        reasons = ", ".join(f"{r} {n}" for r, n in c.rejected.most_common())
        print(f"{name}: {c.cases} cases in {c.seconds:.1f}s: {c.accepted} accepted, "
              f"{sum(c.rejected.values())} rejected ({reasons}); aborts {len(c.aborts)}, "
              f"hangs {len(c.hangs)}, unexpected {len(c.errors)}", flush=True)
        for case, status in c.aborts:
            print(f"  ABORT (status {status}) at case {case}: {c.replay_command(case)}")
        for case in c.hangs:
            print(f"  HANG at case {case}: {c.replay_command(case)}")
        for case, err in c.errors[:20]:
            print(f"  UNEXPECTED at case {case}: {err}: {c.replay_command(case)}")
    if a.summary is not None:
        cmd = (f"python -m tests.fuzz --target {a.target} --cases {a.cases} --seed {a.seed} "
               f"--summary {a.summary}")
        a.summary.write_text(summary_markdown(campaigns, cmd, a.note))
    return 0 if all(c.ok for c in campaigns) else 1


if __name__ == "__main__":
    sys.exit(main())
