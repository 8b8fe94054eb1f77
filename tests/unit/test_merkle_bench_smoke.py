"""Smoke test: the Merkle benchmark runs end to end in --quick mode and writes every row. No
timing assertions: unit tests never depend on machine speed."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import merkle_bench


def test_quick_run_writes_every_row(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "results" / "merkle.md"

    assert merkle_bench.main(["--quick", "--out", str(out)]) == 0

    text = out.read_text(encoding="utf-8")
    assert text in capsys.readouterr().out
    assert "--quick" in text
    for n in merkle_bench.QUICK.sizes:
        assert f"| {n:,} |" in text
    assert "inner node = keyed BLAKE2b of children" in text
    for fanout, depth in merkle_bench.SHAPES:
        assert f"{fanout}/{depth}: round trips" in text
    for k in merkle_bench.QUICK.ks:
        assert f"| {k:,} | 6 |" in text  # default shape: roots + depth + 1 rounds
    assert "Naive (both sides) / total" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]
