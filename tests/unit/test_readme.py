"""The README's examples run as written, and its commands match CI."""

from __future__ import annotations

import re
from pathlib import Path

import schemas
from broker.codec import CURRENT_VERSION

ROOT = Path(__file__).resolve().parents[2]


def test_readme_python_examples_run() -> None:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks
    for block in blocks:
        # dont_inherit: a block runs as pasted, without this module's __future__ imports
        exec(compile(block, "README.md", "exec", dont_inherit=True), {})


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pip install -q -e '.[dev]'" in readme
    assert "pip install --quiet -e '.[dev]'" in ci
    assert ".venv/bin/python -m pytest" in readme
    assert '"$VENV/bin/python" -m pytest' in ci


def test_readme_names_the_current_wire_version() -> None:
    """Issue 20 found the README calling version 2 current after version 3 shipped."""
    readme = (ROOT / "README.md").read_text()
    assert schemas.CURRENT_VERSION == CURRENT_VERSION
    stated = re.findall(r"current wire version \((\d+)\)", readme)
    stated += re.findall(r"^wire_version = (\d+) .*current", readme, re.MULTILINE)
    assert len(stated) == 2, "the README's codec or config example moved: update this test"
    assert {int(v) for v in stated} == {CURRENT_VERSION}
    releases = sorted(p.name for p in schemas.RELEASES_DIR.iterdir() if p.is_dir())
    assert f"`releases/{releases[0]}/` to `releases/{releases[-1]}/` are frozen" in readme
