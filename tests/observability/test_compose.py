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
    for n in nats:
        argv = services[n]["command"]
        assert "--jetstream" in argv
        assert "--cluster_name" in argv
        routes = argv[argv.index("--routes") + 1].split(",")
        assert {r.split("//")[1].split(":")[0] for r in routes} == set(nats) - {n}
        assert "--http_port" in argv  # the exporters read the monitoring endpoint
    exporters = {services[e]["command"][-1] for e in services if e.startswith("nats-exporter")}
    assert exporters == {f"http://{n}:8222" for n in nats}

    worknodes = {n: s for n, s in services.items() if s.get("command") == ["node"]}
    versions = {s["environment"]["WORKNODE_WIRE_VERSION"] for s in worknodes.values()}
    assert versions == {"1", "2"}
    for name, s in worknodes.items():
        assert s["environment"]["WORKNODE_NODE_ID"] == name
        assert s["environment"]["WORKNODE_PEER_VERSION"] == "1"
    assert services["healer"]["command"] == ["healer"]
    identities = set(services["keygen"]["command"])
    assert set(worknodes) | {"healer", "writer"} <= identities

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
        if command == ["node"]:
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
