"""Every dashboard panel's query returns data from a real Prometheus scraping real services.

A real ``prometheus`` (Debian's package) scrapes, every second, the deployment of
``stack.running_stack`` — a nats-server through the exporter stand-in, three worknodes on
two wire versions, the healer — with the job names and alert rules that ship in
``dashboards/prometheus/``, while ``stack.generate_traffic`` runs. Then every query of every
panel and every variable of every dashboard is run through Prometheus's HTTP API as Grafana
would run it (``$__rate_interval`` replaced by a concrete window, variables by "All"), and
each must return at least one series with a number. The alert rules must load and evaluate
without error in the same Prometheus, and ``WorknodeByzantineWriter`` fires for the forged
deltas of the stack's intruder.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.observability.stack import Stack, generate_traffic, running_stack

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = ROOT / "dashboards" / "grafana" / "dashboards"
PROMETHEUS_CONFIG = ROOT / "dashboards" / "prometheus" / "prometheus.yml"

# The dashboards whose every query must return data here: all of them, by uid.
CHECKED_DASHBOARDS = {
    "worknode-overview",
    "worknode-replication",
    "worknode-healing",
    "worknode-rpc",
    "worknode-upgrades",
    "worknode-nats",
}

SCRAPE_INTERVAL = "1s"
# Grafana replaces $__rate_interval by max($__interval + scrape interval, 4 x scrape interval):
# about 4s here. 15s (still many scrapes) keeps rates defined on a loaded machine.
RATE_INTERVAL = "15s"
DEADLINE_S = 45.0  # for every query to return data once traffic runs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _test_config(stack: Stack, tmp: Path) -> Path:
    """The shipped config with its jobs pointed at the stack and a 1 s scrape interval."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["global"] = {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": "1s",
                        "scrape_timeout": SCRAPE_INTERVAL}
    config["rule_files"] = [str(PROMETHEUS_CONFIG.parent / f) for f in config["rule_files"]]
    targets = stack.targets()
    jobs = []
    for job in config["scrape_configs"]:
        if job["job_name"] == "prometheus":
            continue
        job["static_configs"] = [{"targets": targets.pop(job["job_name"])}]
        jobs.append(job)
    assert targets == {}, f"jobs missing from {PROMETHEUS_CONFIG}: {targets}"
    config["scrape_configs"] = jobs
    path = tmp / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


@contextlib.contextmanager
def _running_prometheus(binary: str, config: Path, tmp: Path) -> Iterator[str]:
    """A Prometheus server on a free loopback port; stopped (killed if need be) on exit."""
    port = _free_port()
    log = (tmp / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                pytest.fail(f"prometheus exited: {(tmp / 'prometheus.log').read_text()}")
            with (contextlib.suppress(OSError),
                  urllib.request.urlopen(f"{url}/-/ready", timeout=1) as resp):
                if resp.status == 200:
                    break
            if time.monotonic() > deadline:
                pytest.fail("prometheus not ready within 30 s")
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _api(url: str, path: str, **params: str) -> Any:
    query = urllib.parse.urlencode(params)
    try:
        with urllib.request.urlopen(f"{url}/api/v1/{path}?{query}", timeout=10) as resp:
            body = json.load(resp)
    except urllib.error.HTTPError as exc:  # 400 for a query that does not parse
        body = json.load(exc)
    return body


def grafana_expr(expr: str) -> str:
    """``expr`` as Grafana sends it: ``$__rate_interval`` filled in, variables at "All"."""
    expr = expr.replace("$__rate_interval", RATE_INTERVAL)
    assert "$__" not in expr, f"unsupported Grafana macro in {expr}"
    return re.sub(r"\$\{?([a-z_]+)\}?", ".*", expr)


def queries() -> list[tuple[str, str, str, bool]]:
    """``(dashboard uid, what, PromQL, instant)`` for every panel target and variable."""
    out = []
    for path in sorted(DASHBOARDS.glob("*.json")):
        d = json.loads(path.read_text())
        for panel in d["panels"]:
            for t in panel.get("targets", []):  # an alert list queries nothing
                out.append((d["uid"], f"panel {panel['title']!r} {t['refId']}",
                            grafana_expr(t["expr"]), bool(t.get("instant"))))
        for var in d["templating"]["list"]:
            m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", var["query"]["query"])
            assert m is not None, var["query"]
            out.append((d["uid"], f"variable ${var['name']}",
                        f"count by ({m.group(2)}) ({grafana_expr(m.group(1))})", True))
    return out


def _has_data(result: dict[str, Any]) -> bool:
    """At least one series with at least one number (not NaN) in it."""
    for series in result["data"]["result"]:
        values = series.get("values") or [series["value"]]
        if any(not math.isnan(float(v)) for _, v in values):
            return True
    return False


def _run_query(url: str, expr: str, instant: bool) -> dict[str, Any]:
    if instant:
        return _api(url, "query", query=expr)  # type: ignore[no-any-return]
    now = time.time()
    return _api(url, "query_range", query=expr, start=f"{now - 30:.3f}",  # type: ignore[no-any-return]
                end=f"{now:.3f}", step="1")


def test_dashboard_set_is_explicit() -> None:
    uids = {json.loads(p.read_text())["uid"] for p in DASHBOARDS.glob("*.json")}
    assert uids == CHECKED_DASHBOARDS


async def test_every_panel_query_returns_data_from_real_prometheus(
    tmp_path: Path, prometheus_binary: str
) -> None:
    all_queries = queries()
    async with running_stack(tmp_path / "stack") as stack:
        config = _test_config(stack, tmp_path)
        with _running_prometheus(prometheus_binary, config, tmp_path) as url:
            traffic = asyncio.create_task(generate_traffic(stack))
            try:
                missing = await _poll_until_every_query_has_data(url, all_queries)
                # The intruder's forged deltas page: the alert fires by signer and reason.
                byzantine = await _poll_until_firing(
                    url, "WorknodeByzantineWriter", {"signer": "intruder",
                                                     "reason": "foreign_dot"})
                rules = await asyncio.to_thread(_api, url, "rules")
                # The check is not vacuous: a query matching no series has no data.
                nothing = await asyncio.to_thread(
                    _run_query, url, grafana_expr(
                        "sum(rate(worknode_no_such_series_total[$__rate_interval]))"), False)
            finally:
                traffic.cancel()
                await asyncio.gather(traffic, return_exceptions=True)
            # The down selectors see real outages: one worknode and the healer stop, and
            # the alerts' expressions (without their for:) and the overview's up panels
            # show them, per instance.
            targets = stack.targets()
            await stack.nodes[0].stop()
            await stack.healer.stop()
            down = await _poll_until_down(
                url, targets["worknode"][0], targets["worknode-healer"][0])

    assert nothing["status"] == "success"
    assert not _has_data(nothing)
    assert missing == [], "queries without data:\n" + "\n".join(
        f"  {uid}: {what}: {expr}" for uid, what, expr in missing
    )
    assert down == {}, f"outages not seen: {down}"
    assert byzantine, "WorknodeByzantineWriter did not fire for the intruder"
    evaluated = [r for g in rules["data"]["groups"] for r in g["rules"]]
    assert evaluated
    bad = [(r["name"], r.get("lastError")) for r in evaluated if r["health"] != "ok"]
    assert bad == [], f"alert rules that do not evaluate: {bad}"


def _alert_expr(name: str) -> str:
    for path in sorted((PROMETHEUS_CONFIG.parent / "rules").glob("*.rules.yml")):
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                if rule.get("alert") == name:
                    return str(rule["expr"])
    raise AssertionError(f"no alert {name}")


async def _poll_until_firing(url: str, name: str, labels: dict[str, str]) -> bool:
    """Whether alert ``name`` with ``labels`` fires before the deadline."""
    deadline = time.monotonic() + DEADLINE_S
    while True:
        alerts = (await asyncio.to_thread(_api, url, "alerts"))["data"]["alerts"]
        if any(a["labels"].get("alertname") == name and a["state"] == "firing"
               and labels.items() <= a["labels"].items() for a in alerts):
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.5)


async def _poll_until_down(url: str, node: str, healer: str) -> dict[str, Any]:
    """Run the node-down and healer-down selectors until each names only the stopped
    target (``instance``); return those that did not by the deadline, with what they
    returned."""
    expected = {
        _alert_expr("WorknodeDown"): node,
        _alert_expr("WorknodeHealerDown"): healer,
        'up{job="worknode"} == 0': node,
        'up{job="worknode-healer"} == 0': healer,
    }
    deadline = time.monotonic() + DEADLINE_S
    while True:
        seen: dict[str, Any] = {}
        for expr, instance in expected.items():
            result = await asyncio.to_thread(_run_query, url, expr, True)
            assert result["status"] == "success", f"{expr}: {result}"
            found = [r["metric"].get("instance") for r in result["data"]["result"]]
            if found != [instance]:
                seen[expr] = found
        if not seen or time.monotonic() > deadline:
            return seen
        await asyncio.sleep(0.5)


async def _poll_until_every_query_has_data(
    url: str, all_queries: list[tuple[str, str, str, bool]]
) -> list[tuple[str, str, str]]:
    """Run every query until each has data (or, for dashboards awaiting RPC traffic, parses);
    return those still without data at the deadline."""
    pending = list(all_queries)
    deadline = time.monotonic() + DEADLINE_S
    while True:
        still = []
        for uid, what, expr, instant in pending:
            result = await asyncio.to_thread(_run_query, url, expr, instant)
            assert result["status"] == "success", f"{uid}: {what}: {expr}: {result}"
            if not _has_data(result):
                still.append((uid, what, expr, instant))
        pending = still
        if not pending or time.monotonic() > deadline:
            return [(uid, what, expr) for uid, what, expr, _ in pending]
        await asyncio.sleep(1.0)
