"""Run fuzz cases in worker subprocesses, so an abort or a hang is a finding, not the end.

A campaign of ``cases`` cases of one target is cut into batches; each batch runs in a fresh
``python -m tests.fuzz --worker`` process that prints ``at I`` before case ``I`` and one
``done {json}`` line at the end. A worker killed by a signal (SIGABRT from pycapnp's kj
layer, say) is an abort at the last case it announced; one that outlives its deadline is a
hang at that case; either way the campaign goes on from the next case. Case ``I`` of seed
``S`` is drawn from ``random.Random(f"{S}/{target}/{I}")`` alone, so ``--replay I`` rebuilds
exactly that input.
"""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.fuzz._targets import ACCEPTED, SELF_TESTS, TARGETS, Harness, Target

__all__ = ["Campaign", "case_input", "run_campaign", "run_worker", "summary_markdown"]

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Campaign:
    """What a campaign of one target found."""

    target: str
    seed: int
    cases: int = 0
    accepted: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    aborts: list[tuple[int, int]] = field(default_factory=list)
    """(case, exit status: minus the signal number when killed by one)."""
    hangs: list[int] = field(default_factory=list)
    errors: list[tuple[int, str]] = field(default_factory=list)
    """(case, exception) for anything but a refusal the entry point names."""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """No abort, hang or unexpected exception, and every case accounted for."""
        accounted = self.accepted + sum(self.rejected.values())
        return not (self.aborts or self.hangs or self.errors) and accounted == self.cases

    def replay_command(self, case: int) -> str:
        """The command that reruns ``case`` in this process, with its traceback."""
        return f"python -m tests.fuzz --target {self.target} --seed {self.seed} --replay {case}"


def _target(name: str) -> Target:
    return TARGETS.get(name) or SELF_TESTS[name]


def case_input(target: Target, h: Harness, seeds: list[bytes], seed: int, i: int) -> tuple[
    bytes, random.Random
]:
    """Case ``i``'s input and the generator its run draws from (deterministic in seed, i)."""
    rng = random.Random(f"{seed}/{target.name}/{i}")
    return target.case(rng, h, rng.choice(seeds)), rng


async def _worker(name: str, seed: int, start: int, count: int) -> dict[str, object]:
    target = _target(name)
    h = await target.setup()
    out = sys.stdout
    accepted = 0
    rejected: Counter[str] = Counter()
    errors: list[tuple[int, str]] = []
    try:
        seeds = target.seeds(h)
        for i in range(start, start + count):
            data, rng = case_input(target, h, seeds, seed, i)
            out.write(f"at {i}\n")
            out.flush()
            try:
                outcome = await target.run(h, data, rng)
            except Exception as exc:
                errors.append((i, f"{type(exc).__name__}: {str(exc)[:300]}"))
                continue
            if outcome == ACCEPTED:
                accepted += 1
            else:
                rejected[outcome] += 1
    finally:
        await h.close()
    return {"accepted": accepted, "rejected": dict(rejected), "errors": errors}


def run_worker(name: str, seed: int, start: int, count: int) -> None:
    """The worker process's body: run cases ``start..start+count-1`` and report."""
    result = asyncio.run(_worker(name, seed, start, count))
    sys.stdout.write("done " + json.dumps(result) + "\n")
    sys.stdout.flush()


def replay(name: str, seed: int, case: int) -> int:
    """Run one case in this process, printing its input and outcome (or traceback)."""

    async def one() -> int:
        target = _target(name)
        h = await target.setup()
        try:
            data, rng = case_input(target, h, target.seeds(h), seed, case)
            print(f"case {case} of {name} (seed {seed}): {len(data)} bytes\n{data.hex()}")
            sys.stdout.flush()
            try:
                print("outcome:", await target.run(h, data, rng))
            except Exception:
                traceback.print_exc()
                return 1
            return 0
        finally:
            await h.close()

    return asyncio.run(one())


def run_campaign(
    name: str, cases: int, seed: int, *, batch: int = 500, timeout: float = 300.0
) -> Campaign:
    """Run ``cases`` cases of target ``name`` in worker processes of ``batch`` cases each;
    a worker that runs past ``timeout`` seconds is killed (a hang at its current case)."""
    c = Campaign(name, seed, cases)
    t0 = time.monotonic()
    todo = [(s, min(batch, cases - s)) for s in range(0, cases, batch)]
    while todo:
        start, count = todo.pop(0)
        if count <= 0:
            continue
        cmd = [sys.executable, "-m", "tests.fuzz", "--worker", "--target", name,
               "--seed", str(seed), "--start", str(start), "--cases", str(count)]
        hung = False
        try:
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                                  timeout=timeout, check=False)
            stdout, status = proc.stdout, proc.returncode
        except subprocess.TimeoutExpired as exc:  # run() killed and reaped the worker
            raw = exc.stdout or b""
            stdout = raw.decode() if isinstance(raw, bytes) else raw
            status, hung = 0, True
        if not hung and status > 0 and "\nat " not in "\n" + stdout:
            # Failed before its first case: a broken target, not a finding.
            raise RuntimeError(f"fuzz worker for {name} failed to start:\n{proc.stderr}")
        last = start
        done: dict[str, Any] | None = None
        for line in stdout.splitlines():
            if line.startswith("at "):
                last = int(line[3:])
            elif line.startswith("done "):
                done = json.loads(line[5:])
        if done is not None and not hung and status == 0:
            c.accepted += int(done["accepted"])
            c.rejected.update(done["rejected"])
            c.errors.extend((int(i), str(e)) for i, e in done["errors"])
            continue
        # The worker died or hung at case ``last``; the counts of the cases before it died
        # with it: rerun those in a new worker, and go on after ``last``.
        if hung:
            c.hangs.append(last)
        else:
            c.aborts.append((last, status))
        todo[:0] = [(start, last - start), (last + 1, start + count - last - 1)]
    c.seconds = time.monotonic() - t0
    return c


def summary_markdown(campaigns: list[Campaign], command: str, note: str = "") -> str:
    """The Markdown report of ``campaigns``."""
    import capnp

    lines = [
        "# Fuzz campaign: hostile bytes from trusted signers",
        "",
        f"Command: `{command}`",
        "",
        f"Python {sys.version.split()[0]}, pycapnp {capnp.__version__}; every case ran in a "
        "worker subprocess (an abort or hang would be listed, not lost).",
        "",
    ]
    if note:
        lines += [note, ""]
    lines += [
        "Long run (>= 100,000 cases per target): `python -m tests.fuzz --target all "
        "--cases 100000 --seed 1 --summary bench/results/fuzz.md`.",
        "",
    ]
    lines += [
        "| target | cases | accepted | rejected | aborts | hangs | unexpected | seconds |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in campaigns:
        lines.append(
            f"| {c.target} | {c.cases} | {c.accepted} | {sum(c.rejected.values())} | "
            f"{len(c.aborts)} | {len(c.hangs)} | {len(c.errors)} | {c.seconds:.1f} |"
        )
    lines += ["", "Rejects by reason (the error class, or the replica's metric label):", ""]
    for c in campaigns:
        reasons = ", ".join(f"{r} {n}" for r, n in sorted(c.rejected.items()))
        lines.append(f"- **{c.target}**: {reasons or 'none'}")
    failures = [(c, kind, case) for c in campaigns
                for kind, cases in (("abort", [a for a, _ in c.aborts]), ("hang", c.hangs),
                                    ("unexpected", [e for e, _ in c.errors]))
                for case in cases]
    if failures:
        lines += ["", "Findings (replay each with its command):", ""]
        for c, kind, case in failures:
            lines.append(f"- {c.target} case {case}: {kind}: `{c.replay_command(case)}`")
    return "\n".join(lines) + "\n"
