"""Smoke test: the typed-kind benchmark runs end to end in --quick mode and writes every row.
No timing assertions: unit tests never depend on machine speed."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import kinds_bench


def test_quick_run_writes_every_row(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "kinds.md"
    assert kinds_bench.main(["--quick", "--out", str(out)]) == 0
    text = out.read_text(encoding="utf-8")
    assert text in capsys.readouterr().out
    for row in ("write, untyped", "write, typed", "write, typed through a lens",
                "read, untyped", "read, typed"):
        assert f"| {row} |" in text
    for ratio in ("write: typed / untyped", "write through a lens / untyped",
                  "read: typed / untyped"):
        assert f"| {ratio} |" in text
