"""Key rotation without downtime (issue 16), against a real nats-server: the roster and the
RPC keyring are reloaded by running services, on a file change or SIGHUP, and every holder of
the roster (replicas, endpoints) sees the new keys at once.

- a node's key rotated with an overlap window (``worknode keys rotate``): its peers accept
  the old key inside the window and its new key after their reload, without a restart; the
  old key is refused once the window ends (the peers' clock is injected);
- a key removed from the roster (``worknode keys remove --roster``) is refused by every peer
  (real ``worknode node`` processes) right after SIGHUP;
- an invalid roster file leaves the roster in force, with one error line and a metric;
- an RPC root key removed from the keyring stops its tokens on the reload.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from broker.codec import CURRENT_VERSION, Signer, TrustRoster
from broker.rpc import Grant, RootKey, RpcClient, UnauthenticatedError, mint
from broker.transport import EmbeddedNatsServer, NatsTransport, RequestSigner
from services.worknode import WorknodeService, WorknodeSettings, load_or_create_signer
from services.worknode._keys import write_roster
from tests.integration._nodes import SUBJECT, node_settings, run_cli

WAIT = 30.0
POLL = 0.05  # the services' key_reload_interval_s here: a changed file is seen at once


async def until(cond: Callable[[], bool], what: str) -> None:
    """Wait for ``cond`` (a generous bound only so a broken build fails instead of hanging)."""
    deadline = time.monotonic() + WAIT
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        await asyncio.sleep(0.02)


def sample(svc: WorknodeService, name: str, **labels: str) -> float:
    return svc.metrics.registry.get_sample_value(name, labels) or 0.0


def rejected(svc: WorknodeService, reason: str) -> float:
    return sample(svc, "worknode_deltas_rejected_total", subject=SUBJECT, reason=reason)


def holds(svc: WorknodeService, worknode: str) -> bool:
    return worknode in svc.replica(SUBJECT).state.value()


def settings(tmp: Path, url: str, name: str, roster: Path, **kw: Any) -> WorknodeSettings:
    return node_settings(tmp, url, name, roster_file=roster, key_reload_interval_s=POLL, **kw)


def seed_roster(tmp: Path, names: list[str], roster: Path) -> None:
    """Seeds for ``names`` (under ``tmp / name``) and a roster trusting all of them."""
    write_roster(roster, {
        n: load_or_create_signer(n, tmp / n / f"{n}.key").public_key for n in names})


@asynccontextmanager
async def services(*svcs: WorknodeService) -> AsyncIterator[None]:
    """Start ``svcs``; every one is stopped whatever happens."""
    async with AsyncExitStack() as stack:
        for svc in svcs:
            stack.push_async_callback(svc.stop)
            await svc.start()
        yield


async def test_rotated_key_takes_effect_on_peers_without_restart_and_old_key_ends(
    tmp_path: Path, nats_server: EmbeddedNatsServer
) -> None:
    url, roster_file = nats_server.url, tmp_path / "roster.json"
    seed_roster(tmp_path, ["a", "b", "c"], roster_file)
    old_seed = (tmp_path / "b" / "b.key").read_bytes()
    offset = [0.0]  # the peers' wall clock, moved past the window at the end

    def clock() -> float:
        return time.time() + offset[0]

    peers = [WorknodeService(settings(tmp_path, url, n, roster_file),
                             roster=TrustRoster(now=clock)) for n in ("a", "c")]
    b_settings = settings(tmp_path, url, "b", roster_file)
    async with services(*peers):
        async with services(b := WorknodeService(b_settings)):
            await b.replica(SUBJECT).create("before")
            for p in peers:
                await until(lambda p=p: holds(p, "before"), "b's first write on every peer")

            status, out, err = await run_cli(
                "keys", "rotate", "b", "--seed", str(tmp_path / "b" / "b.key"),
                "--roster", str(roster_file), "--overlap", "1h", cwd=tmp_path)
            assert status == 0, err
            new_key = bytes.fromhex(out.strip())
            assert "Restart b" in err
            for p in peers:  # reloaded by the file watch: no restart
                await until(lambda p=p: p.roster.entries()["b"].key == new_key,
                            "the rotated roster reloaded by every peer")
                assert p.roster.entries()["b"].previous is not None
                assert sample(p, "worknode_roster_keys_in_overlap") == 1
            # b still runs with its old key: inside the window its writes are accepted.
            await b.replica(SUBJECT).create("during")
            for p in peers:
                await until(lambda p=p: holds(p, "during"), "an old-key write in the window")

        # b restarts with its new seed; its peers were never restarted.
        async with services(b2 := WorknodeService(b_settings)):
            assert b2.signer is not None
            assert b2.signer.public_key == new_key
            await b2.replica(SUBJECT).create("after")
            for p in peers:
                await until(lambda p=p: holds(p, "after"), "a new-key write")
            assert all(rejected(p, "bad_signature") == 0 for p in peers)

        # The window ends: a write signed with the old key is refused.
        offset[0] = 2 * 3600
        (tmp_path / "old.key").write_bytes(old_seed)
        (tmp_path / "old.key").chmod(0o600)
        straggler = WorknodeService(node_settings(tmp_path, url, "b", state_dir=tmp_path / "old",
                                                  key_file=tmp_path / "old.key"))
        async with services(straggler):
            await straggler.replica(SUBJECT).create("late")
            for p in peers:
                await until(lambda p=p: rejected(p, "bad_signature") >= 1,
                            "the old key refused after its window")
                assert not holds(p, "late")
                assert sample(p, "worknode_roster_keys_in_overlap") == 0


# -- removal, by SIGHUP, in real `worknode node` processes ---------------------------------

class NodeProcess:
    """A real ``worknode node`` (or ``worknode healer``) process; killed at the end whatever
    happened."""

    def __init__(self) -> None:
        self.proc: asyncio.subprocess.Process | None = None
        self.metrics_url = ""
        self.stderr = ""

    async def start(self, env: dict[str, str], cwd: Path, command: str = "node") -> None:
        base = {k: v for k, v in os.environ.items() if not k.startswith("WORKNODE_")}
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.cli", command, env={**base, **env}, cwd=cwd,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        stream = self.proc.stderr
        assert stream is not None
        pattern = r"metrics at (\S+)" if command == "node" else r"metrics on port (\d+)"
        async with asyncio.timeout(WAIT):
            while not (found := re.search(pattern, line := (await stream.readline()).decode())):
                self.stderr += line
                assert line, f"the {command} exited: {self.stderr}"
        self.metrics_url = (found.group(1) if command == "node"
                            else f"http://127.0.0.1:{found.group(1)}/metrics")

    async def sample(self, name: str, **labels: str) -> float:
        """One series of the process's /metrics (0 when absent)."""
        try:
            text = await asyncio.to_thread(
                lambda: urllib.request.urlopen(self.metrics_url, timeout=10).read().decode())
        except OSError as exc:
            assert self.proc is not None
            raise AssertionError(f"no /metrics from pid {self.proc.pid} (killed by the "
                                 "signal?)") from exc
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in text.splitlines():
            series, _, value = line.rpartition(" ")
            if series == (f"{name}{{{want}}}" if labels else name):
                return float(value)
        return 0.0

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


async def until_sample(node: NodeProcess, at_least: float, name: str, **labels: str) -> None:
    deadline = time.monotonic() + WAIT
    while await node.sample(name, **labels) < at_least:
        assert node.proc is not None
        assert node.proc.returncode is None, "the node exited"
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {name}{labels} >= {at_least}")
        await asyncio.sleep(0.05)


@pytest.fixture
async def processes() -> AsyncIterator[list[NodeProcess]]:
    procs: list[NodeProcess] = []
    try:
        yield procs
    finally:
        for p in procs:
            await p.kill()


async def test_removed_key_is_refused_by_every_peer_and_the_healer_after_sighup(
    tmp_path: Path, nats_server: EmbeddedNatsServer, processes: list[NodeProcess]
) -> None:
    roster_file = tmp_path / "roster.json"
    seed_roster(tmp_path, ["a", "b", "c"], roster_file)
    for name in ("a", "c"):
        node = NodeProcess()
        processes.append(node)
        await node.start({
            "WORKNODE_NODE_ID": name, "WORKNODE_NATS_URLS": f'["{nats_server.url}"]',
            "WORKNODE_SUBJECTS": f'["{SUBJECT}"]', "WORKNODE_STATE_DIR": str(tmp_path / name),
            "WORKNODE_ROSTER_FILE": str(roster_file), "WORKNODE_STORE_SYNC": "normal",
            "WORKNODE_KEY_RELOAD_INTERVAL_S": "0",  # no file watch: SIGHUP alone reloads
            "WORKNODE_METRICS_PORT": "0", "WORKNODE_LOG_LEVEL": "WARNING",
        }, tmp_path)
    secret = tmp_path / "secret"
    secret.write_bytes(os.urandom(32))
    healer = NodeProcess()
    processes.append(healer)
    await healer.start({
        "WORKNODE_HEALER_NATS_URLS": f'["{nats_server.url}"]',
        "WORKNODE_HEALER_CLUSTER_SECRET_FILE": str(secret),
        "WORKNODE_HEALER_STATE_DIR": str(tmp_path / "healer"),
        "WORKNODE_HEALER_ROSTER_FILE": str(roster_file),
        "WORKNODE_HEALER_KEY_RELOAD_INTERVAL_S": "0", "WORKNODE_HEALER_METRICS_PORT": "0",
        "WORKNODE_HEALER_INTERVAL_S": "3600", "WORKNODE_LOG_LEVEL": "WARNING",
    }, tmp_path, "healer")
    nodes = processes[:2]
    assert await healer.sample("worknode_roster_keys") == 4  # a, b, c and itself
    applied = "worknode_deltas_applied_total"
    async with services(b := WorknodeService(node_settings(tmp_path, nats_server.url, "b"))):
        await b.replica(SUBJECT).create("trusted")
        for node in nodes:
            await until_sample(node, 1, applied, subject=SUBJECT, wire_version=str(CURRENT_VERSION))

        status, _, err = await run_cli("keys", "remove", "b", "--roster", str(roster_file),
                                       cwd=tmp_path)
        assert status == 0, err
        assert "b" not in json.loads(roster_file.read_text())
        for node in processes:
            assert node.proc is not None
            node.proc.send_signal(signal.SIGHUP)
        for node in processes:
            await until_sample(node, 1, "worknode_key_reloads_total", file="roster",
                               result="ok")
        for node in nodes:
            assert await node.sample("worknode_roster_keys") == 2
        assert await healer.sample("worknode_roster_keys") == 3  # b is gone for it too

        await b.replica(SUBJECT).create("removed")
        for node in nodes:
            await until_sample(node, 1, "worknode_deltas_rejected_total", subject=SUBJECT,
                               reason="unknown_signer")
        for node in processes:
            assert node.proc is not None
            assert node.proc.returncode is None


# -- an invalid roster keeps the one in force -----------------------------------------------

async def test_invalid_roster_file_keeps_the_roster_in_force_logged_and_counted(
    tmp_path: Path, nats_server: EmbeddedNatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    roster_file = tmp_path / "roster.json"
    seed_roster(tmp_path, ["a", "b"], roster_file)
    a = WorknodeService(settings(tmp_path, nats_server.url, "a", roster_file))
    b = WorknodeService(settings(tmp_path, nats_server.url, "b", roster_file))
    async with services(a, b):
        good = a.roster.entries()
        bad_files = [
            "{not json",
            json.dumps({"b": {"key": "00" * 32, "role": "overlord"}}),
            json.dumps({"b": "abc"}),
        ]
        for n, text in enumerate(bad_files, 1):
            roster_file.write_text(text)
            await until(lambda n=n: sample(a, "worknode_key_reloads_total", file="roster",
                                           result="failed") == n, "the invalid file refused")
            assert a.roster.entries() == good
        refusals = [r for r in caplog.records
                    if r.levelno == logging.ERROR and "reload refused" in r.getMessage()
                    and r.getMessage().startswith("a:")]
        assert len(refusals) == len(bad_files)
        assert all("\n" not in r.getMessage() for r in refusals)
        assert sample(a, "worknode_key_reloads_total", file="roster", result="ok") == 0
        assert sample(a, "worknode_key_file_refused", file="roster") == 1
        # b (whose entry the bad files tried to change) is still trusted by a.
        await b.replica(SUBJECT).create("still-trusted")
        await until(lambda: holds(a, "still-trusted"), "b's write accepted by a")
        assert rejected(a, "unknown_signer") == rejected(a, "bad_signature") == 0
        # A valid file is taken again.
        roster_file.write_text(json.dumps({
            "a": good["a"].key.hex(), "b": good["b"].key.hex(),
            "h": {"key": bytes(range(32)).hex(), "role": "healer"}}))
        await until(lambda: a.roster.role_of("h") == "healer", "the valid file reloaded")
        assert sample(a, "worknode_key_file_refused", file="roster") == 0


# -- the RPC keyring --------------------------------------------------------------------------

NS = "shop"


async def test_rpc_root_key_removed_from_the_keyring_stops_its_tokens(
    tmp_path: Path, nats_server: EmbeddedNatsServer
) -> None:
    kept, removed = RootKey(1, bytes(range(32))), RootKey(2, bytes(range(1, 33)))
    keyring = tmp_path / "keyring.json"
    keyring.write_text(json.dumps({"1": kept.public_key.hex(), "2": removed.public_key.hex()}))
    svc = WorknodeService(WorknodeSettings(
        node_id="n1", namespace=NS, subjects=[SUBJECT], nats_urls=[nats_server.url],
        state_dir=tmp_path / "n1", metrics_port=None, store_sync="normal",
        rpc_keyring_file=keyring, key_reload_interval_s=POLL))

    caller = Signer("caller", bytes(range(5, 37)))

    def token(root: RootKey) -> bytes:
        return mint(root, [Grant(NS, SUBJECT, "root", ("*",))], expires_at=time.time() + 600,
                    holder=caller.public_key)

    async with services(svc), NatsTransport([nats_server.url], name="client") as transport:
        # The caller signs as the tokens' holder; the replies are checked against n1's key.
        client = RpcClient(transport, namespace=NS,
                           signer=RequestSigner(caller, TrustRoster(
                               {"n1": svc.signer.public_key})))
        old, new = token(removed), token(kept)
        await client.call(SUBJECT, "root", "get", token=old)  # verified, and cached
        assert sample(svc, "worknode_rpc_keyring_keys") == 2

        keyring.write_text(json.dumps({"1": kept.public_key.hex()}))
        await until(lambda: sample(svc, "worknode_key_reloads_total", file="rpc_keyring",
                                   result="ok") == 1, "the keyring reloaded")
        assert sample(svc, "worknode_rpc_keyring_keys") == 1
        with pytest.raises(UnauthenticatedError):
            await client.call(SUBJECT, "root", "get", token=old)
        await client.call(SUBJECT, "root", "get", token=new)

        keyring.write_text("[]")  # invalid: the keyring in force stays
        await until(lambda: sample(svc, "worknode_key_reloads_total", file="rpc_keyring",
                                   result="failed") == 1, "the invalid keyring refused")
        await client.call(SUBJECT, "root", "get", token=new)


async def test_the_healer_reloads_its_roster_without_restart(
    tmp_path: Path, nats_server: EmbeddedNatsServer
) -> None:
    from services.healer import HealerService, HealerSettings

    roster_file = tmp_path / "roster.json"
    seed_roster(tmp_path, ["a"], roster_file)
    secret = tmp_path / "secret"
    secret.write_bytes(os.urandom(32))
    healer = HealerService(HealerSettings(
        nats_urls=[nats_server.url], state_dir=tmp_path / "healer", roster_file=roster_file,
        cluster_secret_file=secret, metrics_port=None, interval_s=3600, membership_poll_s=3600,
        key_reload_interval_s=POLL))
    async with AsyncExitStack() as stack:
        stack.push_async_callback(healer.stop)
        await healer.start()
        assert healer.roster.role_of("healer") == "healer"  # itself, with its role
        assert healer.roster.with_role("node") == frozenset({"a"})
        roster_file.write_text(json.dumps({"w": {"key": bytes(range(32)).hex(),
                                                 "role": "writer"}}))
        await until(lambda: healer.roster.role_of("w") == "writer", "the healer's reload")
        assert "a" not in healer.roster  # removed from the file: no longer trusted
        assert healer.roster.with_role("healer") == frozenset({"healer"})
        assert healer.metrics.registry.get_sample_value(
            "worknode_key_reloads_total", {"file": "roster", "result": "ok"}) == 1
