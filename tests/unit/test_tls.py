"""The local CA and client TLS contexts, without a server: files and their modes, reuse
across calls (a restart keeps its trust), name constraints, and one-line errors that never
show key material. A handshake between two in-memory ``ssl`` objects proves OpenSSL accepts
what the CA issues (nats-server's Go stack is proven in tests/integration/test_tls.py)."""

from __future__ import annotations

import concurrent.futures
import datetime
import multiprocessing
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from broker.errors import InvalidArgumentError, TlsConfigError
from broker.transport import LEAF_VALIDITY, TlsFiles, client_ssl_context, create_local_ca


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _handshake(server: TlsFiles, client: ssl.SSLContext, hostname: str = "127.0.0.1") -> None:
    """A TLS handshake between ``client`` and a server presenting ``server``, in memory."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(server.cert_file, server.key_file)
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    c = client.wrap_bio(c_in, c_out, server_hostname=hostname)
    s = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = {"c": False, "s": False}
    for _ in range(10):
        for name, obj, out, peer_in in (("c", c, c_out, s_in), ("s", s, s_out, c_in)):
            if not done[name]:
                try:
                    obj.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
            peer_in.write(out.read())
        if all(done.values()):
            return
    raise AssertionError("handshake did not finish")


def test_the_ca_is_created_private_and_reused(tmp_path):
    ca = create_local_ca(tmp_path / "ca")
    assert _mode(ca.directory) == 0o700
    assert _mode(ca.key_file) == 0o600
    assert _mode(ca.cert_file) == 0o644
    cert = _cert(ca.cert_file)
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ca.not_valid_after - datetime.datetime.now(datetime.UTC) > datetime.timedelta(
        days=3000
    )

    key_bytes = ca.key_file.read_bytes()
    again = create_local_ca(tmp_path / "ca")
    assert again.fingerprint == ca.fingerprint
    assert again.key_file.read_bytes() == key_bytes


def test_a_broken_ca_is_replaced(tmp_path):
    ca = create_local_ca(tmp_path / "ca")
    ca.key_file.write_text("garbage\n")
    fresh = create_local_ca(tmp_path / "ca")
    assert fresh.fingerprint != ca.fingerprint
    assert _mode(fresh.key_file) == 0o600


def test_a_leaf_is_issued_private_reused_and_widened(tmp_path):
    ca = create_local_ca(tmp_path / "ca")
    files = ca.issue("node", tmp_path / "node", client=False)
    assert files.ca_file == ca.cert_file
    assert _mode(files.key_file.parent) == 0o700
    assert _mode(files.key_file) == 0o600
    assert _mode(files.cert_file) == 0o644
    cert = _cert(files.cert_file)
    left = cert.not_valid_after_utc - datetime.datetime.now(datetime.UTC)
    assert left <= LEAF_VALIDITY
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1"}
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    usages = set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    assert usages == {ExtendedKeyUsageOID.SERVER_AUTH}

    before = files.cert_file.read_bytes()
    assert ca.issue("node", tmp_path / "node", client=False) == files
    assert files.cert_file.read_bytes() == before  # reused as is

    ca.issue("node", tmp_path / "node")  # now also a client: reissued with both usages
    usages = set(_cert(files.cert_file).extensions.get_extension_for_class(
        x509.ExtendedKeyUsage).value)
    assert usages == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}


def test_a_leaf_from_another_ca_in_the_same_place_is_replaced(tmp_path):
    first = create_local_ca(tmp_path / "a")
    second = create_local_ca(tmp_path / "b")
    first.issue("node", tmp_path / "node")
    files = second.issue("node", tmp_path / "node")
    _cert(files.cert_file).verify_directly_issued_by(_cert(second.cert_file))


def test_the_ca_signs_only_for_its_hosts(tmp_path):
    ca = create_local_ca(tmp_path / "ca", hosts=["127.0.0.1"])
    assert ca.hosts == ("127.0.0.1",)
    with pytest.raises(InvalidArgumentError, match=r"10\.0\.0\.1"):
        ca.issue("far", tmp_path / "far", hosts=["10.0.0.1"])
    with pytest.raises(InvalidArgumentError):
        ca.issue("../escape", tmp_path)
    with pytest.raises(InvalidArgumentError):
        ca.issue("nobody", tmp_path, server=False, client=False)


def test_openssl_accepts_the_leaf_and_checks_the_host(tmp_path):
    ca = create_local_ca(tmp_path / "ca")
    files = ca.issue("server", tmp_path / "server")
    _handshake(files, client_ssl_context(ca.cert_file))
    _handshake(files, client_ssl_context(ca.cert_file), hostname="localhost")
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(files, client_ssl_context(ca.cert_file), hostname="example.com")
    other = create_local_ca(tmp_path / "other")
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(files, client_ssl_context(other.cert_file))


def test_client_context_defaults(tmp_path):
    ca = create_local_ca(tmp_path / "ca")
    ctx = client_ssl_context(ca.cert_file)
    assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert ctx.verify_mode is ssl.CERT_REQUIRED
    assert ctx.check_hostname
    client = ca.issue("client", tmp_path / "client", server=False)
    client_ssl_context(ca.cert_file, client.cert_file, client.key_file)
    client_ssl_context(None)  # the system trust store


def _one_line_without(message: str, *secrets: Path) -> None:
    assert "\n" not in message
    assert "PRIVATE KEY" not in message
    for secret in secrets:
        for line in secret.read_text().splitlines()[1:-1]:
            assert line not in message


def test_client_context_errors_name_the_file_in_one_line(tmp_path):
    ca = create_local_ca(tmp_path / "ca")
    client = ca.issue("client", tmp_path / "client", server=False)
    other = ca.issue("other", tmp_path / "other", server=False)
    missing = tmp_path / "missing.pem"
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")

    with pytest.raises(TlsConfigError) as info:
        client_ssl_context(missing)
    assert str(missing) in str(info.value)
    assert "no such file" in str(info.value)
    _one_line_without(str(info.value))

    with pytest.raises(TlsConfigError) as info:
        client_ssl_context(garbage)
    assert str(garbage) in str(info.value)
    _one_line_without(str(info.value))

    with pytest.raises(TlsConfigError) as info:
        client_ssl_context(ca.cert_file, garbage, client.key_file)
    assert str(garbage) in str(info.value)
    _one_line_without(str(info.value), client.key_file)

    with pytest.raises(TlsConfigError) as info:  # someone else's key
        client_ssl_context(ca.cert_file, client.cert_file, other.key_file)
    assert str(other.key_file) in str(info.value)
    _one_line_without(str(info.value), client.key_file, other.key_file)

    with pytest.raises(TlsConfigError) as info:  # a certificate where the key should be
        client_ssl_context(ca.cert_file, client.cert_file, client.cert_file)
    _one_line_without(str(info.value), client.key_file)

    with pytest.raises(TlsConfigError):
        client_ssl_context(ca.cert_file, None, client.key_file)
    with pytest.raises(TlsConfigError) as info:
        client_ssl_context(tmp_path)  # a directory
    _one_line_without(str(info.value))


def _make_ca_and_leaf(root: Path) -> tuple[str, bytes]:
    ca = create_local_ca(root / "ca")
    files = ca.issue("node", root / "leaf")
    return ca.fingerprint, files.cert_file.read_bytes()


def test_parallel_processes_agree_on_one_ca_and_one_leaf(tmp_path):
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(3, mp_context=context) as pool:
        results = list(pool.map(_make_ca_and_leaf, [tmp_path] * 3))
    assert len({fingerprint for fingerprint, _ in results}) == 1
    assert len({leaf for _, leaf in results}) == 1
    ca = create_local_ca(tmp_path / "ca")
    assert ca.fingerprint == results[0][0]
    leaf = tmp_path / "leaf" / "node.pem"
    _cert(leaf).verify_directly_issued_by(_cert(ca.cert_file))
    client_ssl_context(ca.cert_file, leaf, tmp_path / "leaf" / "node-key.pem")
