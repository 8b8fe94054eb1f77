"""``worknode kinds`` and the typed-kind examples as real processes.

Offline: ``kinds check`` passes the examples' version history and fails a rename without a
lens with the rule's line (stdout) and a summary (stderr); a file that cannot be loaded is
one ``error:`` line. Online (a real nats-server and a worknode serving the registry
subject): ``register`` runs the gate (an incompatible version is refused with one error line
and not stored), ``list`` and ``show`` read the registry back. Side by side: the example
service on version 1 and on version 2 write one worknode and each reads the other's writes.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from broker.crdt import Add
from broker.kinds import KindSchema, Registry
from broker.transport import EmbeddedNatsServer
from services.worknode import WorknodeService, load_or_create_signer
from tests.integration._nodes import node_settings, run_cli

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "kinds"
V1, V2 = str(EXAMPLES / "person_v1.py"), str(EXAMPLES / "person_v2.py")

BAD = '''
from broker.kinds import LWW, Counter, KindModel, ORSet


class PersonV2(KindModel, kind="person", version=2):
    name: LWW[str] = ""
    amount: Counter = 0
    tags: ORSet[str] = frozenset()
'''


def errors(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


async def test_check_passes_the_examples_and_fails_a_rename_without_a_lens(
        tmp_path: Path) -> None:
    rc, out, err = await run_cli("kinds", "check", V1, V2, cwd=tmp_path)
    assert rc == 0, err
    assert out == ""
    assert err.strip() == "kinds check: OK (2 versions checked)"

    (tmp_path / "bad.py").write_text(BAD)
    rc, out, err = await run_cli("kinds", "check", V1, "bad.py", cwd=tmp_path)
    assert rc == 1
    assert out.splitlines() == [
        "person@2.total: FIELD_REMOVED: field total of person@1 is gone and no lens removes "
        "or moves it [person@1 → person@2]"]
    assert err.strip() == "kinds check: 1 breaking change(s)"

    rc, out, err = await run_cli("kinds", "check", V1, "bad.py", "--format", "json",
                                 cwd=tmp_path)
    assert rc == 1
    assert [f["rule"] for f in json.loads(out)["findings"]] == ["FIELD_REMOVED"]


async def test_a_file_that_does_not_load_is_one_error_line(tmp_path: Path) -> None:
    (tmp_path / "broken.py").write_text("raise RuntimeError('no')\n")
    (tmp_path / "other.py").write_text(BAD.replace('kind="person"', 'kind="other"'))
    # pydantic warns of the shadowing field before the kind refuses it: one line still
    (tmp_path / "shadow.py").write_text(BAD.replace("amount: Counter", "json: Counter"))
    for args in (["check", "missing.py"], ["check", "broken.py"], ["check", V1 + ":Nope"],
                 ["diff", V1, "other.py"], ["check", "shadow.py"],
                 ["migrate", "people", "broken.py:SPLIT"], ["migrate", "people", V1],
                 ["migrate", "people", V1 + ":PersonV1"]):
        rc, out, err = await run_cli("kinds", *args, cwd=tmp_path)
        assert rc == 1, (args, err)
        assert out == ""
        assert len(errors(err)) == 1, err
        assert err.strip() == errors(err)[0]


async def test_diff_lists_the_changes_and_the_lens(tmp_path: Path) -> None:
    rc, out, err = await run_cli("kinds", "diff", V1, V2, cwd=tmp_path)
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0] == "person@1 -> person@2"
    assert '- name: {"crdt": "lww", "default": "", "types": ["str"]}' in lines
    assert '+ amount: {"crdt": "counter", "types": ["int"]}' in lines
    assert 'lens: {"op": "rename", "path": ["total"], "to": "amount"}' in lines


async def test_register_list_show_through_a_worknode(
    tmp_path: Path, nats_server: EmbeddedNatsServer
) -> None:
    settings = node_settings(tmp_path, nats_server.url, "node-a", subjects=["kinds"],
                             roster_file=tmp_path / "roster.json")
    load_or_create_signer("node-a", settings.key_path())
    load_or_create_signer("cli", tmp_path / "cli" / "cli.key")
    rc, _, err = await run_cli("keys", "roster", "roster.json", "cli=@cli/cli.key",
                               f"node-a=@{settings.key_path()}", cwd=tmp_path)
    assert rc == 0, err
    net = ["--nats-url", nats_server.url, "--namespace", settings.namespace,
           "--roster", "roster.json", "--state-dir", "cli"]
    (tmp_path / "bad.py").write_text(BAD.replace("version=2", "version=3"))
    async with WorknodeService(settings) as node:
        replica = node.replica("kinds")
        rc, out, err = await run_cli("kinds", "register", V1, *net, cwd=tmp_path)
        assert rc == 0, err
        assert out.strip() == "registered: person@1 (active)"
        rc, out, err = await run_cli("kinds", "register", V2, *net, cwd=tmp_path)
        assert rc == 0, err

        rc, out, err = await run_cli("kinds", "register", "bad.py", *net, cwd=tmp_path)
        assert rc == 1
        assert len(errors(err)) == 1, err
        assert "FIELD_REMOVED" in errors(err)[0]
        registry = Registry.from_tree(replica.tree)  # the node holds what was confirmed
        assert registry.versions("person") == [1, 2]

        rc, out, err = await run_cli("kinds", "list", *net, cwd=tmp_path)
        assert rc == 0, err
        assert out.strip() == "person: versions 1, 2; active 2"
        rc, out, err = await run_cli("kinds", "show", "person@1", *net, cwd=tmp_path)
        assert rc == 0, err
        assert KindSchema.from_json(json.dumps(json.loads(out))) == registry.get("person", 1)
        rc, out, err = await run_cli("kinds", "show", "nobody", *net, cwd=tmp_path)
        assert rc == 1
        assert errors(err) == ["error: no kind 'nobody' is registered"]

        # A trusted writer (here the node itself) storing junk past the gate: text nested
        # too deep for the JSON parser, a schema no model has, a version that breaks the
        # gate. Every command still works; list names each refused entry on stderr.
        forged = [
            "[" * 100_000 + "]" * 100_000,
            KindSchema.from_json(registry.get("person", 1).to_json()).to_json().replace(
                '"types":["str"]', '"types":[]'),
            registry.get("person", 2).to_json().replace('"version":2', '"version":3')
            .replace('"crdt":"counter"', '"crdt":"lww","default":0'),
        ]
        await replica.write_many([Add("person", ("versions",), t) for t in forged])
        await replica.flush()
        rc, out, err = await run_cli("kinds", "list", *net, cwd=tmp_path)
        assert rc == 0, err
        assert out.strip() == "person: versions 1, 2; active 2"
        assert len([x for x in err.splitlines() if x.startswith("skipped: person: ")]) == 3
        assert "Traceback" not in err
        rc, out, err = await run_cli("kinds", "show", "person", *net, cwd=tmp_path)
        assert rc == 0, err
        assert KindSchema.from_json(json.dumps(json.loads(out))) == registry.get("person", 2)


async def test_a_v1_and_a_v2_service_side_by_side_read_each_other(
    tmp_path: Path, nats_server: EmbeddedNatsServer
) -> None:
    for name, d in (("svc-v1", "a"), ("svc-v2", "b")):
        load_or_create_signer(name, tmp_path / d / f"{name}.key")
    rc, _, err = await run_cli("keys", "roster", "roster.json", "svc-v1=@a/svc-v1.key",
                               "svc-v2=@b/svc-v2.key", cwd=tmp_path)
    assert rc == 0, err
    procs = [await asyncio.create_subprocess_exec(
        sys.executable, str(EXAMPLES / "service.py"), nats_server.url, "--version", v,
        "--node-id", name, "--state-dir", d, "--roster", "roster.json", "--rounds", "6",
        "--interval", "0.5", cwd=tmp_path, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
        for v, name, d in (("1", "svc-v1", "a"), ("2", "svc-v2", "b"))]
    outs = []
    try:
        for p in procs:
            stdout, stderr = await asyncio.wait_for(p.communicate(), 90)
            assert p.returncode == 0, stderr.decode()
            outs.append(stdout.decode().splitlines())
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
                await p.wait()
    v1_last = json.loads(outs[0][-1].split(": ", 1)[1])
    v2_last = json.loads(outs[1][-1].split(": ", 1)[1])
    # each read the other's tags (its writes) in its own shape
    assert any(t.startswith("v2-") for t in v1_last["tags"]), outs[0]
    assert any(t.startswith("v1-") for t in v2_last["tags"]), outs[1]
    assert v1_last["total"] > 6 or v2_last["amount"] > 6  # both counted into one counter
    assert v2_last["first"] == "Ada"  # the migration split v1's name
    assert v2_last["last"] == "Lovelace"


async def test_tail_prints_typed_objects_in_the_newest_shape(
    tmp_path: Path, nats_server: EmbeddedNatsServer
) -> None:
    """A v1 writer's batches, printed by ``tail --kind`` as person@2 objects."""
    from broker.kinds import KindView
    from tests.integration._nodes import SUBJECT

    spec = importlib_models()
    view = KindView(spec["PersonV1"])
    settings = node_settings(tmp_path, nats_server.url, "node-a", nats_insecure=True)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli", "tail", SUBJECT, "--nats-url", nats_server.url,
        "--kind", V1, "--kind", V2, "--count", "2", "--timeout", "60", cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        async with WorknodeService(settings) as node:
            replica = node.replica(SUBJECT)
            await replica.write_many(view.create_ops("ada", name="Ada Lovelace", total=2))
            await replica.flush()
            for i in range(200):  # until tail has seen two batches (it may subscribe late)
                if proc.returncode is not None:
                    break
                await replica.write_many(view.ops("ada", total=1, tags={f"t{i}"}))
                await replica.flush()
                await asyncio.sleep(0.2)
        stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, stderr.decode()
    typed = [line.strip() for line in stdout.decode().splitlines()
             if line.startswith("  person@2 ada: ")]
    assert typed, stdout.decode()
    obj = json.loads(typed[-1].split(": ", 1)[1])
    assert set(obj) == {"first", "last", "amount", "tags"}  # the v2 shape
    assert obj["amount"] >= 1


def importlib_models() -> dict[str, type]:
    """The example's model classes, loaded as ``worknode kinds`` loads them."""
    from services.worknode._kinds_cli import load_models
    return {m.__name__: m for m in load_models(V1) + load_models(V2)}


async def test_a_registration_no_replica_holds_is_not_confirmed(
    tmp_path: Path, nats_server: EmbeddedNatsServer
) -> None:
    rc, out, err = await run_cli("kinds", "register", V1, "--nats-url", nats_server.url,
                                 "--confirm-timeout", "0.5", cwd=tmp_path)
    assert rc == 3, err
    assert out.strip() == "registered: person@1 (active)"  # what was published
    assert errors(err) == [err.strip().splitlines()[-1]]
    assert errors(err)[0].startswith("error: published, not confirmed")
