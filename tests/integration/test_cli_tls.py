"""``worknode tls``: a real CLI process makes a CA constrained to its hosts, issues a
certificate a real nats-server serves with, and refuses what the CA may not sign."""

from __future__ import annotations

from broker.testing import running_nats_server
from broker.transport import ConnectOptions, TlsFiles
from tests.integration._nodes import run_cli


async def test_tls_init_issue_and_serve(tmp_path):
    ca_dir = tmp_path / "ca"
    code, out, err = await run_cli("tls", "init", str(ca_dir), "--host", "127.0.0.1")
    assert code == 0, err
    assert "signs for 127.0.0.1" in out
    first = out
    code, out, err = await run_cli("tls", "init", str(ca_dir))  # kept, not replaced
    assert out == first
    code, out, err = await run_cli("tls", "issue", str(ca_dir), "nats", "--out",
                                   str(tmp_path / "srv"))
    assert code == 0, err
    paths = dict(line.split(" ", 1) for line in out.splitlines())
    assert (ca_dir / "ca-key.pem").stat().st_mode & 0o077 == 0
    assert "PRIVATE" not in out + err
    files = TlsFiles(ca_file=ca_dir / "ca.pem", cert_file=tmp_path / "srv" / "nats.pem",
                     key_file=tmp_path / "srv" / "nats-key.pem")
    assert paths == {"ca": str(files.ca_file), "cert": str(files.cert_file),
                     "key": str(files.key_file)}
    async with running_nats_server(tmp_path / "nats", tls=files) as server:
        options = ConnectOptions((server.url,), tls_ca_file=files.ca_file)
        async with options.transport(name="tls-cli") as transport:
            assert transport.tls_required
    code, out, err = await run_cli("tls", "issue", str(ca_dir), "evil", "--host", "example.com")
    assert code == 1
    assert err == "error: this CA may not sign for example.com; it covers 127.0.0.1\n"
