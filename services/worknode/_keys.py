"""Signing identities and rosters as files: ``worknode keys show | roster`` and the helpers
``deploy/keygen.py`` shares.

A node's identity is a 32-byte Ed25519 seed file (mode 0600, never copied); a roster is a JSON
object ``{"node-id": "<public key hex>"}`` that every node reads to decide whose envelopes it
accepts. A roster is only ever merged into, never rebuilt from a partial list: a tool that
wrote only the ids it was given would silently drop every other node's key, and every node
would then refuse that node's writes (``unknown_signer``).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import click

from broker.codec import Signer, TrustRoster
from broker.errors import InvalidArgumentError
from services.worknode._service import read_roster

__all__ = ["merge_roster", "public_key_of", "register_keys", "write_roster"]


def public_key_of(node_id: str, seed_file: Path) -> bytes:
    """The public key of the signing seed in ``seed_file`` (which must exist)."""
    try:
        seed = seed_file.read_bytes()
    except OSError as exc:
        raise InvalidArgumentError(f"cannot read seed {seed_file}: {exc.strerror or exc}") from None
    if len(seed) != 32:
        raise InvalidArgumentError(f"{seed_file} is not a 32-byte Ed25519 seed "
                                   f"({len(seed)} bytes)")
    return Signer(node_id, seed).public_key


def write_roster(path: Path, roster: Mapping[str, bytes]) -> None:
    """Write ``roster`` to ``path`` atomically (a reader never sees half a file)."""
    text = json.dumps({k: v.hex() for k, v in roster.items()}, indent=2, sort_keys=True) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # public keys only: every node may read it
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def merge_roster(
    path: Path, entries: Mapping[str, bytes], *, replace: bool = False,
    remove: frozenset[str] = frozenset(),
) -> tuple[dict[str, bytes], list[str]]:
    """Merge ``entries`` into the roster file at ``path`` (created if missing) and drop the
    ids in ``remove``; every other entry is kept. An id already trusted with a different key
    is an error unless ``replace`` (key rotation). Returns the new roster and one line per
    change (empty when nothing changed; the file is then left untouched)."""
    current = read_roster(path) if path.exists() else {}
    TrustRoster(entries)  # validates every id and key before anything is written
    roster = dict(current)
    changes: list[str] = []
    for node_id, key in sorted(entries.items()):
        old = roster.get(node_id)
        if old == key:
            continue
        if old is not None and not replace:
            raise InvalidArgumentError(
                f"{path} already trusts another key for {node_id!r} "
                f"({old.hex()[:16]}…); pass --replace to rotate it"
            )
        roster[node_id] = key
        changes.append(f"{'replaced' if old is not None else 'added'} {node_id} "
                       f"{key.hex()[:16]}…")
    for node_id in sorted(remove):
        if roster.pop(node_id, None) is not None:
            changes.append(f"removed {node_id}")
    if changes or not path.exists():
        write_roster(path, roster)
    return roster, changes


def _parse_entry(text: str) -> tuple[str, bytes]:
    node_id, sep, value = text.partition("=")
    if not sep or not node_id or not value:
        raise click.BadParameter(f"entries are ID=PUBLIC_KEY_HEX or ID=@SEED_FILE, got {text!r}")
    if value.startswith("@"):
        return node_id, public_key_of(node_id, Path(value[1:]))
    try:
        key = bytes.fromhex(value)
    except ValueError:
        raise click.BadParameter(f"{node_id}: public key is not hex: {value!r}") from None
    if len(key) != 32:
        raise click.BadParameter(f"{node_id}: a public key is 32 bytes (64 hex digits), "
                                 f"got {len(key)}")
    return node_id, key


def register_keys(main: click.Group) -> None:
    """Add ``keys show`` and ``keys roster`` to the ``worknode`` group."""

    @main.group()
    def keys() -> None:
        """Signing identities: print a public key, build or merge a roster."""

    @keys.command("show")
    @click.argument("seed_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
    @click.option("--node-id", default=None,
                  help="Print a roster entry {ID: key} (JSON) instead of the bare key.")
    def show(seed_file: Path, node_id: str | None) -> None:
        """Print the public key (hex) of the Ed25519 seed in SEED_FILE (a node's
        ``<state_dir>/<node_id>.key``; the seed itself is never printed)."""
        key = public_key_of(node_id or "show", seed_file)
        if node_id is None:
            click.echo(key.hex())
        else:
            click.echo(json.dumps({node_id: key.hex()}, sort_keys=True))

    @keys.command("roster")
    @click.argument("roster_file", type=click.Path(dir_okay=False, path_type=Path))
    @click.argument("entries", nargs=-1, metavar="[ID=KEY_HEX | ID=@SEED_FILE]...")
    @click.option("--replace", is_flag=True,
                  help="Let an entry replace the key an id already has (key rotation).")
    @click.option("--remove", "removed", multiple=True, metavar="ID",
                  help="Stop trusting ID (repeatable).")
    def roster(roster_file: Path, entries: tuple[str, ...], replace: bool,
               removed: tuple[str, ...]) -> None:
        """Merge public keys into ROSTER_FILE (created if missing); every entry already in it
        is kept. An id that already has a different key is refused unless --replace. Prints
        the ids the roster trusts afterwards (with no entry: the ids it trusts now)."""
        if not entries and not removed and not roster_file.exists():
            raise click.UsageError(f"no roster at {roster_file} and nothing to add to one")
        parsed = dict(_parse_entry(e) for e in entries)
        if len(parsed) != len(entries):
            raise click.BadParameter("an id is given twice", param_hint="ENTRIES")
        result, changes = merge_roster(roster_file, parsed, replace=replace,
                                       remove=frozenset(removed))
        for line in changes:
            click.echo(line, err=True)
        click.echo(f"{roster_file}: {len(result)} trusted: {', '.join(sorted(result))}")
