"""STRONG consistency as operators see it, over a real nats-server with JetStream and real
worknode services: the metrics a node's ``/metrics`` serves for its STRONG operations."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nats
import pytest
from prometheus_client.parser import text_string_to_metric_families

from broker.crdt import Increment
from broker.errors import ConflictError, UnavailableError
from broker.replica import Consistency
from broker.strong import StrongMode, strong_subject
from broker.transport import EmbeddedNatsServer
from services.worknode import WorknodeService
from tests.integration._nodes import SUBJECT, running_nodes

STRONG = {SUBJECT: ["acct-"]}


def _nodes(tmp: Path, url: str, names: Sequence[str], **kw: Any) -> Any:
    """Worknode services with STRONG worknodes and a metrics endpoint each."""
    return running_nodes(tmp, url, names, strong=STRONG, strong_timeout_s=2.0,
                         metrics_host="127.0.0.1", metrics_port=0, **kw)


def _text(svc: WorknodeService) -> str:
    assert svc.metrics_url is not None
    with urllib.request.urlopen(svc.metrics_url, timeout=5) as resp:
        return resp.read().decode()  # type: ignore[no-any-return]


def _scrape(svc: WorknodeService) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = _text(svc)
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _get(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
         **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def _strong(svc: WorknodeService) -> StrongMode:
    mode = svc.replica(SUBJECT).strong
    assert mode is not None
    return mode


async def test_metrics_count_strong_outcomes_and_report_the_mode(
    tmp_path: Path, nats_server: EmbeddedNatsServer
) -> None:
    """Two nodes race a create_if_absent: one ``cas ok``, one ``cas conflict`` between them;
    a read counts ``read ok``; the applied sequence is the log's; with the server gone a
    write counts ``unavailable`` and ``worknode_strong_available`` drops to 0 (LOCAL goes
    on)."""
    async with _nodes(tmp_path, nats_server.url, ["a", "b"]) as svcs:
        a, b = svcs
        results = await asyncio.gather(
            _strong(a).create_if_absent("acct-1", "root"),
            _strong(b).create_if_absent("acct-1", "root"), return_exceptions=True)
        assert sum(isinstance(r, ConflictError) for r in results) == 1, results
        read = await _strong(a).read(["acct-1"])
        await _strong(b).read(["acct-1"])  # b has applied the fence too
        scraped = [_scrape(s) for s in svcs]

        def total(op: str, outcome: str) -> float:
            return sum(_get(m, "worknode_strong_ops_total", subject=SUBJECT, op=op,
                            outcome=outcome) for m in scraped)

        assert total("cas", "ok") == 1
        assert total("cas", "conflict") == 1
        assert total("read", "ok") == 2
        assert total("write", "ok") == 0
        ma = scraped[0]
        assert _get(ma, "worknode_strong_available", subject=SUBJECT) == 1
        assert _get(ma, "worknode_strong_applied_seq", subject=SUBJECT) >= read.seq
        assert _get(ma, "worknode_strong_op_seconds_count", subject=SUBJECT, op="read") == 1
        assert _get(ma, "worknode_strong_entries_refused_total", subject=SUBJECT) == 0
        if (promtool := shutil.which("promtool")) is not None:  # test_metrics requires it
            lint = subprocess.run([promtool, "check", "metrics"], input=_text(a),
                                  capture_output=True, text=True, timeout=30, check=False)
            assert lint.returncode == 0, lint.stdout + lint.stderr
            assert lint.stdout + lint.stderr == ""

        # A forged entry on the log (unsigned): every node refuses it, and counts it.
        forger = await nats.connect(nats_server.url)
        try:
            # Through JetStream, so the stream stored it (acknowledged) before the read's
            # fence: a plain publish may be stored after it.
            await forger.jetstream().publish(
                strong_subject(a.settings.namespace, SUBJECT, "acct-9"), b"not an envelope")
        finally:
            await forger.close()
        await _strong(a).read(["acct-1"])  # applied past it
        assert _get(_scrape(a), "worknode_strong_entries_refused_total", subject=SUBJECT) == 1

        await nats_server.stop()
        with pytest.raises(UnavailableError):
            await asyncio.wait_for(a.replica(SUBJECT).write(
                Increment("acct-1", ("bal",), 1), Consistency.STRONG), 30)
        ma = _scrape(a)
        assert _get(ma, "worknode_strong_available", subject=SUBJECT) == 0
        unavailable = sum(_get(ma, "worknode_strong_ops_total", subject=SUBJECT, op="write",
                               outcome=o) for o in ("unavailable", "unknown"))
        assert unavailable == 1
