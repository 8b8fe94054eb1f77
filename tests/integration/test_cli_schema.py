"""``worknode schema check`` outside a checkout (issue 20): with no ``--schemas`` and no
``./schemas`` it checks the schemas the package was installed with (found through
importlib.resources)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import schemas


def test_schema_check_runs_from_any_directory(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "services.cli", "schema", "check", "-v"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    assert "schema check: OK" in r.stderr
    assert f"schemas: {schemas.CURRENT_DIR}" in r.stderr
    releases = sorted(p.name for p in schemas.RELEASES_DIR.iterdir() if p.is_dir())
    assert releases
    for release in releases:  # every frozen release was compared with the current schemas
        assert f"compared: {release} \N{RIGHTWARDS ARROW} current" in r.stderr
