"""``worknode up | node | tail``, the write commands (``set``, ``incr``, ``add``, ``create``,
``move``; ``--strong`` for STRONG worknodes) and ``get --strong``. ``__main__``-style code only:
parse, wire, run."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import click

from broker.codec import RequestAuth, TrustRoster, WireCodec
from broker.crdt import (
    ROOT_ID,
    Assign,
    Create,
    Increment,
    KindConflict,
    OpaqueAtom,
    OpaqueValue,
    ORMap,
    validate_key,
    validate_node_id,
)
from broker.crdt._ops import TreeOp
from broker.errors import (
    CodecError,
    ConflictError,
    ConnectionRefusedByServerError,
    TransportError,
    TreeError,
    UnknownSignerError,
    WorknodeError,
)
from broker.replica import EVIDENCE_HEADER, FULL_HEADER, SYNC_HEADER, Replica
from broker.strong import StrongMode
from broker.transport import (
    ConnectOptions,
    Msg,
    NatsIdentity,
    Role,
    create_local_ca,
    delta_subject,
    heal_subject,
    render_accounts,
    validate_token,
)
from services._cli_errors import EXIT_UNCONFIRMED, error_line, run_until_signal
from services._config import load_settings, read_toml
from services._connection import client_options, pop_connection, with_connection
from services.worknode._heal_cli import DEFAULT_HEALERS, report_line
from services.worknode._service import (
    WorknodeService,
    load_or_create_signer,
    read_roster_entries,
)
from services.worknode._settings import WorknodeSettings, one_shot_settings

__all__ = ["register"]


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"bytes": value.hex()}
    if isinstance(value, OpaqueValue):
        return {"opaque_kind": value[0], "dots": value[1]}
    if isinstance(value, OpaqueAtom):
        return {"opaque_value": value.raw.hex()}
    if isinstance(value, KindConflict):
        return {"kind_conflict": {str(int(k)): _jsonable(v) for k, v in value.items()}}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (frozenset, set)):
        return sorted((_jsonable(v) for v in value), key=repr)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


# ------------------------------------------------------------------------------------------
# worknode up: the main job on the embedded default


_DEMO_SUBJECT = "demo"
_DEMO_STRONG = "lock-"
"""The demo subject's STRONG worknodes: ids starting with this (the random writers' ids,
``w000``..., are EVENTUAL)."""


def _demo_op(rng: random.Random, me: str, known: Any) -> Any:
    """One random demo write: create/move a worknode, set a status, count a visit, tag it."""
    i = rng.randrange(200)
    node = f"w{i:03d}"
    choice = rng.random()
    if node not in known or choice < 0.05:
        parent = f"w{rng.randrange(i):03d}" if i and rng.random() < 0.5 else ROOT_ID

        def place(t: Any, r: str, ts: int) -> ORMap:
            p = parent if parent == ROOT_ID or parent in t else ROOT_ID
            if node in t:
                return t.move(r, node, p, ts)  # type: ignore[no-any-return]
            return t.create(r, node, p, ts)  # type: ignore[no-any-return]

        return place
    if choice < 0.5:
        status = rng.choice(["new", "busy", "done"])
        return lambda t, r, ts: t.assign(r, node, ("status",), status, ts)
    if choice < 0.8:
        return lambda t, r, ts: t.increment(r, node, ("visits",), 1)
    return lambda t, r, ts: t.add(r, node, ("seen_by",), me)


async def _demo_writer(
    replica: Replica, writes: int, rng: random.Random, counts: list[int]
) -> None:
    """A writer streaming random writes through ``replica`` in groups of up to 50."""
    done = 0
    while done < writes:
        n = min(50, writes - done)
        ops = [_demo_op(rng, replica.node_id, replica.tree) for _ in range(n)]
        # A concurrent delete or move elsewhere can remove a node under us: a normal race.
        with contextlib.suppress(TreeError):
            await replica.write_many(ops)
        done += n
        counts[0] += n
        await asyncio.sleep(0)


def _table(echo: Callable[..., None], replicas: list[Replica]) -> list[bytes]:
    digests = [r.content_digest() for r in replicas]
    echo(f"{'node':<8} {'worknodes':>9} {'batches in':>10} {'queued':>6}  content digest")
    for r, d in zip(replicas, digests, strict=True):
        echo(f"{r.node_id:<8} {len(r.tree.nodes()):>9} {r.applied_envelopes:>10} "
             f"{r.queued_ops:>6}  {d.hex()[:32]}")
    return digests


async def _write_phase(
    echo: Callable[..., None], replicas: list[Replica], writes: int, seed: int
) -> None:
    counts = [0]
    rng = random.Random(seed)
    per = [writes // len(replicas) + (1 if i < writes % len(replicas) else 0)
           for i in range(len(replicas))]
    writers = [
        asyncio.create_task(_demo_writer(r, n, random.Random(rng.random()), counts))
        for r, n in zip(replicas, per, strict=True)
    ]
    try:
        while not all(w.done() for w in writers):
            await asyncio.sleep(0.5)
            applied = "  ".join(f"{r.node_id}: {r.applied_envelopes} batches in"
                                for r in replicas)
            echo(f"writes {counts[0]:>6}/{writes}   {applied}")
    finally:
        # Interrupted (Ctrl-C) or not, no writer outlives this phase: one left running
        # would fail against stopped replicas, unobserved ("Task exception was never
        # retrieved").
        for w in writers:
            w.cancel()
        await asyncio.gather(*writers, return_exceptions=True)
    for w in writers:
        w.result()
    for r in replicas:
        await r.flush()


async def _settle(replicas: list[Replica], seconds: float = 15.0) -> bool:
    for _ in range(int(seconds * 10)):  # wait for the last batches to arrive
        if len({r.content_digest() for r in replicas}) == 1:
            return True
        await asyncio.sleep(0.1)
    return False


def _bus_security(state_dir: Path, names: list[str], healer: str) -> tuple[dict[str, Any],
                                                                           Path]:
    """What secures the demo's bus: a local CA and the servers' certificate (client
    connections and routes), and one nkey user per process (each process's signing key)
    with its role's permissions. Returns the servers' options and the CA file."""
    ca = create_local_ca(state_dir / "tls")
    files = ca.issue("nats")
    # Routes trust a CA of their own: a certificate for a client can never join as a route.
    routes = create_local_ca(state_dir / "tls-routes").issue("route")
    identities = [
        NatsIdentity(name, Role.NODE, _public_key(state_dir / name / f"{name}.key", name),
                     "default")
        for name in names
    ]
    identities.append(NatsIdentity(
        healer, Role.HEALER, _public_key(state_dir / "healer" / f"{healer}.key", healer),
        "default"))
    options = {"tls": files, "cluster_tls": routes, "config_extra": render_accounts(identities)}
    return options, files.ca_file


def _public_key(path: Path, name: str) -> bytes:
    return load_or_create_signer(name, path).public_key


async def _refused_without_credentials(url: str, ca_file: Path) -> str:
    """What the server says to a client holding the CA but no credentials."""
    options = ConnectOptions((url,), tls_ca_file=ca_file, start_timeout=5.0)
    try:
        async with options.transport(name="worknode-up-stranger"):
            return "ACCEPTED (the bus is open!)"
    except ConnectionRefusedByServerError:
        return "refused"
    except TransportError as exc:
        return f"not connected ({exc})"


async def _up(writes: int, state_dir: Path, quiet: bool, partition: bool = True,
              insecure: bool = False) -> bool:
    from broker.chaos import NatsCluster
    from services.healer import HealerService, HealerSettings

    echo = (lambda *_a, **_k: None) if quiet else click.echo
    t0 = time.monotonic()
    secret = state_dir / "cluster.secret"
    names = [f"node-{i}" for i in (1, 2, 3)]
    server_options: dict[str, Any] = {}
    ca_file: Path | None = None
    if not insecure:
        server_options, ca_file = _bus_security(state_dir, names, "healer")
    # JetStream fsyncs every write before acknowledging it: the STRONG log's acknowledged
    # writes survive a crash (with the default 2-minute flush, Jepsen's 2025 analysis of
    # NATS lost acknowledged writes).
    server_options["sync_interval"] = "always"
    # Two clustered nats-servers whose route runs through a proxy the demo can cut.
    async with NatsCluster(state_dir / "cluster", 2, server_options=server_options) as cluster:
        await cluster.wait_routes()
        echo(f"nats-server x2 (embedded, JetStream, clustered) at {', '.join(cluster.urls)}")
        if ca_file is not None:
            echo(f"security: TLS on client connections and routes (local CA {ca_file}); "
                 "one nkey user per process (its signing key) with its role's permissions; "
                 "a client without credentials: "
                 f"{await _refused_without_credentials(cluster.urls[0], ca_file)}")
        else:
            echo("security: OFF (--insecure): no authentication, no TLS; any local process "
                 "can read and write the bus")
        placement = {"node-1": 0, "node-2": 0, "node-3": 1}
        settings = [
            WorknodeSettings(
                node_id=name,
                subjects=[_DEMO_SUBJECT],
                nats_urls=[cluster.urls[placement[name]]],
                nats_tls_ca_file=ca_file,
                nats_insecure=insecure,
                state_dir=state_dir / name,
                metrics_port=0,
                store_sync="normal",
                cluster_secret_file=secret,
                strong={_DEMO_SUBJECT: [_DEMO_STRONG]},
                strong_timeout_s=10.0,
            )
            for name in names
        ]
        hs = HealerSettings(nats_urls=[cluster.urls[0]], state_dir=state_dir / "healer",
                            nats_tls_ca_file=ca_file, nats_insecure=insecure,
                            cluster_secret_file=secret, subjects=[_DEMO_SUBJECT],
                            metrics_port=None, interval_s=3600, membership_poll_s=3600)
        roster = TrustRoster(
            {s.node_id: load_or_create_signer(s.node_id, s.key_path()).public_key for s in settings}
        )
        roster.add(hs.node_id, load_or_create_signer(hs.node_id, hs.key_path()).public_key,
                   "healer")
        services = [WorknodeService(s, roster=roster) for s in settings]
        healer = HealerService(hs, roster=roster)
        # An exit stack, not one finally block: every stop runs even when an earlier one
        # re-raises a cancellation (Ctrl-C during the clean-up).
        async with contextlib.AsyncExitStack() as stack:
            for svc in services:
                stack.push_async_callback(svc.stop)
            stack.push_async_callback(healer.stop)
            for svc in services:
                await svc.start()
                echo(f"{svc.settings.node_id}: replica of wn.default.delta.{_DEMO_SUBJECT} "
                     f"on server {placement[svc.settings.node_id]}, metrics at {svc.metrics_url}")
            replicas = [svc.replica(_DEMO_SUBJECT) for svc in services]
            await _write_phase(echo, replicas, writes, 7)
            ok = await _settle(replicas)
            echo("")
            digests = _table(echo, replicas)
            ok = len(set(digests)) == 1
            echo("")
            echo(("converged: all replicas hold identical digests" if ok
                  else "NOT converged: digests differ") + f" ({writes} writes)")
            if ok:
                ok = await _strong_demo(echo, replicas)
            if partition and ok:
                ok = await _partition_and_heal(echo, cluster, replicas, healer, writes)
            echo(f"\ndone in {time.monotonic() - t0:.1f} s")
            return ok


async def _strong_race(
    echo: Callable[..., None], what: str, racers: list[Replica],
    act: Callable[[StrongMode], Awaitable[int]],
) -> int | None:
    """Run ``act`` on every racer's STRONG side at once; print each outcome (one winner,
    the others a conflict naming the version); the winning version (None: not one winner)."""
    modes = [r.strong for r in racers]
    assert all(m is not None for m in modes)
    results = await asyncio.gather(*(act(m) for m in modes if m is not None),
                                   return_exceptions=True)
    won = None
    for r, res in zip(racers, results, strict=True):
        if isinstance(res, ConflictError):
            echo(f"  {r.node_id} {what}: conflict: {res}")
        elif isinstance(res, BaseException):
            echo(f"  {r.node_id} {what}: failed: {res}")
        else:
            echo(f"  {r.node_id} {what}: won (version {res})")
            won = res
    winners = sum(not isinstance(res, BaseException) for res in results)
    conflicts = sum(isinstance(res, ConflictError) for res in results)
    return won if winners == 1 and conflicts == len(results) - 1 else None


async def _strong_demo(echo: Callable[..., None], replicas: list[Replica]) -> bool:
    """STRONG on the demo subject: node-1 and node-3 (on different servers) race a
    create-if-absent of a lock, then a compare-and-set of its owner on the version both
    read; each time exactly one wins and the other gets a conflict naming the version.
    node-2 then reads it linearizably."""
    key = f"{_DEMO_STRONG}leader"
    echo(f"\n-- STRONG: worknodes {_DEMO_STRONG}* of {_DEMO_SUBJECT!r} are ordered through a "
         "JetStream log (R1 on one server: no fault tolerance; R3 in clusters; "
         "sync_interval: always) --")
    racers = [replicas[0], replicas[2]]
    v1 = await _strong_race(echo, f"create-if-absent {key}", racers,
                            lambda m: m.create_if_absent(key, ROOT_ID))
    if v1 is None:
        echo("STRONG: NOT exactly one winner")
        return False

    def claim(m: StrongMode) -> Awaitable[int]:
        return m.write([Assign(key, ("owner",), m.replica.node_id)], if_version=v1)

    v2 = await _strong_race(echo, f"set {key}.owner if version {v1}", racers, claim)
    if v2 is None:
        echo("STRONG: NOT exactly one winner")
        return False
    reader = replicas[1].strong
    assert reader is not None
    read = await reader.read([key])
    owner = read.state.value().get(key, {}).get("fields", {}).get("owner")
    echo(f"  {replicas[1].node_id} reads {key} (linearizable): owner {owner}, version "
         f"{read.versions[key]}")
    echo("STRONG: one winner per race, the losers told the version they lost to")
    return read.versions[key] == v2


async def _partition_and_heal(
    echo: Callable[..., None], cluster: Any, replicas: list[Replica], healer: Any, writes: int
) -> bool:
    echo("\n-- partition: server 0 {node-1, node-2} | server 1 {node-3}; both sides write --")
    cluster.partition([{0}, {1}])
    await _write_phase(echo, replicas, max(300, writes // 3), 11)
    echo("")
    _table(echo, replicas)
    echo("\n-- network healed; the healer compares Merkle roots and repairs --")
    cluster.heal()
    await cluster.wait_routes()
    await healer.start()
    # A route that is back may not carry every subscription's interest yet, so a discovery
    # can miss the replica behind it: heal again (as the healer's loop would at its next
    # poll) until every replica holds the same content.
    # A heal whose receivers owe catch-ups (dots a repair's source could not vouch for) ends
    # "catchup"; they run, and the next heal verifies: heal until one reports converged.
    outcomes: list[Any] = []
    for _ in range(5):
        new = await healer.heal_all()
        outcomes += [o for o in new if o.rounds or o.converged or not outcomes]
        settled = await _settle(replicas, seconds=3.0)
        if settled and new and all(o.converged for o in new):
            break
    for out in outcomes:
        echo("")
        echo("heal report (signed, published on wn.default.heal.demo):")
        rows = [
            ("subject", out.subject),
            ("replicas", ", ".join(out.replicas)),
            ("roots before", ", ".join(r.hex()[:12] for r in out.roots_before)),
            ("roots after", ", ".join(r.hex()[:12] for r in out.roots_after)),
            ("keys differing", str(out.divergent_keys)),
            ("keys repaired", str(out.keys_repaired)),
            ("round trips", str(out.round_trips)),
            ("bytes moved", f"{out.bytes_sent:,}"),
            ("duration", f"{out.duration_s * 1000:.0f} ms"),
            ("converged", "yes" if out.converged else "no"),
        ]
        for k, v in rows:
            echo(f"  {k:<15} {v}")
    echo("")
    digests = _table(echo, replicas)
    ok = len(set(digests)) == 1
    echo("")
    echo("healed: all replicas hold identical digests" if ok else "NOT healed: digests differ")
    return ok


# ------------------------------------------------------------------------------------------
# helpers for the network commands


def _run(main: Callable[[], Coroutine[Any, Any, Any]], *, sigterm_status: int = 143) -> Any:
    """Run a command's coroutine until it ends or a signal stops it cleanly (exit 130 on
    SIGINT); its errors reach ``WorknodeGroup.main`` (one line)."""
    return run_until_signal(main, sigterm_status=sigterm_status)


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _path(text: str) -> tuple[str, ...]:
    return tuple(text.split("."))


def _check(node: str, *, field: str | None = None, parent: str | None = None) -> None:
    """Refuse a bad worknode id, field path or parent before connecting (not after the
    connect and the catch-up)."""
    try:
        validate_node_id(node)
        if parent is not None:
            validate_node_id(parent, allow_root=True)
        if field is not None:
            for key in _path(field):
                validate_key(key)
    except WorknodeError as exc:
        raise click.BadParameter(str(exc)) from None


_common = [
    click.option("--nats-url", "nats_urls", multiple=True, required=True,
                 help="NATS server URL (repeat for a cluster)."),
    click.option("--namespace", default="default", show_default=True),
]


def _with_common(fn: Callable[..., Any]) -> Callable[..., Any]:
    for opt in reversed(_common):
        fn = opt(fn)
    return with_connection(fn)


_CONFIRM_POLL_S = 0.2
"""Pause between two read-backs while no replica holds the write yet."""
_CONFIRM_SLACK_MS = 1_000
"""A confirmation request lives its timeout and this much more."""


async def _holder_of(replica: Replica, dots: list[tuple[str, int]], within: float) -> str | None:
    """The id of a peer replica whose state holds every dot in ``dots`` (it accepted and
    applied the write), asking peers for their state until ``within`` seconds passed; None
    if none did. A peer that does not trust this writer's key does not even answer (it
    refuses the request as it refused the write)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        left = deadline - loop.time()
        if left <= 0:
            return None
        probe = replica.codec.seal(
            replica.signer, subject=replica.sync_subject,
            hlc=replica.clock.now(time.time_ns() // 1_000_000),
            sequence=replica.machine.sequence,
            # This writer's context: a peer answers with what it can vouch for to the asker
            # (its own dots, and dots the asker has seen), so the write's dots are kept.
            document=ORMap(None, replica.state.context.copy(), is_delta=True),
        )
        timeout = min(left, 2.0)
        # The catch-up request of the sync protocol, asking for a peer's full state: signed
        # (peers serve no other), living as long as this writer waits for its answer.
        headers, auth = replica.requests.sign(
            replica.sync_subject, probe, {SYNC_HEADER: "request", FULL_HEADER: "1"},
            reply_root=replica.transport.reply_root,
            lifetime_ms=math.ceil(timeout * 1000) + _CONFIRM_SLACK_MS,
        )
        try:
            # Other writers' batches the peer sends ahead of its answer (evidence) are not
            # the answer: skipped.
            replies = await replica.transport.request_many(
                replica.sync_subject, probe, timeout=timeout, headers=headers, max_replies=1,
                accept=lambda m: not (m.headers and m.headers.get(EVIDENCE_HEADER)),
            )
            reply = replies[0] if replies else None
        except TransportError:
            reply = None  # nobody answered yet: ask again until the deadline
        if reply is not None and _answers(replica, reply, auth):
            holder = _holder_in(replica, reply.data, dots)
            if holder is not None:
                return holder
        await asyncio.sleep(min(_CONFIRM_POLL_S, max(0.0, deadline - loop.time())))


def _answers(replica: Replica, reply: Msg, auth: RequestAuth) -> bool:
    """Whether ``reply`` answers the request signed ``auth`` (not a reply to an earlier one
    replayed). A replier this writer's roster does not list cannot be checked: as its
    state is read unverified (``_holder_in``), so is its reply."""
    try:
        return replica.requests.check_reply(reply, auth) != replica.node_id
    except UnknownSignerError:
        return True
    except CodecError:
        return False


def _holder_in(replica: Replica, data: bytes, dots: list[tuple[str, int]]) -> str | None:
    """The replier's id if its state (in the reply ``data``) covers ``dots``."""
    try:
        env = replica.codec.open(data, replica.roster, subject=replica.sync_subject)
    except UnknownSignerError:
        # The replier is not in this writer's roster: its answer is read unverified (the
        # writer's roster need not list every node to learn whether one holds the write).
        try:
            env = replica.codec.open(data, None, subject=replica.sync_subject)
        except CodecError:
            return None
    except CodecError:
        return None
    document = env.document
    if not isinstance(document, ORMap) or env.writer == replica.node_id:
        return None
    return env.writer if all(dot in document.context for dot in dots) else None


async def _one_write(
    subject: str,
    kw: dict[str, Any],
    mutator: Callable[[Replica], Awaitable[ORMap]],
) -> tuple[ORMap, str | None]:
    """Write as ``kw["node_id"]``, publish, and (unless ``kw["no_confirm"]``) wait for a
    peer replica holding the write; returns the delta and that peer's id (None if none)."""
    settings = one_shot_settings(kw, subject)
    # A one-shot writer is not the deployment: an open bus is the services' to report.
    async with WorknodeService(settings, warn_open_bus=False) as svc:
        replica = svc.replica(subject)
        delta = await mutator(replica)
        await replica.flush()
        if kw["no_confirm"]:
            return delta, None
        # The write's own dots: a replica whose state covers them applied it.
        dots = [d for d in delta.context.dots() if d[0] == replica.node_id]
        if not dots:  # no dot of its own: look for this writer's newest one
            dots = [(replica.node_id, replica.state.context.max_counter(replica.node_id))]
        return delta, await _holder_of(replica, dots, kw["confirm_timeout"])


def _write_and_print(
    subject: str, kw: dict[str, Any], mutator: Callable[[Replica], Awaitable[ORMap]]
) -> None:
    """One write command: connect as ``kw["node_id"]``, write, flush, print the delta, and
    fail with :data:`EXIT_UNCONFIRMED` when no replica confirmed it."""
    delta, holder = _run(lambda: _one_write(subject, kw, mutator))
    click.echo(json.dumps(_jsonable(delta.value()), sort_keys=True))
    if holder is None and not kw["no_confirm"]:
        sys.stdout.flush()
        click.echo(error_line(
            f"published, not confirmed: no replica of {subject!r} held the write within "
            f"{kw['confirm_timeout']:g} s (is writer {kw['node_id']!r} in the nodes' "
            "roster? see 'worknode keys show' and 'worknode keys roster')"), err=True)
        sys.exit(EXIT_UNCONFIRMED)


def _strong_settings(subject: str, kw: dict[str, Any]) -> WorknodeSettings:
    """A one-shot writer's settings for a STRONG operation on ``subject``: its STRONG
    prefixes from ``--strong-prefix`` or the ``strong`` setting (config or environment), as
    the nodes declare them (an id they do not declare STRONG is refused by them)."""
    prefixes = list(kw.pop("strong_prefixes", ()) or ())
    extra: dict[str, Any] = {"strong": {subject: prefixes}} if prefixes else {}
    settings = one_shot_settings(kw, subject, **extra)
    if not settings.strong.get(subject):
        raise click.UsageError(
            f"--strong needs the STRONG worknodes of {subject!r} as the nodes declare them: "
            "--strong-prefix PREFIX (or the 'strong' setting)")
    return settings


async def _strong_op(
    subject: str, kw: dict[str, Any], act: Callable[[StrongMode], Awaitable[Any]]
) -> Any:
    """Run ``act`` on a one-shot writer's STRONG side of ``subject`` (it replays the
    subject's STRONG log first: the state its compare-and-set is against)."""
    settings = _strong_settings(subject, kw)
    async with WorknodeService(settings, warn_open_bus=False) as svc:
        mode = svc.replica(subject).strong
        assert mode is not None  # settings.strong names the subject
        return await act(mode)


def _strong_write_and_print(
    subject: str, node: str, kw: dict[str, Any], op: TreeOp, if_version: int | None
) -> None:
    """A ``--strong`` write command: through the subject's STRONG log (a compare-and-set
    when ``if_version`` is given); prints the worknode's new version and value. A lost
    compare-and-set ends in one error line naming the current version."""
    kw.pop("no_confirm", None)
    kw.pop("confirm_timeout", None)

    async def act(mode: StrongMode) -> tuple[int, Any]:
        version = await mode.write([op], if_version=if_version)
        return version, mode.replica.state.value().get(node)

    version, value = _run(lambda: _strong_op(subject, kw, act))
    click.echo(json.dumps({"worknode": node, "version": version, "value": _jsonable(value)},
                          sort_keys=True))


def _write_or_strong(
    subject: str, node: str, kw: dict[str, Any], op: TreeOp,
    mutator: Callable[[Replica], Awaitable[ORMap]],
) -> None:
    strong, if_version = kw.pop("strong"), kw.pop("if_version")
    if not strong:
        if if_version is not None:
            raise click.UsageError("--if-version needs --strong")
        kw.pop("strong_prefixes", None)
        _write_and_print(subject, kw, mutator)
        return
    _strong_write_and_print(subject, node, kw, op, if_version)


_CONFIRM_HELP = """

\b
Exit status: 0 once a replica of the subject holds the write (read back over the
sync protocol); 3 (after printing the delta and "error: published, not confirmed")
when none did within --confirm-timeout: for example when the nodes' rosters lack this
writer's key, or no node serves the subject. --no-confirm exits 0 once published."""


_STRONG_HELP = """

\b
--strong: through the subject's STRONG log (JetStream, a compare-and-set on the
worknode's version), for worknodes the nodes declare STRONG; prints the new version.
--if-version N makes it conditional: if the worknode moved past N, nothing is written
and the command fails with one line naming the current version (exit 1)."""


def _strong_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("--strong-prefix", "strong_prefixes", multiple=True,
                      help="A STRONG worknode id prefix of the subject, as the nodes' "
                           "'strong' setting declares it (repeat; default: that setting).")(fn)
    return click.option("--strong", is_flag=True,
                        help="STRONG: through the subject's log (linearizable).")(fn)


def one_shot_options(fn: Any, role: str) -> Any:
    """A one-shot command's replica options (``one_shot_settings``): ``--roster``,
    ``--state-dir``, ``--node-id`` (``role``: "Writer", "Reader"), and the common ones."""
    fn = click.option("--roster", type=click.Path(exists=True, dir_okay=False,
                                                  path_type=Path),
                      help="JSON roster of trusted nodes (to read peers' catch-up).")(fn)
    fn = click.option("--state-dir", type=click.Path(path_type=Path),
                      default=Path(".worknode/cli"), show_default=True)(fn)
    fn = click.option("--node-id", default="cli", show_default=True,
                      help=f"{role} node id (its key lives in the state dir).")(fn)
    return _with_common(fn)


def _write_command(
    name: str, help_text: str, strong: bool = False
) -> Callable[[Callable[..., Any]], Any]:
    def deco(fn: Callable[..., Any]) -> Any:
        if strong:
            fn = click.option("--if-version", type=click.IntRange(min=0), default=None,
                              help="With --strong: write only if the worknode is at this "
                                   "version (0: never written).")(fn)
            fn = _strong_options(fn)
        fn = click.option("--no-confirm", is_flag=True,
                          help="Do not wait for a replica to hold the write.")(fn)
        fn = click.option("--confirm-timeout", type=click.FloatRange(min=0, min_open=True),
                          default=5.0, show_default=True,
                          help="Seconds to wait for a replica holding the write.")(fn)
        fn = one_shot_options(fn, "Writer")
        return click.command(
            name, help=help_text + _CONFIRM_HELP + (_STRONG_HELP if strong else ""))(fn)

    return deco


# ------------------------------------------------------------------------------------------
# commands


def register(main: click.Group) -> None:
    """Add the service commands to the ``worknode`` group."""

    @main.command()
    @click.option("--writes", default=3_000, show_default=True, type=click.IntRange(min=1),
                  help="Writes in total.")
    @click.option("--state-dir", type=click.Path(path_type=Path), default=None,
                  help="Keep data here (default: a temporary directory, removed after).")
    @click.option("--quiet", is_flag=True)
    @click.option("--insecure", is_flag=True,
                  help="Run the servers open: no authentication, no TLS (logs a warning).")
    def up(writes: int, state_dir: Path | None, quiet: bool, insecure: bool) -> None:
        """The main job: embedded nats-servers (TLS, one nkey user per process with its
        role's permissions), three worknodes, a writer; prove convergence. Ctrl-C stops
        everything it started and exits 130."""
        if insecure:
            logging.getLogger("worknode.up").warning(
                "--insecure: the embedded NATS servers run without authentication and TLS")
        tmp = None
        if state_dir is None:
            tmp = Path(tempfile.mkdtemp(prefix="worknode-up-"))
            state_dir = tmp
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        secret = state_dir / "cluster.secret"
        secret.unlink(missing_ok=True)
        fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(32))
        try:
            ok = _run(lambda: _up(writes, state_dir, quiet, insecure=insecure))
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
        sys.exit(0 if ok else 1)

    @main.command()
    @click.option("--config", "config_file",
                  type=click.Path(exists=True, dir_okay=False, path_type=Path),
                  help="TOML settings file (environment variables WORKNODE_* override it).")
    @click.option("--node-id", default=None, help="Overrides the configured node id.")
    def node(config_file: Path | None, node_id: str | None) -> None:
        """Run one worknode service until SIGINT/SIGTERM (then flush and stop; exit status
        130 after SIGINT, 0 after SIGTERM)."""
        kw: dict[str, Any] = {}
        if config_file is not None:
            kw["config_file"] = config_file
        if node_id is not None:
            kw["node_id"] = node_id
        settings = load_settings(WorknodeSettings, lambda: WorknodeSettings(**kw))

        async def run() -> None:
            async with WorknodeService(settings) as svc:
                click.echo(f"{settings.node_id}: serving {', '.join(settings.subjects)}; "
                           f"metrics at {svc.metrics_url}", err=True)
                try:
                    await asyncio.Event().wait()  # until a signal cancels it
                finally:
                    click.echo("stopping: flushing pending batches", err=True)

        _run(run, sigterm_status=0)

    @main.command()
    @click.option("--config", "config_file",
                  type=click.Path(exists=True, dir_okay=False, path_type=Path),
                  help="TOML settings file (WORKNODE_HEALER_* environment variables override).")
    @click.option("--once", is_flag=True, help="Heal every subject once, print, and exit.")
    def healer(config_file: Path | None, once: bool) -> None:
        """Run the healer: compare Merkle roots per subject, repair, publish heal reports
        (until SIGINT, exit status 130, or SIGTERM, 0)."""
        from broker.healing import pass_status
        from services.healer import HealerService, HealerSettings

        kw: dict[str, Any] = {}
        if config_file is not None:
            # Environment variables override the file: pass only what they do not set.
            kw = {
                k: v for k, v in read_toml(config_file).items()
                if f"WORKNODE_HEALER_{k.upper()}" not in os.environ
            }
        settings = load_settings(HealerSettings, lambda: HealerSettings(**kw))

        async def run() -> None:
            async with HealerService(settings) as svc:
                if once:
                    outcomes, failed = await svc.heal_pass()
                    for out in outcomes:
                        click.echo(
                            f"{out.subject}: {len(out.replicas)} replicas, "
                            f"{out.divergent_keys} keys differed, {out.keys_repaired} repaired, "
                            f"{out.round_trips} round trips, {out.bytes_sent} bytes, "
                            f"{out.duration_s * 1000:.0f} ms, "
                            f"{'converged' if out.converged else 'NOT converged'}"
                            f"{f' ({out.reason})' if out.reason else ''}"
                        )
                    for subject, reason in svc.skipped.items():
                        click.echo(f"{subject}: skipped ({reason.replace('_', ' ')}: fewer "
                                   "than two replicas answered, nothing to compare)")
                    if failed:
                        click.echo(f"heal failed for: {', '.join(failed)} (see the log)",
                                   err=True)
                    if svc.replicas_found == 0:
                        click.echo(f"error: no replica answered discovery in namespace "
                                   f"{settings.namespace!r} on {', '.join(settings.nats_urls)}"
                                   f" within {settings.discover_timeout_s} s: nothing healed",
                                   err=True)
                        raise SystemExit(3)
                    # A heal that did not converge is not a success: the runbook's "the next
                    # heal finds no divergence" would not hold; nor is a subject skipped.
                    status = pass_status((o.converged for o in outcomes), failed)
                    if status or svc.skipped:
                        raise SystemExit(status or 3)
                    return
                click.echo(f"healer {settings.node_id}: metrics on port {svc.metrics_port}",
                           err=True)
                await asyncio.Event().wait()  # until a signal cancels it

        _run(run, sigterm_status=0)

    @main.command()
    @click.argument("subject")
    @_with_common
    @click.option("--roster", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                  help="Verify signatures against this JSON roster (else shown unverified).")
    @click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
    @click.option("--count", type=click.IntRange(min=0), default=0,
                  help="Exit after this many envelopes (0: never).")
    @click.option("--timeout", type=click.FloatRange(min=0), default=0.0,
                  help="Exit after this many seconds (0: never).")
    @click.option("--heal", "heal_reports", is_flag=True,
                  help="Print SUBJECT's heal reports instead, each marked 'verified by healer' "
                       "or 'UNVERIFIED' (see `worknode heal verify`).")
    @click.option("--healer", "healers", multiple=True, default=DEFAULT_HEALERS,
                  show_default=True, help="With --heal: a healer identity; repeat.")
    @click.option("--kind", "kind_files", multiple=True,
                  help="Also print the worknodes each batch touches as typed objects of the "
                       "kind these files define (a model file, FILE.py:Class or schema "
                       "JSON; repeat for earlier versions: the newest is shown). Fields no "
                       "batch seen yet wrote read as their defaults.")
    def tail(subject: str, nats_urls: tuple[str, ...], namespace: str, roster: Path | None,
             as_json: bool, count: int, timeout: float, heal_reports: bool,
             healers: tuple[str, ...], kind_files: tuple[str, ...], **conn: Any) -> None:
        """Print every delta batch published on SUBJECT, decoded (a subscriber's view)."""
        from services.worknode._kinds_cli import kind_view_of, typed_lines, typed_tree
        kind_view, seen_tree = (kind_view_of(kind_files) if kind_files else None), typed_tree()
        options = client_options("worknode-tail", list(nats_urls), pop_connection(conn))
        # With its roles and previous keys: an old key inside its overlap window verifies.
        trust = (TrustRoster.from_entries(read_roster_entries(roster), now=time.time)
                 if roster else None)
        codec = WireCodec()
        ns, subject = validate_token(namespace, "namespace"), validate_token(subject, "subject")
        watched = heal_subject(ns, subject) if heal_reports else delta_subject(ns, subject)

        async def run() -> None:
            seen = 0
            done = asyncio.Event()

            async def handle(msg: Msg) -> None:
                nonlocal seen
                if heal_reports:
                    ok, line = report_line(codec, msg.data, trust, healers, subject)
                    click.echo(json.dumps({"verified": ok, "report": line}) if as_json
                               else line)
                    seen += 1
                    if count and seen >= count:
                        done.set()
                    return
                try:
                    env = codec.open(msg.data, trust)
                except WorknodeError as exc:
                    click.echo(json.dumps({"error": type(exc).__name__, "detail": str(exc)})
                               if as_json else f"! rejected: {type(exc).__name__}: {exc}")
                    return
                record = {
                    "subject": msg.subject, "writer": env.writer, "version": env.version,
                    "sequence": env.sequence, "hlc": env.hlc, "state": env.is_state,
                    "verified": env.verified, "trace_id": env.trace_id.hex(),
                    "value": _jsonable(env.document.value()),
                }
                if as_json:
                    click.echo(json.dumps(record, sort_keys=True))
                else:
                    mark = "" if env.verified else " (unverified)"
                    click.echo(f"{env.writer} #{env.sequence} v{env.version}{mark}: "
                               f"{json.dumps(record['value'], sort_keys=True)}")
                if kind_view is not None:
                    for line in typed_lines(kind_view, seen_tree, env.document):
                        click.echo(f"  {line}")
                seen += 1
                if count and seen >= count:
                    done.set()

            async with options.transport(name="worknode-tail") as transport:
                await transport.subscribe(watched, handle)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(done.wait(), timeout or None)

        _run(run)

    @_write_command("set", "Set FIELD (dotted path) of worknode NODE to VALUE (JSON or text).",
                    strong=True)
    @click.argument("subject")
    @click.argument("node_name", metavar="NODE")
    @click.argument("field")
    @click.argument("value")
    def set_(subject: str, node_name: str, field: str, value: str, **kw: Any) -> None:
        _check(node_name, field=field)
        parsed = _parse_value(value)
        _write_or_strong(subject, node_name, kw, Assign(node_name, _path(field), parsed),
                         lambda r: r.set(node_name, _path(field), parsed))

    @_write_command("incr", "Add AMOUNT (default 1) to counter FIELD of worknode NODE.",
                    strong=True)
    @click.argument("subject")
    @click.argument("node_name", metavar="NODE")
    @click.argument("field")
    @click.argument("amount", type=int, default=1)
    def incr(subject: str, node_name: str, field: str, amount: int, **kw: Any) -> None:
        _check(node_name, field=field)
        _write_or_strong(subject, node_name, kw, Increment(node_name, _path(field), amount),
                         lambda r: r.increment(node_name, _path(field), amount))

    @_write_command("add", "Add ELEMENT to set FIELD of worknode NODE.")
    @click.argument("subject")
    @click.argument("node_name", metavar="NODE")
    @click.argument("field")
    @click.argument("element")
    def add(subject: str, node_name: str, field: str, element: str, **kw: Any) -> None:
        _check(node_name, field=field)
        element_value = _parse_value(element)
        _write_and_print(subject, kw, lambda r: r.add(node_name, _path(field), element_value))

    @_write_command("create", "Create worknode NODE under PARENT (default: the root); with "
                    "--strong, only if it was never written (--if-version 0 implied).",
                    strong=True)
    @click.argument("subject")
    @click.argument("node_name", metavar="NODE")
    @click.argument("parent", default=ROOT_ID)
    def create(subject: str, node_name: str, parent: str, **kw: Any) -> None:
        _check(node_name, parent=parent)
        if kw["strong"] and kw["if_version"] is None:
            kw["if_version"] = 0  # create-if-absent
        _write_or_strong(subject, node_name, kw, Create(node_name, parent),
                         lambda r: r.create(node_name, parent))

    @click.command("get", help="Print worknode NODE of SUBJECT with --strong: a linearizable "
                   "read through the subject's STRONG log (it includes every STRONG write "
                   "acknowledged before it began) and the worknode's version.")
    @click.argument("subject")
    @click.argument("node_name", metavar="NODE")
    @click.option("--state-dir", type=click.Path(path_type=Path),
                  default=Path(".worknode/cli"), show_default=True)
    @click.option("--node-id", default="cli", show_default=True,
                  help="Reader node id (its key lives in the state dir: it signs the fence).")
    @click.option("--roster", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                  help="JSON roster of trusted nodes.")
    @_strong_options
    @_with_common
    def get(subject: str, node_name: str, **kw: Any) -> None:
        _check(node_name)
        if not kw.pop("strong"):
            raise click.UsageError("get reads STRONG worknodes: pass --strong")

        async def act(mode: StrongMode) -> tuple[int, Any]:
            read = await mode.read([node_name])
            return read.versions[node_name], read.state.value().get(node_name)

        version, value = _run(lambda: _strong_op(subject, kw, act))
        click.echo(json.dumps({"worknode": node_name, "version": version,
                               "value": _jsonable(value)}, sort_keys=True))

    @_write_command("move", "Move worknode NODE under PARENT.")
    @click.argument("subject")
    @click.argument("node_name", metavar="NODE")
    @click.argument("parent")
    def move(subject: str, node_name: str, parent: str, **kw: Any) -> None:
        _check(node_name, parent=parent)
        _write_and_print(subject, kw, lambda r: r.move(node_name, parent))

    for cmd in (set_, incr, add, create, move, get):
        main.add_command(cmd)
