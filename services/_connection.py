"""The connection settings every service and command shares: one model (``NatsClientSettings``)
and one way from it to a connection (``connect_options`` -> ``broker.transport.connect``).

The worknode service, the healer and every CLI command inherit these fields (``nats_*``), so a
credential or TLS option works the same everywhere: from a TOML file, from the service's
environment variables (``WORKNODE_NATS_*``, ``WORKNODE_HEALER_NATS_*``), or from a command's
options. Secrets (password, token) are ``SecretStr``: never printed, never in an error.

Identity: a process that signs envelopes (a node, the healer, the CLI writer) is, on NATS, the
same Ed25519 key: its signing seed, encoded as an nkey user seed. ``nats_nkey_file`` names
another identity (an nkey seed file) when a deployment wants one; ``nats_creds_file`` (JWT),
``nats_user``/``nats_password`` and ``nats_token`` replace the nkey altogether.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import click
from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from broker.errors import InvalidArgumentError
from broker.transport import (
    INBOX_ROOT,
    ConnectOptions,
    NatsTransport,
    read_nkey_seed,
    seed_public_nkey,
    validate_nats_url,
    validate_subject,
)

__all__ = [
    "CONNECTION_KEYS",
    "CONNECTION_OPTIONS",
    "ClientSettings",
    "NatsClientSettings",
    "client_options",
    "open_server_warning",
    "pop_connection",
    "with_connection",
]

class NatsClientSettings(BaseSettings):
    """How to reach NATS and who to be there: URLs, credentials, TLS, inbox prefix, timeouts.

    A base for the services' settings (they add their environment prefix); its fields are the
    README's "Connection settings" table.
    """

    nats_urls: list[str] = Field(
        default_factory=list,
        description="NATS servers to connect to; empty starts an embedded nats-server.",
    )
    nats_nkey_file: Path | None = Field(
        None, description="NATS identity: an nkey user seed file (SU...) or a 32-byte worknode "
        "key; default: this process's signing key (the key that signs its envelopes).")
    nats_creds_file: Path | None = Field(
        None, description="Decentralised-auth credentials (JWT + seed) instead of an nkey.")
    nats_user: str | None = None
    nats_password: SecretStr | None = None
    nats_token: SecretStr | None = None
    nats_tls_ca_file: Path | None = Field(
        None, description="CA of the servers' certificates (TLS on; system trust if unset).")
    nats_tls_cert_file: Path | None = Field(
        None, description="Client certificate, for servers that verify clients.")
    nats_tls_key_file: Path | None = None
    nats_tls_hostname: str | None = Field(
        None, description="Name to check in the server certificate, if not the URL's host.")
    nats_inbox_prefix: str | None = Field(
        None, description="Reply subjects' prefix; default _INBOX.<node id>.")
    nats_connect_timeout_s: float = Field(2.0, gt=0, le=600)
    nats_insecure: bool = Field(
        False, description="Accept a NATS server without authentication or TLS quietly "
        "(development only); otherwise connecting to one logs a warning.")

    @field_validator("nats_urls")
    @classmethod
    def _nats_urls(cls, v: list[str]) -> list[str]:
        return [validate_nats_url(u) for u in v]

    @field_validator("nats_inbox_prefix")
    @classmethod
    def _inbox(cls, v: str | None) -> str | None:
        return None if v is None else validate_subject(v, "inbox prefix")

    def connect_options(
        self, identity: str, *, urls: list[str] | None = None, signing_key: Path | None = None,
    ) -> ConnectOptions:
        """The ``ConnectOptions`` for ``identity`` (a node id, the healer's id, a client
        name): these settings' credentials and TLS; with no credential configured, the nkey
        of ``signing_key`` (the process's own 32-byte seed file) when it exists. ``urls``
        replaces ``nats_urls`` (an embedded server's URL). One-line
        ``InvalidArgumentError`` for a file that cannot be used."""
        nkey = None
        others = self.nats_creds_file or self.nats_user or self.nats_token
        if self.nats_nkey_file is not None:
            if others:
                raise InvalidArgumentError(
                    "nats_nkey_file and another NATS credential (creds file, user or token) "
                    "are both set: keep one")
            nkey = read_nkey_seed(self.nats_nkey_file)
        elif not others and signing_key is not None and signing_key.is_file():
            nkey = read_nkey_seed(signing_key)
        return ConnectOptions(
            urls=tuple(urls if urls is not None else self.nats_urls),
            nkey_seed=nkey,
            creds_file=self.nats_creds_file,
            user=self.nats_user,
            password=self.nats_password.get_secret_value() if self.nats_password else None,
            token=self.nats_token.get_secret_value() if self.nats_token else None,
            tls_ca_file=self.nats_tls_ca_file,
            tls_cert_file=self.nats_tls_cert_file,
            tls_key_file=self.nats_tls_key_file,
            tls_hostname=self.nats_tls_hostname,
            # Its own inbox, named by its key (a client knows it from its seed alone).
            inbox_prefix=self.nats_inbox_prefix or
            f"{INBOX_ROOT}.{seed_public_nkey(nkey) if nkey is not None else identity}",
            connect_timeout=self.nats_connect_timeout_s,
        )


def open_server_warning(transport: object, *, acknowledged: bool = False) -> str | None:
    """What is open about ``transport``'s NATS connection (None when it is authenticated and
    encrypted, or not a NATS connection at all: an injected in-memory transport): the warning
    a service logs at start; ``acknowledged`` (``nats_insecure``) only says it was asked for."""
    if not isinstance(transport, NatsTransport):
        return None
    missing = [what for what, ok in (("authentication", transport.auth_required),
                                     ("TLS", transport.tls_required)) if not ok]
    if not missing:
        return None
    if acknowledged:
        return (f"NATS connection without {' and '.join(missing)} (nats_insecure): any client "
                "that reaches the server can read every delta and RPC token and publish as "
                "anyone")
    return (f"NATS connection without {' and '.join(missing)}: any client that reaches the "
            "server can read every delta and RPC token and publish as anyone (see the "
            "README's Security section; nats_insecure=true acknowledges an open deployment)")


class ClientSettings(NatsClientSettings):
    """The connection settings of a one-shot command (``tail``, ``call``, ``token revoke``):
    its options, then ``WORKNODE_NATS_*`` environment variables (``WORKNODE_NATS_PASSWORD``
    and ``WORKNODE_NATS_TOKEN`` only there: a secret on a command line is visible to every
    user of the machine)."""

    model_config = SettingsConfigDict(env_prefix="WORKNODE_", extra="ignore")


_FILE = click.Path(dir_okay=False, path_type=Path)

CONNECTION_OPTIONS: Final = (
    click.option("--nats-nkey", "nats_nkey_file", type=_FILE, default=None,
                 help="NATS identity: nkey user seed file (SU...) or a 32-byte worknode key "
                 "[env WORKNODE_NATS_NKEY_FILE]."),
    click.option("--nats-creds", "nats_creds_file", type=_FILE, default=None,
                 help="NATS credentials file (JWT + seed) [env WORKNODE_NATS_CREDS_FILE]."),
    click.option("--tls-ca", "nats_tls_ca_file", type=_FILE, default=None,
                 help="CA that signed the servers' certificates (turns TLS on) "
                 "[env WORKNODE_NATS_TLS_CA_FILE]."),
    click.option("--tls-cert", "nats_tls_cert_file", type=_FILE, default=None,
                 help="Client certificate, for servers that verify clients "
                 "[env WORKNODE_NATS_TLS_CERT_FILE]."),
    click.option("--tls-key", "nats_tls_key_file", type=_FILE, default=None,
                 help="Client certificate's key [env WORKNODE_NATS_TLS_KEY_FILE]."),
)
"""Click options every network command takes (user, password and token: environment only)."""

CONNECTION_KEYS: Final = ("nats_nkey_file", "nats_creds_file", "nats_tls_ca_file",
                          "nats_tls_cert_file", "nats_tls_key_file")
"""The keyword names ``CONNECTION_OPTIONS`` give a command."""


def with_connection(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``CONNECTION_OPTIONS`` to a click command."""
    for opt in reversed(CONNECTION_OPTIONS):
        fn = opt(fn)
    return fn


def pop_connection(kw: dict[str, Any]) -> dict[str, Any]:
    """Take the ``CONNECTION_OPTIONS`` values out of a command's keywords; only the ones given
    (an option left out must not hide the environment variable of the same setting)."""
    return {k: v for k in CONNECTION_KEYS if (v := kw.pop(k, None)) is not None}


def client_options(identity: str, nats_urls: list[str], given: dict[str, Any]) -> ConnectOptions:
    """The ``ConnectOptions`` of a one-shot command connecting as ``identity`` (the name of
    its NATS identity, for its inbox prefix), from its options (``given``, see
    ``pop_connection``) and the environment; ``ConfigError`` or ``InvalidArgumentError`` in
    one line when a setting is unusable."""
    from services._config import load_settings

    settings = load_settings(ClientSettings,
                             lambda: ClientSettings(nats_urls=nats_urls, **given))
    return settings.connect_options(identity)
