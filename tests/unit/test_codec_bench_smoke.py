"""Smoke test: the codec benchmark runs end to end in --quick mode. No timing assertions."""

from __future__ import annotations

from pathlib import Path

from bench import codec_bench


def test_quick_run_writes_every_section(tmp_path: Path) -> None:
    out = tmp_path / "codec.md"
    assert codec_bench.main(["--quick", "--out", str(out)]) == 0
    text = out.read_text(encoding="utf-8")
    for needle in (
        "encode: msgpack",
        "decode: orjson",
        "open: worknode signed envelope",
        "worknode / msgpack",
        "pycrdt update",
        "register sets, new keys",
    ):
        assert needle in text, needle
    # bytes per op are exact counts, so this holds on any machine
    line = next(x for x in text.splitlines() if x.startswith("| register sets, new keys | 1,000"))
    assert line.endswith("| yes |"), line
