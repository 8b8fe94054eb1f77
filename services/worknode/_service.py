"""The worknode service: hosts the replicas of its configured subjects on one node.

Built from ``WorknodeSettings``; ``start()``/``stop()`` are idempotent and it works as
``async with``. With no NATS URL configured it starts an embedded nats-server (JetStream, a
free loopback port, data under the state directory). A graceful stop flushes every pending
batch before it disconnects. Metrics are served at ``/metrics`` on ``metrics_host``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from prometheus_client import start_http_server

from broker.codec import RateLimiter, RosterEntry, Signer, TrustRoster, WireCodec, parse_roster
from broker.errors import InvalidArgumentError, StoreError, WorknodeError
from broker.healing import HealEndpoints, healer_identities
from broker.replica import Replica, ReplicaConfig
from broker.rpc import MethodRegistry, RpcServer
from broker.strong import StrongMode, strong_log_for
from broker.transport import (
    EmbeddedNatsServer,
    NatsIdentity,
    Role,
    Transport,
    complete_despite_cancel,
    create_local_ca,
    render_accounts,
)
from services._connection import open_server_warning
from services._reload import KeyFileWatch, TrustMetrics, roster_watch
from services.worknode._events import ReplicaEvents, TransportEvents
from services.worknode._metrics import ServiceMetrics, package_version
from services.worknode._rpc import start_rpc
from services.worknode._settings import WorknodeSettings
from services.worknode._store import ObservedStore

__all__ = [
    "MetricsEndpoint",
    "WorknodeService",
    "load_identity",
    "load_or_create_signer",
    "read_cluster_secret",
    "read_roster",
    "read_roster_entries",
]

log = logging.getLogger(__name__)

LOCAL_ADMIN = "local-admin"
"""The embedded server's second user (role admin): the operator's tools on this machine."""


def load_or_create_signer(node_id: str, path: Path) -> Signer:
    """The node's signing key from ``path`` (a 32-byte seed), created with mode 0600 if new."""
    if path.exists():
        seed = path.read_bytes()
        if len(seed) != 32:
            raise InvalidArgumentError(f"{path} is not a 32-byte Ed25519 seed")
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:  # a key others can read is a key others may hold: close it now
            try:
                path.chmod(0o600)
                log.warning("signing key %s was readable by other users (mode %o): made 0600; "
                            "consider it exposed if others could log in", path, mode)
            except OSError as exc:
                raise InvalidArgumentError(
                    f"{path} is readable by other users (mode {mode:o}) and cannot be made "
                    f"0600 ({exc.strerror or exc}): chmod 600 it") from None
        return Signer(node_id, seed)
    signer = Signer.generate(node_id)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(signer.seed)
    return signer


def read_roster_entries(path: Path | None) -> dict[str, RosterEntry]:
    """The entries of a JSON roster file (see ``broker.codec.parse_roster``: a hex key, role
    node, or ``{"key", "role", "previous", "previous_until"}``); empty if no file.
    ``InvalidArgumentError`` naming the file and the first bad entry."""
    if path is None:
        return {}
    try:
        return parse_roster(json.loads(path.read_text()))
    except OSError as exc:
        raise InvalidArgumentError(
            f"cannot read roster {path}: {exc.strerror or exc}") from None
    except ValueError as exc:  # not JSON, or an entry parse_roster refused
        raise InvalidArgumentError(f"cannot read roster {path}: {exc}") from None


def read_roster(path: Path | None) -> dict[str, bytes]:
    """``{node_id: public key}`` from a JSON roster file; empty if no file (roles and
    previous keys: ``read_roster_entries``)."""
    return {node_id: e.key for node_id, e in read_roster_entries(path).items()}


def read_cluster_secret(path: Path) -> bytes:
    """The Merkle-tree secret shared by the replicas and the healer, from ``path``;
    ``InvalidArgumentError`` naming the file if it is missing, unreadable or empty."""
    try:
        secret = path.read_bytes()
    except OSError as exc:
        raise InvalidArgumentError(
            f"cannot read the cluster secret {path}: {exc.strerror or exc}"
        ) from None
    if not secret:
        raise InvalidArgumentError(f"the cluster secret {path} is empty")
    return secret


def load_identity(node_id: str, key_path: Path, roster_file: Path | None,
                  roster: TrustRoster, role: str = "node") -> Signer:
    """This node's signer (created if new); ``roster`` gains the roster file and itself (as
    ``role``, unless the file gives it one, with the key of its own seed)."""
    signer = load_or_create_signer(node_id, key_path)
    for node, entry in read_roster_entries(roster_file).items():
        roster.add(node, entry.key, entry.role, previous=entry.previous,
                   previous_until=entry.previous_until)
    roster.add(node_id, signer.public_key, roster.role_of(node_id) or role)
    return signer


class MetricsEndpoint:
    """``/metrics`` of one registry over HTTP (prometheus-client's server), stoppable."""

    def __init__(self) -> None:
        self._server: Any = None
        self.port: int | None = None

    def start(self, host: str, port: int | None, registry: Any) -> None:
        """Serve ``registry`` on ``host:port`` (0 picks a free port; None serves nothing)."""
        if port is not None and self._server is None:
            try:
                self._server, _ = start_http_server(port, addr=host, registry=registry)
            except OSError as exc:  # in use, or a host this machine does not have
                raise InvalidArgumentError(
                    f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}"
                ) from exc
            self.port = int(self._server.server_port)

    def stop(self) -> None:
        """Stop serving (idempotent)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class WorknodeService:
    """One node: a transport, a durable store, and a replica per configured subject.

    ``warn_open_bus=False`` keeps the open-bus warning out of the log (one-shot commands such
    as ``worknode set``; ``worknode_nats_open_connection`` is set either way)."""

    def __init__(
        self,
        settings: WorknodeSettings,
        *,
        transport: Transport | None = None,
        roster: TrustRoster | None = None,
        rpc_methods: MethodRegistry | None = None,
        warn_open_bus: bool = True,
    ) -> None:
        self.settings = settings
        self._warn_open_bus = warn_open_bus
        self.metrics = ServiceMetrics(
            settings.hosted_subjects(), package_version(), settings.wire_version,
            settings.peer_version,
        )
        self.rpc_methods = rpc_methods
        self.rpc: RpcServer | None = None
        self._given_transport = transport
        self.transport: Transport | None = transport
        self.server: EmbeddedNatsServer | None = None
        self.store: ObservedStore | None = None
        self.events = ReplicaEvents(self.metrics, settings.node_id)
        self.signer: Signer | None = None
        # The wall clock ends rotation overlap windows (a roster given in keeps its own).
        self.roster = roster if roster is not None else TrustRoster(now=time.time)
        self.trust_metrics = TrustMetrics(self.metrics.registry)
        self.trust_metrics.watch_roster(self.roster)
        self.key_watches: list[KeyFileWatch] = []
        """The roster's and the RPC keyring's file watches (reload on change or SIGHUP)."""
        self.replicas: dict[str, Replica] = {}
        self._metrics_http = MetricsEndpoint()
        self._gauges: asyncio.Task[None] | None = None
        self._lock_fd: int | None = None
        self.heal_endpoints: HealEndpoints | None = None
        self._running = False

    # -- lifecycle -------------------------------------------------------------------------

    def _healer_ids(self) -> frozenset[str]:
        return healer_identities(self.roster, self.settings.healers)

    def _replica_ids(self) -> frozenset[str]:
        return self.roster.with_role("node") | self.roster.with_role("writer")

    async def start(self) -> None:
        """Start (idempotent). On failure, whatever started is stopped again."""
        if self._running:
            return
        try:
            await self._start()
        except BaseException:
            await self._teardown()
            raise
        self._running = True

    async def _start(self) -> None:
        s = self.settings
        s.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # keys, store: owner only
        os.chmod(s.state_dir, 0o700)  # one that existed already too
        self._lock_state_dir()
        self.signer = load_identity(s.node_id, s.key_path(), s.roster_file, self.roster)
        if s.roster_file is not None:
            self.key_watches.append(roster_watch(
                self.roster, s.roster_file, s.node_id, self.signer.public_key,
                read=read_roster_entries, role="node", metrics=self.trust_metrics,
                interval_s=s.key_reload_interval_s))
        # Read before connecting: a missing secret fails at once, not after the connect.
        secret = (None if s.cluster_secret_file is None
                  else read_cluster_secret(s.cluster_secret_file))
        if self.transport is None:
            urls = list(s.nats_urls)
            options = s.connect_options(s.node_id, urls=urls or ["nats://127.0.0.1:4222"],
                                        signing_key=s.key_path())  # checked before any start
            if not urls:
                server_options: dict[str, Any] = {}
                if not s.nats_insecure:
                    server_options = self._secure_embedded()
                    options = dataclasses.replace(
                        options, tls_ca_file=server_options["tls"].ca_file)
                self.server = EmbeddedNatsServer(s.state_dir / "nats", **server_options)
                await self.server.start()
                options = dataclasses.replace(options, urls=(self.server.url,))
                log.info("%s: embedded nats-server at %s (%s)", s.node_id, self.server.url,
                         "OPEN: nats_insecure" if s.nats_insecure else
                         f"TLS with the CA {server_options['tls'].ca_file}; users: this node "
                         f"and {LOCAL_ADMIN} (seed {s.state_dir / f'{LOCAL_ADMIN}.key'})")
            self.transport = options.transport(
                name=s.node_id, observer=TransportEvents(self.metrics, self))
        await self.transport.start()
        self._check_open_connection()
        self.store = ObservedStore(
            s.state_dir / "worknode.db", synchronous=s.store_sync,
            on_error=lambda op, _exc: self.metrics.store_errors.labels(op).inc(),
        )
        self.store.open()
        codec = WireCodec(
            s.wire_version,
            max_payload=self.transport.max_payload,
            peer_version=min(s.peer_version, s.wire_version),
        )
        for subject in s.hosted_subjects():
            replica = Replica(
                signer=self.signer,
                roster=self.roster,
                codec=codec,
                transport=self.transport,
                store=self.store,
                config=ReplicaConfig(
                    namespace=s.namespace,
                    subject=subject,
                    flush_interval=s.flush_interval_ms / 1000,
                    adaptive_flush=s.adaptive_flush,
                    max_batch_ops=s.max_batch_ops,
                    max_batch_bytes=max(4096, self.transport.max_payload // 4),
                    max_pending_ops=s.max_pending_ops,
                    snapshot_every=s.snapshot_every,
                    max_hold=s.byzantine_max_hold_s,
                    max_evidence_bytes=s.evidence_max_bytes,
                    add_only=s.add_only(subject),
                    strong_prefixes=tuple(s.strong.get(subject, ())),
                ),
                observer=self.events,
                # Catch-up is served to replicas (nodes and one-shot writers), never to the
                # healer or a stranger; read on each request, so a roster reload counts.
                serve_to=self._replica_ids,
            )
            self.metrics.pending_ops_limit.labels(subject).set(s.max_pending_ops)
            self.replicas[subject] = replica
        # Together: each start ends with its first catch-up, which a node alone waits out
        # (catchup_timeout, 2 s); one after the other, a lone node with N subjects took 2N s.
        # A failing start cancels the others and its error (not a group) goes to the caller,
        # whose teardown stops every replica.
        starts = [asyncio.create_task(r.start()) for r in self.replicas.values()]
        try:
            await asyncio.gather(*starts)
        except BaseException:
            for task in starts:
                task.cancel()
            await asyncio.gather(*starts, return_exceptions=True)
            raise
        for subject, replica in self.replicas.items():
            if s.strong.get(subject):
                mode = StrongMode(replica, strong_log_for(
                    self.transport, s.namespace, subject, replicas=s.strong_replicas,
                    timeout=s.strong_timeout_s, max_keys=s.strong_max_worknodes),
                    timeout=s.strong_timeout_s, observer=self.metrics)
                replica.strong = mode
                await mode.start()
        self.metrics.export_strong(self._strong_state)
        if secret is not None:
            self.heal_endpoints = HealEndpoints(
                transport=self.transport,
                namespace=s.namespace,
                replicas=self.replicas,
                signer=self.signer,
                roster=self.roster,
                codec=codec,
                secret=secret,
                healers=self._healer_ids,
                limiter=RateLimiter(s.heal_rate_per_s, s.heal_burst),
            )
            self.metrics.export_heal_rejects(lambda: self.heal_endpoints.rejected)  # type: ignore[union-attr]
            await self.heal_endpoints.start()
        if s.rpc_keyring_file is not None:
            self.rpc = await start_rpc(self, codec, self.rpc_methods)
        self._metrics_http.start(s.metrics_host, s.metrics_port, self.metrics.registry)
        self._gauges = asyncio.create_task(self._update_gauges())
        for watch in self.key_watches:
            watch.start()

    def _secure_embedded(self) -> dict[str, Any]:
        """The embedded server's security: TLS from a local CA under the state directory,
        and two nkey users, this node (its signing key) and ``LOCAL_ADMIN`` (a seed made
        beside it, 0600) for the operator's local tools (``tail``, ``call``, writes)."""
        s = self.settings
        assert self.signer is not None
        ca = create_local_ca(s.state_dir / "tls")
        admin = load_or_create_signer(LOCAL_ADMIN, s.state_dir / f"{LOCAL_ADMIN}.key")
        users = [NatsIdentity(s.node_id, Role.NODE, self.signer.public_key, s.namespace),
                 NatsIdentity(LOCAL_ADMIN, Role.ADMIN, admin.public_key, s.namespace)]
        return {"tls": ca.issue("nats"), "config_extra": render_accounts(users)}

    def _check_open_connection(self) -> None:
        """Warn (and set ``worknode_nats_open_connection``) when the NATS connection is
        unauthenticated or in the clear (``nats_insecure`` only changes the words)."""
        warning = open_server_warning(self.transport, acknowledged=self.settings.nats_insecure)
        self.metrics.nats_open.set(0 if warning is None else 1)
        if warning is not None and self._warn_open_bus:
            log.warning("%s: %s", self.settings.node_id, warning)

    def _lock_state_dir(self) -> None:
        """One process per state directory: two writers on one store would break its log."""
        path = self.settings.state_dir / "worknode.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise StoreError(
                f"{self.settings.state_dir} is in use by another worknode process"
            ) from None
        self._lock_fd = fd

    async def stop(self) -> None:
        """Flush pending batches, then stop everything (idempotent)."""
        if not self._running:
            return
        self._running = False
        await complete_despite_cancel(self._teardown())

    async def _teardown(self) -> None:
        for watch in self.key_watches:
            await watch.stop()
        self.key_watches.clear()
        if self._gauges is not None:
            self._gauges.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._gauges
            self._gauges = None
        if self.rpc is not None:
            with contextlib.suppress(WorknodeError):
                await self.rpc.stop()
            self.rpc = None
        if self.heal_endpoints is not None:
            with contextlib.suppress(WorknodeError):
                await self.heal_endpoints.stop()
            self.heal_endpoints = None
        for replica in self.replicas.values():
            if replica.strong is not None:
                with contextlib.suppress(WorknodeError):
                    await replica.strong.stop()
        for replica in self.replicas.values():
            with contextlib.suppress(WorknodeError):
                await replica.stop()
        self.replicas.clear()
        if self.transport is not None and self._given_transport is None:
            with contextlib.suppress(WorknodeError):
                await self.transport.stop()
            self.transport = None
        if self.store is not None:
            self.store.close()
            self.store = None
        if self.server is not None:
            await self.server.stop()
            self.server = None
        self._metrics_http.stop()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    async def __aenter__(self) -> WorknodeService:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def reload_keys(self) -> bool:
        """Reload the roster and RPC keyring files now (what SIGHUP does); False if any was
        refused (the keys in force are kept; logged and counted)."""
        return all([watch.reload() for watch in self.key_watches])

    # -- access ----------------------------------------------------------------------------

    def replica(self, subject: str) -> Replica:
        """The replica of a configured subject."""
        try:
            return self.replicas[subject]
        except KeyError:
            raise InvalidArgumentError(
                f"subject {subject!r} is not configured on {self.settings.node_id}"
            ) from None

    def _strong_state(self) -> dict[str, tuple[bool, int]]:
        """subject -> (STRONG available, log sequence applied), for the metrics."""
        return {subject: (r.strong.available, r.strong.applied)
                for subject, r in self.replicas.items() if r.strong is not None}

    @property
    def metrics_port(self) -> int | None:
        """The port ``/metrics`` is served on (None when not serving)."""
        return self._metrics_http.port

    @property
    def metrics_url(self) -> str | None:
        """``http://host:port/metrics`` while serving metrics."""
        if self.metrics_port is None:
            return None
        return f"http://{self.settings.metrics_host}:{self.metrics_port}/metrics"

    async def _update_gauges(self) -> None:
        while True:
            for subject, r in self.replicas.items():
                self.metrics.keys.labels(subject).set(len(r.state))
                self.metrics.pending_ops.labels(subject).set(r.queued_ops)
            await asyncio.sleep(1.0)
