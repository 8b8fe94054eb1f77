"""``worknode keys show | roster`` and ``deploy/keygen.py`` as real processes: a public key
printed from a seed file, rosters merged (never rebuilt from a partial list)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from broker.codec import Signer

REPO = Path(__file__).resolve().parents[2]


def worknode(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``worknode ARGS`` in a real process."""
    return subprocess.run([sys.executable, "-m", "services.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=60, check=False)


def _seed(path: Path) -> bytes:
    seed = os.urandom(32)
    path.write_bytes(seed)
    return seed


def test_keys_show_prints_the_public_key_never_the_seed(tmp_path: Path) -> None:
    seed = _seed(tmp_path / "n1.key")
    public = Signer("n1", seed).public_key.hex()
    r = worknode("keys", "show", "n1.key", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{public}\n"
    r = worknode("keys", "show", "n1.key", "--node-id", "n1", cwd=tmp_path)
    assert json.loads(r.stdout) == {"n1": public}
    assert seed.hex() not in r.stdout + r.stderr


def test_keys_roster_merges_refuses_conflicts_rotates_and_removes(tmp_path: Path) -> None:
    a, b, c = (Signer(n, _seed(tmp_path / f"{n}.key")).public_key.hex() for n in "abc")
    roster = tmp_path / "roster.json"
    assert worknode("keys", "roster", "roster.json", "a=@a.key", cwd=tmp_path).returncode == 0
    # A second run with other ids keeps what is there.
    r = worknode("keys", "roster", "roster.json", f"b={b}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(roster.read_text()) == {"a": a, "b": b}
    # Another key for a trusted id is refused, and the file is left as it was.
    before = roster.read_text()
    r = worknode("keys", "roster", "roster.json", "a=@c.key", cwd=tmp_path)
    assert r.returncode != 0
    assert r.stderr.startswith("error: ")
    assert "--replace" in r.stderr
    assert roster.read_text() == before
    # Rotation and removal are explicit.
    r = worknode("keys", "roster", "roster.json", "a=@c.key", "--replace", "--remove", "b",
                 cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(roster.read_text()) == {"a": c}


def test_keygen_merges_into_an_existing_roster(tmp_path: Path) -> None:
    """deploy/keygen.py used to rewrite roster.json with only the ids of its own run."""
    keys = tmp_path / "keys"
    keys.mkdir()
    outsider = Signer.generate("outsider").public_key.hex()
    (keys / "roster.json").write_text(json.dumps({"outsider": outsider}))

    def keygen(*ids: str) -> None:
        r = subprocess.run([sys.executable, str(REPO / "deploy" / "keygen.py"), str(keys), *ids],
                           capture_output=True, text=True, timeout=60, check=False)
        assert r.returncode == 0, r.stderr

    keygen("node-a", "node-b")
    keygen("writer")
    roster = json.loads((keys / "roster.json").read_text())
    assert set(roster) == {"outsider", "node-a", "node-b", "writer"}
    assert roster["outsider"] == outsider
    for node in ("node-a", "node-b", "writer"):
        seed = (keys / f"{node}.key").read_bytes()
        assert roster[node] == Signer(node, seed).public_key.hex()
    secret = (keys / "cluster.secret").read_bytes()
    keygen("node-a")  # idempotent: the same identities, the same secret
    assert json.loads((keys / "roster.json").read_text()) == roster
    assert (keys / "cluster.secret").read_bytes() == secret
