"""Smoke test: the CRDT benchmark runs end to end in --quick mode and writes every row.

No timing assertions: unit tests never depend on machine speed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import crdt_bench  # needs pycrdt and psutil: the dev extra installs them


def test_quick_run_writes_every_row(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "results" / "crdt.md"

    assert crdt_bench.main(["--quick", "--out", str(out)]) == 0

    text = out.read_text(encoding="utf-8")
    assert text in capsys.readouterr().out
    assert len(crdt_bench.ROW_NAMES) == 17
    for name in crdt_bench.ROW_NAMES:
        assert f"| {name} |" in text, name
    assert "Command: `" in text
    assert "--quick" in text
