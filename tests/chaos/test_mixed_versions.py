"""Issue 13, bug 3 with real processes: a worknode pinned to wire v1 and one on the current
version, an enable-wins flag written by the newer one (the v1 node keeps it opaque), healed by
``worknode healer --once`` in its own process.

The runbook's rolling-upgrade promise must hold: one heal converges, the next one finds no
divergence, and no value changes on the way. With the bug reintroduced in the nodes
(``WORKNODE_CHAOS_MUTATION``), the same heal must not claim success: it stops as stuck after
one round and exits non-zero.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import pytest

from broker.testing import running_nats_server
from services.worknode import WorknodeSettings, load_or_create_signer
from tests.chaos.test_scenarios import ROOT, SUBJECT, Node, _node_process

pytestmark = pytest.mark.slow


@contextlib.asynccontextmanager
async def _mixed_pair(tmp: Path) -> AsyncIterator[tuple[Node, Node, Path]]:
    """A v1-pinned node ``old`` and a current node ``new`` (each its own process) on one
    nats-server, and the config file of a one-shot healer for them."""
    async with AsyncExitStack() as stack:
        server = await stack.enter_async_context(running_nats_server(tmp / "nats"))
        secret = tmp / "cluster.secret"
        secret.write_bytes(os.urandom(32))
        settings = {
            name: WorknodeSettings(
                node_id=name, subjects=[SUBJECT], nats_urls=[server.url], state_dir=tmp / name,
                metrics_port=None, store_sync="normal", cluster_secret_file=secret,
                flush_interval_ms=2, **extra,
            )
            for name, extra in (("old", {"wire_version": 1}), ("new", {}))
        }
        keys = {n: load_or_create_signer(n, s.key_path()).public_key.hex()
                for n, s in settings.items()}
        keys["healer"] = load_or_create_signer(
            "healer", tmp / "healer" / "healer.key"
        ).public_key.hex()
        roster = tmp / "roster.json"
        roster.write_text(json.dumps(keys))
        config = tmp / "healer.toml"
        config.write_text("\n".join([
            f"nats_urls = [{json.dumps(server.url)}]",
            f"state_dir = {json.dumps(str(tmp / 'healer'))}",
            f"cluster_secret_file = {json.dumps(str(secret))}",
            f"roster_file = {json.dumps(str(roster))}",
            f"subjects = [{json.dumps(SUBJECT)}]",
            "metrics_port = 0",
        ]) + "\n")
        old = await stack.enter_async_context(_node_process("old", settings["old"], roster))
        new = await stack.enter_async_context(_node_process("new", settings["new"], roster))
        yield old, new, config


async def _heal_once(config: Path) -> tuple[int, str]:
    """``worknode healer --once`` in its own process: (exit status, its one line)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "from services.cli import main; main()",
        "healer", "--once", "--config", str(config),
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 120)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    text = out.decode()
    assert f"{SUBJECT}: 2 replicas" in text, err.decode()[-3000:]
    return proc.returncode, text


async def _write_mixed(old: Node, new: Node) -> list[str]:
    """Registers from both nodes, a flag from the new one (published), another kept local
    (a write lost on the way); returns the keys of the registers, once both nodes hold them
    and the v1 node holds the published flag."""
    keys = await old.write(20) + await new.write(20)
    await new.call("enable", key="flag-pub", local=False)
    await new.call("enable", key="flag-lost", local=True)
    for _ in range(500):
        values = (await old.call("values", keys=["flag-pub", *keys]))["values"]
        theirs = (await new.call("values", keys=keys))["values"]
        if values["flag-pub"] is not None and None not in values.values() and \
                None not in theirs.values():
            return keys
        await asyncio.sleep(0.02)
    raise AssertionError("the writes did not replicate")


async def test_v1_and_v3_nodes_with_flags_converge_in_one_heal(tmp_path: Path) -> None:
    async with _mixed_pair(tmp_path) as (old, new, config):
        keys = await _write_mixed(old, new)
        before_old = (await old.call("values", keys=keys))["values"]
        before_new = (await new.call("values", keys=["flag-pub", "flag-lost"]))["values"]
        assert before_new == {"flag-pub": {"on": True}, "flag-lost": {"on": True}}
        # The v1 node holds the newer kind as an opaque store: (kind 6, one dot).
        opaque = (await old.call("values", keys=["flag-pub"]))["values"]["flag-pub"]
        assert opaque == {"on": [6, 1]}
        assert await old.root() != await new.root()

        status, line = await _heal_once(config)
        assert status == 0, line
        assert "NOT converged" not in line, line
        assert "converged" in line, line
        assert await old.root() == await new.root()
        assert (await old.call("digests"))["digests"] == (await new.call("digests"))["digests"]

        # The runbook: the next heal finds no divergence.
        status, line = await _heal_once(config)
        assert status == 0, line
        assert re.search(r"\b0 keys differed, 0 repaired\b", line), line
        assert "NOT converged" not in line, line

        # No value changed on the way; the lost flag reached the v1 node (kept opaque).
        assert (await old.call("values", keys=keys))["values"] == before_old
        assert (await new.call("values", keys=keys))["values"] == before_old
        assert (await new.call("values", keys=["flag-pub", "flag-lost"]))["values"] == before_new
        lost = (await old.call("values", keys=["flag-lost"]))["values"]["flag-lost"]
        assert lost == {"on": [6, 1]}


async def test_with_the_bug_reintroduced_the_heal_stops_stuck_and_exits_non_zero(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mutation check: nodes whose digests depend on their wire version never agree. The
    healer must say so (exit 2, "NOT converged (stuck)") after one round, not report
    success and not keep re-pushing the same keys round after round."""
    monkeypatch.setenv("WORKNODE_CHAOS_MUTATION", "version-dependent-digests")
    async with _mixed_pair(tmp_path) as (old, new, config):
        await _write_mixed(old, new)
        status, line = await _heal_once(config)
        assert status == 2, line
        assert "NOT converged (stuck)" in line, line
