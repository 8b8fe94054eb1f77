"""The benchmarks' secure bus (``--secure``): TLS from a local CA and one nkey user per process
with its role's permissions, for raw nats-py and worknode alike, so a ratio compares the two
over the same TLS and the same permission checks.

Every benchmark identity has a fixed seed (derived from its name), so a child process knows
its key from its name alone and the server's users can be written once before any child
starts. The environment carries the rest to the children: ``BENCH_SECURE_DIR`` (where the CA
lives) and ``WORKNODE_NATS_TLS_CA_FILE`` (which worknode services read by themselves).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

ENV_DIR = "BENCH_SECURE_DIR"


def bench_seed(name: str) -> bytes:
    """The fixed 32-byte seed of benchmark identity ``name`` (never a production key)."""
    return hashlib.sha256(f"worknode-bench/{name}".encode()).digest()


def write_seed(path: Path, name: str) -> None:
    """Put ``name``'s seed at ``path`` (a worknode key file), 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(bench_seed(name))


def secure_server(directory: Path, users: Mapping[str, tuple[str, str, tuple[str, ...]]]
                  ) -> tuple[dict[str, Any], dict[str, str]]:
    """The ``EmbeddedNatsServer`` options (TLS, the accounts block) for ``users`` (name ->
    (role, namespace, granted subjects)), and the environment children need."""
    from broker.codec import Signer
    from broker.transport import NatsIdentity, Role, create_local_ca, render_accounts

    ca = create_local_ca(directory / "tls")
    identities = [NatsIdentity(name, Role(role), Signer(name, bench_seed(name)).public_key, ns,
                               subjects)
                  for name, (role, ns, subjects) in users.items()]
    options = {"tls": ca.issue("nats"), "config_extra": render_accounts(identities)}
    env = {ENV_DIR: str(directory), "WORKNODE_NATS_TLS_CA_FILE": str(ca.cert_file)}
    return options, env


def run_options(secure: bool, users: Mapping[str, tuple[str, str, tuple[str, ...]]]
                ) -> tuple[dict[str, Any], dict[str, str]]:
    """A benchmark run's server options and environment: ``secure_server`` in a fresh
    directory, or an open bus its services are told is open on purpose."""
    if secure:
        return secure_server(Path(tempfile.mkdtemp(prefix="wn-bench-tls-")), users)
    return {}, {"WORKNODE_NATS_INSECURE": "true"}


@contextlib.contextmanager
def environment(env: Mapping[str, str]) -> Iterator[None]:
    """``env`` in ``os.environ`` for the block (children started in it inherit it), then
    the environment as it was."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def raw_options(name: str) -> dict[str, Any]:
    """nats-py ``connect`` keywords for identity ``name``: its nkey, its inbox and TLS when
    the run is secure (``BENCH_SECURE_DIR`` set), nothing otherwise."""
    directory = os.environ.get(ENV_DIR)
    if not directory:
        return {}
    from broker.codec import Signer
    from broker.transport import client_ssl_context, inbox_prefix, nkey_seed

    seed = bench_seed(name)
    return {
        "tls": client_ssl_context(Path(directory) / "tls" / "ca.pem"),
        "nkeys_seed_str": nkey_seed(seed),
        "inbox_prefix": inbox_prefix(Signer(name, seed).public_key),
    }


def connect_options(name: str, url: str) -> Any:
    """``ConnectOptions`` for a worknode transport of identity ``name`` (secure or not)."""
    from broker.transport import ConnectOptions

    directory = os.environ.get(ENV_DIR)
    if not directory:
        return ConnectOptions((url,))
    raw = raw_options(name)
    return ConnectOptions((url,), nkey_seed=raw["nkeys_seed_str"],
                          tls_ca_file=Path(directory) / "tls" / "ca.pem",
                          inbox_prefix=raw["inbox_prefix"])
