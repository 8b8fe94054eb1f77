"""Seed scenario 2 for STRONG: six worknodes on a 3-server cluster (sync_interval always,
STRONG streams R3), split 5 | 1 (the lone node's server cut from the other servers).

- The majority's STRONG writes succeed (retried while the stream elects a leader on its side).
- The lone node's STRONG writes and reads fail with ``UnavailableError`` in bounded time (its
  ``strong_timeout_s``; ``wait_for`` only turns a hang into a failure), while its EVENTUAL and
  LOCAL writes succeed.
- After healing, all six replicas hold every acknowledged write: STRONG by fast-forward from
  the log (each node's STRONG read, and its local state without a fence), EVENTUAL by the
  healer (``worknode healer`` in its own process, as in ``tests/chaos``).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import pytest

from broker.crdt import Assign, Create
from broker.errors import UnavailableError
from broker.replica import Consistency
from services.worknode import load_or_create_signer
from tests.chaos.test_scenarios import _healer_process
from tests.jepsen._harness import (
    SUBJECT,
    _settings,
    cluster,
    roster_of,
    services,
    strong_of,
    until,
)

pytestmark = pytest.mark.slow
KEYS = ["acct-0", "acct-1", "acct-2"]


async def test_scenario_2_lone_node_is_read_only_for_strong_and_fast_forwards(
    tmp_path: Path,
) -> None:
    placement = {"n1": 0, "n2": 0, "n3": 1, "n4": 1, "n5": 0, "n6": 2}
    secret = tmp_path / "cluster.secret"
    secret.write_bytes(os.urandom(32))
    async with cluster(tmp_path) as c:
        settings = [_settings(tmp_path, c.urls[s], n, secret) for n, s in placement.items()]
        healer_key = load_or_create_signer("healer", tmp_path / "healer" / "healer.key")
        roster = roster_of(settings, {"healer": healer_key.public_key})
        roster_file = tmp_path / "roster.json"
        roster_file.write_text(json.dumps(
            {s.node_id: load_or_create_signer(s.node_id, s.key_path()).public_key.hex()
             for s in settings} | {"healer": healer_key.public_key.hex()}))
        async with services(settings, roster) as svcs, \
                _healer_process(tmp_path, c, 0, secret, roster_file):
            nodes = dict(zip(placement, svcs, strict=True))
            first = strong_of(nodes["n1"].replica(SUBJECT))
            for key in KEYS:
                await until(lambda k=key: first.create_if_absent(k, "root"), 30, "create")
            for svc in svcs:
                await until(lambda s=svc: strong_of(s.replica(SUBJECT)).read(KEYS), 30, "read")

            c.partition([{0, 1}, {2}])
            lone = nodes["n6"].replica(SUBJECT)
            acked: dict[str, dict[str, str]] = {k: {} for k in KEYS}
            for i, (name, svc) in enumerate(nodes.items()):
                if name == "n6":
                    continue
                mode = strong_of(svc.replica(SUBJECT))
                for j in range(3):
                    key, field, value = KEYS[(i + j) % 3], f"by-{name}-{j}", f"{name}:{j}"
                    await until(lambda m=mode, k=key, f=field, v=value: m.write(
                        [Assign(k, (f,), v)]), 30, f"majority write on {name}")
                    acked[key][field] = value
            # The lone node: STRONG fails, bounded; it never succeeds.
            started = time.monotonic()
            for _ in range(3):
                with pytest.raises(UnavailableError):
                    await asyncio.wait_for(strong_of(lone).write(
                        [Assign("acct-0", ("lone",), "x")]), 30)
                with pytest.raises(UnavailableError):
                    await asyncio.wait_for(strong_of(lone).read(KEYS), 30)
            print(f"\nscenario 2: 3 STRONG writes + 3 reads failed on the lone node in "
                  f"{time.monotonic() - started:.1f} s")
            assert strong_of(lone).available is False
            # ... while LOCAL and EVENTUAL go on, on both sides.
            eventual = [f"ev-n6-{i}" for i in range(10)] + [f"ev-n1-{i}" for i in range(10)]
            for key in eventual[:10]:
                await lone.write(Create(key, "root"), Consistency.EVENTUAL)
            await lone.write(Create("local-n6", "root"), Consistency.LOCAL)
            for key in eventual[10:]:
                await nodes["n1"].replica(SUBJECT).write(Create(key, "root"))
            assert all(k in lone.state.value() for k in eventual[:10])

            c.heal()
            await c.wait_routes(timeout=30)
            for name, svc in nodes.items():
                r = svc.replica(SUBJECT)
                got = await until(lambda r=r: strong_of(r).read(KEYS), 30,
                                  f"STRONG read on {name} after healing")
                value, local = got.state.value(), r.state.value()
                for key in KEYS:
                    fields = value[key].get("fields", {})
                    assert fields == acked[key], (name, key)  # and nothing from the lone node
                    assert local[key].get("fields", {}) == acked[key], (name, key)
            deadline = time.monotonic() + 60
            for name, svc in nodes.items():
                r = svc.replica(SUBJECT)
                while missing := [k for k in eventual if k not in r.state.value()]:
                    assert time.monotonic() < deadline, f"{name} misses {missing}"
                    await asyncio.sleep(0.1)
