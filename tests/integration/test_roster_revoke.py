"""Responding to a Byzantine writer (issue 17): ``worknode roster revoke`` and the causal
gate's hold as a setting, against a real nats-server, real worknode services (real SQLite)
and the real ``worknode`` command line.

- A writer whose deltas node-a and node-c accept is revoked with ``worknode roster revoke``
  on the roster file both nodes read: each reloads it (``worknode_key_reloads_total``), then
  refuses that writer's next delta (``worknode_deltas_rejected_total{reason="unknown_signer"}``),
  keeps the writes it had accepted from it, and still takes node-c's writes.
- The revocation is remembered: ``keys roster`` (``--replace`` too), ``keys roster-from``
  and a second ``revoke`` cannot trust the key again, under its id or another; the id comes
  back only with a new key.
- ``byzantine_max_hold_s`` reaches each replica's machine.

Without ``roster revoke`` (before this change) the command does not exist (status 2); with
``keys remove --roster`` instead, the re-adding steps succeed and the key is trusted again.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from broker.codec import Signer, WireCodec
from broker.crdt import Tree
from broker.transport import EmbeddedNatsServer, NatsTransport, delta_subject
from services.worknode import WorknodeService, load_or_create_signer, read_roster_entries
from services.worknode._keys import write_roster
from tests.integration._nodes import SUBJECT, eventually, node_settings, run_cli

DELTA = delta_subject("default", SUBJECT)
WRITER = "writer-w"


def _count(svc: WorknodeService, reason: str) -> float:
    value: float = svc.metrics.rejected_envelopes.labels(SUBJECT, reason)._value.get()
    return value


def _reloads(svc: WorknodeService) -> float:
    value: float = svc.trust_metrics.reloads.labels("roster", "ok")._value.get()
    return value


class Writer:
    """writer-w: seals its own deltas with its key and publishes them from a plain NATS
    connection (nothing else is ever sent under its name: every unknown_signer counted
    after the revocation is one of these)."""

    def __init__(self, seed_file: Path, url: str) -> None:
        self.signer: Signer = load_or_create_signer(WRITER, seed_file)
        self.url = url
        self.sequence = 0

    async def create(self, base: WorknodeService, worknode: str) -> None:
        """Publish W's delta creating ``worknode`` (built on ``base``'s state)."""
        hlc = time.time_ns() // 1_000_000 << 16
        delta = Tree(base.replica(SUBJECT).state.copy()).create(WRITER, worknode, "root", hlc)
        self.sequence += 1
        envelope = WireCodec().seal(self.signer, subject=DELTA, hlc=hlc,
                                    sequence=self.sequence, document=delta)
        async with NatsTransport([self.url], name=WRITER) as transport:
            await transport.publish(DELTA, envelope)


async def test_roster_revoke_cuts_a_writer_off_on_every_running_node(
    tmp_path: Path, nats_server: EmbeddedNatsServer
) -> None:
    roster_file = tmp_path / "roster.json"
    settings = {n: node_settings(tmp_path, nats_server.url, n, roster_file=roster_file,
                                 key_reload_interval_s=0.1)
                for n in ("node-a", "node-c")}
    writer = Writer(tmp_path / "writer-w.key", nats_server.url)
    write_roster(roster_file, {
        **{n: load_or_create_signer(n, s.key_path()).public_key for n, s in settings.items()},
        WRITER: writer.signer.public_key,
    })
    svcs: dict[str, WorknodeService] = {}
    try:
        for name, s in settings.items():
            svcs[name] = WorknodeService(s)
            await svcs[name].start()
        a, c = svcs["node-a"], svcs["node-c"]
        await writer.create(a, "w-before")
        for svc in (a, c):
            await eventually(lambda svc=svc: "w-before" in svc.replica(SUBJECT).tree,  # type: ignore[misc]
                             20, "W's write accepted")
        reloads = {n: _reloads(svc) for n, svc in svcs.items()}
        refused = {n: _count(svc, "unknown_signer") for n, svc in svcs.items()}

        status, out, err = await run_cli("roster", "revoke", WRITER, "--roster", str(roster_file))
        assert status == 0, err
        assert f"revoked: {WRITER}" in out
        for name, svc in svcs.items():
            await eventually(lambda svc=svc, name=name: _reloads(svc) > reloads[name],  # type: ignore[misc]
                             20, f"{name} reloaded the roster")
            assert WRITER not in svc.roster

        await writer.create(a, "w-after")
        await c.replica(SUBJECT).create("c-after")
        for name, svc in svcs.items():
            await eventually(
                lambda svc=svc, name=name: _count(svc, "unknown_signer") > refused[name],  # type: ignore[misc]
                20, f"{name} refused W's delta")
            assert _count(svc, "unknown_signer") == refused[name] + 1
            await eventually(lambda svc=svc: "c-after" in svc.replica(SUBJECT).tree,  # type: ignore[misc]
                             20, f"{name} still takes node-c's writes")
            tree = svc.replica(SUBJECT).tree
            assert "w-after" not in tree
            assert "w-before" in tree  # W's own earlier write stays: it was W's to make
    finally:
        for svc in svcs.values():
            await svc.stop()


async def test_a_revoked_key_cannot_be_trusted_again(tmp_path: Path) -> None:
    roster_file = tmp_path / "roster.json"
    ids = tmp_path / "ids.json"
    w_seed = tmp_path / "w.key"
    key = load_or_create_signer(WRITER, w_seed).public_key.hex()
    status, _, err = await run_cli("keys", "add", WRITER, "--role", "writer", "--seed",
                                   str(w_seed), "--identities", str(ids))
    assert status == 0, err
    status, _, err = await run_cli("keys", "roster-from", "--identities", str(ids),
                                   str(roster_file))
    assert status == 0, err
    status, _, err = await run_cli("keys", "roster", str(roster_file), "node-a=" + "ab" * 32)
    assert status == 0, err
    before = json.loads(roster_file.read_text())

    status, _, err = await run_cli("roster", "revoke", "nobody", WRITER, "--roster",
                                   str(roster_file))
    assert status == 1
    assert err.splitlines() == [
        f"error: {roster_file} does not trust 'nobody': nothing revoked (it trusts node-a, "
        f"{WRITER})"]
    assert json.loads(roster_file.read_text()) == before  # all or nothing

    status, out, err = await run_cli("roster", "revoke", WRITER, "--roster", str(roster_file),
                                     "--identities", str(ids))
    assert status == 0, err
    assert out.strip() == f"{roster_file}: 1 trusted: node-a; revoked: {WRITER}"
    assert set(read_roster_entries(roster_file)) == {"node-a"}
    assert json.loads(roster_file.read_text())["$revoked"][0]["key"] == key
    assert WRITER not in json.loads(ids.read_text())

    # Every way back in is refused, --replace too, and the file stays as it is.
    revoked = roster_file.read_text()
    status, _, err = await run_cli("keys", "add", WRITER, "--role", "writer", "--seed",
                                   str(w_seed), "--identities", str(ids))
    assert status == 0, err  # the NATS identity may come back; the roster refuses its key
    for args in (("keys", "roster", str(roster_file), f"{WRITER}={key}"),
                 ("keys", "roster", str(roster_file), f"other={key}", "--replace"),
                 ("keys", "roster-from", "--identities", str(ids), str(roster_file))):
        status, _, err = await run_cli(*args)
        assert status == 1, args
        assert len(err.splitlines()) == 1
        assert "revoked key" in err, err
        assert roster_file.read_text() == revoked
    # A second revoke changes nothing; the id comes back with a new key.
    status, _, err = await run_cli("roster", "revoke", WRITER, "--roster", str(roster_file))
    assert status == 0, err
    assert "already revoked" in err
    assert roster_file.read_text() == revoked
    status, _, err = await run_cli("keys", "roster", str(roster_file), f"{WRITER}={'cd' * 32}")
    assert status == 0, err
    assert read_roster_entries(roster_file)[WRITER].key.hex() == "cd" * 32
    assert json.loads(roster_file.read_text())["$revoked"][0]["key"] == key


async def test_byzantine_max_hold_s_reaches_the_replication_machine(
    tmp_path: Path, nats_server: EmbeddedNatsServer
) -> None:
    s = node_settings(tmp_path, nats_server.url, "node-a", byzantine_max_hold_s=2.5)
    async with WorknodeService(s) as svc:
        assert svc.replica(SUBJECT).machine.config.max_hold == 2.5
    default = node_settings(tmp_path, nats_server.url, "node-b")
    assert default.byzantine_max_hold_s == 30.0
    for bad in (0, -1):
        with pytest.raises(ValidationError):
            node_settings(tmp_path, nats_server.url, "node-a", byzantine_max_hold_s=bad)
