"""``worknode set|incr|create --strong [--if-version N]`` and ``worknode get --strong`` as real
processes against a real nats-server (JetStream) and a worknode declaring STRONG worknodes:
the writer's log entries reach the node, a lost compare-and-set prints one line naming the
current version and exits non-zero, and with no server the command fails in one line."""

from __future__ import annotations

import json
import os
from pathlib import Path

from broker.testing import running_nats_server
from broker.transport import EmbeddedNatsServer
from services.worknode import WorknodeService, load_or_create_signer
from tests.integration._nodes import SUBJECT, node_settings, run_cli

STRONG = {SUBJECT: ["acct-"]}


async def test_strong_writes_and_reads_through_the_cli(
    tmp_path: Path, nats_server: EmbeddedNatsServer
) -> None:
    settings = node_settings(tmp_path, nats_server.url, "node-a", strong=STRONG,
                             roster_file=tmp_path / "roster.json")
    load_or_create_signer("node-a", settings.key_path())
    load_or_create_signer("writer", tmp_path / "writer" / "writer.key")
    rc, _, err = await run_cli("keys", "roster", "roster.json", "writer=@writer/writer.key",
                               f"node-a=@{settings.key_path()}", cwd=tmp_path)
    assert rc == 0, err
    cli = ["--nats-url", nats_server.url, "--namespace", settings.namespace,
           "--roster", "roster.json", "--node-id", "writer", "--state-dir", "writer",
           "--strong", "--strong-prefix", "acct-"]
    async with WorknodeService(settings) as node:
        strong = node.replica(SUBJECT).strong
        assert strong is not None

        rc, out, err = await run_cli("create", SUBJECT, "acct-1", *cli, cwd=tmp_path)
        assert rc == 0, err
        created = json.loads(out)
        v1 = created["version"]
        assert created == {"worknode": "acct-1", "version": v1, "value": {"parent": "root"}}

        # create --strong is create-if-absent: the second one loses, in one line.
        rc, out, err = await run_cli("create", SUBJECT, "acct-1", *cli, cwd=tmp_path)
        assert rc == 1
        assert out == ""
        assert err.splitlines() == [f"error: worknode 'acct-1' is at version {v1}, not 0"]

        rc, out, err = await run_cli("set", SUBJECT, "acct-1", "owner", "ann", *cli,
                                     "--if-version", str(v1), cwd=tmp_path)
        assert rc == 0, err
        v2 = json.loads(out)["version"]
        assert v2 > v1
        rc, out, err = await run_cli("set", SUBJECT, "acct-1", "owner", "bob", *cli,
                                     "--if-version", str(v1), cwd=tmp_path)
        assert rc == 1
        assert err.splitlines() == [f"error: worknode 'acct-1' is at version {v2}, not {v1}"]

        rc, out, err = await run_cli("incr", SUBJECT, "acct-1", "bal", "7", *cli, cwd=tmp_path)
        assert rc == 0, err
        v3 = json.loads(out)["version"]

        # The node applied the writer's entries (signed by a roster writer, in log order).
        read = await strong.read(["acct-1"])
        assert read.versions == {"acct-1": v3}
        assert read.state.value()["acct-1"]["fields"] == {"owner": "ann", "bal": 7}

        rc, out, err = await run_cli("get", SUBJECT, "acct-1", *cli, cwd=tmp_path)
        assert rc == 0, err
        assert json.loads(out) == {"worknode": "acct-1", "version": v3, "value": {
            "parent": "root", "fields": {"owner": "ann", "bal": 7}}}


async def test_strong_needs_its_prefixes_and_if_version_needs_strong(
    tmp_path: Path, nats_server: EmbeddedNatsServer
) -> None:
    net = ["--nats-url", nats_server.url, "--state-dir", "writer"]
    rc, _, err = await run_cli("set", SUBJECT, "acct-1", "owner", "ann", *net, "--strong",
                               cwd=tmp_path)
    assert rc == 2
    assert len(err.splitlines()) == 1
    assert "--strong-prefix" in err
    rc, _, err = await run_cli("set", SUBJECT, "acct-1", "owner", "ann", *net,
                               "--if-version", "3", cwd=tmp_path)
    assert rc == 2
    assert len(err.splitlines()) == 1
    assert "--if-version needs --strong" in err


async def test_strong_without_a_server_fails_in_one_line(tmp_path: Path) -> None:
    rc, _, err = await run_cli("create", SUBJECT, "acct-1", "--nats-url",
                               "nats://127.0.0.1:1", "--state-dir", "w", "--strong",
                               "--strong-prefix", "acct-", cwd=tmp_path, timeout=60)
    assert rc == 1
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ")


async def test_strong_with_no_jetstream_quorum_fails_in_one_line(tmp_path: Path) -> None:
    """A server without JetStream stands for a node cut off from the log's quorum: the
    STRONG write fails within strong_timeout_s with one line (UnavailableError)."""
    async with running_nats_server(tmp_path / "nats", jetstream=False) as server:
        env = {**os.environ, "WORKNODE_STRONG_TIMEOUT_S": "1"}
        rc, out, err = await run_cli("create", SUBJECT, "acct-1", "--nats-url", server.url,
                                     "--state-dir", "w", "--strong", "--strong-prefix",
                                     "acct-", cwd=tmp_path, env=env)
    assert rc == 1
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
