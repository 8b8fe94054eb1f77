"""A CLI write succeeds only once a replica holds it (issue 20): against a real nats-server and
a worknode, the write commands exit 0 when the node trusts the writer, and exit 3 with one
``error: published, not confirmed`` line when the node refuses the writer's key."""

from __future__ import annotations

import json
from pathlib import Path

from broker.transport import EmbeddedNatsServer
from services.worknode import WorknodeService, load_or_create_signer
from tests.integration._nodes import SUBJECT, node_settings, run_cli


async def worknode(*args: str, cwd: Path) -> tuple[int, str, str]:
    """``worknode ARGS`` as a real process; its status, stdout and stderr."""
    return await run_cli(*args, cwd=cwd)


async def test_a_write_exits_0_only_once_a_replica_holds_it(
    tmp_path: Path, nats_server: EmbeddedNatsServer
) -> None:
    # The roster is built with the CLI, as an operator would: it trusts node-a and "writer",
    # not "intruder"; the node and both writers read it.
    settings = node_settings(tmp_path, nats_server.url, "node-a",
                             roster_file=tmp_path / "roster.json")
    load_or_create_signer("node-a", settings.key_path())
    load_or_create_signer("writer", tmp_path / "writer" / "writer.key")
    load_or_create_signer("intruder", tmp_path / "intruder" / "intruder.key")
    rc, _, err = await worknode("keys", "roster", "roster.json", "writer=@writer/writer.key",
                                f"node-a=@{settings.key_path()}", cwd=tmp_path)
    assert rc == 0, err
    net = ["--nats-url", nats_server.url, "--namespace", settings.namespace,
           "--roster", "roster.json"]
    async with WorknodeService(settings) as node:
        replica = node.replica(SUBJECT)

        rc, out, err = await worknode("create", SUBJECT, "o1", *net, "--node-id", "writer",
                                      "--state-dir", "writer", cwd=tmp_path)
        assert rc == 0, err
        assert json.loads(out) == {"o1": {"parent": "root"}}
        assert err == ""
        assert "o1" in replica.tree  # confirmed means held: no waiting needed here

        rc, out, err = await worknode("create", SUBJECT, "o2", *net, "--node-id", "intruder",
                                      "--state-dir", "intruder", "--confirm-timeout", "1",
                                      cwd=tmp_path)
        assert rc == 3, err
        assert json.loads(out) == {"o2": {"parent": "root"}}  # what was published
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, err  # (log lines may precede it: the node refused us)
        assert err.splitlines()[-1] == errors[0]
        assert errors[0].startswith("error: published, not confirmed")
        assert "'intruder'" in errors[0]
        assert "o2" not in replica.tree

        # --no-confirm is the explicit way to publish without waiting.
        rc, _, err = await worknode("create", SUBJECT, "o3", *net, "--node-id", "intruder",
                                    "--state-dir", "intruder", "--no-confirm", cwd=tmp_path)
        assert rc == 0, err


async def test_a_write_with_no_replica_serving_the_subject_is_not_confirmed(
    tmp_path: Path, nats_server: EmbeddedNatsServer
) -> None:
    rc, _, err = await worknode("create", SUBJECT, "o1", "--nats-url", nats_server.url,
                                "--confirm-timeout", "0.5", cwd=tmp_path)
    assert rc != 0
    assert "published, not confirmed" in err
