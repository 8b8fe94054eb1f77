"""The compose stack's NATS servers, run here from the configs ``deploy/compose-keys.sh``
generated (no Docker engine on this machine): each config with its container paths mapped to
the test's directories and its listeners moved to loopback, nothing else changed (the TLS
blocks, the cluster TLS and the accounts are the generated ones).

Two ways:

- ``cluster=False``: servers on 127.0.0.1 with free ports, each alone (its ``cluster`` block
  dropped: clustered JetStream refuses to start without routes); a client reaches one as
  ``nats://127.0.0.1:<port>`` and checks the certificate for the name ``nats-N``;
- ``cluster=True``: the real topology: server ``nats-N`` listens on its own loopback address
  127.0.0.1N (ports 4222, 6222, 8222 as in the containers) and runs in a private mount
  namespace whose ``/etc/hosts`` maps ``nats-1..3`` to those addresses, so the generated
  routes (``nats://nats-M:6222``) resolve on loopback and each route's certificate is checked
  for its host name as in the stack. Needs ``unshare -m`` and ``mount --bind`` (root):
  ``can_run_cluster()`` says whether this machine allows it.

Every process started is stopped on exit, also when the test fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import subprocess
import urllib.request
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broker.transport import find_nats_server

NATS_DIR = "/etc/nats"
"""Where a NATS container mounts its keys volume (the generated configs' paths)."""

_READY_POLLS = 400  # x 0.05 s: how long a server may take to write its ports file


@dataclass(frozen=True)
class GeneratedServer:
    """A running server: its compose name, client URL and monitoring URL."""

    name: str
    url: str
    monitor_url: str
    config: Path
    log: Path


def cluster_address(name: str) -> str:
    """The loopback address of server ``nats-N`` in the cluster mode: 127.0.0.1N."""
    return f"127.0.0.1{name.rsplit('-', 1)[1]}"


def _replace(text: str, old: str, new: str) -> str:
    """``text`` with the one occurrence of ``old`` replaced (the template changed if not)."""
    assert text.count(old) == 1, f"generated config: expected {old!r} once"
    return text.replace(old, new)


def local_config(text: str, keys_dir: Path, store: Path, ports_dir: Path, *,
                 host: str | None) -> str:
    """The generated config ``text`` runnable here: container paths to ``keys_dir`` and
    ``store``; listeners on ``host`` with the container ports, or (``host`` None) on
    127.0.0.1 with free ports and without the cluster block."""
    out = text.replace(f'"{NATS_DIR}/', f'"{keys_dir}/')
    assert f'"{NATS_DIR}' not in out
    out = _replace(out, 'store_dir: "/data"', f"store_dir: {json.dumps(str(store))}")
    if host is None:
        out = _replace(out, "\nport: 4222\n", "\nport: -1\n")
        out = _replace(out, "\nhttp_port: 8222\n", "\nhttp_port: -1\n")
        out, dropped = re.subn(r"\ncluster \{.*?\n\}\n", "\n", out, flags=re.S)
        assert dropped == 1, "generated config: expected one cluster block"
    else:
        out = _replace(out, 'listen: "0.0.0.0:6222"', f'listen: "{host}:6222"')
    head = f'host: "{host or "127.0.0.1"}"\nports_file_dir: {json.dumps(str(ports_dir))}\n'
    return head + out


def can_run_cluster(tmp: Path) -> bool:
    """Whether servers can run in private mount namespaces with their own ``/etc/hosts``."""
    if shutil.which("unshare") is None:
        return False
    hosts = tmp / "hosts-probe"
    hosts.write_text("127.0.0.11 nats-probe\n")
    r = subprocess.run(
        ["unshare", "-m", "sh", "-c", 'mount --bind "$1" /etc/hosts && getent hosts nats-probe',
         "sh", str(hosts)], capture_output=True, text=True, timeout=30, check=False)
    return r.returncode == 0 and "127.0.0.11" in r.stdout


def get_json(url: str) -> Any:
    """GET ``url`` (a monitoring endpoint) as JSON."""
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is not None:
        return
    proc.terminate()
    try:
        await asyncio.wait_for(proc.wait(), 10)
    except TimeoutError:
        proc.kill()
        await proc.wait()


@contextlib.asynccontextmanager
async def running_generated_nats(
    out: Path, tmp: Path, names: Sequence[str], *, cluster: bool = False
) -> AsyncIterator[dict[str, GeneratedServer]]:
    """Start the servers ``names`` from their generated configs in ``out/<name>`` (the
    keys volumes as ``compose-keys.sh`` filled them); ``{name: server}`` once each accepts
    clients. See the module docstring for ``cluster``."""
    binary = str(find_nats_server())
    hosts = tmp / "hosts"
    hosts.write_text("".join(f"{cluster_address(n)} {n}\n" for n in names)
                     + "127.0.0.1 localhost\n")
    procs: list[asyncio.subprocess.Process] = []
    servers: dict[str, GeneratedServer] = {}
    try:
        for name in names:
            work = tmp / f"run-{name}"
            work.mkdir()
            host = cluster_address(name) if cluster else None
            config = work / f"{name}.conf"
            config.write_text(local_config((out / name / f"{name}.conf").read_text(),
                                           out / name, work / "jetstream", work, host=host))
            argv = [binary, "-c", str(config)]
            if cluster:
                argv = ["unshare", "-m", "sh", "-c",
                        'mount --bind "$1" /etc/hosts && shift && exec "$@"', "sh", str(hosts),
                        *argv]
            log = work / "nats.log"
            with log.open("wb") as log_file:
                proc = await asyncio.create_subprocess_exec(
                    *argv, stdin=asyncio.subprocess.DEVNULL, stdout=log_file, stderr=log_file)
            procs.append(proc)
            ports = None
            for _ in range(_READY_POLLS):
                assert proc.returncode is None, f"{name} exited:\n{log.read_text()}"
                found = next(iter(work.glob("*.ports")), None)
                if found is not None:
                    with contextlib.suppress(ValueError):
                        ports = json.loads(found.read_text())
                        break
                await asyncio.sleep(0.05)
            assert ports is not None, f"{name} did not start:\n{log.read_text()}"
            # the ports file may name the client URL tls://; clients dial nats:// and upgrade
            url = re.sub(r"^tls://", "nats://", ports["nats"][0])
            servers[name] = GeneratedServer(name, url, ports["monitoring"][0], config, log)
        yield servers
    finally:
        for proc in procs:
            await _stop(proc)
