"""Writes the Grafana dashboards in ``dashboards/grafana/dashboards/`` (provisioned JSON).

The JSON files are generated, never edited by hand: change a panel here, then run
``python dashboards/build.py`` (``--check`` only compares, as the tests do). Every dashboard
has a stable ``uid`` and every panel and query names the pinned Prometheus datasource uid
``worknode-prometheus`` (``grafana/provisioning/datasources/prometheus.yml``).

Rate windows are ``$__rate_interval``, which Grafana derives from the scrape interval, so a
panel shows data after a few scrapes; the tests substitute a concrete window the same way.
Variables default to "All" (``allValue: ".*"``).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OUT_DIR = Path(__file__).resolve().parent / "grafana" / "dashboards"
DATASOURCE = {"type": "prometheus", "uid": "worknode-prometheus"}
SCHEMA_VERSION = 41  # Grafana 11.x dashboard model
RI = "$__rate_interval"


@dataclass
class Query:
    """One Prometheus query of a panel."""

    expr: str
    legend: str = ""
    instant: bool = False
    table: bool = False


@dataclass
class Panel:
    """One panel: a visualization over one or more queries."""

    title: str
    description: str
    queries: list[Query]
    kind: str = "timeseries"  # timeseries | stat | table | bargauge
    unit: str = "short"
    width: int = 12
    height: int = 8
    extra_defaults: dict[str, Any] = field(default_factory=dict)


@dataclass
class Variable:
    """A query variable ``$name`` over ``label_values(metric, label)``, "All" by default."""

    name: str
    label: str
    metric: str

    def model(self) -> dict[str, Any]:
        """The templating entry."""
        definition = f"label_values({self.metric}, {self.name})"
        return {
            "name": self.name,
            "label": self.label,
            "type": "query",
            "datasource": DATASOURCE,
            "query": {"qryType": 1, "query": definition, "refId": "PrometheusVariableQueryEditor"},
            "refresh": 2,
            "includeAll": True,
            "allValue": ".*",
            "multi": True,
            "sort": 1,
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
            "options": [],
            "hide": 0,
        }


@dataclass
class Dashboard:
    """One provisioned dashboard."""

    uid: str
    title: str
    description: str
    panels: list[Panel]
    variables: list[Variable] = field(default_factory=list)
    tags: tuple[str, ...] = ("worknode",)


def _target(q: Query, ref: str) -> dict[str, Any]:
    t: dict[str, Any] = {
        "datasource": DATASOURCE,
        "refId": ref,
        "expr": q.expr,
        "legendFormat": q.legend or "__auto",
        "range": not q.instant,
        "instant": q.instant,
        "editorMode": "code",
    }
    if q.table:
        t["format"] = "table"
    return t


def _options(kind: str) -> dict[str, Any]:
    if kind == "timeseries":
        return {
            "legend": {"showLegend": True, "displayMode": "list", "placement": "bottom",
                       "calcs": []},
            "tooltip": {"mode": "multi", "sort": "desc"},
        }
    if kind == "stat":
        return {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "value",
            "graphMode": "area",
            "justifyMode": "auto",
            "orientation": "auto",
            "textMode": "auto",
        }
    if kind == "bargauge":
        return {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "orientation": "horizontal",
            "displayMode": "basic",
            "showUnfilled": True,
        }
    if kind == "table":
        return {"showHeader": True, "cellHeight": "sm"}
    raise ValueError(kind)


def _panel(p: Panel, pid: int, x: int, y: int) -> dict[str, Any]:
    defaults: dict[str, Any] = {"unit": p.unit}
    if p.kind == "timeseries":
        defaults["custom"] = {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10,
                              "showPoints": "never", "spanNulls": False}
    defaults.update(p.extra_defaults)
    return {
        "id": pid,
        "type": p.kind,
        "title": p.title,
        "description": p.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": p.height, "w": p.width, "x": x, "y": y},
        "targets": [_target(q, chr(ord("A") + i)) for i, q in enumerate(p.queries)],
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": _options(p.kind),
    }


def render(d: Dashboard) -> dict[str, Any]:
    """The provisioned JSON model of ``d`` (panels laid out left to right, row by row)."""
    panels = []
    x = y = row_h = 0
    for i, p in enumerate(d.panels, start=1):
        if x + p.width > 24:
            x, y, row_h = 0, y + row_h, 0
        panels.append(_panel(p, i, x, y))
        x += p.width
        row_h = max(row_h, p.height)
    return {
        "uid": d.uid,
        "title": d.title,
        "description": d.description,
        "tags": list(d.tags),
        "timezone": "browser",
        "editable": False,
        "graphTooltip": 1,
        "time": {"from": "now-1h", "to": "now"},
        "timepicker": {"refresh_intervals": ["10s", "30s", "1m", "5m", "15m"]},
        "refresh": "30s",
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "fiscalYearStartMonth": 0,
        "liveNow": False,
        "weekStart": "",
        "links": [
            {"title": "worknode", "type": "dashboards", "tags": ["worknode"], "asDropdown": True,
             "icon": "external link", "includeVars": False, "keepTime": True,
             "targetBlank": False, "tooltip": "", "url": ""},
        ],
        "annotations": {"list": [
            {"builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"},
             "enable": True, "hide": True, "iconColor": "rgba(0, 211, 255, 1)",
             "name": "Annotations & Alerts", "type": "dashboard"},
        ]},
        "templating": {"list": [v.model() for v in d.variables]},
        "panels": panels,
    }


def _q(expr: str, legend: str = "", **kw: Any) -> Query:
    return Query(expr, legend, **kw)


def _quantiles(metric: str, by: str, sel: str) -> list[Query]:
    out = []
    for q in ("0.5", "0.99"):
        legend = f"p{int(float(q) * 100)}" + (" {{" + by + "}}" if by else "")
        group = f"le, {by}" if by else "le"
        out.append(_q(f"histogram_quantile({q}, sum by ({group}) "
                      f"(rate({metric}_bucket{{{sel}}}[{RI}])))", legend))
    return out


SUBJ = 'subject=~"$subject"'
NODE = 'service="worknode"'

REPLICATION = Dashboard(
    uid="worknode-replication",
    title="worknode / Replication",
    description="Deltas written, published and applied; batch sizes; replication lag; "
                "envelopes refused by reason; catch-up and NATS connection state.",
    variables=[Variable("subject", "Subject", "worknode_keys")],
    panels=[
        Panel("Ops committed / s", "Local writes durably committed, per node.",
              [_q(f"sum by (instance) (rate(worknode_ops_committed_total{{{SUBJ}}}[{RI}]))",
                  "{{instance}}")], unit="ops"),
        Panel("Deltas out: batches published / s",
              "Delta batches (signed envelopes) published, per node; ops joined into them.",
              [_q(f"sum by (instance) (rate(worknode_batches_published_total{{{SUBJ}}}[{RI}]))",
                  "batches {{instance}}"),
               _q(f"sum by (instance) (rate(worknode_ops_published_total{{{SUBJ}}}[{RI}]))",
                  "ops {{instance}}")], unit="ops"),
        Panel("Deltas in: envelopes applied / s",
              "Envelopes from peers joined into the state, per node and wire version read.",
              [_q("sum by (instance, wire_version) "
                  f"(rate(worknode_deltas_applied_total{{{SUBJ}}}[{RI}]))",
                  "{{instance}} v{{wire_version}}")], unit="ops"),
        Panel("Bytes in / out per second",
              "Bytes of envelopes applied (in) and published (out), per node.",
              [_q(f"sum by (instance) (rate(worknode_applied_bytes_total{{{SUBJ}}}[{RI}]))",
                  "in {{instance}}"),
               _q(f"sum by (instance) (rate(worknode_batch_bytes_sum{{{SUBJ}}}[{RI}]))",
                  "out {{instance}}")], unit="Bps"),
        Panel("Batch size (ops)", "Operations joined into one published batch: median, p99 "
              "and mean.",
              [*_quantiles("worknode_batch_ops", "", SUBJ),
               _q(f"sum(rate(worknode_batch_ops_sum{{{SUBJ}}}[{RI}])) / "
                  f"sum(rate(worknode_batch_ops_count{{{SUBJ}}}[{RI}]))", "mean")]),
        Panel("Batch size (bytes)", "Bytes of one published envelope: median and p99.",
              _quantiles("worknode_batch_bytes", "", SUBJ), unit="bytes"),
        Panel("Replication lag", "Writer's seal time to local apply (hybrid clock), "
              "median and p99 per subject.",
              _quantiles("worknode_replication_lag_seconds", "subject", SUBJ), unit="s"),
        Panel("Flush latency", "First committed write of a batch to its publication.",
              _quantiles("worknode_flush_latency_seconds", "subject", SUBJ), unit="s"),
        Panel("Envelopes rejected / s by reason",
              "Envelopes refused (unsigned, unknown signer, bad signature, malformed, too "
              "large, unsupported version, ...). Any bad_signature is worth a look.",
              [_q(f"sum by (reason) (rate(worknode_deltas_rejected_total{{{SUBJ}}}[{RI}]))",
                  "{{reason}}")], unit="ops"),
        Panel("Store commit latency", "Durable group-commit latency (SQLite WAL).",
              _quantiles("worknode_store_commit_seconds", "subject", SUBJ), unit="s"),
        Panel("Pending ops", "Committed operations not yet published, per node "
              "(writers get BackpressureError past max_pending_ops).",
              [_q(f"sum by (instance) (worknode_pending_ops{{{SUBJ}}})", "{{instance}}")]),
        Panel("Catch-ups / s by outcome, sequence gaps / s",
              "State transfers by outcome, and batches found missing from a writer's "
              "sequence (each triggers catch-up).",
              [_q(f"sum by (outcome) (rate(worknode_catchups_total{{{SUBJ}}}[{RI}]))",
                  "catch-up {{outcome}}"),
               _q(f"sum(rate(worknode_sequence_gaps_total{{{SUBJ}}}[{RI}]))", "gaps")],
              unit="ops"),
        Panel("Failures / s", "Publishes retried, handler errors (a bug), slow-consumer "
              "drops (each triggers catch-up).",
              [_q(f"sum by (instance) (rate(worknode_publish_failures_total{{{SUBJ}}}[{RI}]))",
                  "publish failures {{instance}}"),
               _q(f"sum by (instance) (rate(worknode_handler_errors_total[{RI}]))",
                  "handler errors {{instance}}"),
               _q(f"sum by (instance) (rate(worknode_slow_consumer_dropped_total[{RI}]))",
                  "slow-consumer drops {{instance}}")], unit="ops"),
        Panel("Keys per subject", "Top-level keys (worknodes) held, per node and subject.",
              [_q(f"max by (instance, subject) (worknode_keys{{{SUBJ}}})",
                  "{{instance}} {{subject}}")], width=6),
        Panel("Connected to NATS", "1 while a node is connected to NATS, per node.",
              [_q("min by (instance) (worknode_nats_connected)", "{{instance}}")],
              kind="stat", width=6),
    ],
)

HEALING = Dashboard(
    uid="worknode-healing",
    title="worknode / Healing",
    description="The healer: divergence per subject, rounds, keys repaired, bytes, duration, "
                "outcomes and the age of the last heal report.",
    variables=[Variable("subject", "Subject", "worknode_heal_replicas")],
    panels=[
        Panel("Divergence per subject", "Keys differing at the start of the latest heal. "
              "Non-zero heal after heal means replication keeps losing deltas.",
              [_q(f"max by (subject) (worknode_heal_divergence_keys{{{SUBJ}}})", "{{subject}}")]),
        Panel("Heals / s by outcome", "in_sync: roots agreed; converged: repaired; "
              "still_moving: writes kept landing; stuck: repairs changed no root (a defect, "
              "escalated); failed: a replica unreachable or a bad reply.",
              [_q(f"sum by (outcome) (rate(worknode_heals_total{{{SUBJ}}}[{RI}]))",
                  "{{outcome}}")], unit="ops"),
        Panel("Reconciliation rounds / s", "Rounds run per subject (a heal re-checks roots "
              "up to max_rounds).",
              [_q(f"sum by (subject) (rate(worknode_heal_rounds_total{{{SUBJ}}}[{RI}]))",
                  "{{subject}}")], unit="ops"),
        Panel("Keys found different / repaired per second",
              "Keys the Merkle comparison named, and keys whose state was pushed.",
              [_q(f"sum by (subject) (rate(worknode_heal_divergent_keys_total{{{SUBJ}}}[{RI}]))",
                  "found {{subject}}"),
               _q(f"sum by (subject) (rate(worknode_heal_keys_repaired_total{{{SUBJ}}}[{RI}]))",
                  "repaired {{subject}}")], unit="ops"),
        Panel("Healer bytes / s", "Bytes sent and received by the healer "
              "(throttled to bytes_per_second).",
              [_q(f"sum by (subject) (rate(worknode_heal_bytes_total{{{SUBJ}}}[{RI}]))",
                  "{{subject}}")], unit="Bps"),
        Panel("Healer requests / s", "Requests the healer made (Merkle roots, nodes, leaves, "
              "fetches, applies).",
              [_q(f"sum by (subject) (rate(worknode_heal_round_trips_total{{{SUBJ}}}[{RI}]))",
                  "{{subject}}")], unit="reqps"),
        Panel("Heal duration", "Time to heal one subject: median and p99.",
              _quantiles("worknode_heal_duration_seconds", "subject", SUBJ), unit="s"),
        Panel("Heal failures / s", "Heals that failed; retried after retry_s.",
              [_q(f"sum by (subject) (rate(worknode_heal_failures_total{{{SUBJ}}}[{RI}]))",
                  "{{subject}}")], unit="ops"),
        Panel("Last heal report", "Seconds since the latest signed heal report per subject "
              "(a report is published when a heal had work to do).",
              [_q(f"time() - max by (subject) "
                  f"(worknode_heal_last_report_timestamp_seconds{{{SUBJ}}})", "{{subject}}")],
              kind="stat", unit="s", width=12, height=6),
        Panel("Replicas per subject", "Replicas the healer discovered.",
              [_q(f"max by (subject) (worknode_heal_replicas{{{SUBJ}}})", "{{subject}}")],
              kind="stat", width=12, height=6),
    ],
)

RPC = Dashboard(
    uid="worknode-rpc",
    title="worknode / RPC",
    description="Capability-checked RPC between worknodes: request rate, errors by status "
                "code, latency quantiles, requests in flight, token verification.",
    variables=[Variable("method", "Method", "worknode_rpc_requests_total")],
    panels=[
        Panel("Requests / s by method", "Requests served, per method.",
              [_q(f'sum by (method) (rate(worknode_rpc_requests_total{{method=~"$method"}}'
                  f"[{RI}]))", "{{method}}")], unit="reqps"),
        Panel("Errors / s by code", "Requests that did not end ok, by status code "
              "(permission_denied, deadline_exceeded, ...).",
              [_q(f'sum by (code) (rate(worknode_rpc_requests_total{{method=~"$method", '
                  f'code!="ok"}}[{RI}]))', "{{code}}")], unit="reqps"),
        Panel("Error ratio", "Share of requests that did not end ok, per method "
              "(alert: WorknodeRPCErrorRatioHigh).",
              [_q(f'sum by (method) (rate(worknode_rpc_requests_total{{method=~"$method", '
                  f'code!="ok"}}[{RI}])) / sum by (method) (rate(worknode_rpc_requests_total'
                  f'{{method=~"$method"}}[{RI}]))', "{{method}}")], unit="percentunit"),
        Panel("Latency by method", "Request duration: median and p99 per method.",
              _quantiles("worknode_rpc_request_duration_seconds", "method",
                         'method=~"$method"'), unit="s"),
        Panel("In flight", "Requests being served, per method (bounded per endpoint).",
              [_q('sum by (method) (worknode_rpc_in_flight{method=~"$method"})',
                  "{{method}}")]),
        Panel("Token verification", "Time to verify a capability token: median and p99.",
              _quantiles("worknode_rpc_token_verify_seconds", "", ""), unit="s"),
    ],
)

UPGRADES = Dashboard(
    uid="worknode-upgrades",
    title="worknode / Rolling upgrades",
    description="Which wire version each node writes and which versions it reads: watch a "
                "rolling upgrade node by node.",
    panels=[
        Panel("Nodes by wire version written", "Worknodes per wire version they write "
              "(worknode_build_info). Two values for long: WorknodeMixedWireVersions.",
              [_q(f"count by (wire_version) (worknode_build_info{{{NODE}}})",
                  "v{{wire_version}}")], kind="bargauge", width=8, height=6),
        Panel("Nodes by package version", "Worknodes per installed worknode version.",
              [_q(f"count by (version) (worknode_build_info{{{NODE}}})", "{{version}}")],
              kind="bargauge", width=8, height=6),
        Panel("Distinct wire versions", "1 outside an upgrade.",
              [_q(f"count(count by (wire_version) (worknode_build_info{{{NODE}}}))",
                  "versions")], kind="stat", width=8, height=6),
        Panel("Nodes", "Every worknode and healer process: package version, wire version "
              "written, oldest version written for (peer_wire_version).",
              [_q("max by (instance, service, version, wire_version, peer_wire_version) "
                  "(worknode_build_info)", "", instant=True, table=True)],
              kind="table", width=24, height=7),
        Panel("Envelopes read / s by wire version", "What the cluster is reading, per wire "
              "version written: the old version fades out as nodes upgrade.",
              [_q(f"sum by (wire_version) (rate(worknode_deltas_applied_total[{RI}]))",
                  "v{{wire_version}}")], unit="ops"),
        Panel("Envelopes read / s per node and version", "Per reading node.",
              [_q("sum by (instance, wire_version) "
                  f"(rate(worknode_deltas_applied_total[{RI}]))",
                  "{{instance}} v{{wire_version}}")], unit="ops"),
        Panel("Version rejections / s", "Envelopes a node could not read: too old a version, "
              "or a feature it can neither read nor keep (a compressed batch sent to a v1 "
              "node: set peer_version back to 1).",
              [_q('sum by (instance, reason) (rate(worknode_deltas_rejected_total{reason=~'
                  f'"unsupported_version|unsupported_content"}}[{RI}]))',
                  "{{instance}} {{reason}}")], unit="ops"),
        Panel("Scrape targets up", "1 per service Prometheus scrapes.",
              [_q('sum by (job) (up{job=~"worknode.*"})', "{{job}}")]),
    ],
)

NATS = Dashboard(
    uid="worknode-nats",
    title="worknode / NATS servers",
    description="NATS server health from prometheus-nats-exporter (-varz -healthz -jsz): "
                "connections, traffic, slow consumers, routes, memory, JetStream.",
    panels=[
        Panel("Healthy", "/healthz per server: 0 is ok (prometheus-nats-exporter's "
              "convention), 1 is unhealthy.",
              [_q("max by (server_id) (gnatsd_healthz_status)", "{{server_id}}")],
              kind="stat", width=12, height=5),
        Panel("Routes", "Cluster routes per server (a full mesh of 3 has 2 each, more with "
              "pooled routes).",
              [_q("max by (server_id) (gnatsd_varz_routes)", "{{server_id}}")],
              kind="stat", width=12, height=5),
        Panel("Client connections", "Open client connections per server.",
              [_q("max by (server_id) (gnatsd_varz_connections)", "{{server_id}}")]),
        Panel("Messages / s", "Messages in and out per server.",
              [_q(f"sum by (server_id) (rate(gnatsd_varz_in_msgs[{RI}]))", "in {{server_id}}"),
               _q(f"sum by (server_id) (rate(gnatsd_varz_out_msgs[{RI}]))",
                  "out {{server_id}}")], unit="ops"),
        Panel("Bytes / s", "Bytes in and out per server.",
              [_q(f"sum by (server_id) (rate(gnatsd_varz_in_bytes[{RI}]))", "in {{server_id}}"),
               _q(f"sum by (server_id) (rate(gnatsd_varz_out_bytes[{RI}]))",
                  "out {{server_id}}")], unit="Bps"),
        Panel("Slow consumers", "Slow-consumer events the server counted (worknode "
              "catches up after each; see worknode_slow_consumer_dropped_total).",
              [_q("max by (server_id) (gnatsd_varz_slow_consumers)", "{{server_id}}")]),
        Panel("Subscriptions", "Subscriptions per server.",
              [_q("max by (server_id) (gnatsd_varz_subscriptions)", "{{server_id}}")]),
        Panel("Memory", "Resident memory per server.",
              [_q("max by (server_id) (gnatsd_varz_mem)", "mem {{server_id}}")],
              unit="bytes"),
        Panel("JetStream storage", "Bytes stored in JetStream and the configured maximum.",
              [_q("max by (server_id) (jetstream_server_total_message_bytes)",
                  "stored {{server_id}}"),
               _q("max by (server_id) (jetstream_server_max_storage)", "max {{server_id}}")],
              unit="bytes"),
        Panel("NATS CPU", "CPU use per server, percent of one core.",
              [_q("max by (server_id) (gnatsd_varz_cpu)", "{{server_id}}")], unit="percent"),
    ],
)

DASHBOARDS = (REPLICATION, HEALING, RPC, UPGRADES, NATS)


def files() -> dict[Path, str]:
    """``{path: JSON text}`` of every dashboard."""
    return {
        OUT_DIR / f"{d.uid.removeprefix('worknode-')}.json":
            json.dumps(render(d), indent=2) + "\n"
        for d in DASHBOARDS
    }


def main() -> int:
    """Write the dashboards, or with ``--check`` report any that differ from this file."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="compare only; exit 1 if stale")
    args = parser.parse_args()
    stale = []
    for path, text in files().items():
        current = path.read_text() if path.exists() else None
        if current != text:
            stale.append(path)
            if not args.check:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
    for path in stale:
        print(("stale: " if args.check else "wrote: ") + str(path))
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
