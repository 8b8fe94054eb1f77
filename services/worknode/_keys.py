"""Signing and NATS identities as files: ``worknode keys show | roster | add | remove | rotate |
list | nats-config | roster-from``, ``worknode roster revoke`` and the helpers
``deploy/keygen.py`` shares.

A node's identity is a 32-byte Ed25519 seed file (mode 0600, never copied); a roster is a JSON
object ``{"node-id": "<public key hex>"}`` (a node) or ``{"id": {"key": hex, "role": "healer"}}``
(any role: node, healer, writer; see ``broker.codec.parse_roster``) that every node reads to
decide whose envelopes and requests it accepts. A roster is only ever merged into, never
rebuilt from a partial list: a tool that wrote only the ids it was given would silently drop
every other node's key, and every node would then refuse that node's writes
(``unknown_signer``).

The NATS identities file (``keys add``) is one record per identity: ``{name: {role, namespace,
subjects, public_key}}`` (public data, see ``broker.transport._auth``). The same seed is the
identity's NATS credential (as an nkey) and, for the roles that sign envelopes (node, healer,
writer), its roster key: ``keys roster-from`` copies exactly those keys into a roster, so the
NATS user and the roster entry cannot drift apart. ``keys nats-config`` renders the server's
``accounts`` block from the file. The file is merged into like a roster; a name that already
has another key, role, namespace or subjects is changed only with ``--replace`` (rotation).
Seeds are never printed: ``list`` shows nkey public keys (``U...``).

``roster revoke`` drops ids as ``keys remove --roster`` does and also records their keys in
the roster's ``"$revoked"`` list: every later merge refuses those keys (``--replace`` too),
and so does every node reading the file (``parse_roster`` refuses a roster that trusts a
revoked key), so a stale copy or a tool re-run cannot trust a cut-off key again.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path

import click

from broker.codec import (
    ROSTER_ROLES,
    Revocation,
    RosterEntry,
    Signer,
    TrustRoster,
    dump_roster,
    parse_revocations,
    parse_roster,
)
from broker.errors import InvalidArgumentError
from broker.transport import (
    SIGNING_ROLES,
    NatsIdentity,
    Role,
    dump_identities,
    load_identities,
    public_of_nkey,
    render_accounts,
)
from services.worknode._service import load_or_create_signer, read_roster_entries

__all__ = [
    "merge_identities",
    "merge_roster",
    "public_key_of",
    "read_identities",
    "read_roster_file",
    "register_keys",
    "revoke_roster",
    "roster_entries",
    "write_identities",
    "write_roster",
]


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


def _write_public(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (a reader never sees half a file), mode 0644."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # public keys only: every node may read it
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _entry(value: bytes | RosterEntry) -> RosterEntry:
    """A bare key is a node's entry (the legacy roster form)."""
    return value if isinstance(value, RosterEntry) else RosterEntry(bytes(value))


def write_roster(path: Path, roster: Mapping[str, bytes | RosterEntry],
                 revoked: Iterable[Revocation] = ()) -> None:
    """Write ``roster`` to ``path`` atomically (a reader never sees half a file): a node with
    no previous key as its bare hex key, any other entry as an object, the revoked keys as
    the ``"$revoked"`` list (``dump_roster``)."""
    entries = {node_id: _entry(v) for node_id, v in roster.items()}
    _write_public(path, json.dumps(dump_roster(entries, revoked), indent=2, sort_keys=True)
                  + "\n")


def read_roster_file(path: Path) -> tuple[dict[str, RosterEntry], list[Revocation]]:
    """The entries and the revoked keys of the roster file at ``path``, read once;
    ``InvalidArgumentError`` naming the file and the first bad entry."""
    try:
        raw = json.loads(path.read_text())
        return parse_roster(raw), parse_revocations(raw)
    except OSError as exc:
        raise InvalidArgumentError(
            f"cannot read roster {path}: {exc.strerror or exc}") from None
    except ValueError as exc:  # not JSON, or an entry the parser refused
        raise InvalidArgumentError(f"cannot read roster {path}: {exc}") from None


def read_identities(path: Path) -> dict[str, NatsIdentity]:
    """The NATS identities recorded in ``path`` (``{}`` when there is no such file)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise InvalidArgumentError(
            f"cannot read identities {path}: {exc.strerror or exc}"
        ) from None
    try:
        return load_identities(text)
    except InvalidArgumentError as exc:
        raise InvalidArgumentError(f"{path}: {exc}") from None


def write_identities(path: Path, identities: Mapping[str, NatsIdentity]) -> None:
    """Write ``identities`` to ``path`` atomically (public keys only: mode 0644)."""
    _write_public(path, dump_identities(identities[name] for name in sorted(identities)))


def _describe(identity: NatsIdentity) -> str:
    subjects = ",".join(identity.subjects) or "*"
    return f"{identity.role} {identity.name} in {identity.namespace} (subjects {subjects})"


def merge_identities(
    path: Path, entries: Mapping[str, NatsIdentity], *, replace: bool = False,
    remove: frozenset[str] = frozenset(),
) -> tuple[dict[str, NatsIdentity], list[str]]:
    """Merge ``entries`` into the identities file at ``path`` (created if missing) and drop
    the names in ``remove``; every other identity is kept. A name already recorded
    differently (key, role, namespace or subjects) is an error unless ``replace`` (rotation);
    a key already used by another name is always an error (one key, one NATS user). Returns
    the identities afterwards and one line per change (the file is left untouched when
    nothing changed)."""
    identities = read_identities(path)
    changes: list[str] = []
    for name in sorted(remove):
        if identities.pop(name, None) is not None:
            changes.append(f"removed {name}")
    for name, identity in sorted(entries.items()):
        old = identities.get(name)
        if old == identity:
            continue
        if old is not None and not replace:
            raise InvalidArgumentError(
                f"{path} already records {_describe(old)} with key {old.nkey[:12]}…; "
                "pass --replace to change or rotate it"
            )
        identities[name] = identity
        changes.append(f"{'replaced' if old is not None else 'added'} {_describe(identity)} "
                       f"{identity.nkey[:12]}…")
    owners: dict[bytes, str] = {}
    for name, identity in sorted(identities.items()):
        other = owners.setdefault(identity.public_key, name)
        if other != name:
            raise InvalidArgumentError(
                f"{other} and {name} would share the key {identity.nkey[:12]}…: one key is one "
                "NATS user (give each identity its own seed)"
            )
    if changes or not path.exists():
        write_identities(path, identities)
    return identities, changes


def roster_entries(
    identities: Mapping[str, NatsIdentity], namespace: str | None = None
) -> dict[str, RosterEntry]:
    """``{name: roster entry}`` (key and role) of the identities that sign envelopes (node,
    healer, writer), of ``namespace`` only when given: what a roster must trust for them."""
    return {
        name: RosterEntry(i.public_key, str(i.role)) for name, i in identities.items()
        if i.role in SIGNING_ROLES and (namespace is None or i.namespace == namespace)
    }


def _describe_entry(node_id: str, e: RosterEntry) -> str:
    role = "" if e.role == "node" else f" ({e.role})"
    return f"{node_id}{role} {e.key.hex()[:16]}…"


def merge_roster(
    path: Path, entries: Mapping[str, bytes | RosterEntry], *, replace: bool = False,
    remove: frozenset[str] = frozenset(),
) -> tuple[dict[str, RosterEntry], list[str]]:
    """Merge ``entries`` (a bare key: role node) into the roster file at ``path`` (created if
    missing) and drop the ids in ``remove``; every other entry is kept. An id already trusted
    with a different key or role is an error unless ``replace`` (key rotation; a replaced
    entry keeps no previous key unless the new entry carries one). Returns the new roster and
    one line per change (empty when nothing changed; the file is then left untouched). A
    key the file lists as revoked is refused, ``replace`` or not: revoking is for good."""
    current, revoked = read_roster_file(path) if path.exists() else ({}, [])
    given = {node_id: _entry(v) for node_id, v in entries.items()}
    TrustRoster.from_entries(given)  # validates every id and key before anything is written
    gone = {r.key: r.node_id for r in revoked}
    for node_id, entry in sorted(given.items()):
        for key in (entry.key, entry.previous or b""):
            if key in gone:
                raise InvalidArgumentError(
                    f"{path} revoked key {key.hex()[:16]}… (of {gone[key]}): a revoked key is "
                    f"never trusted again; give {node_id} a new key")
    roster = dict(current)
    changes: list[str] = []
    for node_id, entry in sorted(given.items()):
        old = roster.get(node_id)
        if old == entry or (old is not None and entry.previous is None
                            and (old.key, old.role) == (entry.key, entry.role)):
            continue  # the same (an overlap window in force is kept)
        if old is not None and not replace:
            raise InvalidArgumentError(
                f"{path} already trusts {_describe_entry(node_id, old)}; pass --replace to "
                "rotate it or change its role"
            )
        roster[node_id] = entry
        changes.append(f"{'replaced' if old is not None else 'added'} "
                       f"{_describe_entry(node_id, entry)}")
    for node_id in sorted(remove):
        if roster.pop(node_id, None) is not None:
            changes.append(f"removed {node_id}")
    if changes or not path.exists():
        write_roster(path, roster, revoked)
    return roster, changes


def revoke_roster(path: Path, ids: Iterable[str], *, now: float
                  ) -> tuple[dict[str, RosterEntry], list[str]]:
    """Cut ``ids`` off in the roster file at ``path``: drop their entries and record their
    keys (and any previous key) in its ``"$revoked"`` list, revoked at ``now`` (Unix
    seconds), so that no later merge trusts them again. All or nothing: an id the file
    neither trusts nor has revoked is an error and nothing is written; one already revoked
    is left as it is (a second run changes nothing). Returns the roster afterwards and one
    line per change."""
    current, revoked = read_roster_file(path)
    done = {r.node_id for r in revoked}
    unknown = sorted(i for i in set(ids) if i not in current and i not in done)
    if unknown:
        raise InvalidArgumentError(
            f"{path} does not trust {', '.join(map(repr, unknown))}: nothing revoked "
            f"(it trusts {', '.join(sorted(current)) or 'nobody'})")
    changes: list[str] = []
    for node_id in sorted(set(ids)):
        entry = current.pop(node_id, None)
        if entry is None:
            changes.append(f"{node_id} was already revoked")
            continue
        for key in (entry.key, entry.previous):
            if key is not None:
                revoked.append(Revocation(node_id, key, now))
        changes.append(f"revoked {_describe_entry(node_id, entry)}")
    if any(c.startswith("revoked ") for c in changes):
        write_roster(path, current, revoked)
    return current, changes


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
    """Add the ``keys`` group (show, roster, add, remove, rotate, list, nats-config,
    roster-from) and the ``roster`` group (revoke) to the ``worknode`` group."""

    @main.group()
    def keys() -> None:
        """Signing and NATS identities: print a public key, merge a roster, rotate or remove
        a key (running nodes reload the roster), record NATS identities and render the
        server's accounts block from them."""

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
    @click.option("--role", type=click.Choice(ROSTER_ROLES), default="node", show_default=True,
                  help="The role the entries given are trusted as.")
    def roster(roster_file: Path, entries: tuple[str, ...], replace: bool,
               removed: tuple[str, ...], role: str) -> None:
        """Merge public keys into ROSTER_FILE (created if missing); every entry already in it
        is kept. An id that already has a different key is refused unless --replace. Prints
        the ids the roster trusts afterwards (with no entry: the ids it trusts now)."""
        if not entries and not removed and not roster_file.exists():
            raise click.UsageError(f"no roster at {roster_file} and nothing to add to one")
        parsed = {i: RosterEntry(k, role) for i, k in (_parse_entry(e) for e in entries)}
        if len(parsed) != len(entries):
            raise click.BadParameter("an id is given twice", param_hint="ENTRIES")
        result, changes = merge_roster(roster_file, parsed, replace=replace,
                                       remove=frozenset(removed))
        for line in changes:
            click.echo(line, err=True)
        click.echo(f"{roster_file}: {len(result)} trusted: {', '.join(sorted(result))}")

    identities_option = click.option(
        "--identities", "identities_file", required=True,
        type=click.Path(dir_okay=False, path_type=Path),
        help="The NATS identities file (JSON, public keys only).")

    @keys.command("add")
    @click.argument("name")
    @click.option("--role", required=True, type=click.Choice([str(r) for r in Role]),
                  help="What the identity may do on the bus (see 'keys list').")
    @click.option("--namespace", default="default", show_default=True)
    @click.option("--subject", "subjects", multiple=True, metavar="SUBJECT",
                  help="Grant this subject only (repeatable; none: every subject of the "
                       "namespace).")
    @click.option("--seed", "seed_file", type=click.Path(dir_okay=False, path_type=Path),
                  help="The identity's 32-byte Ed25519 seed, created (mode 0600) if missing.")
    @click.option("--public-key", "public_key", metavar="U…|HEX",
                  help="Record a key whose seed lives elsewhere (an nkey user or 64 hex "
                       "digits) instead of --seed.")
    @identities_option
    @click.option("--replace", is_flag=True,
                  help="Let NAME's record change (another key: rotation; role, subjects).")
    def add(name: str, role: str, namespace: str, subjects: tuple[str, ...],
            seed_file: Path | None, public_key: str | None, identities_file: Path,
            replace: bool) -> None:
        """Record NATS identity NAME (the roster id too, for node, healer and writer) with
        the key of its seed. Prints its nkey public key (U…); the seed is never printed."""
        if (seed_file is None) == (public_key is None):
            raise click.UsageError("give exactly one of --seed and --public-key")
        # Everything checked before a seed file is created for a name that cannot be used.
        NatsIdentity(name, Role(role), bytes(32), namespace, subjects)
        if seed_file is not None:
            key = load_or_create_signer(name, seed_file).public_key
        else:
            assert public_key is not None
            key = _parse_public_key(public_key)
        identity = NatsIdentity(name, Role(role), key, namespace, subjects)
        _, changes = merge_identities(identities_file, {name: identity}, replace=replace)
        for line in changes:
            click.echo(line, err=True)
        click.echo(identity.nkey)

    @keys.command("remove")
    @click.argument("names", nargs=-1, required=True, metavar="NAME...")
    @click.option("--identities", "identities_file", default=None,
                  type=click.Path(dir_okay=False, path_type=Path),
                  help="Drop the NATS identities from this file (then reload the servers).")
    @click.option("--roster", "roster_file", default=None,
                  type=click.Path(dir_okay=False, path_type=Path),
                  help="Drop the ids (key and any previous key) from this roster: peers "
                       "refuse them from their next reload (SIGHUP: at once).")
    def remove(names: tuple[str, ...], identities_file: Path | None,
               roster_file: Path | None) -> None:
        """Stop trusting NAMES: drop them from the identities file and/or the roster (a
        compromised key: both, then SIGHUP the nodes and reload the NATS servers; 'worknode
        roster revoke' also makes the roster refuse those keys for good)."""
        if identities_file is None and roster_file is None:
            raise click.UsageError("give --identities, --roster or both")
        for path, what in ((identities_file, "identities file"), (roster_file, "roster")):
            if path is not None and not path.exists():
                raise click.UsageError(f"no {what} at {path}")
        changes: list[str] = []
        if identities_file is not None:
            changes += merge_identities(identities_file, {}, remove=frozenset(names))[1]
        if roster_file is not None:
            changes += [f"roster: {c}" for c in
                        merge_roster(roster_file, {}, remove=frozenset(names))[1]]
        for line in changes or [f"none of {', '.join(names)} recorded: nothing removed"]:
            click.echo(line, err=True)

    @keys.command("rotate")
    @click.argument("node_id", metavar="ID")
    @click.option("--seed", "seed_file", required=True,
                  type=click.Path(dir_okay=False, path_type=Path),
                  help="ID's seed file (a node's <state_dir>/<ID>.key): replaced by a new "
                       "seed (mode 0600).")
    @click.option("--roster", "roster_file", required=True,
                  type=click.Path(exists=True, dir_okay=False, path_type=Path),
                  help="The roster to trust the new key in.")
    @click.option("--overlap", default="1h", show_default=True, metavar="DURATION",
                  help="How long peers still accept the old key (e.g. 90s, 30m, 1h, 2d).")
    @click.option("--no-overlap", is_flag=True,
                  help="Refuse the old key from the peers' next reload (a compromised key).")
    @click.option("--identities", "identities_file", default=None,
                  type=click.Path(exists=True, dir_okay=False, path_type=Path),
                  help="Also give ID's NATS identity the new key (then reload the servers).")
    def rotate(node_id: str, seed_file: Path, roster_file: Path, overlap: str,
               no_overlap: bool, identities_file: Path | None) -> None:
        """Give ID a new signing key: a new seed in --seed, the roster trusting the new key
        (and the old one until the overlap ends, unless --no-overlap). Prints the new public
        key; the seed is never printed."""
        window = 0.0 if no_overlap else _duration(overlap)
        entries = read_roster_entries(roster_file)
        current = entries.get(node_id)
        if current is None:
            raise click.UsageError(f"{roster_file} does not trust {node_id!r}: nothing to "
                                   "rotate (add it with 'worknode keys roster')")
        identity = None
        if identities_file is not None:
            identity = read_identities(identities_file).get(node_id)
            if identity is None:
                raise click.UsageError(f"{identities_file} records no identity {node_id!r}")
        new = Signer.generate(node_id)
        until = time.time() + window
        entry = RosterEntry(new.public_key, current.role,
                            None if no_overlap else current.key,
                            None if no_overlap else until)
        _write_seed(seed_file, new.seed)
        merge_roster(roster_file, {node_id: entry}, replace=True)
        if identity is not None and identities_file is not None:
            merge_identities(identities_file, {node_id: dataclasses.replace(
                identity, public_key=new.public_key)}, replace=True)
        click.echo(new.public_key.hex())
        old = ("the old key is refused from the peers' next reload" if no_overlap else
               f"peers accept the old key until {_utc(until)}")
        click.echo(f"rotated {node_id} in {roster_file}: {old}. Restart {node_id} with "
                   f"{seed_file}; give the other hosts this roster (they reload it within "
                   "key_reload_interval_s, or at once on SIGHUP).", err=True)

    @keys.command("list")
    @identities_option
    @click.option("--json", "as_json", is_flag=True, help="One JSON object per identity.")
    def list_(identities_file: Path, as_json: bool) -> None:
        """Print every identity: name, role, namespace, subjects (* for all) and its NATS
        user (nkey public key). Public data only."""
        identities = _existing(identities_file)
        for name in sorted(identities):
            i = identities[name]
            if as_json:
                click.echo(json.dumps({
                    "name": i.name, "role": str(i.role), "namespace": i.namespace,
                    "subjects": list(i.subjects), "nkey": i.nkey,
                    "public_key": i.public_key.hex()}, sort_keys=True))
            else:
                click.echo(f"{i.name}\t{i.role}\t{i.namespace}\t"
                           f"{','.join(i.subjects) or '*'}\t{i.nkey}")

    @keys.command("nats-config")
    @identities_option
    @click.option("--account", default="WORKNODE", show_default=True,
                  help="The account every identity is a user of.")
    @click.option("--jetstream/--no-jetstream", default=True, show_default=True,
                  help="Enable JetStream for the account (the server must run it).")
    def nats_config(identities_file: Path, account: str, jetstream: bool) -> None:
        """Print the nats-server ``accounts`` block (nkey users and their permissions) for
        every identity in the file; include it in the server config, reload with SIGHUP."""
        identities = _existing(identities_file)
        click.echo(render_accounts(identities.values(), account=account, jetstream=jetstream),
                   nl=False)

    @keys.command("roster-from")
    @identities_option
    @click.argument("roster_file", type=click.Path(dir_okay=False, path_type=Path))
    @click.option("--namespace", default=None,
                  help="Only the identities of this namespace (default: all).")
    @click.option("--replace", is_flag=True,
                  help="Let a rotated identity replace the key the roster trusts for it.")
    def roster_from(identities_file: Path, roster_file: Path, namespace: str | None,
                    replace: bool) -> None:
        """Merge the key of every envelope-signing identity (node, healer, writer) into
        ROSTER_FILE: the roster trusts exactly the keys the NATS users are."""
        entries = roster_entries(_existing(identities_file), namespace)
        if not entries:
            raise click.UsageError(f"{identities_file} has no node, healer or writer"
                                   + (f" in namespace {namespace!r}" if namespace else ""))
        result, changes = merge_roster(roster_file, entries, replace=replace)
        for line in changes:
            click.echo(line, err=True)
        click.echo(f"{roster_file}: {len(result)} trusted: {', '.join(sorted(result))}")

    @main.group("roster")
    def roster_group() -> None:
        """Respond to a compromised or Byzantine identity in the roster (see the README,
        "Responding to a Byzantine writer")."""

    @roster_group.command("revoke")
    @click.argument("ids", nargs=-1, required=True, metavar="ID...")
    @click.option("--roster", "roster_file", required=True, envvar="WORKNODE_ROSTER_FILE",
                  type=click.Path(dir_okay=False, path_type=Path),
                  help="The roster file the nodes read (WORKNODE_ROSTER_FILE).")
    @click.option("--identities", "identities_file", default=None,
                  type=click.Path(dir_okay=False, path_type=Path),
                  help="Also drop the NATS identities from this file (then regenerate "
                       "'keys nats-config' and reload the servers).")
    def revoke(ids: tuple[str, ...], roster_file: Path, identities_file: Path | None) -> None:
        """Cut IDS off: drop them from the roster and record their keys as revoked in it, so
        that no later 'keys roster', 'keys roster-from' or 'keys rotate' trusts those keys
        again (the id itself may come back with a new key). Nodes reading the file refuse
        the key from their next reload (key_reload_interval_s, or at once on SIGHUP); the
        writes already accepted from it stay."""
        if not roster_file.exists():
            raise click.UsageError(f"no roster at {roster_file}")
        if identities_file is not None and not identities_file.exists():
            raise click.UsageError(f"no identities file at {identities_file}")
        result, changes = revoke_roster(roster_file, ids, now=time.time())
        if identities_file is not None:
            changes += [f"identities: {c}" for c in
                        merge_identities(identities_file, {}, remove=frozenset(ids))[1]]
        for line in changes:
            click.echo(line, err=True)
        click.echo(f"nodes reading {roster_file} refuse the revoked keys from their next reload "
                   "(key_reload_interval_s, or at once on SIGHUP); give hosts that keep their "
                   "own copy this roster. Writes already accepted from them stay.", err=True)
        click.echo(f"{roster_file}: {len(result)} trusted: {', '.join(sorted(result))}; "
                   f"revoked: {', '.join(sorted(set(ids)))}")


def _existing(path: Path) -> dict[str, NatsIdentity]:
    """The identities in ``path``, which must exist and hold at least one."""
    identities = read_identities(path)
    if not identities:
        raise click.UsageError(f"no identities in {path} (add one with 'worknode keys add')")
    return identities


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration(text: str) -> float:
    """Seconds of ``90s``, ``30m``, ``1h``, ``2d`` or a bare number of seconds."""
    number, unit = (text[:-1], text[-1]) if text[-1:] in _UNITS else (text, "s")
    try:
        seconds = float(number) * _UNITS[unit]
    except ValueError:
        raise click.BadParameter(f"not a duration: {text!r} (e.g. 90s, 30m, 1h, 2d)",
                                 param_hint="--overlap") from None
    if not seconds > 0:
        raise click.BadParameter("the overlap must be positive (or use --no-overlap)",
                                 param_hint="--overlap")
    return seconds


def _utc(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _write_seed(path: Path, seed: bytes) -> None:
    """Replace the seed at ``path`` atomically, mode 0600 from the start."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # mode 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(seed)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _parse_public_key(text: str) -> bytes:
    """A 32-byte public key from an nkey user (``U...``) or 64 hex digits."""
    if text.startswith("U"):
        return public_of_nkey(text)
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise click.BadParameter("not an nkey user (U…) nor hex", param_hint="--public-key"
                                 ) from None
    if len(key) != 32:
        raise click.BadParameter(f"a public key is 32 bytes (64 hex digits), got {len(key)}",
                                 param_hint="--public-key")
    return key
