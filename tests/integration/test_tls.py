"""TLS on a real nats-server: client connections (server-verified and mutual) and cluster
routes, with certificates from ``create_local_ca``.

What is proven here: a client trusting the right CA gets service over TLS (the server's
``/connz`` says the connection is TLS); a client that speaks plaintext gets no service, and
clients trusting another CA, or without a client certificate where one is required, are
refused; routes form between servers holding certificates from the same CA (through the
harness's TCP proxies) and never with a server whose route certificate comes from another CA;
the server's state directory and generated files are private; ``reload()`` picks up new TLS
files.
"""

from __future__ import annotations

import asyncio
import json
import stat
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from broker.chaos import NatsCluster
from broker.errors import TlsConfigError, TransportError
from broker.testing import running_nats_server
from broker.transport import (
    EmbeddedNatsServer,
    LocalCA,
    Msg,
    NatsTransport,
    TlsFiles,
    client_ssl_context,
    create_local_ca,
)

_POLL = 0.05
# nats-py retries a refused TLS handshake until its start timeout: long enough for a few
# attempts on a loaded machine (the message then carries the TLS error), short for a test.
_REFUSED_AFTER = 2.0


@pytest.fixture
def ca(tmp_path: Path) -> LocalCA:
    """The CA every good party trusts."""
    return create_local_ca(tmp_path / "ca")


@pytest.fixture
def other_ca(tmp_path: Path) -> LocalCA:
    """A second, unrelated CA (an impostor's, or another deployment's)."""
    return create_local_ca(tmp_path / "other-ca", name="another CA")


@pytest.fixture
def server_files(ca: LocalCA, tmp_path: Path) -> TlsFiles:
    """The client-port certificate of the server under test."""
    return ca.issue("server", tmp_path / "certs", client=False)


@pytest.fixture
async def tls_server(tmp_path: Path, server_files: TlsFiles):
    """A nats-server requiring TLS from clients; stopped even if the test fails."""
    async with running_nats_server(tmp_path / "nats", tls=server_files, jetstream=False) as s:
        yield s


def _transport(server: EmbeddedNatsServer, name: str, **kwargs: Any) -> NatsTransport:
    # Quick retries: a refused client makes several attempts within its start timeout.
    return NatsTransport(
        [server.url], name=name, reconnect_time_wait=0.05, drain_timeout=2.0, **kwargs
    )


async def _refused(transport: NatsTransport) -> str:
    """Start ``transport``, expecting it to be refused; the error's message.

    A certificate that does not verify, or a handshake alert, fails the start at once
    (``TransportError`` naming the TLS problem); a refusal nats-py only sees as a reset
    connection ends in ``TransportTimeoutError`` (a ``TransportError`` too) at the start
    timeout, its message carrying the last error."""
    with pytest.raises(TransportError) as info:
        await transport.start()
    await transport.stop()
    return str(info.value)


def _no_secret(message: str, *key_files: Path) -> None:
    assert "PRIVATE KEY" not in message
    for key_file in key_files:
        for line in key_file.read_text().splitlines()[1:-1]:
            assert line not in message


async def _round_trip(transport: NatsTransport, subject: str) -> bytes:
    got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def handler(msg: Msg) -> None:
        if not got.done():
            got.set_result(msg.data)

    await transport.subscribe(subject, handler)
    await transport.flush()
    await transport.publish(subject, b"over tls")
    async with asyncio.timeout(10):
        return await got


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


async def _wait_log(server: EmbeddedNatsServer, *needles: str) -> str:
    """The server's log once it holds a line with every one of ``needles``."""
    async with asyncio.timeout(20):
        while True:
            text = server.log_path.read_text(errors="replace")
            for line in text.splitlines():
                if all(needle in line for needle in needles):
                    return line
            await asyncio.sleep(_POLL)


# -- client connections ----------------------------------------------------------------------


async def test_a_client_trusting_the_ca_gets_service_over_tls(tls_server, ca):
    assert tls_server.tls_required
    transport = _transport(tls_server, "trusting", tls=client_ssl_context(ca.cert_file))
    async with transport:
        assert await _round_trip(transport, "tls.check") == b"over tls"
        assert tls_server.monitor_url is not None
        connz = await asyncio.to_thread(_get_json, f"{tls_server.monitor_url}/connz")
    mine = [c for c in connz["connections"] if c.get("name") == "trusting"]
    assert len(mine) == 1
    assert mine[0].get("tls_version", "").startswith("1.")  # the server saw a TLS connection


async def test_a_plaintext_client_gets_no_service(tls_server, server_files):
    host, port = tls_server.url.removeprefix("nats://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        info = await reader.readline()
        assert info.startswith(b"INFO ")
        assert json.loads(info[5:])["tls_required"] is True
        writer.write(b'CONNECT {"verbose":false}\r\nSUB > 1\r\nPING\r\n')
        await writer.drain()
        async with asyncio.timeout(20):
            rest = await reader.read()  # until the server hangs up
    finally:
        writer.close()
        await writer.wait_closed()
    assert b"PONG" not in rest
    assert b"+OK" not in rest

    # nats-py given no context still upgrades (with the system trust store) and is refused.
    message = await _refused(_transport(tls_server, "no-context", start_timeout=_REFUSED_AFTER))
    assert "certificate does not verify" in message
    assert "\n" not in message
    _no_secret(message, server_files.key_file)


async def test_a_client_trusting_another_ca_is_refused(tls_server, other_ca, server_files):
    transport = _transport(
        tls_server,
        "other-ca",
        tls=client_ssl_context(other_ca.cert_file),
        start_timeout=_REFUSED_AFTER,
    )
    message = await _refused(transport)
    assert "certificate does not verify" in message
    _no_secret(message, server_files.key_file)


async def test_mutual_tls_requires_a_client_certificate_from_the_ca(
    tmp_path, ca, other_ca, server_files
):
    good = ca.issue("client", tmp_path / "client", server=False)
    forged = other_ca.issue("client", tmp_path / "forged", server=False)
    async with running_nats_server(
        tmp_path / "nats", tls=server_files, tls_verify=True, jetstream=False
    ) as server:
        anonymous = _transport(
            server, "no-cert", tls=client_ssl_context(ca.cert_file), start_timeout=_REFUSED_AFTER
        )
        # The last error is the TLS alert or, as often, the reset that follows it.
        _no_secret(await _refused(anonymous), server_files.key_file)

        impostor = _transport(
            server,
            "forged-cert",
            tls=client_ssl_context(ca.cert_file, forged.cert_file, forged.key_file),
            start_timeout=_REFUSED_AFTER,
        )
        _no_secret(await _refused(impostor), server_files.key_file, forged.key_file)

        member = _transport(
            server, "with-cert", tls=client_ssl_context(ca.cert_file, good.cert_file, good.key_file)
        )
        async with member:
            assert await _round_trip(member, "mtls.check") == b"over tls"


async def test_reload_picks_up_new_tls_files(tmp_path, ca, other_ca, server_files):
    async with running_nats_server(tmp_path / "nats", tls=server_files, jetstream=False) as server:
        rotated = other_ca.issue("rotated", tmp_path / "rotated", client=False)
        # Rotate in place: same paths, a certificate from the other CA.
        server_files.cert_file.write_bytes(rotated.cert_file.read_bytes())
        server_files.key_file.write_bytes(rotated.key_file.read_bytes())
        server.reload()
        await _wait_log(server, "Reloaded server configuration")
        transport = _transport(server, "after-reload", tls=client_ssl_context(other_ca.cert_file))
        async with transport:
            assert await _round_trip(transport, "reload.check") == b"over tls"
        stale = _transport(
            server,
            "stale-trust",
            tls=client_ssl_context(ca.cert_file),
            start_timeout=_REFUSED_AFTER,
        )
        assert "certificate does not verify" in await _refused(stale)


async def test_state_directory_and_generated_files_are_private(tmp_path, server_files):
    state = tmp_path / "nats"
    state.mkdir(mode=0o755)
    state.chmod(0o755)  # as an older version (or a lax umask) left it
    async with running_nats_server(state, tls=server_files, jetstream=False) as server:
        assert stat.S_IMODE(state.stat().st_mode) == 0o700
        assert stat.S_IMODE(server.config_path.stat().st_mode) == 0o600
        assert stat.S_IMODE(server.log_path.stat().st_mode) == 0o600
        server.reload()
        assert stat.S_IMODE(server.config_path.stat().st_mode) == 0o600


# -- cluster routes -------------------------------------------------------------------------


async def test_routes_form_only_between_servers_of_the_same_ca(tmp_path, ca, other_ca):
    route = ca.issue("route", tmp_path / "route")
    clients = ca.issue("clients", tmp_path / "clients", client=False)
    member = ca.issue("member", tmp_path / "member", server=False)
    intruder_route = other_ca.issue("route", tmp_path / "intruder-route")
    async with NatsCluster(
        tmp_path / "cluster",
        2,
        jetstream=False,
        server_options={"cluster_tls": route, "tls": clients, "tls_verify": True},
        client_tls=client_ssl_context(ca.cert_file, member.cert_file, member.key_file),
    ) as cluster:
        # The good pair: its route forms through the proxies and messages cross it.
        await cluster.wait_routes()
        await cluster.wait_flow(0, 1)
        await cluster.wait_flow(1, 0)
        for url in cluster.monitor_urls:
            varz = await asyncio.to_thread(_get_json, f"{url}/varz")
            assert varz["cluster"]["tls_required"] is True
            assert varz["cluster"]["tls_verify"] is True

        first = cluster.servers[0]
        assert first.cluster_url is not None
        async with running_nats_server(
            tmp_path / "intruder",
            server_name="intruder",
            cluster_name="chaos",
            routes=[first.cluster_url],
            cluster_tls=intruder_route,
            tls=clients,
            jetstream=False,
        ) as intruder:
            # Wait for the positive evidence that the intruder dialled and was turned away
            # (both ends of its route failed their TLS handshake), then look at the routes.
            await _wait_log(intruder, "TLS route handshake error")
            await _wait_log(first, "TLS route handshake error")
            assert await cluster.peers(0) == {cluster.server_name(1)}
            assert await cluster.peers(1) == {cluster.server_name(0)}
            assert intruder.monitor_url is not None
            routez = await asyncio.to_thread(_get_json, f"{intruder.monitor_url}/routez")
            assert not routez.get("routes")
            await cluster.wait_routes()  # the good pair is untouched


async def test_unusable_tls_files_are_refused_in_one_line(tmp_path, ca, server_files):
    missing = TlsFiles(ca.cert_file, tmp_path / "absent.pem", server_files.key_file)
    server = EmbeddedNatsServer(tmp_path / "never", tls=missing, jetstream=False)
    with pytest.raises(TlsConfigError) as info:
        await server.start()
    assert not server.running
    assert str(missing.cert_file) in str(info.value)
    assert "\n" not in str(info.value)

    async with running_nats_server(tmp_path / "nats", tls=server_files, jetstream=False) as s:
        good_key = server_files.key_file.read_bytes()
        server_files.key_file.write_text("-----BEGIN PRIVATE KEY-----\nbroken\n")
        with pytest.raises(TlsConfigError) as info:
            s.reload()  # refused before the server is asked: it keeps its working files
        assert str(server_files.key_file) in str(info.value)
        assert "\n" not in str(info.value)
        server_files.key_file.write_bytes(good_key)
        transport = _transport(s, "still-served", tls=client_ssl_context(ca.cert_file))
        async with transport:
            assert await _round_trip(transport, "still.check") == b"over tls"
