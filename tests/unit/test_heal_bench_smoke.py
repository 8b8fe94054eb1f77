"""Smoke test: the healing benchmark runs end to end on a small tree and writes every row. No
timing assertions: unit tests never depend on machine speed."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import heal_bench


def test_small_run_writes_every_row(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "results" / "heal.md"

    argv = ["--keys", "3000", "--diff", "30", "--rounds", "1", "--no-e2e", "--out", str(out)]
    assert heal_bench.main(argv) == 0

    text = out.read_text(encoding="utf-8")
    assert text in capsys.readouterr().out
    assert "--keys 3000" in text
    for label, _, _, _ in heal_bench.ID_ROWS:
        assert f"| {label} |" in text
    assert "naive: every (key, digest) pair" in text
    assert "| steady state (root still the agreed one): root only |" in text
    assert "cold build, 3,000 keys" in text
    # every protocol finds the 30 differences (10 left, 10 right, 10 changed on both; a
    # changed key is an unmatched item on each side)
    assert text.count("| 4 | 8 | 40 |") == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]


def test_the_pair_differs_as_the_issue_says() -> None:
    left, right = heal_bench.make_pair(3000, 30)
    lset, rset = dict(left), dict(right)
    assert len(lset) == len(rset) == 3000
    assert len(lset.keys() - rset.keys()) == len(rset.keys() - lset.keys()) == 10
    assert sum(lset[k] != rset[k] for k in lset.keys() & rset.keys()) == 10
