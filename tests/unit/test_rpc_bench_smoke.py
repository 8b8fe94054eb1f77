"""Smoke test: the RPC benchmark runs end to end in --quick mode and writes every row.

No timing assertions: unit tests never depend on machine speed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import rpc_bench


def test_quick_run_writes_every_row(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "results" / "rpc.md"
    assert rpc_bench.main(["--quick", "--out", str(out)]) == 0
    text = out.read_text(encoding="utf-8")
    assert text in capsys.readouterr().out
    for row in ("p50 ratio worknode / raw", "throughput ratio worknode / raw",
                "token verification, uncached", "token verification, cached",
                "## What the signatures cost, per call", "responder: verify request (us per call)",
                "every step of one call (us)"):
        assert row in text, row
    assert "Command: `python -m bench.rpc_bench --quick" in text


def test_quick_secure_run_and_environment_restored(tmp_path: Path) -> None:
    """``--secure``: the same run over TLS and nkey users; the environment it sets for its
    children is gone afterwards (this process runs other tests)."""
    import os

    before = dict(os.environ)
    out = tmp_path / "rpc-secure.md"
    assert rpc_bench.main(["--quick", "--secure", "--out", str(out)]) == 0
    text = out.read_text(encoding="utf-8")
    assert "**auth and TLS on**" in text
    assert "throughput ratio worknode / raw" in text
    assert dict(os.environ) == before
