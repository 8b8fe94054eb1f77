"""The Grafana dashboards and provisioning files, checked offline.

Grafana itself is not on these machines. Each dashboard is validated against the dashboard
model of grafana-foundation-sdk (Grafana's own generated types, pinned to the Grafana 11.6
schema in pyproject): parsed with its ``Dashboard.from_json`` (with every panel and
datasource plugin registered), every attribute is checked against the SDK's type annotations,
and re-encoding must give back every key we wrote — a key the model does not know, a wrong
nesting or a wrong type fails.
"""

from __future__ import annotations

import enum
import importlib.util
import json
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.cog.plugins import register_default_plugins
from grafana_foundation_sdk.models.dashboard import Dashboard

from services.healer import HealerMetrics
from services.worknode import ServiceMetrics
from services.worknode._rpc_metrics import RpcMetrics

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = ROOT / "dashboards" / "grafana" / "dashboards"
PROVISIONING = ROOT / "dashboards" / "grafana" / "provisioning"
DATASOURCE_UID = "worknode-prometheus"
EXPECTED_UIDS = {
    "overview.json": "worknode-overview",
    "replication.json": "worknode-replication",
    "healing.json": "worknode-healing",
    "rpc.json": "worknode-rpc",
    "upgrades.json": "worknode-upgrades",
    "nats.json": "worknode-nats",
}


def load_build() -> Any:
    """``dashboards/build.py`` as a module."""
    spec = importlib.util.spec_from_file_location("dashboards_build", ROOT / "dashboards" /
                                                  "build.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def dashboards() -> dict[str, dict[str, Any]]:
    """``{file name: dashboard JSON}``."""
    return {p.name: json.loads(p.read_text()) for p in sorted(DASHBOARDS.glob("*.json"))}


def test_dashboard_files_are_generated_and_up_to_date() -> None:
    build = load_build()
    for path, text in build.files().items():
        assert path.read_text() == text, f"{path} is stale: run python dashboards/build.py"
    assert {p.name for p in build.files()} == set(EXPECTED_UIDS)


def test_uids_are_stable_and_datasource_is_pinned() -> None:
    found = dashboards()
    assert {name: d["uid"] for name, d in found.items()} == EXPECTED_UIDS
    for name, d in found.items():
        assert 8 <= len(d["uid"]) <= 40, name  # Grafana's uid bounds
        ids = [p["id"] for p in d["panels"]]
        assert len(ids) == len(set(ids)), name
        for panel in d["panels"]:
            where = f"{name}: {panel['title']}"
            assert panel["description"], where
            assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, where
            if panel["type"] == "alertlist":  # lists the alert rules; queries nothing
                assert "targets" not in panel, where
                continue
            assert panel["datasource"] == {"type": "prometheus", "uid": DATASOURCE_UID}, where
            assert panel["targets"], where
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == DATASOURCE_UID, where
        for var in d["templating"]["list"]:
            assert var["datasource"]["uid"] == DATASOURCE_UID, name
    ds = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())
    (source,) = ds["datasources"]
    assert source["uid"] == DATASOURCE_UID
    assert source["type"] == "prometheus"


def _stat_panels() -> dict[str, dict[str, Any]]:
    return {f"{name}: {p['title']}": p for name, d in dashboards().items()
            for p in d["panels"] if p["type"] == "stat"}


def _value_map(panel: dict[str, Any]) -> dict[str, tuple[str, str]]:
    out: dict[str, tuple[str, str]] = {}
    for m in panel["fieldConfig"]["defaults"]["mappings"]:
        if m["type"] == "value":
            out |= {v: (r["text"], r["color"]) for v, r in m["options"].items()}
    return out


def _color_at(panel: dict[str, Any], value: float) -> str:
    """The threshold color Grafana gives ``value`` (the last step at or below it)."""
    steps = panel["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert steps[0]["value"] is None
    return str([s for s in steps if s["value"] is None or s["value"] <= value][-1]["color"])


def test_every_stat_panel_has_thresholds_and_value_mappings() -> None:
    stats = _stat_panels()
    assert len(stats) >= 8
    for where, panel in stats.items():
        defaults = panel["fieldConfig"]["defaults"]
        assert defaults["thresholds"]["mode"] == "absolute", where
        assert defaults["thresholds"]["steps"], where
        assert defaults["color"] == {"mode": "thresholds"}, where
        assert "mappings" in defaults, where
    # The meanings issue 20 found inverted: NATS healthy 0 = ok is green, a node not
    # connected is red, a target down is red.
    assert _value_map(stats["nats.json: Healthy"])["0"] == ("ok", "green")
    assert _color_at(stats["nats.json: Healthy"], 0) == "green"
    assert _color_at(stats["nats.json: Healthy"], 1) == "red"
    for where in ("replication.json: Connected to NATS", "overview.json: Connected to NATS"):
        assert _value_map(stats[where])["0"] == ("Disconnected", "red")
        assert _color_at(stats[where], 0) == "red"
        assert _color_at(stats[where], 1) == "green"
    for where in ("overview.json: Worknodes up", "overview.json: Healer up"):
        assert _color_at(stats[where], 0) == "red"
        assert _color_at(stats[where], 1) == "green"
    # The heal age stays green through healthy operation (a success every interval_s) and
    # only turns red when WorknodeHealStalled would fire (30 min); it reads the
    # last-success timestamp, not the last report (published only when there was work).
    age = stats["healing.json: Time since last successful heal"]
    assert "worknode_heal_last_success_timestamp_seconds" in age["targets"][0]["expr"]
    assert _color_at(age, 80) == "green"
    assert _color_at(age, 1800) == "red"
    assert not any("last_report" in t["expr"] for p in stats.values() for t in p["targets"])


def test_the_overview_has_an_alert_list_and_process_metrics() -> None:
    overview = dashboards()["overview.json"]
    assert [p["type"] for p in overview["panels"]].count("alertlist") == 1
    exprs = " ".join(t["expr"] for p in overview["panels"] for t in p.get("targets", []))
    for metric in ("process_resident_memory_bytes", "process_cpu_seconds_total",
                   "process_open_fds", 'up{job="worknode"}', 'up{job="worknode-healer"}'):
        assert metric in exprs, metric


def _exported_names() -> set[str]:
    names: set[str] = set()
    service = ServiceMetrics(["s"], "0", 2)
    service.export_strong(lambda: {"s": (True, 1)})  # series of subjects with a STRONG log
    RpcMetrics(service.registry, ["get"])
    for registry in (service.registry, HealerMetrics(["s"]).registry):
        for family in registry.collect():
            names.add(family.name + ("_total" if family.type == "counter" else ""))
            names.add(family.name + ("_info" if family.type == "info" else ""))
    return names


def test_every_worknode_series_queried_is_exported() -> None:
    exported = _exported_names()
    for name, d in dashboards().items():
        exprs = [t["expr"] for p in d["panels"] for t in p.get("targets", [])]
        exprs += [v["query"]["query"] for v in d["templating"]["list"]]
        for expr in exprs:
            for metric in re.findall(r"\bworknode_[a-z_]+", expr):
                base = re.sub(r"_(bucket|sum|count)$", "", metric)
                assert metric in exported or base in exported, f"{name}: {metric} in {expr}"


# -- the grafana-foundation-sdk model ----------------------------------------------------------


def _type_errors(value: Any, hint: Any, path: str) -> list[str]:
    """Where ``value`` does not fit the SDK annotation ``hint`` (empty: it fits)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or hint is object:
        return []
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return []
        attempts = [_type_errors(value, a, path) for a in args if a is not type(None)]
        return [] if any(not e for e in attempts) else min(attempts, key=len)
    if origin is typing.Literal:
        return [] if value in args else [f"{path}: {value!r} not one of {args}"]
    if origin is list:
        if not isinstance(value, list):
            return [f"{path}: expected a list, got {value!r}"]
        return [e for i, v in enumerate(value) for e in _type_errors(v, args[0], f"{path}[{i}]")]
    if origin is dict:
        if not isinstance(value, dict):
            return [f"{path}: expected an object, got {value!r}"]
        return [e for k, v in value.items() for e in _type_errors(v, args[1], f"{path}.{k}")]
    if not isinstance(hint, type):
        return []
    if issubclass(hint, enum.Enum):
        try:
            hint(value)
        except ValueError:
            return [f"{path}: {value!r} is not a {hint.__name__}"]
        return []
    if hint is bool:
        return [] if isinstance(value, bool) else [f"{path}: expected bool, got {value!r}"]
    if hint in (int, float):
        ok = isinstance(value, (int, float) if hint is float else int)
        return [] if ok and not isinstance(value, bool) else [f"{path}: expected {hint}"]
    if hint is str:
        return [] if isinstance(value, str) else [f"{path}: expected str, got {value!r}"]
    if not isinstance(value, hint):
        return [f"{path}: expected {hint.__name__}, got {type(value).__name__}"]
    return _model_errors(value, path)


def _model_errors(obj: Any, path: str) -> list[str]:
    hints = typing.get_type_hints(type(obj))
    if not hints:  # e.g. UnknownDataquery: the SDK knows no model for it
        return [f"{path}: no model for {type(obj).__name__}"]
    return [e for attr, hint in hints.items()
            for e in _type_errors(getattr(obj, attr), hint, f"{path}.{attr}")]


def _dropped(ours: Any, theirs: Any, path: str = "") -> list[str]:
    """Keys and values of ``ours`` that the SDK's re-encoding does not give back."""
    if isinstance(ours, dict):
        if not isinstance(theirs, dict):
            return [f"{path}: became {theirs!r}"]
        return [e for k, v in ours.items() for e in
                ([f"{path}.{k}: unknown to the model"] if k not in theirs
                 else _dropped(v, theirs[k], f"{path}.{k}"))]
    if isinstance(ours, list):
        if not isinstance(theirs, list) or len(ours) != len(theirs):
            return [f"{path}: list changed"]
        return [e for i, (a, b) in enumerate(zip(ours, theirs, strict=True))
                for e in _dropped(a, b, f"{path}[{i}]")]
    return [] if ours == theirs and type(ours) is type(theirs) else [f"{path}: {ours!r}"]


@pytest.mark.parametrize("name", sorted(EXPECTED_UIDS))
def test_dashboard_matches_the_grafana_foundation_sdk_model(name: str) -> None:
    register_default_plugins()
    data = json.loads((DASHBOARDS / name).read_text())
    model = Dashboard.from_json(data)
    assert _model_errors(model, name) == []
    assert _dropped(data, json.loads(json.dumps(model, cls=JSONEncoder))) == []


def test_the_sdk_check_catches_mistakes() -> None:
    """The validation above is not vacuous: a misspelt key and a wrong type both fail."""
    register_default_plugins()
    data = json.loads((DASHBOARDS / "replication.json").read_text())
    data["panels"][0]["gridpos"] = data["panels"][0].pop("gridPos")
    model = Dashboard.from_json(data)
    assert any("gridpos" in e for e in _dropped(data, json.loads(json.dumps(model,
                                                                            cls=JSONEncoder))))
    data = json.loads((DASHBOARDS / "replication.json").read_text())
    data["panels"][0]["gridPos"]["w"] = "12"
    data["graphTooltip"] = 7
    errors = _model_errors(Dashboard.from_json(data), "d")
    assert any("grid_pos.w" in e for e in errors), errors
    assert any("graph_tooltip" in e for e in errors), errors


def test_dashboard_provider_loads_the_dashboards_folder() -> None:
    provider = yaml.safe_load((PROVISIONING / "dashboards" / "worknode.yml").read_text())
    (p,) = provider["providers"]
    assert p["type"] == "file"
    assert p["options"]["path"] == "/var/lib/grafana/dashboards/worknode"
