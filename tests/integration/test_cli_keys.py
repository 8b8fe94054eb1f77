"""``worknode keys show | roster | add | list | nats-config | roster-from`` and
``deploy/keygen.py`` as real processes: a public key printed from a seed file, rosters and
identities merged (never rebuilt from a partial list), a server config rendered that
nats-server accepts, and no seed ever printed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from broker.codec import Signer
from broker.transport import find_nats_server, nkey_public, nkey_seed, public_of_nkey

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


def test_keys_add_list_nats_config_and_roster_from(tmp_path: Path) -> None:
    """One ``keys add`` record ties a NATS user and a roster key; ``nats-config`` renders a
    block nats-server accepts; no seed is ever printed."""
    r = worknode("keys", "add", "n1", "--role", "node", "--namespace", "ns", "--seed", "n1.key",
                 "--identities", "ids.json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    seed = (tmp_path / "n1.key").read_bytes()
    assert len(seed) == 32
    assert (tmp_path / "n1.key").stat().st_mode & 0o777 == 0o600
    n1 = nkey_public(Signer("n1", seed).public_key)
    assert r.stdout == f"{n1}\n"
    r = worknode("keys", "add", "r", "--role", "reader", "--namespace", "ns", "--subject", "a",
                 "--seed", "r.key", "--identities", "ids.json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    reader = nkey_public(Signer("r", (tmp_path / "r.key").read_bytes()).public_key)

    listed = worknode("keys", "list", "--identities", "ids.json", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines() == [f"n1\tnode\tns\t*\t{n1}", f"r\treader\tns\ta\t{reader}"]
    as_json = worknode("keys", "list", "--identities", "ids.json", "--json", cwd=tmp_path)
    assert [json.loads(line)["nkey"] for line in as_json.stdout.splitlines()] == [n1, reader]

    config = worknode("keys", "nats-config", "--identities", "ids.json", "--account", "WN",
                      cwd=tmp_path)
    assert config.returncode == 0, config.stderr
    assert n1 in config.stdout
    assert reader in config.stdout
    conf = tmp_path / "server.conf"
    conf.write_text(f"port: -1\njetstream {{ store_dir: {str(tmp_path / 'js')!r} }}\n"
                    + config.stdout)
    check = subprocess.run([str(find_nats_server()), "-c", str(conf), "-t"],
                           capture_output=True, text=True, timeout=30, check=False)
    assert check.returncode == 0, check.stdout + check.stderr

    r = worknode("keys", "roster-from", "--identities", "ids.json", "roster.json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    # the reader signs nothing: only the node is trusted, with the key its NATS user is
    assert json.loads((tmp_path / "roster.json").read_text()) == {
        "n1": public_of_nkey(n1).hex()}

    everything = listed.stdout + as_json.stdout + config.stdout + r.stdout + r.stderr
    for name in ("n1", "r"):
        secret = (tmp_path / f"{name}.key").read_bytes()
        assert secret.hex() not in everything
        assert nkey_seed(secret) not in everything


def test_keys_add_refuses_a_changed_record_without_replace_and_a_shared_key(
    tmp_path: Path,
) -> None:
    def add(*args: str) -> subprocess.CompletedProcess[str]:
        return worknode("keys", "add", *args, "--identities", "ids.json", cwd=tmp_path)

    assert add("n1", "--role", "node", "--seed", "n1.key").returncode == 0
    before = (tmp_path / "ids.json").read_text()
    for args in (["n1", "--role", "node", "--seed", "other.key"],  # another key
                 ["n1", "--role", "reader", "--seed", "n1.key"],  # another role
                 ["x", "--role", "node", "--seed", "n1.key"]):  # n1's key for another name
        r = add(*args)
        assert r.returncode == 1, r.stderr
        assert r.stderr.startswith("error: ")
        assert len(r.stderr.splitlines()) == 1
        assert (tmp_path / "ids.json").read_text() == before
    rotated = add("n1", "--role", "node", "--seed", "other.key", "--replace")
    assert rotated.returncode == 0, rotated.stderr
    assert rotated.stdout == (
        f"{nkey_public(Signer('n1', (tmp_path / 'other.key').read_bytes()).public_key)}\n")
    # usage errors: unknown role, a seed refused as a public key (not echoed), bad name
    r = add("y", "--role", "root", "--seed", "y.key")
    assert r.returncode == 2
    seed_text = nkey_seed((tmp_path / "n1.key").read_bytes())
    r = add("y", "--role", "node", "--public-key", seed_text)
    assert r.returncode != 0
    assert seed_text not in r.stderr
    r = add("a.b", "--role", "node", "--seed", "ab.key")
    assert r.returncode == 1
    assert not (tmp_path / "ab.key").exists()
    r = worknode("keys", "list", "--identities", "missing.json", cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.startswith("error: ")


def test_roles_written_by_keygen_roster_and_roster_from(tmp_path: Path) -> None:
    """Every roster writer records roles: keygen's ``ID:ROLE``, ``keys roster --role`` and
    ``keys roster-from`` (a NATS identity's role); nodes stay bare hex keys."""
    keys = tmp_path / "keys"
    r = subprocess.run([sys.executable, str(REPO / "deploy" / "keygen.py"), str(keys), "n1",
                        "healer:healer", "writer:writer"],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    roster = json.loads((keys / "roster.json").read_text())
    pub = {i: Signer(i, (keys / f"{i}.key").read_bytes()).public_key.hex()
           for i in ("n1", "healer", "writer")}
    assert roster == {"n1": pub["n1"], "healer": {"key": pub["healer"], "role": "healer"},
                      "writer": {"key": pub["writer"], "role": "writer"}}

    _seed(tmp_path / "w.key")
    r = worknode("keys", "roster", "r.json", "w=@w.key", "--role", "writer", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "r.json").read_text())["w"]["role"] == "writer"
    r = worknode("keys", "roster", "r.json", "w=@w.key", cwd=tmp_path)  # another role
    assert r.returncode != 0
    assert len(r.stderr.strip().splitlines()) == 1

    r = worknode("keys", "add", "h", "--role", "healer", "--seed", "h.key",
                 "--identities", "ids.json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = worknode("keys", "roster-from", "--identities", "ids.json", "r.json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "r.json").read_text())["h"]["role"] == "healer"


def test_keys_rotate_and_remove_from_a_roster(tmp_path: Path) -> None:
    """``keys rotate`` writes a new seed (0600, never printed) and a roster entry keeping the
    old key until the overlap ends (or not: --no-overlap); ``keys remove --roster`` drops an
    id; mistakes are one error line and change nothing."""
    old_seed = _seed(tmp_path / "b.key")
    old = Signer("b", old_seed).public_key.hex()
    r = worknode("keys", "roster", "r.json", "b=@b.key", "--role", "writer", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = worknode("keys", "rotate", "b", "--seed", "b.key", "--roster", "r.json",
                 "--overlap", "30m", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    new_seed = (tmp_path / "b.key").read_bytes()
    assert new_seed != old_seed
    assert (tmp_path / "b.key").stat().st_mode & 0o777 == 0o600
    new = Signer("b", new_seed).public_key.hex()
    assert r.stdout == f"{new}\n"
    assert new_seed.hex() not in r.stdout + r.stderr
    entry = json.loads((tmp_path / "r.json").read_text())["b"]
    assert entry["key"] == new
    assert entry["role"] == "writer"
    assert entry["previous"] == old
    assert entry["previous_until"].endswith("Z")

    r = worknode("keys", "rotate", "b", "--seed", "b.key", "--roster", "r.json",
                 "--no-overlap", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    entry = json.loads((tmp_path / "r.json").read_text())["b"]
    assert set(entry) == {"key", "role"}

    before = (tmp_path / "r.json").read_text()
    for args in (("rotate", "nobody", "--seed", "x.key", "--roster", "r.json"),
                 ("rotate", "b", "--seed", "b.key", "--roster", "r.json", "--overlap", "soon"),
                 ("remove", "b")):
        r = worknode("keys", *args, cwd=tmp_path)
        assert r.returncode != 0
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert (tmp_path / "r.json").read_text() == before
    assert not (tmp_path / "x.key").exists()

    r = worknode("keys", "remove", "b", "--roster", "r.json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "r.json").read_text()) == {}
