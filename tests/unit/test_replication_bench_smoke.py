"""Smoke test: the replication benchmark runs end to end in --quick mode and writes every row,
the cost of the signatures included.

No timing assertions: unit tests never depend on machine speed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import replication_bench


def test_quick_run_writes_every_row(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "results" / "replication.md"
    assert replication_bench.main(["--quick", "--out", str(out)]) == 0
    text = out.read_text(encoding="utf-8")
    assert text in capsys.readouterr().out
    for row in ("**ratio worknode / raw (per round)**", "ratio distinct fields / raw",
                "write-to-remote-apply latency p50", "## What the signatures cost",
                "writer: Ed25519 sign of the batch (us per batch)",
                "replica: Ed25519 verify of the batch (us per batch)",
                "requester: verify reply (us per catch-up)",
                "every step of one catch-up (us)"):
        assert row in text, row
    assert "Command: `python -m bench.replication_bench --quick" in text


def test_latency_only_prints_the_latency_rows(capsys: pytest.CaptureFixture[str]) -> None:
    results = replication_bench.DEFAULT_OUT
    before = results.stat().st_mtime_ns if results.exists() else None
    assert replication_bench.main(["--latency", "--rounds", "1"]) == 0
    text = capsys.readouterr().out
    for row in ("raw nats-py pub->sub p50", "floor p50", "worknode write-to-remote-apply p50",
                "latency p50 ratio worknode / raw", "latency p50 ratio worknode / floor"):
        assert row in text, row
    assert (results.stat().st_mtime_ns if results.exists() else None) == before  # not written
