"""Hostile bytes from trusted signers: every entry point survives signed, mutated input.

Each target runs in worker subprocesses (``tests.fuzz._runner``): an abort or a hang is a
failure with the case that caused it, never the end of pytest. ``FUZZ_CI_CASES`` cases per
target here (a few thousand in all); the long run is ``python -m tests.fuzz --target all
--cases 100000`` (README, "Hostile input").
"""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys

import pytest

from tests.fuzz._runner import ROOT, run_campaign
from tests.fuzz._targets import ACCEPTED, TARGETS

FUZZ_CI_CASES = 300
SEED = 14


@pytest.mark.parametrize("name", list(TARGETS))
def test_every_seed_is_accepted(name: str) -> None:
    # Mutations start from valid messages: a seed the entry point refused would leave the
    # fuzzer testing only the first check.
    target = TARGETS[name]

    async def outcomes() -> list[str]:
        h = await target.setup()
        try:
            return [await target.run(h, s, random.Random(0)) for s in target.seeds(h)]
        finally:
            await h.close()

    found = asyncio.run(outcomes())
    assert found
    assert set(found) == {ACCEPTED}, found


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TARGETS))
def test_target_survives_signed_hostile_input(name: str) -> None:
    c = run_campaign(name, FUZZ_CI_CASES, SEED, batch=FUZZ_CI_CASES, timeout=120)
    assert not c.aborts, [c.replay_command(i) for i, _ in c.aborts]
    assert not c.hangs, [c.replay_command(i) for i in c.hangs]
    assert not c.errors, c.errors[:5]
    assert c.accepted + sum(c.rejected.values()) == FUZZ_CI_CASES
    # The mutations were hostile, and some still decoded: both sides of the decoder ran.
    assert sum(c.rejected.values()) > FUZZ_CI_CASES // 4, c.rejected
    assert c.accepted > 0


def test_the_runner_reports_aborts_and_hangs() -> None:
    # A runner that cannot see an abort proves nothing: these targets abort on about half
    # their cases, or hang.
    c = run_campaign("selftest-abort", 8, SEED, batch=8, timeout=60)
    assert c.aborts
    assert all(status == -6 for _, status in c.aborts)  # SIGABRT
    assert len(c.aborts) + c.accepted == 8
    assert not c.ok
    h = run_campaign("selftest-hang", 1, SEED, timeout=2)
    assert h.hangs == [0]
    assert not h.ok


def test_single_pointer_corruptions_of_a_signed_repair_are_refused_not_aborts() -> None:
    # Issue 14: the healer's apply endpoint opened repairs with keep_packed=True, which
    # copied the document with pycapnp's as_builder() before validating it; an out-of-bounds
    # pointer in a validly signed repair aborted the interpreter (SIGABRT).
    proc = subprocess.run(
        [sys.executable, "-m", "tests.fuzz._repro_repair"], cwd=ROOT, capture_output=True,
        text=True, timeout=240, check=False,
    )
    lines = proc.stdout.splitlines()
    at = [line for line in lines if line.startswith("at ")]
    assert proc.returncode == 0, (
        f"exit status {proc.returncode} at case {at[-1] if at else '?'}: {proc.stderr[-500:]}"
    )
    done = json.loads(lines[-1].removeprefix("done "))
    assert done["cases"] >= 100
    assert done["refused"] > done["cases"] // 2
