"""Worknode settings and rosters shared by the replication tests (one subject, loopback NATS)."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from broker.codec import TrustRoster
from services.worknode import WorknodeService, WorknodeSettings, load_or_create_signer

SUBJECT = "orders"


def node_settings(tmp: Path, url: str, name: str, **kw: Any) -> WorknodeSettings:
    """Settings of worknode ``name`` replicating ``SUBJECT``, state under ``tmp / name``."""
    base: dict[str, Any] = {
        "node_id": name,
        "subjects": [SUBJECT],
        "nats_urls": [url],
        "state_dir": tmp / name,
        "metrics_port": None,
        "store_sync": "normal",
        "flush_interval_ms": 2,
    }
    base.update(kw)
    return WorknodeSettings(**base)


def roster_of(settings: Sequence[WorknodeSettings]) -> TrustRoster:
    """The roster trusting every node of ``settings`` (their keys are made if missing)."""
    return TrustRoster(
        {s.node_id: load_or_create_signer(s.node_id, s.key_path()).public_key for s in settings}
    )


@asynccontextmanager
async def running_nodes(
    tmp: Path, url: str, names: Sequence[str], roster: TrustRoster | None = None, **kw: Any
) -> AsyncIterator[list[WorknodeService]]:
    """Worknode services ``names`` (``node_settings(..., **kw)``), started in order, all
    trusting each other (or ``roster``); stopped on exit, also when the body fails."""
    settings = [node_settings(tmp, url, n, **kw) for n in names]
    roster = roster or roster_of(settings)
    services = [WorknodeService(s, roster=roster) for s in settings]
    try:
        for svc in services:
            await svc.start()
        yield services
    finally:
        for svc in services:
            await svc.stop()


async def run_cli(*args: str, cwd: Path | None = None, timeout: float = 60,
                  env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """``worknode ARGS`` as a real process (killed if it outlives ``timeout``; ``env``: its
    whole environment, default this one's): its status, stdout and stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli", *args, cwd=cwd, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def eventually(check: Callable[[], bool], timeout: float, what: str) -> None:
    """Wait until ``check()`` holds, polling; ``AssertionError`` naming ``what`` after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached in {timeout} s: {what}")
        await asyncio.sleep(0.05)


async def heal_until_converged(healer: Any, subject: str, nodes: list[str],
                               timeout: float = 30) -> Any:
    """``healer.heal_subject`` until a heal converges (its ``HealOutcome``); a heal may
    end ``catchup`` first (receivers drop writers' dots their repair's source cannot vouch
    for and catch up from those writers). ``AssertionError`` with the last reason after
    ``timeout`` seconds, or at once for a heal that ends otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        out = await healer.heal_subject(subject, nodes)
        if out.converged:
            return out
        assert out.reason == "catchup", f"heal of {subject} ended {out.reason}"
        if time.monotonic() > deadline:
            raise AssertionError(f"heal of {subject} not converged in {timeout} s")
        await asyncio.sleep(0.05)
