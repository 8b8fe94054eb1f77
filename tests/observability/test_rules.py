"""The alert rules and the Prometheus config pass promtool, the rules' unit tests
(``dashboards/prometheus/tests/``) pass and cover every alert both firing and not firing,
and every alert carries a summary, a description, a ``for:`` and a runbook link to its own
subsection of the README's "Runbook"."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
PROM = ROOT / "dashboards" / "prometheus"
RULE_FILES = sorted((PROM / "rules").glob("*.rules.yml"))
TEST_FILES = sorted((PROM / "tests").glob("*_test.yml"))


def _run(*argv: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=cwd,
                          check=False)


def _rules() -> list[dict[str, Any]]:
    return [r for path in RULE_FILES for group in yaml.safe_load(path.read_text())["groups"]
            for r in group["rules"] if "alert" in r]


def _alerts() -> set[str]:
    return {r["alert"] for r in _rules()}


def _runbook_sections() -> list[str]:
    """The ``####`` headings under the README's ``## Runbook`` / ``### Runbook``, in order."""
    text = (ROOT / "README.md").read_text()
    m = re.search(r"^(#{2,3}) Runbook\n(.*?)(?=^#{2,3} |\Z)", text, re.M | re.S)
    assert m is not None, "README has no Runbook section"
    return re.findall(r"^#### (\S+)\s*$", m.group(2), re.M)


def test_every_alert_has_annotations_and_its_own_runbook_section() -> None:
    sections = _runbook_sections()
    assert len(sections) == len(set(sections)), "a runbook section appears twice"
    for rule in _rules():
        name = rule["alert"]
        notes = rule.get("annotations", {})
        assert notes.get("summary"), name
        assert notes.get("description"), name
        assert re.fullmatch(r"\d+[smh]", rule.get("for", "")), f"{name}: no sensible for:"
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, name
        # GitHub's anchor for "#### WorknodeDown" is "#worknodedown".
        assert notes.get("runbook_url") == f"README.md#{name.lower()}", name
    assert set(sections) == _alerts(), "runbook sections and alerts differ"


def test_rules_and_config_pass_promtool_check(promtool: str) -> None:
    assert RULE_FILES
    assert TEST_FILES
    r = _run(promtool, "check", "rules", *map(str, RULE_FILES))
    assert r.returncode == 0, r.stdout + r.stderr
    r = _run(promtool, "check", "config", str(PROM / "prometheus.yml"))
    assert r.returncode == 0, r.stdout + r.stderr


def test_rule_unit_tests_pass(promtool: str) -> None:
    r = _run(promtool, "test", "rules", *(p.name for p in TEST_FILES), cwd=PROM / "tests")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for path in TEST_FILES:
        for group in yaml.safe_load(path.read_text())["tests"]:
            for case in group.get("alert_rule_test", []):
                (firing if case.get("exp_alerts") else quiet).add(case["alertname"])
    alerts = _alerts()
    assert alerts
    assert alerts - firing == set(), "alerts never tested firing"
    assert alerts - quiet == set(), "alerts never tested quiet"
    assert (firing | quiet) - alerts == set(), "tests of alerts that do not exist"
