"""The healer: finds replicas, compares Merkle roots per subject, repairs what differs.

Per subject, one heal:

1. ask every replica for its root (in parallel); equal roots: nothing to do. The request
   asks for the top two levels' values as well, unless the replica's root is still the one
   all replicas agreed on after the last heal (so replicas in sync cost one small root
   reply each);
2. otherwise group replicas by (root, item count): replicas of one group hold the same
   items. Reconcile a *hub* (the replica with the most items) with one member of each other
   group: the pure ``Reconciliation`` names the differing keys in at most depth - 1 round
   trips after the roots; both sides' entries for those keys are fetched (signed by each
   replica) and the repair deltas of ``broker.repair`` are pushed (signed by the healer)
   to every member of both groups. A repair delta is a piece of the other side's state, so
   joining it is safe on any replica, and on a replica holding the same items as the one
   it was computed for it does exactly the same — so the hub's group ends with the join of
   everyone, and each other group with the join of itself and the hub;
3. re-check the roots; while they differ (writes landed meanwhile, or the first pass gave
   early groups an older hub), repeat, up to ``max_rounds``. Node values travel cut to
   ``hash_bytes`` bytes (see ``broker.healing``); a round that found no key while roots
   differed is followed by one with whole values, so a truncation collision never hides a
   difference for good;
4. publish a signed heal report on ``wn.<ns>.heal.<subject>``: replicas, roots before and
   after, keys repaired, bytes, round trips (waves of requests sent in parallel: root
   fetches, descent rounds, fetches, pushes), duration, and whether all roots agree.

Heals run every ``interval_s`` and at once when membership changes (a replica appears,
disappears or restarts with a new service id). Bytes moved are throttled to
``bytes_per_second``. ``start()``/``stop()`` are idempotent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Final

from broker.codec import REPORT_DOMAIN, Signer, TrustRoster, WireCodec
from broker.crdt import ORMap
from broker.errors import WorknodeError
from broker.healing import REPLICA_SERVICE, HealClient, RootView
from broker.merkle import HASH_SIZE, Diff
from broker.repair import repair_deltas
from broker.transport import NatsTransport, Transport, discover, heal_subject
from services.healer._metrics import HealerMetrics
from services.healer._settings import HealerSettings
from services.worknode import MetricsEndpoint, load_identity

__all__ = ["ROOT_LEVELS", "HealOutcome", "HealerService"]

log = logging.getLogger(__name__)

ROOT_LEVELS = 2
"""Levels below the root a root request asks for (272 values at fan-out 16): two round trips
saved whenever roots differ."""


@dataclass
class HealOutcome:
    """What one heal of one subject did (also the content of its report)."""

    subject: str
    replicas: list[str]
    roots_before: list[bytes]
    roots_after: list[bytes] = field(default_factory=list)
    divergent_keys: int = 0
    keys_repaired: int = 0
    bytes_sent: int = 0
    round_trips: int = 0
    rounds: int = 0
    duration_s: float = 0.0
    converged: bool = False
    published: bool = False
    # where the time went (seconds): root requests, identification, fetch + push of states
    phases: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))


PHASES: Final[tuple[str, ...]] = ("roots", "identify", "repair")


async def _none() -> None:
    return None


class HealerService:
    """See module doc."""

    def __init__(
        self,
        settings: HealerSettings,
        *,
        transport: Transport | None = None,
        roster: TrustRoster | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = HealerMetrics(settings.subjects)
        self._given_transport = transport
        self.transport: Transport | None = transport
        self.roster = roster if roster is not None else TrustRoster()
        self.signer: Signer | None = None
        self.secret = b""
        self.codec = WireCodec()
        self._task: asyncio.Task[None] | None = None
        self._membership: frozenset[tuple[str, str]] = frozenset()
        self._answers = 0  # replica services (any namespace) that answered the last discovery
        self._forced = False  # trigger(): heal at the next wake whatever the membership
        self.failed_subjects: list[str] = []  # subjects whose heal failed in the last pass
        self._wake = asyncio.Event()
        self._metrics_http = MetricsEndpoint()
        self.reports: list[HealOutcome] = []
        self._lock = asyncio.Lock()
        self._running = False
        self._agreed: dict[str, bytes] = {}  # subject -> the root all replicas last agreed on
        self._scheme_warnings: set[tuple[str, tuple[str, ...], int, int]] = set()

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the heal loop (idempotent)."""
        if self._running:
            return
        try:
            await self._start()
        except BaseException:
            self._running = True  # let stop() release whatever started
            await self.stop()
            raise

    async def _start(self) -> None:
        s = self.settings
        s.state_dir.mkdir(parents=True, exist_ok=True)
        self.signer = load_identity(s.node_id, s.key_path(), s.roster_file, self.roster)
        self.secret = s.cluster_secret_file.read_bytes()
        if self.transport is None:
            self.transport = NatsTransport(s.nats_urls, name=s.node_id)
        await self.transport.start()
        self.codec = WireCodec(max_payload=self.transport.max_payload)
        self._metrics_http.start(s.metrics_host, s.metrics_port, self.metrics.registry)
        self._running = True
        self._task = asyncio.create_task(self._loop(), name="healer")

    async def stop(self) -> None:
        """Stop the loop (a heal in progress is cancelled; replicas stay consistent: every
        repair is a join). Idempotent."""
        if not self._running:
            return
        self._running = False
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self.transport is not None and self._given_transport is None:
            with contextlib.suppress(WorknodeError):
                await self.transport.stop()
            self.transport = None
        self._metrics_http.stop()

    @property
    def metrics_port(self) -> int | None:
        """The port ``/metrics`` is served on (None when not serving)."""
        return self._metrics_http.port

    async def __aenter__(self) -> HealerService:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- loop ------------------------------------------------------------------------------

    async def _loop(self) -> None:
        s = self.settings
        next_heal = 0.0
        while True:
            try:
                # A poll ends discover_idle_s after the last answer once as many replicas
                # answered as last time, so a replica that comes back (a healed partition)
                # is healed at once; a scheduled or triggered heal waits the whole
                # discover_timeout_s, so a replica that always answers late is found then.
                due = self._forced or time.monotonic() >= next_heal
                members = await self._discover(
                    idle=0.0 if due else s.discover_idle_s, min_replies=self._answers
                )
                changed = frozenset((m[0], m[1]) for m in members) != self._membership
                if changed or due:
                    self._forced = False
                    self._membership = frozenset((m[0], m[1]) for m in members)
                    outcomes, failed = await self.heal_pass(members)
                    self.failed_subjects = failed
                    # A failed heal, or one still moving, is retried soon, not an interval later.
                    settled = all(o.converged for o in outcomes) and not failed
                    next_heal = time.monotonic() + (s.interval_s if settled else s.retry_s)
            except WorknodeError as exc:
                self.metrics.loop_errors.inc()
                next_heal = min(next_heal, time.monotonic() + s.retry_s)
                log.warning("heal loop: %s", exc)
            except Exception:  # a bug must not end healing for good: logged, counted, retried
                self.metrics.loop_errors.inc()
                next_heal = min(next_heal, time.monotonic() + s.retry_s)
                log.exception("heal loop: unexpected error")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(s.membership_poll_s):
                    await self._wake.wait()
            self._wake.clear()

    def trigger(self) -> None:
        """Heal every subject at once (as after a membership change), with a full discovery."""
        self._forced = True
        self._wake.set()

    async def _discover(
        self, idle: float = 0.0, min_replies: int = 0
    ) -> list[tuple[str, str, list[str]]]:
        """``(node, service id, subjects)`` of every replica service in the namespace, waiting
        ``discover_timeout_s`` for answers, or (``idle``) until ``idle`` seconds pass without
        another answer once ``min_replies`` came."""
        assert self.transport is not None
        out = []
        s = self.settings
        found = await discover(
            self.transport, REPLICA_SERVICE, timeout=s.discover_timeout_s, idle=idle,
            min_replies=min_replies,
        )
        self._answers = len(found)
        for info in found:
            if info.metadata.get("namespace") != self.settings.namespace:
                continue
            subjects = [x for x in info.metadata.get("subjects", "").split(",") if x]
            out.append((info.metadata.get("node", ""), info.id, subjects))
        return out

    async def heal_all(
        self, members: list[tuple[str, str, list[str]]] | None = None
    ) -> list[HealOutcome]:
        """Heal every subject (of the configured ones, or all served) once; ``failed_subjects``
        then names the ones whose heal failed. Without ``members``, discovery waits the whole
        ``discover_timeout_s``: a one-shot heal has no next poll to find a replica that
        answered late."""
        outcomes, self.failed_subjects = await self.heal_pass(members)
        return outcomes

    async def heal_pass(
        self, members: list[tuple[str, str, list[str]]] | None = None
    ) -> tuple[list[HealOutcome], list[str]]:
        """``heal_all``, returning ``(outcomes, subjects whose heal failed)`` of this pass
        alone (the loop's passes may run beside it)."""
        if members is None:
            members = await self._discover()
        by_subject: dict[str, list[str]] = {}
        for node, _, subjects in members:
            for subject in subjects:
                if not self.settings.subjects or subject in self.settings.subjects:
                    by_subject.setdefault(subject, []).append(node)
        outcomes: list[HealOutcome] = []
        failed: list[str] = []
        for subject, nodes in sorted(by_subject.items()):
            self.metrics.replicas.labels(self.metrics.label(subject)).set(len(nodes))
            if len(nodes) < 2:
                continue
            try:
                outcomes.append(await self.heal_subject(subject, sorted(nodes)))
            except Exception as exc:  # counted, logged; the loop retries after retry_s
                failed.append(subject)
                label = self.metrics.label(subject)
                self.metrics.failures.labels(label).inc()
                self.metrics.heals.labels(label, "failed").inc()
                if isinstance(exc, WorknodeError):
                    log.warning("heal of %s failed: %s", subject, exc)
                else:
                    log.exception("heal of %s failed: unexpected error", subject)
        return outcomes, failed

    # -- one subject -------------------------------------------------------------------------

    def _client(self) -> HealClient:
        assert self.transport is not None
        assert self.signer is not None
        return HealClient(
            self.transport,
            namespace=self.settings.namespace,
            codec=self.codec,
            signer=self.signer,
            roster=self.roster,
            timeout=self.settings.request_timeout_s,
        )

    async def heal_subject(self, subject: str, nodes: list[str]) -> HealOutcome:
        """Heal one subject among ``nodes`` (see module doc). Heals of one healer never
        overlap (the loop and explicit calls share a lock); heals by several healers at
        once are safe too, only wasteful: every repair is a join of consistent snapshots."""
        async with self._lock:
            return await self._heal_subject(subject, nodes)

    async def _roots(
        self, client: HealClient, subject: str, nodes: list[str], width: int,
        phases: dict[str, float],
    ) -> dict[str, RootView]:
        t0 = time.monotonic()
        unless = self._agreed.get(subject, b"")
        views = await asyncio.gather(
            *(client.root(subject, n, levels=ROOT_LEVELS, width=width, unless=unless)
              for n in nodes)
        )
        phases["roots"] += time.monotonic() - t0
        return dict(zip(nodes, views, strict=True))

    async def _heal_subject(self, subject: str, nodes: list[str]) -> HealOutcome:
        t0 = time.monotonic()
        client = self._client()
        label = self.metrics.label(subject)
        width = self.settings.hash_bytes
        phases = dict.fromkeys(PHASES, 0.0)
        roots = await self._roots(client, subject, nodes, width, phases)
        waves = 1
        out = HealOutcome(subject, nodes, [roots[n].root for n in nodes], phases=phases)
        for _ in range(self.settings.max_rounds):
            if len({(r.root, r.count) for r in roots.values()}) == 1:
                out.converged = True
                break
            out.rounds += 1
            self.metrics.rounds.labels(label).inc()
            groups: dict[tuple[bytes, int, int], list[str]] = {}
            for n in nodes:
                groups.setdefault((roots[n].root, roots[n].count, roots[n].scheme), []).append(n)
            hub = max(nodes, key=lambda n: (roots[n].count, n))
            hub_group = groups.pop((roots[hub].root, roots[hub].count, roots[hub].scheme))
            found_any = False
            for members in groups.values():
                other = roots[members[0]]
                if other.scheme != roots[hub].scheme:
                    # A rolling upgrade: trees of different schemes cannot be compared. Said
                    # once per replica set, not at every retry.
                    note = (subject, tuple(members), other.scheme, roots[hub].scheme)
                    if note not in self._scheme_warnings:
                        self._scheme_warnings.add(note)
                        log.warning(
                            "heal of %s: replicas %s use tree scheme %d, the hub %s scheme %d; "
                            "they are healed once they run the same release",
                            subject, members, other.scheme, hub, roots[hub].scheme,
                        )
                    continue
                found, repaired, trips = await self._pair(
                    client, subject, roots[hub], other, hub_group, members, out.phases
                )
                found_any = found_any or found > 0
                if out.rounds == 1:
                    out.divergent_keys += found
                out.keys_repaired += repaired
                waves += trips
            # A round that found nothing while roots differ may have met a collision of cut
            # values (or writes racing it): the next round compares whole values.
            width = self.settings.hash_bytes if found_any else HASH_SIZE
            roots = await self._roots(client, subject, nodes, width, phases)
            waves += 1
        else:
            out.converged = len({(r.root, r.count) for r in roots.values()}) == 1
        if out.converged:
            self._agreed[subject] = roots[nodes[0]].root
            self._scheme_warnings = {w for w in self._scheme_warnings if w[0] != subject}
        out.roots_after = [roots[n].root for n in nodes]
        out.bytes_sent = client.bytes_sent + client.bytes_received
        out.round_trips = waves
        out.duration_s = time.monotonic() - t0
        self._record(out)
        if out.rounds:
            log.info(
                "heal of %s: %d replicas, %d keys differed, %d pushed, %d waves, %d bytes, "
                "%.0f ms (roots %.0f, identify %.0f, repair %.0f), %s",
                subject, len(nodes), out.divergent_keys, out.keys_repaired, out.round_trips,
                out.bytes_sent, out.duration_s * 1000,
                *(out.phases[p] * 1000 for p in PHASES),
                "converged" if out.converged else "NOT converged",
            )
        if out.rounds:
            await self._publish_report(out)
        return out

    async def _pair(
        self,
        client: HealClient,
        subject: str,
        left: RootView,
        right: RootView,
        left_group: list[str],
        right_group: list[str],
        phases: dict[str, float],
    ) -> tuple[int, int, int]:
        """Reconcile ``left`` with ``right``; push the repairs to every member of their
        groups (replicas holding the same items). Returns (keys found, keys pushed, waves)."""
        item_width = self.settings.item_bytes if left.width < HASH_SIZE else 0
        t0 = time.monotonic()
        result = await client.identify(subject, left, right, self.secret, item_width)
        phases["identify"] += time.monotonic() - t0
        await self._throttle(client)
        waves = result.round_trips
        t0 = time.monotonic()
        try:
            if result.left_items or result.right_items:
                found, pushed, more = await self._repair_items(
                    client, subject, left, right, left_group, right_group, result, item_width
                )
                return found, pushed, waves + more
            pushed, more = await self._repair_keys(
                client, subject, left, right, left_group, right_group, list(result.keys)
            )
            return len(result.keys), pushed, waves + more
        finally:
            phases["repair"] += time.monotonic() - t0

    async def _repair_keys(
        self,
        client: HealClient,
        subject: str,
        left: RootView,
        right: RootView,
        left_group: list[str],
        right_group: list[str],
        keys: list[str],
    ) -> tuple[int, int]:
        """Repair ``keys`` (a whole-values reconciliation names them): fetch both sides'
        entries, push the repairs to both groups. Returns (entries pushed, waves)."""
        pushed = waves = 0
        batch = self.settings.fetch_batch
        for i in range(0, len(keys), batch):
            chunk = keys[i : i + batch]
            # Ask both sides for every key of the chunk, even one the diff said a side lacks:
            # it may hold it by now, and a side's context is only a valid removal proof
            # together with its entries for the same keys at the same moment.
            a, b = await asyncio.gather(
                client.fetch(subject, left.node, chunk),
                client.fetch(subject, right.node, chunk),
            )
            to_left, to_right = repair_deltas(a, b, chunk)
            pushes = [(n, to_left) for n in left_group if to_left.store]
            pushes += [(n, to_right) for n in right_group if to_right.store]
            pushed += await client.apply_all(subject, pushes)
            waves += 2 if pushes else 1
            await self._throttle(client)
        return pushed, waves

    async def _repair_items(
        self,
        client: HealClient,
        subject: str,
        left: RootView,
        right: RootView,
        left_group: list[str],
        right_group: list[str],
        result: Diff,
        width: int,
    ) -> tuple[int, int, int]:
        """Repair what a digests-only reconciliation found: fetch each side's unmatched items
        (the replica names their keys), then, for a key only one side named, the other
        side's entry by key (so every side's entries and context come from one moment), and
        push the repairs. Returns (keys found, keys pushed, waves)."""
        bits = left.fanout.bit_length() - 1

        def index(prefix: tuple[int, ...]) -> int:
            value = 0
            for digit in prefix:
                value = (value << bits) | digit
            return value

        lhs = [(index(p), d) for p, d in result.left_items]
        rhs = [(index(p), d) for p, d in result.right_items]
        found: set[str] = set()
        pushed = waves = 0
        batch = self.settings.fetch_batch
        for i in range(0, max(len(lhs), len(rhs)), batch):
            a1, b1 = await asyncio.gather(
                client.fetch(subject, left.node, [], lhs[i : i + batch], width),
                client.fetch(subject, right.node, [], rhs[i : i + batch], width),
            )
            waves += 1
            ka, kb = set(a1.store or ()), set(b1.store or ())
            only_a, only_b = sorted(ka - kb), sorted(kb - ka)
            fetches = [
                client.fetch(subject, right.node, only_a) if only_a else _none(),
                client.fetch(subject, left.node, only_b) if only_b else _none(),
            ]
            b2, a3 = await asyncio.gather(*fetches)
            if only_a or only_b:
                waves += 1
            to_left, to_right = ORMap(is_delta=True), ORMap(is_delta=True)
            parts = [(a1, b1, sorted(ka & kb)), (a1, b2, only_a), (a3, b1, only_b)]
            for a, b, keys in parts:
                if keys and a is not None and b is not None:
                    dl, dr = repair_deltas(a, b, keys)
                    to_left.merge(dl)
                    to_right.merge(dr)
            found |= ka | kb
            pushes = [(n, to_left) for n in left_group if to_left.store]
            pushes += [(n, to_right) for n in right_group if to_right.store]
            pushed += await client.apply_all(subject, pushes)
            waves += 1 if pushes else 0
            await self._throttle(client)
        return len(found), pushed, waves

    async def _throttle(self, client: HealClient) -> None:
        moved = client.bytes_sent + client.bytes_received
        started = getattr(client, "_throttle_t0", None)
        if started is None:
            client._throttle_t0 = time.monotonic()  # type: ignore[attr-defined]
            return
        ahead = moved / self.settings.bytes_per_second - (time.monotonic() - started)
        if ahead > 0:
            await asyncio.sleep(ahead)

    def _record(self, out: HealOutcome) -> None:
        label = self.metrics.label(out.subject)
        m = self.metrics
        m.divergent_keys.labels(label).inc(out.divergent_keys)
        m.divergence.labels(label).set(out.divergent_keys)
        m.repaired.labels(label).inc(out.keys_repaired)
        m.bytes.labels(label).inc(out.bytes_sent)
        m.round_trips.labels(label).inc(out.round_trips)
        m.duration.labels(label).observe(out.duration_s)
        outcome = (
            "in_sync" if not out.rounds else "converged" if out.converged else "still_moving"
        )
        m.heals.labels(label, outcome).inc()
        self.reports.append(out)
        del self.reports[:-100]

    async def _publish_report(self, out: HealOutcome) -> None:
        assert self.transport is not None
        assert self.signer is not None
        r = self.codec.schema.healer.HealReport.new_message()
        r.subject = out.subject
        for name, values in (
            ("replicas", out.replicas),
            ("rootsBefore", out.roots_before),
            ("rootsAfter", out.roots_after),
        ):
            lst = r.init(name, len(values))
            for i, v in enumerate(values):
                lst[i] = v
        r.keysRepaired = out.keys_repaired
        r.bytesSent = out.bytes_sent
        r.roundTrips = out.round_trips
        r.durationMs = int(out.duration_s * 1000)
        r.converged = out.converged
        body = r.to_bytes_packed()
        signed = self.codec.schema.envelope.SignedEnvelope.new_message()
        signed.signer = self.signer.node_id
        signed.signature = self.signer.sign(body, REPORT_DOMAIN)
        signed.body = body
        with contextlib.suppress(WorknodeError):
            await self.transport.publish(
                heal_subject(self.settings.namespace, out.subject), signed.to_bytes_packed()
            )
            out.published = True
            self.metrics.last_report.labels(self.metrics.label(out.subject)).set(time.time())
