"""One connection runtime (``ConnectOptions`` / ``NatsClientSettings``) against a real
nats-server that requires nkey authentication: the key that signs a node's envelopes is its
NATS identity; replies arrive under the identity's own inbox prefix; CLI commands take the same
options and fail in one line without echoing a secret."""

from __future__ import annotations

import json
import os

import pytest

from broker.errors import InvalidArgumentError, TransportError
from broker.testing import running_nats_server
from broker.transport import (
    ConnectOptions,
    NatsTransport,
    nkey_seed,
    read_nkey_seed,
    seed_public_nkey,
)
from services._connection import NatsClientSettings
from services.worknode import WorknodeService, WorknodeSettings, load_or_create_signer
from tests.integration._nodes import SUBJECT, node_settings, roster_of, run_cli


def _users(*publics: str, inbox_only: bool = False) -> str:
    """An authorization block admitting these public nkeys; with ``inbox_only`` each may
    subscribe to ``wn.>`` and to its own ``_INBOX.<key>.>`` only (not ``_INBOX.>``)."""
    users = []
    for pub in publics:
        if inbox_only:
            perms = {"publish": {"allow": ["wn.>"]},
                     "subscribe": {"allow": ["wn.>", f"_INBOX.{pub}.>"]},
                     "allow_responses": True}
            users.append({"nkey": pub, "permissions": perms})
        else:
            users.append({"nkey": pub})
    return "authorization { users: " + json.dumps(users) + " }"


def _seed_file(path, seed: bytes | None = None):
    path.write_bytes(seed if seed is not None else os.urandom(32))
    path.chmod(0o600)
    return path


async def test_node_signing_key_is_its_nats_identity(tmp_path):
    """Two nodes whose only NATS credential is their signing key replicate through a server
    admitting exactly those keys, each subscribing to replies under its own inbox only."""
    settings = [node_settings(tmp_path, "nats://127.0.0.1:1", n) for n in ("a", "b")]
    roster = roster_of(settings)  # makes the keys
    publics = [seed_public_nkey(read_nkey_seed(s.key_path())) for s in settings]
    # The tie: the nkey is the Ed25519 public key the roster trusts, in nkey encoding.
    import base64

    import nacl.signing
    import nkeys

    for s, pub in zip(settings, publics, strict=True):
        signer = load_or_create_signer(s.node_id, s.key_path())
        raw = base64.b32decode(pub + "=" * (-len(pub) % 8))[1:33]  # prefix byte, key, crc
        assert raw == signer.public_key
        assert s.node_id in roster
        # What the NATS identity signs (the server's nonce), the roster's key verifies.
        keypair = nkeys.from_seed(bytearray(read_nkey_seed(s.key_path()).encode()))
        nacl.signing.VerifyKey(signer.public_key).verify(b"nonce", keypair.sign(b"nonce"))
    async with running_nats_server(tmp_path / "nats",
                                   config_extra=_users(*publics, inbox_only=True)) as server:
        live = [node_settings(tmp_path, server.url, s.node_id) for s in settings]
        a, b = (WorknodeService(s, roster=roster) for s in live)
        async with a, b:
            await a.replica(SUBJECT).create("w1")
            await a.replica(SUBJECT).set("w1", ("f",), 1)
            await a.replica(SUBJECT).flush()
            # b's catch-up and a's write meet: b holds the write. A catch-up request's
            # reply comes to b's inbox, which the permissions allow only under its key.
            for _ in range(200):
                if b.replica(SUBJECT).state.value() == a.replica(SUBJECT).state.value():
                    break
                await b.replica(SUBJECT).catch_up()
            assert b.replica(SUBJECT).state.value() == a.replica(SUBJECT).state.value()
            assert b.transport is not None
            assert b.transport._options["inbox_prefix"] == f"_INBOX.{publics[1]}"  # type: ignore[attr-defined]


async def test_unknown_key_is_refused_in_one_line(tmp_path):
    """A node whose key the server does not know cannot connect: a TransportError naming the
    server (authorization violation), not a hang, not a traceback."""
    admitted = seed_public_nkey(nkey_seed(os.urandom(32)))
    async with running_nats_server(tmp_path / "nats", config_extra=_users(admitted)) as server:
        svc = WorknodeService(node_settings(tmp_path, server.url, "stranger"))
        with pytest.raises(TransportError, match=r"(?i)authorization") as info:
            await svc.start()
        await svc.stop()
        assert "\n" not in str(info.value)


async def test_cli_tail_connects_with_nkey_and_fails_in_one_line_without(tmp_path):
    """``worknode tail --nats-nkey`` reaches an nkey-only server; without it, or with a URL
    carrying a password, the error is one line naming the server and never the secret."""
    seed = _seed_file(tmp_path / "reader.key")
    pub = seed_public_nkey(read_nkey_seed(seed))
    async with running_nats_server(tmp_path / "nats", config_extra=_users(pub)) as server:
        code, out, err = await run_cli("tail", SUBJECT, "--nats-url", server.url,
                                       "--nats-nkey", str(seed), "--timeout", "0.2")
        assert code == 0, err
        code, out, err = await run_cli("tail", SUBJECT, "--nats-url", server.url,
                                       "--timeout", "0.2")
        assert code != 0
        assert "Traceback" not in err
        assert err.count("\n") == 1, err
        assert "uthorization" in err
        secret_url = server.url.replace("nats://", "nats://admin:hunter2@")
        code, out, err = await run_cli("tail", SUBJECT, "--nats-url", secret_url,
                                       "--timeout", "0.2")
        assert code != 0
        assert "hunter2" not in err + out
        assert err.count("\n") == 1, err
        # The seed is never printed, whatever happens.
        assert seed.read_bytes().hex() not in err + out


def test_connect_options_never_show_secrets(tmp_path):
    seed = nkey_seed(os.urandom(32))
    options = ConnectOptions(("nats://127.0.0.1:4222",), nkey_seed=seed)
    assert seed not in repr(options)
    options = ConnectOptions(("nats://127.0.0.1:4222",), user="u", password="hunter2")
    assert "hunter2" not in repr(options)
    settings = NatsClientSettings(nats_urls=["nats://127.0.0.1:4222"], nats_user="u",
                                  nats_password="hunter2")
    assert "hunter2" not in repr(settings)
    assert "hunter2" not in str(settings.model_dump())
    assert settings.connect_options("x").password == "hunter2"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"nkey_seed": "SU", "token": "t"}, "not nkey seed and token"),
        ({"password": "p"}, "a password needs a user"),
        ({"creds_file": "/nonexistent.creds"}, "creds file /nonexistent.creds: no such file"),
        ({"tls_ca_file": "/nonexistent.pem"}, "TLS CA file /nonexistent.pem: no such file"),
        ({"tls_key_file": "/k.pem"}, "a client key file needs a client certificate"),
        ({"inbox_prefix": "_INBOX.>"}, "inbox prefix"),
    ],
)
def test_connect_options_refuse_unusable_settings(kwargs, message):
    from pathlib import Path

    for key in ("creds_file", "tls_ca_file", "tls_key_file"):
        if key in kwargs:
            kwargs[key] = Path(kwargs[key])
    with pytest.raises(InvalidArgumentError, match=message):
        ConnectOptions(("nats://127.0.0.1:4222",), **kwargs)


def test_unusable_tls_and_seed_files_in_one_line(tmp_path):
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    with pytest.raises(InvalidArgumentError, match=f"TLS CA file {garbage}: ") as info:
        ConnectOptions(("nats://127.0.0.1:4222",), tls_ca_file=garbage).ssl_context()
    assert "\n" not in str(info.value)
    with pytest.raises(InvalidArgumentError, match="neither a 32-byte worknode key"):
        read_nkey_seed(garbage)
    bad = tmp_path / "bad.nk"
    bad.write_text("SUAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\n")
    with pytest.raises(InvalidArgumentError, match="not a valid nkey user seed") as info:
        read_nkey_seed(bad)
    assert "SUAAAA" not in str(info.value)
    # An nk-style seed file and a worknode key file name the same identity.
    raw = os.urandom(32)
    text = tmp_path / "user.nk"
    text.write_text(nkey_seed(raw) + "\n")
    assert read_nkey_seed(text) == read_nkey_seed(_seed_file(tmp_path / "raw.key", raw))


async def test_state_files_are_owner_only(tmp_path):
    """A node's state directory is 0700, its key, store and lock 0600: another user of the
    machine reads no key and no replicated data."""
    async with running_nats_server(tmp_path / "nats") as server:
        svc = WorknodeService(node_settings(tmp_path, server.url, "a"))
        async with svc:
            await svc.replica(SUBJECT).create("w1")
            await svc.replica(SUBJECT).flush()
            state = tmp_path / "a"
            assert state.stat().st_mode & 0o777 == 0o700
            files = [p for p in state.iterdir() if p.is_file()]
            assert {p.name for p in files} >= {"a.key", "worknode.db", "worknode.lock"}
            for path in files:
                assert path.stat().st_mode & 0o077 == 0, path


async def test_open_server_is_flagged(tmp_path, caplog):
    """Connected to a server with neither authentication nor TLS, a node says so (a warning
    and ``worknode_nats_open_connection`` 1) unless ``nats_insecure`` acknowledges it; a
    server demanding an nkey clears the authentication half of the warning."""
    import logging

    caplog.set_level(logging.WARNING, logger="services.worknode._service")
    async with running_nats_server(tmp_path / "nats") as server:
        svc = WorknodeService(node_settings(tmp_path, server.url, "a"))
        async with svc:
            assert svc.metrics.nats_open._value.get() == 1
        assert "NATS connection without authentication and TLS" in caplog.text
        caplog.clear()
        svc = WorknodeService(node_settings(tmp_path, server.url, "a", nats_insecure=True))
        async with svc:
            assert svc.metrics.nats_open._value.get() == 1
        assert "without authentication and TLS (nats_insecure)" in caplog.text  # still said
    settings = node_settings(tmp_path, "nats://127.0.0.1:1", "b")
    roster_of([settings])
    pub = seed_public_nkey(read_nkey_seed(settings.key_path()))
    async with running_nats_server(tmp_path / "nats2", config_extra=_users(pub)) as server:
        svc = WorknodeService(node_settings(tmp_path, server.url, "b"))
        async with svc:
            assert svc.metrics.nats_open._value.get() == 1
        assert "NATS connection without TLS:" in caplog.text


async def test_embedded_default_is_secure(tmp_path):
    """A node with no NATS URL starts its own server with TLS and two users (itself and the
    local admin, whose seed it writes 0600); a stranger is refused; ``nats_insecure`` is the
    only way to an open one."""
    settings = WorknodeSettings(node_id="solo", subjects=[SUBJECT], state_dir=tmp_path / "s",
                                metrics_port=None, store_sync="normal")
    async with WorknodeService(settings) as svc:
        transport = svc.transport
        assert isinstance(transport, NatsTransport)
        assert transport.auth_required
        assert transport.tls_required
        assert svc.metrics.nats_open._value.get() == 0
        assert svc.server is not None
        url = svc.server.url
        admin = tmp_path / "s" / "local-admin.key"
        assert admin.stat().st_mode & 0o077 == 0
        ca = tmp_path / "s" / "tls" / "ca.pem"
        options = ConnectOptions((url,), nkey_seed=read_nkey_seed(admin), tls_ca_file=ca)
        async with options.transport(name="admin") as client:
            assert client.connected
        with pytest.raises(TransportError, match="refused this client's credentials"):
            async with ConnectOptions((url,), tls_ca_file=ca).transport(name="stranger"):
                pass
    insecure = WorknodeSettings(node_id="solo", subjects=[SUBJECT], state_dir=tmp_path / "o",
                                metrics_port=None, store_sync="normal", nats_insecure=True)
    async with WorknodeService(insecure) as svc:
        assert svc.metrics.nats_open._value.get() == 1
        assert isinstance(svc.transport, NatsTransport)
        assert not svc.transport.auth_required
