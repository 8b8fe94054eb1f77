"""Writes the Grafana dashboards in ``dashboards/grafana/dashboards/`` (provisioned JSON).

The JSON files are generated, never edited by hand: change a panel here, then run
``python dashboards/build.py`` (``--check`` only compares, as the tests do). Every dashboard
has a stable ``uid`` and every panel and query names the pinned Prometheus datasource uid
``worknode-prometheus`` (``grafana/provisioning/datasources/prometheus.yml``).

Rate windows are ``$__rate_interval``, which Grafana derives from the scrape interval, so a
panel shows data after a few scrapes; the tests substitute a concrete window the same way.
Variables default to "All" (``allValue: ".*"``). Every stat panel states its thresholds and
value mappings (``Stat``): a 0 that means "ok" is green, a 0 that means "down" is red, and a
panel stays green while the system is healthy. The alert list panel shows the Prometheus
rules of ``dashboards/prometheus/rules`` (firing and pending).
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
class Stat:
    """What a stat panel's values mean: ``steps`` are ``(from value, color)`` thresholds
    (the first from ``None``: the base), ``values`` maps exact values to a text and a color,
    ``ranges`` maps ``(from, to)`` ranges the same way."""

    steps: list[tuple[float | None, str]]
    values: dict[int, tuple[str, str]] = field(default_factory=dict)
    ranges: list[tuple[float, float, str, str]] = field(default_factory=list)

    def defaults(self) -> dict[str, Any]:
        """The panel's ``fieldConfig.defaults`` entries: thresholds, mappings, color."""
        mappings: list[dict[str, Any]] = []
        if self.values:
            mappings.append({"type": "value", "options": {
                str(v): {"text": text, "color": color, "index": i}
                for i, (v, (text, color)) in enumerate(sorted(self.values.items()))
            }})
        for lo, hi, text, color in self.ranges:
            mappings.append({"type": "range", "options": {
                "from": lo, "to": hi, "result": {"text": text, "color": color,
                                                 "index": len(mappings)},
            }})
        return {
            "thresholds": {"mode": "absolute", "steps": [
                {"color": color, "value": value} for value, color in self.steps
            ]},
            "mappings": mappings,
            "color": {"mode": "thresholds"},
        }


UP = Stat([(None, "red"), (1, "green")], {0: ("Down", "red"), 1: ("Up", "green")})
"""``up`` and other 1-is-good gauges."""


@dataclass
class Panel:
    """One panel: a visualization over one or more queries (none for an alert list)."""

    title: str
    description: str
    queries: list[Query]
    kind: str = "timeseries"  # timeseries | stat | table | bargauge | alertlist
    unit: str = "short"
    width: int = 12
    height: int = 8
    extra_defaults: dict[str, Any] = field(default_factory=dict)
    stat: Stat | None = None
    """Required for ``kind="stat"``: thresholds and value mappings."""


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
    if kind == "alertlist":
        # Unified alerting's list: data-source-managed rules (the Prometheus rules) included.
        return {
            "viewMode": "list",
            "groupMode": "default",
            "groupBy": [],
            "maxItems": 20,
            "sortOrder": 1,
            "dashboardAlerts": False,
            "alertName": "",
            "alertInstanceLabelFilter": "",
            "stateFilter": {"firing": True, "pending": True, "noData": False,
                            "normal": False, "error": True},
            "showInstances": True,
        }
    raise ValueError(kind)


def _panel(p: Panel, pid: int, x: int, y: int) -> dict[str, Any]:
    defaults: dict[str, Any] = {"unit": p.unit}
    if p.kind == "timeseries":
        defaults["custom"] = {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10,
                              "showPoints": "never", "spanNulls": False}
    if p.kind == "stat":
        if p.stat is None:
            raise ValueError(f"stat panel {p.title!r} without thresholds and mappings")
        defaults.update(p.stat.defaults())
    defaults.update(p.extra_defaults)
    if p.kind == "alertlist":
        return {
            "id": pid,
            "type": p.kind,
            "title": p.title,
            "description": p.description,
            "gridPos": {"h": p.height, "w": p.width, "x": x, "y": y},
            "options": _options(p.kind),
        }
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
PROC = 'job=~"worknode|worknode-healer"'

HEAL_AGE = Stat([(None, "green"), (300, "yellow"), (1800, "red")])
REPLICAS = Stat([(None, "red"), (2, "green")], {0: ("0: none", "red"), 1: ("1: alone", "red")})

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
              "median and p99 per subject (buckets up to 10 minutes: a node catching up "
              "after a partition shows minutes).",
              _quantiles("worknode_replication_lag_seconds", "subject", SUBJ), unit="s"),
        Panel("Replication lag p99 per node", "p99 seal-to-apply lag at each reading node: "
              "one slow node (CPU, slow consumer, clock) stands out.",
              [_q("histogram_quantile(0.99, sum by (le, instance) "
                  f"(rate(worknode_replication_lag_seconds_bucket{{{SUBJ}}}[{RI}])))",
                  "p99 {{instance}}")], unit="s"),
        Panel("Flush latency", "First committed write of a batch to its publication.",
              _quantiles("worknode_flush_latency_seconds", "subject", SUBJ), unit="s"),
        Panel("Envelopes rejected / s by reason",
              "Envelopes refused (unsigned, unknown signer, bad signature, malformed, too "
              "large, unsupported version, ...). Any bad_signature is worth a look.",
              [_q("sum by (instance, reason) "
                  f"(rate(worknode_deltas_rejected_total{{{SUBJ}}}[{RI}]))",
                  "{{instance}} {{reason}}")], unit="ops"),
        Panel("Byzantine envelopes rejected by signer/reason",
              "Envelopes a roster key signed that no honest writer signs (foreign_dot, "
              "dot_range, clock_range, unbacked_context), per signer and reason, summed over "
              "the nodes. Any is an attack or a broken writer (alert WorknodeByzantineWriter): "
              "revoke the signer (worknode roster revoke) or rotate its key.",
              [_q("sum by (signer, reason) "
                  f"(increase(worknode_byzantine_rejected_total{{{SUBJ}}}[{RI}]))",
                  "{{signer}} {{reason}}")]),
        Panel("Store commit latency", "Durable group-commit latency (SQLite WAL).",
              _quantiles("worknode_store_commit_seconds", "subject", SUBJ), unit="s"),
        Panel("Store errors / s", "Durable store calls that failed, per node and operation "
              "(alert: WorknodeStoreErrors; a failed append stops writes until a restart).",
              [_q("sum by (instance, operation) "
                  f"(rate(worknode_store_errors_total[{RI}]))",
                  "{{instance}} {{operation}}")], unit="ops"),
        Panel("Pending ops", "Committed operations not yet published, per node, as a share "
              "of max_pending_ops (writers get BackpressureError at 100%; alert at 80%).",
              [_q(f"max by (instance, subject) (worknode_pending_ops{{{SUBJ}}}) / on "
                  "(instance, subject) max by (instance, subject) "
                  f"(worknode_pending_ops_limit{{{SUBJ}}})", "{{instance}} {{subject}}")],
              unit="percentunit"),
        Panel("Catch-ups / s by outcome, sequence gaps / s",
              "State transfers by outcome, and batches found missing from a writer's "
              "sequence (each triggers catch-up).",
              [_q(f"sum by (outcome) (rate(worknode_catchups_total{{{SUBJ}}}[{RI}]))",
                  "catch-up {{outcome}}"),
               _q(f"sum(rate(worknode_sequence_gaps_total{{{SUBJ}}}[{RI}]))", "gaps")],
              unit="ops"),
        Panel("Catch-ups served and refused / s",
              "Peers' catch-up requests this node answered, and those it refused unanswered, "
              "by reason (replayed, expired, unsigned, unknown_signer, not_served, "
              "rate_limited, ...): a replay or a flood shows here, not as load.",
              [_q("sum by (instance) "
                  f"(rate(worknode_catchup_served_total{{{SUBJ}}}[{RI}]))",
                  "served {{instance}}"),
               _q("sum by (instance, reason) "
                  f"(rate(worknode_catchup_refused_total{{{SUBJ}}}[{RI}]))",
                  "refused {{instance}} {{reason}}")], unit="ops"),
        Panel("Failures / s", "Publishes retried, handler errors (a bug), slow-consumer "
              "drops (each triggers catch-up).",
              [_q(f"sum by (instance) (rate(worknode_publish_failures_total{{{SUBJ}}}[{RI}]))",
                  "publish failures {{instance}}"),
               _q(f"sum by (instance) (rate(worknode_handler_errors_total[{RI}]))",
                  "handler errors {{instance}}"),
               _q(f"sum by (instance) (rate(worknode_slow_consumer_dropped_total[{RI}]))",
                  "slow-consumer drops {{instance}}")], unit="ops"),
        Panel("STRONG operations / s by op and outcome",
              "STRONG writes, reads and cas (conditional writes) per outcome: ok, conflict "
              "(a compare-and-set lost: the caller read a stale version), unavailable (no "
              "quorum within strong_timeout_s: not done), unknown (maybe done: read to find "
              "out).",
              [_q("sum by (op, outcome) "
                  f"(rate(worknode_strong_ops_total{{{SUBJ}}}[{RI}]))",
                  "{{op}} {{outcome}}")], unit="ops"),
        Panel("STRONG latency", "STRONG operations, acknowledged by the stream's quorum and "
              "applied here (a read: its fence published and applied): median and p99 per op.",
              _quantiles("worknode_strong_op_seconds", "op", SUBJ), unit="s"),
        Panel("STRONG log applied sequence / refused entries",
              "The STRONG log sequence each node applied (nodes of a subject converge on "
              "one value; one behind is partitioned or catching up), and log entries refused "
              "(not a sealed write of a node or writer).",
              [_q(f"max by (instance, subject) (worknode_strong_applied_seq{{{SUBJ}}})",
                  "applied {{instance}} {{subject}}"),
               _q("sum by (instance) "
                  f"(increase(worknode_strong_entries_refused_total{{{SUBJ}}}[{RI}]))",
                  "refused {{instance}}")]),
        Panel("STRONG mode", "Per node: Available (its last STRONG operation reached a "
              "quorum), or Unavailable (red: a minority or cut off from JetStream; STRONG "
              "fails there in bounded time while LOCAL/EVENTUAL go on).",
              [_q(f"min by (instance) (worknode_strong_available{{{SUBJ}}})", "{{instance}}")],
              kind="stat", width=6,
              stat=Stat([(None, "red"), (1, "green")],
                        {0: ("Unavailable", "red"), 1: ("Available", "green")})),
        Panel("Keys per subject", "Top-level keys (worknodes) held, per node and subject.",
              [_q(f"max by (instance, subject) (worknode_keys{{{SUBJ}}})",
                  "{{instance}} {{subject}}")], width=6),
        Panel("Connected to NATS", "Per node: Connected, or Disconnected (red; alert "
              "WorknodeNATSDisconnected after 2 minutes).",
              [_q("min by (instance) (worknode_nats_connected)", "{{instance}}")],
              kind="stat", width=6,
              stat=Stat([(None, "red"), (1, "green")],
                        {0: ("Disconnected", "red"), 1: ("Connected", "green")})),
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
              "escalated); unverified: a replica's reply failed verification (relayed or "
              "replayed); failed: a replica unreachable or a bad reply.",
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
        Panel("Heal failures / s", "Heals that failed (retried after retry_s), and heal "
              "loop passes that failed outside any subject (discovery).",
              [_q(f"sum by (subject) (rate(worknode_heal_failures_total{{{SUBJ}}}[{RI}]))",
                  "{{subject}}"),
               _q(f"sum by (instance) (rate(worknode_heal_loop_errors_total[{RI}]))",
                  "loop errors {{instance}}")], unit="ops"),
        Panel("Skipped heals / s by reason", "Subjects not healed because fewer than two "
              "replicas answered: no_replicas, one_replica (alert: WorknodeHealSkipped).",
              [_q("sum by (subject, reason) "
                  f"(rate(worknode_heal_skipped_total{{{SUBJ}}}[{RI}]))",
                  "{{subject}} {{reason}}")], unit="ops"),
        Panel("Time since last successful heal", "Per subject, since a heal last ended with "
              "every replica's root agreeing (every interval_s while healthy, also when there "
              "was nothing to repair). Yellow past 5 minutes, red past 30 (alert: "
              "WorknodeHealStalled).",
              [_q(f"time() - max by (subject) "
                  f"(worknode_heal_last_success_timestamp_seconds{{{SUBJ}}})", "{{subject}}")],
              kind="stat", unit="s", width=12, height=6, stat=HEAL_AGE),
        Panel("Replicas per subject", "Replicas the healer discovered: 0 or 1 is red "
              "(nothing to compare, no redundancy).",
              [_q(f"max by (subject) (worknode_heal_replicas{{{SUBJ}}})", "{{subject}}")],
              kind="stat", width=12, height=6, stat=REPLICAS),
    ],
)

SERVER_CODES = "internal|unavailable|deadline_exceeded"
CALLER_CODES = "unauthenticated|permission_denied|invalid_argument|not_found|failed_precondition"

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
        Panel("Error ratio: server side vs callers'", "Per method, the share of requests "
              "that ended with a server-side status (internal, unavailable, "
              "deadline_exceeded; alert: WorknodeRPCServerErrors) and with the caller's "
              "error (unauthenticated, permission_denied, invalid_argument, not_found, "
              "failed_precondition; alert: WorknodeRPCCallerErrors).",
              [_q(f'sum by (method) (rate(worknode_rpc_requests_total{{method=~"$method", '
                  f'code=~"{SERVER_CODES}"}}[{RI}])) / sum by (method) '
                  f'(rate(worknode_rpc_requests_total{{method=~"$method"}}[{RI}]))',
                  "server {{method}}"),
               _q(f'sum by (method) (rate(worknode_rpc_requests_total{{method=~"$method", '
                  f'code=~"{CALLER_CODES}"}}[{RI}])) / sum by (method) '
                  f'(rate(worknode_rpc_requests_total{{method=~"$method"}}[{RI}]))',
                  "caller {{method}}")], unit="percentunit"),
        Panel("Requests / s per node", "Requests served by each node.",
              [_q(f'sum by (instance) (rate(worknode_rpc_requests_total{{method=~"$method"}}'
                  f"[{RI}]))", "{{instance}}")], unit="reqps"),
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
        Panel("Distinct wire versions", "1 outside an upgrade; 2 during one (yellow; alert "
              "WorknodeMixedWireVersions past 2 hours).",
              [_q(f"count(count by (wire_version) (worknode_build_info{{{NODE}}}))",
                  "versions")], kind="stat", width=8, height=6,
              stat=Stat([(None, "green"), (2, "yellow"), (3, "red")],
                        {1: ("1: one version", "green")})),
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
        Panel("Scrape targets up", "Targets Prometheus scrapes successfully, per job.",
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
              kind="stat", width=12, height=5,
              stat=Stat([(None, "green"), (1, "red")],
                        {0: ("ok", "green"), 1: ("unhealthy", "red")})),
        Panel("Routes", "Cluster routes per server (a full mesh of 3 has 2 each, more with "
              "pooled routes).",
              [_q("max by (server_id) (gnatsd_varz_routes)", "{{server_id}}")],
              kind="stat", width=12, height=5,
              stat=Stat([(None, "blue")], {0: ("0 (single server)", "blue")})),
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

OVERVIEW = Dashboard(
    uid="worknode-overview",
    title="worknode / Overview",
    description="Start here: which processes are up, connected and healing, the alerts "
                "firing, and each process's memory, CPU and file descriptors.",
    panels=[
        Panel("Worknodes up", "Per worknode target: Up, or Down (red; alert WorknodeDown).",
              [_q('up{job="worknode"}', "{{instance}}")], kind="stat", width=12, height=5,
              stat=UP),
        Panel("Healer up", "The healer target: Up, or Down (red; alert WorknodeHealerDown).",
              [_q('up{job="worknode-healer"}', "{{instance}}")], kind="stat", width=6,
              height=5, stat=UP),
        Panel("Connected to NATS", "Per worknode: Connected, or Disconnected (red).",
              [_q("min by (instance) (worknode_nats_connected)", "{{instance}}")],
              kind="stat", width=6, height=5,
              stat=Stat([(None, "red"), (1, "green")],
                        {0: ("Disconnected", "red"), 1: ("Connected", "green")})),
        Panel("Alerts", "worknode alerts firing or pending in Prometheus "
              "(dashboards/prometheus/rules; README: Runbook).",
              [], kind="alertlist", width=12, height=8),
        Panel("Time since last successful heal", "Per subject (see the Healing dashboard).",
              [_q("time() - max by (subject) "
                  "(worknode_heal_last_success_timestamp_seconds)", "{{subject}}")],
              kind="stat", unit="s", width=12, height=8, stat=HEAL_AGE),
        Panel("Resident memory", "RSS of every worknode and healer process "
              "(prometheus-client's process collector).",
              [_q(f"process_resident_memory_bytes{{{PROC}}}", "{{job}} {{instance}}")],
              unit="bytes", width=8),
        Panel("CPU", "CPU time used per second (1 = one core), per process.",
              [_q(f"rate(process_cpu_seconds_total{{{PROC}}}[{RI}])", "{{job}} {{instance}}")],
              unit="percentunit", width=8),
        Panel("Open file descriptors", "Open fds per process (the limit is "
              "process_max_fds).",
              [_q(f"process_open_fds{{{PROC}}}", "{{job}} {{instance}}")], width=8),
    ],
)

DASHBOARDS = (OVERVIEW, REPLICATION, HEALING, RPC, UPGRADES, NATS)


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
