"""Ctrl-C on the long-running commands (issue 20): SIGINT to a real ``worknode up``, ``node``
or ``healer`` process once it reports ready ends it with status 130, no traceback, no "Task
exception was never retrieved", and no nats-server left running from its state directory;
SIGTERM stops a service with status 0."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from broker.testing import running_nats_server


def _processes_under(path: Path) -> list[str]:
    """Command lines of the running processes that name ``path`` (orphaned servers)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if str(path) in cmdline and "nats-server" in cmdline:
            found.append(cmdline)
    return found


class Cli:
    """A ``worknode`` process; killed at the end of the test whatever happened."""

    def __init__(self) -> None:
        self.proc: asyncio.subprocess.Process | None = None
        self.stderr = ""

    async def start(self, *args: str, env: dict[str, str], cwd: Path) -> None:
        base = {k: v for k, v in os.environ.items() if not k.startswith("WORKNODE_")}
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.cli", *args, env={**base, **env}, cwd=cwd,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )

    async def wait_for_line(self, stream: str, text: str, timeout: float = 60) -> None:
        """Read ``stream`` until a line contains ``text`` (kept in ``stderr`` if read)."""
        assert self.proc is not None
        reader = self.proc.stdout if stream == "stdout" else self.proc.stderr
        assert reader is not None
        async with asyncio.timeout(timeout):
            while True:
                line = (await reader.readline()).decode()
                if stream == "stderr":
                    self.stderr += line
                assert line, f"exited before {text!r}: {self.stderr}"
                if text in line:
                    return

    async def stop_with(self, signum: int, timeout: float = 60) -> tuple[int, str]:
        """Send ``signum``; the exit status and everything the process wrote on stderr."""
        assert self.proc is not None
        self.proc.send_signal(signum)
        async with asyncio.timeout(timeout):
            _, err = await self.proc.communicate()
        assert self.proc.returncode is not None
        return self.proc.returncode, self.stderr + err.decode()

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


@pytest.fixture
async def cli() -> AsyncIterator[Cli]:
    """A CLI process handle; the process is killed if the test leaves it running."""
    handle = Cli()
    try:
        yield handle
    finally:
        await handle.kill()


def _assert_clean(status: int, stderr: str, expected: int) -> None:
    assert status == expected, stderr
    assert "Traceback" not in stderr
    assert "never retrieved" not in stderr
    assert "error:" not in stderr


async def test_ctrl_c_stops_up_cleanly(cli: Cli, tmp_path: Path) -> None:
    state = tmp_path / "up"
    await cli.start("up", "--writes", "1000000", "--state-dir", str(state), env={},
                    cwd=tmp_path)
    await cli.wait_for_line("stdout", "writes ")  # the write phase is under way
    status, stderr = await cli.stop_with(signal.SIGINT)
    _assert_clean(status, stderr, 130)
    assert _processes_under(state) == []


@pytest.mark.parametrize(("signum", "expected"), [(signal.SIGINT, 130), (signal.SIGTERM, 0)])
async def test_signal_stops_node_cleanly(
    cli: Cli, tmp_path: Path, signum: int, expected: int
) -> None:
    state = tmp_path / "node"
    await cli.start("node", "--node-id", "n1",
                    env={"WORKNODE_STATE_DIR": str(state), "WORKNODE_LOG_LEVEL": "WARNING"},
                    cwd=tmp_path)
    await cli.wait_for_line("stderr", "serving")
    status, stderr = await cli.stop_with(signum)
    _assert_clean(status, stderr, expected)
    assert "flushing pending batches" in stderr
    assert _processes_under(state) == []


async def test_ctrl_c_stops_healer_cleanly(cli: Cli, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(os.urandom(32))
    async with running_nats_server(tmp_path / "nats") as server:
        await cli.start("healer", env={
            "WORKNODE_HEALER_NATS_URLS": f'["{server.url}"]',
            "WORKNODE_HEALER_CLUSTER_SECRET_FILE": str(secret),
            "WORKNODE_HEALER_STATE_DIR": str(tmp_path / "healer"),
            "WORKNODE_LOG_LEVEL": "WARNING",
        }, cwd=tmp_path)
        await cli.wait_for_line("stderr", "metrics on port")
        status, stderr = await cli.stop_with(signal.SIGINT)
    _assert_clean(status, stderr, 130)
