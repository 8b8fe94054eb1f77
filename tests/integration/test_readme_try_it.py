"""The README's RPC "Try it" block, run as written.

Issue 20: pasted into a shell, its first three calls failed with ``unavailable`` (waiting for
the node was only a comment) and it left nats-server and the node running. The block is taken
from README.md verbatim and run by bash in a temporary directory whose ``.venv`` is this
interpreter's environment (the real ``worknode`` and ``nats-server`` binaries), on a free
loopback port (``NATS_PORT``). Every process it starts is in one process group, killed at the
end of the test whatever happens.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def try_it_block() -> str:
    """The ```sh block that follows "**Try it**" in README.md."""
    readme = (ROOT / "README.md").read_text()
    found = re.search(r"^\*\*Try it\*\*.*?^```sh\n(.*?)^```$", readme, re.S | re.M)
    assert found, "README.md has no **Try it** block"
    return found.group(1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _group_members(pgid: int) -> list[int]:
    """Live processes (not zombies) of process group ``pgid``."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            out.append(int(entry.name))
    return out


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen[str]]]:
    """Processes the test starts (each leading its own group); their groups are killed."""
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        if _group_members(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
        proc.wait()


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads processes from /proc")
def test_readme_rpc_block_runs_when_pasted_and_cleans_up(
    tmp_path: Path, started: list[subprocess.Popen[str]]
) -> None:
    venv = Path(sys.prefix)
    assert (venv / "bin" / "worknode").exists()
    assert (venv / "bin" / "nats-server").exists()
    work = tmp_path / "clone"
    work.mkdir()
    (work / ".venv").symlink_to(venv)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    (work / "try.sh").write_text(try_it_block())
    env = dict(os.environ, NATS_PORT=str(_free_port()), TMPDIR=str(scratch))
    env = {k: v for k, v in env.items() if not k.startswith("WORKNODE_")}
    # Output goes to files, not pipes: a server the block leaves running would hold a pipe
    # open, and the test would wait for it instead of seeing it left behind.
    with (tmp_path / "stdout").open("w") as out, (tmp_path / "stderr").open("w") as err:
        proc = subprocess.Popen(["bash", "try.sh"], cwd=work, env=env, text=True,
                                stdout=out, stderr=err, start_new_session=True)
        started.append(proc)
        proc.wait(timeout=240)
    stdout, stderr = (tmp_path / "stdout").read_text(), (tmp_path / "stderr").read_text()
    report = f"stdout:\n{stdout}\nstderr:\n{stderr}"

    assert proc.returncode == 0, report
    assert "unavailable" not in (stdout + stderr).lower(), report
    oks = [line for line in stdout.splitlines() if '"status": "ok"' in line]
    assert len(oks) == 4, report  # create, set, get, revoke
    assert '"total": 1250' in oks[2], report
    assert "permission_denied" in stderr, report
    assert "token revoked" in stderr, report
    assert _group_members(proc.pid) == [], "the block left processes running"
    assert list(scratch.iterdir()) == [], "the block left its scratch directory"
