"""The healer tells the truth when replicas go away (issue 20), over a real nats-server:
``worknode_heal_replicas`` follows them down to 0, a subject with fewer than two replicas is
counted as a ``skipped`` heal with its reason and logged, membership changes are logged, a
heal that ends with every root agreeing sets ``worknode_heal_last_success_timestamp_seconds``,
and ``worknode healer --once`` with nothing to heal says so and exits non-zero."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from broker.replica import Consistency
from broker.transport import EmbeddedNatsServer
from services.healer import HealerService
from services.worknode import WorknodeService, load_or_create_signer
from tests.integration._nodes import run_cli
from tests.integration.test_healing import SUBJECT, _setup


async def eventually(condition: Callable[[], bool], within: float = 20.0) -> None:
    """Poll ``condition`` until it holds (a generous deadline; never a fixed sleep)."""
    async with asyncio.timeout(within):
        while not condition():
            await asyncio.sleep(0.02)


def _events(caplog: pytest.LogCaptureFixture, name: str) -> list[str]:
    return [m for r in caplog.records
            if (m := r.getMessage()).startswith(f"event={name} ")]


async def test_replicas_going_away_are_counted_skipped_and_logged(
    tmp_path: Path, nats_server: EmbeddedNatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    nodes, hs, roster = _setup(tmp_path, nats_server.url, ["a", "b", "c"])
    # Heals run at start and at every membership change (the interval is an hour).
    hs = hs.model_copy(update={"membership_poll_s": 0.05})
    svcs = [WorknodeService(s, roster=roster) for s in nodes]
    try:
        for svc in svcs:
            await svc.start()
        # A lost write: the first heal repairs it (one INFO line for a heal that did work).
        await svcs[0].replica(SUBJECT).write(
            lambda t, r, ts: t.state.assign(r, ("lost", "v"), 1, ts), Consistency.LOCAL
        )
        async with HealerService(hs, roster=roster) as healer:
            m = healer.metrics

            def replicas() -> float:
                return float(m.replicas.labels(SUBJECT)._value.get())

            def skipped(reason: str) -> float:
                return float(m.skipped.labels(SUBJECT, reason)._value.get())

            before = time.time()
            await eventually(lambda: replicas() == 3 and healer.reports != [])
            assert healer.reports[-1].converged
            assert m.last_success.labels(SUBJECT)._value.get() >= before
            assert {f"node={n}" for n in "abc"} == {
                e.split()[1] for e in _events(caplog, "replica_appeared")}
            (heal,) = _events(caplog, "heal")
            assert heal.startswith(
                f"event=heal subject={SUBJECT} outcome=converged replicas=3 divergent_keys=1 "
                "repaired=")

            await svcs[2].stop()
            await eventually(lambda: replicas() == 2)
            await svcs[1].stop()
            await eventually(lambda: replicas() == 1 and skipped("one_replica") >= 1)
            await svcs[0].stop()
            await eventually(lambda: replicas() == 0 and skipped("no_replicas") >= 1)
            assert healer.skipped == {SUBJECT: "no_replicas"}
            assert m.heals.labels(SUBJECT, "skipped")._value.get() == (
                skipped("one_replica") + skipped("no_replicas"))
    finally:
        for svc in svcs:
            await svc.stop()
    gone = _events(caplog, "replica_disappeared")
    assert [e.split()[1] for e in gone] == ["node=c", "node=b", "node=a"]
    assert _events(caplog, "heal_skipped") == [
        f"event=heal_skipped subject={SUBJECT} reason=one_replica replicas=a namespace=default",
        f"event=heal_skipped subject={SUBJECT} reason=no_replicas replicas=none "
        "namespace=default",
    ]
    assert all(r.levelno == logging.WARNING for r in caplog.records
               if r.getMessage().startswith("event=heal_skipped "))


async def _healer_once(config: Path) -> tuple[int, str, str]:
    return await run_cli("healer", "--once", "--config", str(config))


async def test_healer_once_without_enough_replicas_says_so_and_fails(
    tmp_path: Path, nats_server: EmbeddedNatsServer
) -> None:
    nodes, hs, _ = _setup(tmp_path, nats_server.url, ["a"])
    roster_file = tmp_path / "roster.json"
    keys = {s.node_id: load_or_create_signer(s.node_id, s.key_path()).public_key.hex()
            for s in [*nodes, hs]}
    roster_file.write_text(json.dumps(keys))
    config = tmp_path / "healer.toml"
    config.write_text(
        f'nats_urls = ["{nats_server.url}"]\nstate_dir = "{hs.state_dir}"\n'
        f'cluster_secret_file = "{hs.cluster_secret_file}"\nroster_file = "{roster_file}"\n'
        'metrics_port = 0\n'
    )
    # No replica at all: one clear line, a non-zero status.
    status, out, err = await _healer_once(config)
    assert status == 3, out + err
    assert "error: no replica answered discovery in namespace 'default'" in err
    assert "Traceback" not in err
    # One replica: nothing to compare, said per subject.
    async with WorknodeService(nodes[0]):
        status, out, err = await _healer_once(config)
    assert status == 3, out + err
    assert f"{SUBJECT}: skipped (one replica: fewer than two replicas answered" in out
    assert f"event=heal_skipped subject={SUBJECT} reason=one_replica replicas=a" in err
