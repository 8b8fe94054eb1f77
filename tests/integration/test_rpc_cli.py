"""``worknode token ...`` and ``worknode call`` end to end, as the README uses them, against a
worknode service on a real nats-server."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

from services.worknode import WorknodeService, WorknodeSettings, load_or_create_signer


async def _cli(*args: str, cwd: Path) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli", *args, cwd=cwd,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


REPO = Path(__file__).resolve().parents[2]


async def test_token_commands_and_call(tmp_path: Path, nats_server) -> None:
    repo = REPO
    rc, _, err = await _cli("token", "keygen", "--key-id", "1", "--out", str(tmp_path / "root.key"),
                            "--keyring", str(tmp_path / "keyring.json"), cwd=repo)
    assert rc == 0, err
    settings = WorknodeSettings(
        node_id="node-a", namespace="shop", subjects=["orders"], nats_urls=[nats_server.url],
        state_dir=tmp_path / "node-a", metrics_port=None, store_sync="normal",
        rpc_keyring_file=tmp_path / "keyring.json",
    )
    # The caller's key (tokens are minted for it; calls are signed with it), and the roster
    # of the nodes whose signed replies it accepts.
    caller = tmp_path / "caller.key"
    caller.write_bytes(os.urandom(32))
    roster = tmp_path / "roster.json"
    node_key = load_or_create_signer("node-a", settings.key_path()).public_key
    roster.write_text(json.dumps({"node-a": node_key.hex()}))
    net = ["--nats-url", nats_server.url, "--namespace", "shop", "--key", str(caller),
           "--roster", str(roster)]
    async with WorknodeService(settings):
        rc, admin, err = await _cli("token", "mint", "--root-key", str(tmp_path / "root.key"),
                                    "--namespace", "shop", "--subject", "orders",
                                    "--holder", f"@{caller}", cwd=repo)
        assert rc == 0, err
        admin = admin.strip()
        for args in (["create", "parent=root"], ["set", "path=total", "value=1250"]):
            rc, out, err = await _cli("call", "orders", "o1", *args, "--token", admin, *net,
                                      cwd=repo)
            assert rc == 0, err
            assert json.loads(out)["status"] == "ok"
        rc, out, err = await _cli("call", "orders", "o1", "get", "--token", admin, *net, cwd=repo)
        assert rc == 0, err
        assert json.loads(out)["state"]["o1"]["fields"] == {"total": 1250}

        rc, reader, err = await _cli("token", "attenuate", admin, "--keyring",
                                     str(tmp_path / "keyring.json"), "--method", "get",
                                     "--worknode", "o1", "--ttl", "600", cwd=repo)
        assert rc == 0, err
        reader = reader.strip()
        rc, out, err = await _cli("token", "inspect", reader, cwd=repo)
        assert rc == 0, err
        info = json.loads(out)
        assert info["key_id"] == 1
        assert len(info["blocks"]) == 2
        rc, shown, err = await _cli("keys", "show", str(caller), cwd=repo)
        assert rc == 0, err
        assert info["holder"] == shown.strip()
        # Someone else's key with the same token: refused.
        other = tmp_path / "other.key"
        other.write_bytes(os.urandom(32))
        rc, out, err = await _cli("call", "orders", "o1", "get", "--token", reader, *net,
                                  "--key", str(other), cwd=repo)
        assert rc == 1
        assert "unauthenticated" in err
        rc, out, err = await _cli("call", "orders", "o1", "set", "path=total", "value=1",
                                  "--token", reader, *net, cwd=repo)
        assert rc == 1
        assert "permission_denied" in err

        rc, revoker, err = await _cli("token", "mint", "--root-key", str(tmp_path / "root.key"),
                                      "--namespace", "shop", "--subject", "revocations",
                                      "--method", "revoke", "--holder", shown.strip(),
                                      cwd=repo)
        assert rc == 0, err
        rc, out, err = await _cli("token", "revoke", reader, "--token", revoker.strip(), *net,
                                  cwd=repo)
        assert rc == 0, err
        assert json.loads(out)["result"]["revoked"] == info["token_id"]
        rc, out, err = await _cli("call", "orders", "o1", "get", "--token", reader, *net,
                                  cwd=repo)
        assert rc == 1
        assert "unauthenticated: token revoked" in err
        rc, out, err = await _cli("call", "orders", "o1", "nosuch", "--token", admin, *net,
                                  cwd=repo)
        assert rc == 1
        assert "unavailable" in err
