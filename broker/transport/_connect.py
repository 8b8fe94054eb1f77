"""One way to reach NATS: ``ConnectOptions`` (every URL, credential, TLS and inbox setting in
one value) and ``connect()``. The worknode service, the healer and every CLI command build their
connection here, so an option added once works everywhere.

Invariants:

- No secret is ever shown: the password, token and nkey seed are left out of ``repr``, and
  every error names the setting or file at fault, never its content.
- Everything that can be checked before connecting is checked in the constructor (URLs, the
  files named, the inbox prefix) and fails with one line, instead of after a connect timeout.
- An nkey identity can come from a worknode signing seed (32 raw bytes, the file every node
  already has) or from an nkey seed file (``SU...``): it is the same Ed25519 key either way,
  so a node's NATS user and the key that signs its envelopes are one key.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import nkeys

from broker.errors import InvalidArgumentError
from broker.transport._auth import nkey_seed
from broker.transport._nats import NatsTransport, validate_nats_url
from broker.transport._protocol import TransportObserver
from broker.transport._subjects import validate_subject
from broker.transport._tls import client_ssl_context

__all__ = ["ConnectOptions", "connect", "read_nkey_seed", "seed_public_nkey"]

_RAW_SEED_BYTES: Final = 32


def seed_public_nkey(seed: str) -> str:
    """The public nkey (``U...``) of an nkey user seed."""
    public: bytes = nkeys.from_seed(bytearray(seed.encode())).public_key
    return public.decode()


def read_nkey_seed(path: Path) -> str:
    """The nkey user seed in ``path``: a worknode key file (32 raw bytes) or an nkey seed
    file (``SU...`` text, as ``nk`` and ``nsc`` write). One-line ``InvalidArgumentError``
    naming the file (never its content) when it is neither."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidArgumentError(f"nkey seed file {path}: {exc.strerror or exc}") from None
    if len(data) == _RAW_SEED_BYTES:
        return nkey_seed(data)
    text = data.strip()
    if text.startswith(b"SU"):
        try:
            nkeys.from_seed(bytearray(text))
        except Exception:  # nkeys raises its own untyped errors for a bad checksum or length
            raise InvalidArgumentError(
                f"nkey seed file {path}: not a valid nkey user seed (bad checksum or length)"
            ) from None
        return text.decode()
    raise InvalidArgumentError(
        f"nkey seed file {path}: neither a 32-byte worknode key nor an nkey user seed (SU...)"
    )


@dataclass(frozen=True, slots=True)
class ConnectOptions:
    """How to reach a NATS deployment and who to be on it.

    ``urls``: one or more ``nats://`` / ``tls://`` URLs of one deployment. Credentials, at most
    one kind: ``nkey_seed`` (an nkey user seed; see ``read_nkey_seed``), ``creds_file`` (a
    decentralised-auth ``.creds`` file: JWT + seed), ``user`` + ``password`` or ``token``.
    TLS: ``tls_ca_file`` (the CA that signed the servers' certificates; the system's trust
    store when unset), ``tls_cert_file`` + ``tls_key_file`` (a client certificate, for servers
    that verify clients), ``tls_hostname`` (the name to check in the server's certificate, when
    it differs from the URL's host). TLS is used when a CA or client certificate is given, a
    URL says ``tls://``, or the server requires it. ``inbox_prefix``: this identity's reply
    subjects (``_INBOX.<name>``) so that permissions can keep replies private.
    """

    urls: tuple[str, ...]
    nkey_seed: str | None = field(default=None, repr=False)
    creds_file: Path | None = None
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_hostname: str | None = None
    inbox_prefix: str | None = None
    connect_timeout: float = 2.0
    start_timeout: float = 10.0

    def __post_init__(self) -> None:
        if isinstance(self.urls, str) or not self.urls:
            raise InvalidArgumentError("need at least one NATS server URL")
        for url in self.urls:
            validate_nats_url(url)
        kinds = [k for k, v in (("nkey seed", self.nkey_seed), ("creds file", self.creds_file),
                                ("user", self.user), ("token", self.token)) if v]
        if len(kinds) > 1:
            raise InvalidArgumentError(
                f"NATS credentials: give one of nkey seed, creds file, user+password or token, "
                f"not {' and '.join(kinds)}")
        if self.password and not self.user:
            raise InvalidArgumentError("NATS credentials: a password needs a user")
        if self.creds_file is not None and not self.creds_file.is_file():
            raise InvalidArgumentError(f"NATS creds file {self.creds_file}: no such file")
        if self.tls_key_file is not None and self.tls_cert_file is None:
            raise InvalidArgumentError("TLS: a client key file needs a client certificate file")
        for label, path in (("CA", self.tls_ca_file), ("certificate", self.tls_cert_file),
                            ("key", self.tls_key_file)):
            if path is not None and not path.is_file():
                raise InvalidArgumentError(f"TLS {label} file {path}: no such file")
        if self.inbox_prefix is not None:
            validate_subject(self.inbox_prefix, "inbox prefix")
        for label, value in (("connect_timeout", self.connect_timeout),
                             ("start_timeout", self.start_timeout)):
            if not value > 0:
                raise InvalidArgumentError(f"{label} must be > 0, got {value!r}")

    @property
    def uses_tls(self) -> bool:
        """Whether the client will insist on TLS (a CA or client certificate is configured, or
        a URL says ``tls://``); the server may still demand it of a client that does not."""
        return (self.tls_ca_file is not None or self.tls_cert_file is not None
                or any(u.startswith(("tls://", "wss://")) for u in self.urls))

    @property
    def has_credentials(self) -> bool:
        """Whether the client presents any NATS credential."""
        return bool(self.nkey_seed or self.creds_file or self.user or self.token)

    def ssl_context(self) -> ssl.SSLContext | None:
        """The client TLS context (None when the options do not ask for TLS): verifies the
        server's certificate and host name, TLS 1.2 at least. One-line ``TlsConfigError``
        naming the file that is not a usable CA, certificate or key."""
        if not self.uses_tls:
            return None
        return client_ssl_context(self.tls_ca_file, self.tls_cert_file, self.tls_key_file)

    def transport(self, *, name: str, observer: TransportObserver | None = None,
                  **kwargs: Any) -> NatsTransport:
        """A ``NatsTransport`` (not started) with these options; ``kwargs`` are its tuning
        arguments (pending limits, reconnect settings, ``echo``)."""
        return NatsTransport(
            list(self.urls), name=name, observer=observer,
            nkey_seed=self.nkey_seed, creds_file=self.creds_file,
            user=self.user, password=self.password, token=self.token,
            tls=self.ssl_context(), tls_hostname=self.tls_hostname,
            inbox_prefix=self.inbox_prefix, connect_timeout=self.connect_timeout,
            start_timeout=self.start_timeout, **kwargs,
        )


async def connect(options: ConnectOptions, *, name: str,
                  observer: TransportObserver | None = None, **kwargs: Any) -> NatsTransport:
    """A started ``NatsTransport`` for ``options`` (stop it, or use it as ``async with``).
    Raises what ``NatsTransport.start`` raises: ``TransportTimeoutError``, ``NotConnectedError``
    or ``TransportError`` (authentication, authorization, TLS), with secrets redacted."""
    transport = options.transport(name=name, observer=observer, **kwargs)
    await transport.start()
    return transport
