"""The README's "Creating and rotating identities" commands, run as written, make a working
secure bus: the identities file renders into a server configuration with TLS from the local CA,
the node they name replicates over it, the reader they name reads its granted subject through
the real CLI, and a client without credentials is refused."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from broker.testing import running_nats_server
from broker.transport import TlsFiles
from services.worknode import WorknodeService, WorknodeSettings
from tests.integration._nodes import run_cli

ROOT = Path(__file__).resolve().parents[2]


def identities_block() -> str:
    """The first ```sh block after "### Creating and rotating identities"."""
    readme = (ROOT / "README.md").read_text()
    found = re.search(r"^### Creating and rotating identities\n.*?^```sh\n(.*?)^```$", readme,
                      re.S | re.M)
    assert found, "README.md has no identities block"
    return found.group(1)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WORKNODE_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


async def _cli(cwd: Path, *args: str, **env: str) -> tuple[int, str, str]:
    return await run_cli(*args, cwd=cwd, env=_env(**env))


async def test_readme_identity_commands_secure_a_real_bus(tmp_path):
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", identities_block()], cwd=tmp_path,
                            env=_env(), capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    for seed in ("node-a.key", "healer.key", "dash.key", "billing.key"):
        assert (tmp_path / seed).stat().st_mode & 0o077 == 0
        assert (tmp_path / seed).read_bytes().hex() not in result.stdout + result.stderr
    roster = json.loads((tmp_path / "roster.json").read_text())
    assert set(roster) == {"node-a", "healer"}  # signing identities only
    ca = tmp_path / "ca"
    files = TlsFiles(ca_file=ca / "ca.pem", cert_file=ca / "nats-1.pem",
                     key_file=ca / "nats-1-key.pem")
    auth = (tmp_path / "auth.conf").read_text()
    async with running_nats_server(tmp_path / "nats", tls=files, config_extra=auth,
                                   monitor_port=None) as server:
        tls_env = {"WORKNODE_NATS_TLS_HOSTNAME": "nats-1"}  # the name the certificate carries
        # The reader follows its granted subject through the real CLI ...
        tail = asyncio.create_task(_cli(
            tmp_path, "tail", "orders", "--nats-url", server.url, "--namespace", "shop",
            "--nats-nkey", "dash.key", "--tls-ca", "ca/ca.pem", "--count", "1",
            "--timeout", "30", "--json", **tls_env))
        # So does a microservice with plain nats-py and pycapnp (examples/subscriber.py).
        example = await asyncio.create_subprocess_exec(
            sys.executable, str(ROOT / "examples" / "subscriber.py"), server.url, "shop",
            "orders", "--count", "1", "--nkey", "dash.key", "--tls-ca", "ca/ca.pem",
            "--tls-hostname", "nats-1", cwd=tmp_path, env=_env(),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        example_out = asyncio.create_task(asyncio.wait_for(example.communicate(), 60))
        # ... while node-a, whose NATS identity is its signing key, writes.
        settings = WorknodeSettings(
            node_id="node-a", namespace="shop", subjects=["orders"], nats_urls=[server.url],
            key_file=tmp_path / "node-a.key", roster_file=tmp_path / "roster.json",
            state_dir=tmp_path / "state-a", metrics_port=None, store_sync="normal",
            nats_tls_ca_file=files.ca_file, nats_tls_hostname="nats-1")
        async with WorknodeService(settings) as svc:
            replica = svc.replica("orders")
            for _ in range(300):  # until the reader's subscription is there to see one
                await replica.create(f"o{_}")
                await replica.flush()
                if tail.done() and example_out.done():
                    break
                await asyncio.sleep(0.1)
            code, out, err = await tail
        assert code == 0, err
        assert json.loads(out.splitlines()[0])["writer"] == "node-a"
        ex_out, ex_err = await example_out
        assert example.returncode == 0, ex_err
        batches = [json.loads(line) for line in ex_out.decode().splitlines()]
        assert batches[0] == {"ready": True}
        assert batches[1]["writer"] == "node-a", batches
        # A client without credentials, holding the CA, is refused in one line.
        code, out, err = await _cli(
            tmp_path, "tail", "orders", "--nats-url", server.url, "--namespace", "shop",
            "--tls-ca", "ca/ca.pem", "--timeout", "0.2", **tls_env)
        assert code == 1
        assert "refused this client's credentials" in err
        assert err.count("\n") == 1
