"""Command line of the simulator.

    python -m tests.sim --seeds 200                 # seeds 0..199, 2 processes
    python -m tests.sim --seeds 100000 --summary tests/sim/results/campaign.md
    python -m tests.sim --replay 1234 [--steps 60] [--mutation counter] [-v]
    python -m tests.sim --replay-file tests/sim/results/shrunk-1234.json -v
    python -m tests.sim --seeds 300 --byzantine [--relay] [--repair] [--preclaim]

A failing seed prints the one command that replays it; ``--replay`` of a failing seed also
shrinks it (``tests.sim.shrink``) and writes the short history as a replayable JSON file.
Exit status: 0 when every run passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from tests.sim.mutations import MUTATIONS, mutated
from tests.sim.shrink import shrink, signature
from tests.sim.world import Result, World, make_schedule, run

RESULTS = Path(__file__).parent / "results"
FAULT_STATS = (
    "dropped", "duplicated", "lost_in_flight", "step.crash", "step.restart", "step.part",
    "step.faults", "version_changes", "catchup_requests", "catchup.no_peer", "catchup.ok",
    "report.gap", "report.gated", "heal_keys", "acked", "published", "snapshots",
    "hlc_inversions",
)


def replay_command(seed: int, steps: int, mutation: str | None, byz: str = "") -> str:
    """The one command that replays ``seed`` (``byz``: the Byzantine flags, ``byz_flags``)."""
    cmd = f"python -m tests.sim --replay {seed} --steps {steps}"
    return cmd + (f" --mutation {mutation}" if mutation else "") + byz


def byz_flags(byzantine: bool, relay: bool, repair: bool, preclaim: bool = False) -> str:
    """The command-line flags of a Byzantine mode ("" without it)."""
    if not byzantine:
        return ""
    return " --byzantine" + (" --relay" if relay else "") + (" --repair" if repair else "") \
        + (" --preclaim" if preclaim else "")


Mode = tuple[bool, bool, bool, bool]
"""(byzantine, relay, repair, preclaim)."""
HONEST: Mode = (False, False, False, False)


def _one(args: tuple[int, int, str | None, Mode]) -> dict[str, Any]:
    seed, steps, mutation, (byz, relay, repair, preclaim) = args
    with mutated(mutation):
        r = run(seed, steps, byzantine=int(byz), relay=relay, repair=repair,
                preclaim=preclaim)
    return {
        "seed": seed,
        "ok": r.ok,
        "failure": r.failure.splitlines()[0] if r.failure else "",
        "signature": signature(r.failure) if r.failure else "",
        "steps": r.steps,
        "versions": sorted(set(r.versions)),
        "stats": {k: r.stats.get(k, 0) for k in FAULT_STATS},
        "events": r.stats.get("events", 0),
        "byz": {k: v for k, v in r.stats.items() if k.startswith(("byz.", "rejected."))},
    }


def campaign(first: int, count: int, steps: int, jobs: int, mutation: str | None,
             mode: Mode = HONEST) -> dict[str, Any]:
    """Run ``count`` seeds from ``first`` over ``jobs`` processes; the aggregated outcome."""
    t0 = time.perf_counter()
    work = [(s, steps, mutation, mode) for s in range(first, first + count)]
    rows: list[dict[str, Any]] = []
    if jobs <= 1:
        rows = [_one(w) for w in work]
    else:
        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            for i, row in enumerate(pool.imap_unordered(_one, work, chunksize=25), 1):
                rows.append(row)
                if i % 5000 == 0:
                    bad = sum(not r["ok"] for r in rows)
                    print(f"  {i}/{count} seeds, {bad} failing, "
                          f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)
    elapsed = time.perf_counter() - t0
    rows.sort(key=lambda r: r["seed"])
    faults: Counter[str] = Counter()
    for r in rows:
        faults.update(r["stats"])
        faults.update(r["byz"])
    return {
        "first": first, "count": count, "steps": steps, "jobs": jobs, "mutation": mutation,
        "byz": byz_flags(*mode),
        "elapsed": elapsed, "rows": rows, "faults": faults,
        "total_steps": sum(r["steps"] for r in rows),
        "total_events": sum(r["events"] for r in rows),
        "failures": [r for r in rows if not r["ok"]],
        "signatures": Counter(r["signature"] for r in rows if not r["ok"]),
        "mixed": sum(len(r["versions"]) > 1 for r in rows),
        "version_sets": Counter(",".join(map(str, r["versions"])) for r in rows),
    }


def summary_md(c: dict[str, Any]) -> str:
    """The campaign summary as Markdown."""
    n, el = c["count"], c["elapsed"]
    byz = c.get("byz", "")
    lines = [
        "# Simulation campaign" + (" (Byzantine mode)" if byz else ""),
        "",
        f"Command: `python -m tests.sim --seeds {n} --seed {c['first']} --steps {c['steps']} "
        f"--jobs {c['jobs']}" + (f" --mutation {c['mutation']}" if c["mutation"] else "")
        + byz + " --summary ...`"
        + (f" (run as {c['chunks']} chunks with `--json`, merged with `--merge`)"
           if c.get("chunks", 1) > 1 else ""),
        "",
        "| figure | value |",
        "|---|---|",
        f"| seeds | {n} (from {c['first']}) |",
        f"| schedule steps | {c['total_steps']} ({c['steps']} per seed) |",
        f"| simulated events | {c['total_events']} |",
        f"| failing seeds | {len(c['failures'])} |",
        f"| wall time | {el:.0f} s on {c['jobs']} processes |",
        f"| seeds/s | {n / el:.1f} ({n / el / max(1, c['jobs']):.1f} per process) |",
        f"| steps/s | {c['total_steps'] / el:.0f} |",
        f"| runs mixing wire versions | {c['mixed']} |",
        "",
        "Faults injected and mechanisms exercised (totals):",
        "",
        "| counter | total |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v} |" for k, v in sorted(c["faults"].items())]
    lines += ["", "Wire-version sets:", "", "| versions | runs |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in sorted(c["version_sets"].items())]
    if c["failures"]:
        lines += ["", "Failures by class:", "", "| class | seeds |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in c["signatures"].most_common()]
        lines += ["", "First failing seeds (replay with the command):", ""]
        for r in c["failures"][:20]:
            lines.append(f"- `{replay_command(r['seed'], c['steps'], c['mutation'], byz)}`: "
                         f"{r['failure'][:160]}")
    return "\n".join(lines) + "\n"


def _print_history(setup: dict[str, Any], steps: list[Any]) -> None:
    print(f"setup: {json.dumps(setup)}")
    for i, s in enumerate(steps):
        print(f"  {i:3d} {json.dumps(s)}")


def replay(seed: int, steps: int, mutation: str | None, verbose: bool,
           schedule: tuple[dict[str, Any], list[Any]] | None = None,
           mode: Mode = HONEST) -> int:
    """Replay one seed (or a saved schedule); on failure shrink it. Exit status."""
    byz, relay, repair, preclaim = mode
    sched = schedule or make_schedule(seed, steps, byzantine=int(byz), relay=relay,
                                      repair=repair, preclaim=preclaim)
    with mutated(mutation):
        r = run(seed, schedule=sched)
        print(f"seed {seed}: {'ok' if r.ok else 'FAILED'}  trace {r.trace_hash}  "
              f"nodes {r.nodes} versions {list(r.versions)} steps {r.steps}")
        if verbose:
            _print_history(*sched)
            print("stats:", dict(sorted(r.stats.items())))
        if r.ok:
            return 0
        print(r.failure)
        if schedule is None:
            short, sr = shrink(seed, sched, r.failure, budget=600)
            # Byzantine findings open on this base go apart: every history directly in
            # results/ must replay ok (test_every_saved_finding_replays_ok).
            where = RESULTS / "byzantine" if sched[0].get("byzantine") else RESULTS
            where.mkdir(parents=True, exist_ok=True)
            path = where / f"shrunk-{seed}{'-' + mutation if mutation else ''}.json"
            path.write_text(json.dumps({"seed": seed, "mutation": mutation, "setup": sched[0],
                                        "steps": short}, indent=1) + "\n")
            print(f"\nshrunk to {len(short)} of {len(sched[1])} steps ({signature(sr.failure)}):")
            _print_history(sched[0], short)
            print(f"replay the short history: python -m tests.sim --replay-file {path}")
    return 1


def main(argv: list[str] | None = None) -> int:
    """Entry point (see the module doc)."""
    p = argparse.ArgumentParser(prog="python -m tests.sim", description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=0, help="run this many seeds")
    p.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    p.add_argument("--steps", type=int, default=60, help="schedule steps per seed")
    p.add_argument("--replay", type=int, help="replay one seed (and shrink it if it fails)")
    p.add_argument("--replay-file", type=Path, help="replay a saved (shrunk) schedule")
    p.add_argument("--summary", type=Path, help="write the campaign summary (Markdown) here")
    p.add_argument("--json", type=Path, help="write the campaign's figures (JSON) here")
    p.add_argument("--merge", type=Path, nargs="+",
                   help="merge the --json figures of campaign chunks into one --summary")
    p.add_argument("--jobs", type=int, default=2, help="processes (default 2)")
    p.add_argument("--mutation", choices=sorted(MUTATIONS), help="reintroduce a fixed defect")
    p.add_argument("--byzantine", action="store_true",
                   help="add the Byzantine node (tests/sim/byzantine.py) and its attacks")
    p.add_argument("--relay", action="store_true",
                   help="with --byzantine: it answers catch-ups with forged states (h)")
    p.add_argument("--repair", action="store_true",
                   help="with --byzantine: forged repairs signed by the healer's key (i)")
    p.add_argument("--preclaim", action="store_true",
                   help="with --byzantine: removals claiming honest dots not issued yet")
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args(argv)
    mode: Mode = (a.byzantine, a.relay, a.repair, a.preclaim)
    if (a.relay or a.repair or a.preclaim) and not a.byzantine:
        p.error("--relay, --repair and --preclaim need --byzantine")
    if a.replay_file is not None:
        saved = json.loads(a.replay_file.read_text())
        return replay(saved["seed"], len(saved["steps"]), a.mutation or saved.get("mutation"),
                      a.verbose, (saved["setup"], saved["steps"]))
    if a.replay is not None:
        return replay(a.replay, a.steps, a.mutation, a.verbose, mode=mode)
    if a.merge:
        c = merge([json.loads(f.read_text()) for f in a.merge])
        print(f"{c['count']} seeds, {c['total_steps']} steps: {len(c['failures'])} failing")
        if a.summary is not None:
            a.summary.write_text(summary_md(c))
        return 1 if c["failures"] else 0
    if a.seeds <= 0:
        p.error("give --seeds N or --replay SEED")
    c = campaign(a.seed, a.seeds, a.steps, a.jobs, a.mutation, mode)
    n, el = c["count"], c["elapsed"]
    print(f"{n} seeds, {c['total_steps']} steps in {el:.1f} s ({n / el:.1f} seeds/s, "
          f"{c['total_steps'] / el:.0f} steps/s): {len(c['failures'])} failing")
    for r in c["failures"][:10]:
        print(f"  seed {r['seed']}: {r['failure'][:140]}\n"
              f"    replay: {replay_command(r['seed'], a.steps, a.mutation, c['byz'])}")
    if a.summary is not None:
        a.summary.parent.mkdir(parents=True, exist_ok=True)
        a.summary.write_text(summary_md(c))
    if a.json is not None:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({k: v for k, v in c.items() if k != "rows"}))
    return 1 if c["failures"] else 0


def merge(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    """One campaign's figures from chunks run one after another (``--json``): seeds must be
    contiguous and steps equal; wall time adds up."""
    chunks = sorted(chunks, key=lambda c: c["first"])
    for a, b in itertools.pairwise(chunks):
        if a["first"] + a["count"] != b["first"] or a["steps"] != b["steps"]:
            raise SystemExit("error: chunks are not contiguous runs of one step count")
    out: dict[str, Any] = {
        "first": chunks[0]["first"], "count": sum(c["count"] for c in chunks),
        "steps": chunks[0]["steps"], "jobs": chunks[0]["jobs"], "mutation": None,
        "byz": chunks[0].get("byz", ""),
        "elapsed": sum(c["elapsed"] for c in chunks),
        "total_steps": sum(c["total_steps"] for c in chunks),
        "total_events": sum(c["total_events"] for c in chunks),
        "failures": [f for c in chunks for f in c["failures"]],
        "mixed": sum(c["mixed"] for c in chunks),
        "chunks": len(chunks),
    }
    for key in ("faults", "signatures", "version_sets"):
        total: Counter[str] = Counter()
        for c in chunks:
            total.update(c[key])
        out[key] = total
    return out


__all__ = ["Result", "World", "campaign", "main", "replay", "replay_command", "summary_md"]

if __name__ == "__main__":
    sys.exit(main())
