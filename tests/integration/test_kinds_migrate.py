"""``worknode kinds migrate`` during a rolling upgrade (real nats-server, real services, the
command as a real process): each node, while stopped, runs the split-name migration on its
own replica; nothing is published, yet every node ends with the same state (the
migration's fixed authors give every node the same dots), and v2 reads the split names.
"""

from __future__ import annotations

from pathlib import Path

from broker.kinds import KindView
from broker.transport import EmbeddedNatsServer
from services.worknode import WorknodeService, load_or_create_signer
from tests.integration._nodes import eventually, node_settings, run_cli
from tests.integration.test_cli_kinds import EXAMPLES, importlib_models

SUBJECT = "people"
NODES = ("node-a", "node-b", "node-c")
NAMES = {f"p{i}": f"First{i} Last{i}" for i in range(25)}


def config(path: Path, tmp: Path, url: str, name: str) -> Path:
    path.write_text(
        f'node_id = "{name}"\nsubjects = ["{SUBJECT}"]\nnats_urls = ["{url}"]\n'
        f'state_dir = "{tmp / name}"\nroster_file = "{tmp / "roster.json"}"\n'
        'metrics_port = 0\nnats_insecure = true\nflush_interval_ms = 2\n')
    return path


async def test_each_node_migrates_itself_and_all_converge(
    tmp_path: Path, nats_server: EmbeddedNatsServer
) -> None:
    models = importlib_models()
    v1 = KindView(models["PersonV1"])
    v2 = KindView(models["PersonV2"], [models["PersonV1"]])
    for n in NODES:
        load_or_create_signer(n, tmp_path / n / f"{n}.key")
    rc, _, err = await run_cli("keys", "roster", "roster.json",
                               *(f"{n}=@{n}/{n}.key" for n in NODES), cwd=tmp_path)
    assert rc == 0, err
    settings = {n: node_settings(tmp_path, nats_server.url, n, subjects=[SUBJECT],
                                 roster_file=tmp_path / "roster.json", nats_insecure=True)
                for n in NODES}
    services = {n: WorknodeService(settings[n]) for n in NODES}
    try:
        for svc in services.values():
            await svc.start()
        writer = services["node-a"].replica(SUBJECT)
        for node, name in NAMES.items():
            await writer.write_many(v1.create_ops(node, name=name, total=1))
        await writer.flush()
        await eventually(lambda: all(len(s.replica(SUBJECT).tree.nodes()) == len(NAMES)
                                     for s in services.values()), 30, "v1 data everywhere")
        for n in NODES:  # the rolling upgrade: each node stops, migrates itself, restarts
            await services.pop(n).stop()
            cfg = config(tmp_path / f"{n}.toml", tmp_path, nats_server.url, n)
            rc, out, err = await run_cli(
                "kinds", "migrate", SUBJECT, f"{EXAMPLES / 'person_v2.py'}:SPLIT_NAME",
                "--config", str(cfg), "--batch", "10", cwd=tmp_path)
            assert rc == 0, err
            assert f"{len(NAMES)}/{len(NAMES)} worknodes" in err
            assert out.startswith(f"migrated person@2/split-name on {n}/{SUBJECT}: ")
            services[n] = WorknodeService(settings[n])
            await services[n].start()
            if n == "node-a":  # a v2 write over a migrated value while the others are not
                a = services[n].replica(SUBJECT)
                await a.write_many(v2.ops("p0", first="Changed0"))
                await a.flush()
                await eventually(lambda: all(
                    v2.read(s.replica(SUBJECT).tree, "p0").first == "Changed0"  # type: ignore[attr-defined]
                    for s in services.values()), 30, "the v2 write reaches unmigrated nodes")
        replicas = [s.replica(SUBJECT) for s in services.values()]
        await eventually(lambda: len({r.content_digest() for r in replicas}) == 1, 30,
                         "the migrated replicas agree")
        for r in replicas:
            for node, name in NAMES.items():
                person = v2.read(r.tree, node)
                first = "Changed0" if node == "p0" else name.split()[0]
                assert f"{person.first} {person.last}" == f"{first} {name.split()[1]}"  # type: ignore[attr-defined]
    finally:
        for svc in services.values():
            await svc.stop()
