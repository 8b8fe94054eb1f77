"""Smoke test: the durable store benchmark runs end to end in --quick mode and writes every
row. No timing assertions: unit tests never depend on machine speed."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import store_bench


def test_quick_run_writes_every_row(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "results" / "store.md"

    assert store_bench.main(["--quick", "--out", str(out), "--dir", str(tmp_path)]) == 0

    text = out.read_text(encoding="utf-8")
    assert text in capsys.readouterr().out
    for mode in ("full", "normal"):
        for group in (1, 10, 100):
            assert f"| {mode}, {group} per commit |" in text
        assert f"| {mode}: records/s, 100 per commit / 1 per commit |" in text
    assert "| 100 per commit: commits/s, normal / full |" in text
    assert "--quick" in text
    # the benchmark cleans up after itself
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]
