"""``worknode token keygen | mint | attenuate | inspect | revoke`` and ``worknode call``.

Tokens travel as URL-safe base64 text (the Biscuit convention). ``__main__``-style code only:
parse, wire, run.

A token is minted for a holder (``token mint --holder``: the hex Ed25519 public key that
``worknode keys show SEED_FILE`` prints, or ``@SEED_FILE``) and honoured only on requests
signed by that key: ``call`` and ``token revoke`` sign with ``--key`` (a 32-byte worknode key
file or an nkey user seed ``SU...``; default: the ``--nats-nkey`` file, the identity the
command already connects as). With ``--roster`` (the nodes' public keys) every reply must be
signed by a node of the roster and bound to its request, else the command fails.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import time
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import nkeys

from broker.codec import Signer, TrustRoster
from broker.crdt import KindConflict, OpaqueAtom, OpaqueValue, validate_node_id
from broker.errors import WorknodeError
from broker.rpc import (
    DEFAULT_REVOCATION_SUBJECT,
    Grant,
    RootKey,
    RpcClient,
    RpcError,
    attenuate,
    inspect,
    mint,
)
from broker.transport import ConnectOptions, RequestSigner, read_nkey_seed, validate_token
from services._cli_errors import run_until_signal
from services._connection import client_options, pop_connection, with_connection
from services.worknode._rpc import read_keyring
from services.worknode._service import read_roster_entries

CALLER_ID = "worknode-call"
"""The signer id a CLI call's ``Worknode-Auth`` names (only a label: the server verifies the
signature with the key its token names)."""

__all__ = ["register_rpc"]


def _encode(token: bytes) -> str:
    return base64.urlsafe_b64encode(token).decode()


def _decode(text: str) -> bytes:
    text = text.strip()
    if text.startswith("@"):
        text = Path(text[1:]).read_text().strip()
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise click.BadParameter(f"not a base64 token: {exc}") from exc


def _read_root_key(path: Path) -> RootKey:
    try:
        raw = json.loads(path.read_text())
        return RootKey(int(raw["key_id"]), bytes.fromhex(raw["private_key"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise click.ClickException(f"cannot read root key {path}: {exc}") from exc


def read_keyring_file(path: Path) -> dict[str, str]:
    """The keyring JSON at ``path`` as text (``{}`` if the file does not exist yet)."""
    if not path.exists():
        return {}
    try:
        ring = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise click.ClickException(f"cannot read keyring {path}: {exc}") from None
    if not isinstance(ring, dict):
        raise click.ClickException(f"cannot read keyring {path}: not a JSON object")
    return {str(k): str(v) for k, v in ring.items()}


def _read_seed(path: Path) -> bytes:
    """The raw 32-byte Ed25519 seed of a worknode key file or an nkey user seed file."""
    try:
        text = read_nkey_seed(path)
        _, raw = nkeys.decode_seed(bytearray(text.encode()))
    except Exception as exc:  # ours are WorknodeErrors; nkeys raises untyped ones
        raise click.ClickException(f"cannot read signing key {path}: {exc}") from None
    return bytes(raw)


def _holder_key(text: str) -> bytes:
    """``--holder``: a hex public key, or ``@SEED_FILE`` (its public key)."""
    if text.startswith("@"):
        return Signer("holder", _read_seed(Path(text[1:]))).public_key
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != 32:
        raise click.BadParameter("a hex Ed25519 public key (64 hex digits) or @SEED_FILE",
                                 param_hint="'--holder'")
    return key


def _caller(key: Path | None, conn: dict[str, Any], roster: Path | None) -> RequestSigner:
    """The signer of a CLI call: ``--key``, else the ``--nats-nkey`` identity."""
    path = key if key is not None else conn.get("nats_nkey_file")
    if path is None:
        raise click.UsageError("give --key: the signing key of the token's holder (a worknode "
                               "key file or an nkey seed)")
    try:
        # With its roles (only nodes answer calls) and the previous keys of a rotation
        # inside their overlap window (a node still signs with its old key until restart).
        keys = (TrustRoster.from_entries(read_roster_entries(roster), now=time.time)
                if roster is not None else TrustRoster())
    except WorknodeError as exc:
        raise click.ClickException(str(exc)) from None
    return RequestSigner(Signer(CALLER_ID, _read_seed(Path(path))), keys)


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, tz=UTC).isoformat()


def _parse_arg(text: str) -> tuple[str, Any]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise click.BadParameter(f"arguments are NAME=VALUE, got {text!r}")
    try:
        return name, json.loads(value)
    except ValueError:
        return name, value


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"bytes": value.hex()}
    if isinstance(value, OpaqueAtom):
        return {"opaque_value": value.raw.hex()}
    if isinstance(value, OpaqueValue):
        return {"opaque_kind": value[0], "dots": value[1]}
    if isinstance(value, KindConflict):
        return {"kind_conflict": {str(int(k)): _jsonable(v) for k, v in value.items()}}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset, list, tuple)):
        return sorted((_jsonable(v) for v in value), key=repr)
    return value


async def _call(
    options: ConnectOptions, namespace: str, subject: str, worknode: str, method: str,
    arguments: dict[str, Any], token: bytes, timeout_ms: float, signer: RequestSigner,
    verify_replies: bool,
) -> dict[str, Any]:
    async with options.transport(name="worknode-call") as transport:
        keys = signer.keys
        client = RpcClient(transport, namespace=namespace, signer=signer,
                           verify_replies=verify_replies,
                           responders=keys.with_role("node")
                           if isinstance(keys, TrustRoster) else None)
        r = await client.call(subject, worknode, method, arguments, token=token,
                              timeout_ms=timeout_ms)
    out: dict[str, Any] = {"status": r.status.label, "result": _jsonable(dict(r.result))}
    if r.state is not None:
        out["state"] = _jsonable(r.state.value())
    return out


def _run_call(main: Callable[[], Coroutine[Any, Any, dict[str, Any]]]) -> dict[str, Any]:
    """Run one call (Ctrl-C stops it cleanly); an RPC error's line starts with its status."""
    try:
        return run_until_signal(main)
    except RpcError as exc:
        raise click.ClickException(f"{exc.code.label}: {exc}") from exc


_nats = [
    click.option("--nats-url", "nats_urls", multiple=True, required=True,
                 help="NATS server URL (repeat for a cluster)."),
    click.option("--namespace", default="default", show_default=True),
    click.option("--token", "token_text", envvar="WORKNODE_TOKEN", required=True,
                 help="Capability token (base64, or @file); env WORKNODE_TOKEN."),
    click.option("--timeout-ms", type=click.FloatRange(min=0, min_open=True), default=5000,
                 show_default=True),
    click.option("--key", "key_file", type=click.Path(exists=True, dir_okay=False,
                 path_type=Path), envvar="WORKNODE_KEY_FILE", default=None,
                 help="Signing key of the token's holder: a 32-byte worknode key file or an "
                 "nkey user seed (default: the --nats-nkey file) [env WORKNODE_KEY_FILE]."),
    click.option("--roster", "roster_file", type=click.Path(exists=True, dir_okay=False,
                 path_type=Path), envvar="WORKNODE_ROSTER_FILE", default=None,
                 help="Roster of the nodes' public keys: replies must be signed by one of "
                 "them and bound to the request (recommended) [env WORKNODE_ROSTER_FILE]."),
]


_TTL = click.FloatRange(min=0, min_open=True, max=100 * 365 * 86400)
"""A token's lifetime in seconds: positive, at most a century (a timestamp must fit)."""


def _with_nats(fn: Any) -> Any:
    for opt in reversed(_nats):
        fn = opt(fn)
    return with_connection(fn)


def register_rpc(main: click.Group) -> None:
    """Add ``token`` and ``call`` to the ``worknode`` group."""

    @main.group()
    def token() -> None:
        """Capability tokens (Biscuit): keygen, mint, attenuate, inspect, revoke."""

    @token.command()
    @click.option("--key-id", type=click.IntRange(0, 2**32 - 1), required=True,
                  help="Id of the new root key.")
    @click.option("--out", type=click.Path(path_type=Path), required=True,
                  help="Root key file to create (mode 0600; keep it secret).")
    @click.option("--keyring", type=click.Path(path_type=Path), required=True,
                  help="Keyring JSON to add the public key to (created if missing).")
    def keygen(key_id: int, out: Path, keyring: Path) -> None:
        """Create a cluster root key and add its public key to a keyring (rotation: a new
        key id; keep the old one in keyrings until its tokens expire)."""
        ring = read_keyring_file(keyring)
        if str(key_id) in ring:
            raise click.BadParameter(f"key id {key_id} is already in {keyring}",
                                     param_hint="'--key-id'")
        key = RootKey(key_id, os.urandom(32))
        try:
            fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise click.BadParameter(f"{out} exists: refusing to overwrite a root key",
                                     param_hint="'--out'") from None
        with os.fdopen(fd, "w") as f:
            json.dump({"key_id": key_id, "private_key": key.private_key.hex()}, f)
        ring[str(key_id)] = key.public_key.hex()
        keyring.write_text(json.dumps(ring, indent=2, sort_keys=True) + "\n")
        click.echo(f"root key {key_id}: {out}; public key added to {keyring}")

    @token.command("mint")
    @click.option("--root-key", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                  required=True)
    @click.option("--namespace", required=True)
    @click.option("--subject", "subjects", multiple=True, required=True,
                  help="Subject granted (repeatable).")
    @click.option("--worknode", default="root", show_default=True,
                  help="Worknode whose subtree is granted.")
    @click.option("--method", "methods", multiple=True, help="Method granted (repeatable; "
                  "default: every method).")
    @click.option("--ttl", type=_TTL, default=3600, show_default=True, help="Seconds valid.")
    @click.option("--holder", "holder_text", required=True,
                  help="Who may use the token: the hex Ed25519 public key its calls must be "
                  "signed with (`worknode keys show SEED_FILE`), or @SEED_FILE.")
    def mint_(root_key: Path, namespace: str, subjects: tuple[str, ...], worknode: str,
              methods: tuple[str, ...], ttl: float, holder_text: str) -> None:
        """Mint a token with the cluster root key for one holder; prints it."""
        holder = _holder_key(holder_text)
        key = _read_root_key(root_key)
        try:
            grants = [Grant(namespace, s, worknode, tuple(methods) or ("*",)) for s in subjects]
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from exc
        click.echo(_encode(mint(key, grants, expires_at=time.time() + ttl, holder=holder)))

    @token.command("attenuate")
    @click.argument("token_text", metavar="TOKEN")
    @click.option("--keyring", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                  required=True, help="Keyring of root public keys (no secret needed).")
    @click.option("--method", "methods", multiple=True, help="Keep only these methods.")
    @click.option("--worknode", default=None, help="Keep only this subtree.")
    @click.option("--subject", default=None, help="Keep only this subject.")
    @click.option("--ttl", type=_TTL, default=None, help="Expire within this many seconds.")
    def attenuate_(token_text: str, keyring: Path, methods: tuple[str, ...],
                   worknode: str | None, subject: str | None, ttl: float | None) -> None:
        """Narrow a token (offline, no issuer); prints the new token."""
        if not (methods or worknode or subject or ttl is not None):
            raise click.UsageError("nothing to narrow: give --method, --worknode, --subject "
                                   "or --ttl")
        try:
            out = attenuate(
                _decode(token_text), read_keyring(keyring), methods=methods or None,
                worknode=worknode, subject=subject,
                expires_at=None if ttl is None else time.time() + ttl,
            )
        except (WorknodeError, ValueError) as exc:
            raise click.ClickException(str(exc)) from exc
        click.echo(_encode(out))

    @token.command("inspect")
    @click.argument("token_text", metavar="TOKEN")
    def inspect_(token_text: str) -> None:
        """Print a token's key id, id, expiry and blocks (signatures not checked)."""
        try:
            info = inspect(_decode(token_text))
        except WorknodeError as exc:
            raise click.ClickException(str(exc)) from exc
        click.echo(json.dumps({
            "key_id": info.key_id,
            "token_id": info.token_id,
            "expires_at": _iso(info.expires_at),
            "holder": info.holder.hex() if info.holder is not None else None,
            "revocation_ids": list(info.revocation_ids),
            "blocks": list(info.blocks),
        }, indent=2))

    @token.command("revoke")
    @click.argument("target", metavar="TOKEN_OR_ID")
    @_with_nats
    @click.option("--subject", "revocation_subject", default=DEFAULT_REVOCATION_SUBJECT,
                  show_default=True, help="The revocation subject of the cluster.")
    def revoke(target: str, nats_urls: tuple[str, ...], namespace: str, token_text: str,
               timeout_ms: float, revocation_subject: str, key_file: Path | None,
               roster_file: Path | None, **conn: Any) -> None:
        """Revoke a token (or a revocation id, hex) cluster-wide; --token must grant
        ``revoke`` on the revocation subject (and be held by --key)."""
        given = pop_connection(conn)
        options = client_options("worknode-call", list(nats_urls), given)
        signer = _caller(key_file, given, roster_file)
        if all(c in "0123456789abcdef" for c in target) and len(target) >= 32:
            token_id = target
        else:
            try:
                token_id = inspect(_decode(target)).token_id
            except WorknodeError as exc:
                raise click.ClickException(str(exc)) from exc
        token = _decode(token_text)
        out = _run_call(lambda: _call(options, namespace, revocation_subject, "root",
                                      "revoke", {"token_id": token_id}, token, timeout_ms,
                                      signer, roster_file is not None))
        click.echo(json.dumps(out, sort_keys=True))

    @main.command("call")
    @click.argument("subject")
    @click.argument("worknode")
    @click.argument("method")
    @click.argument("args", nargs=-1, metavar="[NAME=VALUE]...")
    @_with_nats
    def call_(subject: str, worknode: str, method: str, args: tuple[str, ...],
              nats_urls: tuple[str, ...], namespace: str, token_text: str,
              timeout_ms: float, key_file: Path | None, roster_file: Path | None,
              **conn: Any) -> None:
        """Call METHOD on WORKNODE of SUBJECT with a capability token, signed with --key (the
        token's holder); prints the result. Values are JSON when they parse as JSON, text
        otherwise."""
        given = pop_connection(conn)
        options = client_options("worknode-call", list(nats_urls), given)
        try:  # before connecting: a typo fails at once
            validate_token(subject, "subject")
            validate_token(namespace, "namespace")
            validate_token(method, "method")
            validate_node_id(worknode, allow_root=True)
        except WorknodeError as exc:
            raise click.BadParameter(str(exc)) from None
        arguments = dict(_parse_arg(a) for a in args)
        token = _decode(token_text)
        signer = _caller(key_file, given, roster_file)
        out = _run_call(lambda: _call(options, namespace, subject, worknode, method,
                                      arguments, token, timeout_ms, signer,
                                      roster_file is not None))
        click.echo(json.dumps(out, sort_keys=True))
