"""The healer: finds replicas, compares Merkle roots per subject, repairs what differs.

The decisions of one heal (grouping, hub, rounds, value widths, convergence, when to stop and
escalate) are the pure ``broker.healing.HealPlanner``'s; this service drives it: it runs the
planner's actions with a ``HealClient`` (root requests in parallel; per ``RepairPair`` a
``Reconciliation``, fetches of both sides' entries, each side's signed fetch replies pushed
to the other group), throttles bytes to ``bytes_per_second``, times the phases, records metrics and
publishes a signed heal report on ``wn.<ns>.heal.<subject>`` (replicas, roots before and
after, keys repaired, bytes, round trips, duration, whether all roots agree).

Vouched repairs: the healer signs no state. A side's fetch reply, sealed by that replica, is
the voucher it forwards unchanged to each member of the other group, which computes its repair
itself and keeps only what the source vouches for (``broker.healing._endpoints``).
``broker.repair.repair_deltas`` over both replies only decides which side needs a push and
counts the entries. A push refused as Byzantine (the source served state it cannot vouch
for) names the source as suspect: ``worknode_heal_unbacked_sources_total{source}``, a WARNING
line, and the heal ends ``unbacked``, not converged.

A heal that does not converge is logged with its reason and never counted as success: the
loop retries soon when another heal may do better (roots still moving, a failure), and waits
the interval when it would only repeat itself (``stuck``: repairs changed no root; tree
schemes differ); ``worknode healer --once`` exits non-zero (``pass_status``).

Heals run every ``interval_s`` and at once when membership changes (a replica appears,
disappears or restarts with a new service id; each change is logged at INFO). A subject with
fewer than two replicas answering is skipped, counted (``outcome="skipped"`` and
``worknode_heal_skipped_total{reason}``) and logged, and ``worknode_heal_replicas`` follows
its replicas down to 0. A heal ending with every root agreeing sets
``worknode_heal_last_success_timestamp_seconds``. ``start()``/``stop()`` are idempotent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Final

from broker.codec import Signer, TrustRoster, WireCodec
from broker.crdt import ORMap
from broker.errors import SignatureError, WorknodeError
from broker.healing import (
    REPLICA_SERVICE,
    ROOT_LEVELS,
    AskRoots,
    HealClient,
    HealPlanner,
    HealPolicy,
    HealResult,
    PairResult,
    Refusal,
    RepairPair,
    RootView,
    StopReason,
    Voucher,
    seal_heal_report,
    subjects_to_heal,
)
from broker.merkle import Diff
from broker.repair import repair_deltas
from broker.replication._gate import relayed
from broker.transport import (
    Transport,
    complete_despite_cancel,
    discover,
    heal_subject,
)
from services._connection import open_server_warning
from services._reload import KeyFileWatch, TrustMetrics, roster_watch
from services.healer._metrics import HealerMetrics
from services.healer._settings import HealerSettings
from services.worknode import (
    MetricsEndpoint,
    load_identity,
    read_cluster_secret,
    read_roster_entries,
)
from services.worknode._events import ConnectionLog
from services.worknode._logging import RateLimited, event

__all__ = ["ROOT_LEVELS", "HealOutcome", "HealerService"]

log = logging.getLogger(__name__)

SKIP_LOG_WINDOW_S: Final = 300.0
"""A subject skipped heal after heal is logged again this often (and at once when the
reason changes)."""


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
    reason: StopReason = ""
    """Why a heal that did not converge stopped (``broker.healing.HealResult.reason``)."""
    retry_soon: bool = False
    published: bool = False
    unverified: list[str] = field(default_factory=list)
    """Replicas whose root reply failed verification (a relay, a replay): left out of the
    heal, which then did not converge (``reason`` ``unverified``)."""
    unbacked: list[str] = field(default_factory=list)
    """Replicas whose fetch reply another replica refused as Byzantine (state its source
    cannot vouch for): the heal did not converge (``reason`` ``unbacked``)."""
    # where the time went (seconds): root requests, identification, fetch + push of states
    phases: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))


PHASES: Final[tuple[str, ...]] = ("roots", "identify", "repair")
_WHY: Final[dict[str, str]] = {
    "": "",
    "rounds": "roots still moving after the last round",
    "stuck": "repairs changed no root: a digest or repair defect, escalated",
    "schemes": "tree schemes differ",
    "failed": "a step failed",
    "unverified": "a replica's reply failed verification (relayed or replayed?): left out",
    "unbacked": "a replica refused another's fetch reply as Byzantine: its source is suspect",
    "catchup": "receivers catch up writers' dots their repair's source could not vouch for",
}


async def _none() -> None:
    return None


class _Abandoned:
    """Stands in for the planner when fewer than two replicas' roots verified: nothing to
    compare, the heal ends not converged."""

    def __init__(self, subject: str, views: dict[str, RootView]) -> None:
        self.subject = subject
        self._views = views

    def result(self) -> HealResult:
        """The heal's (empty) outcome among the replicas that did verify."""
        nodes = sorted(self._views)
        roots = [self._views[n].root for n in nodes]
        return HealResult(self.subject, nodes, roots, roots, reason="unverified")


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
        self.roster = roster if roster is not None else TrustRoster(now=time.time)
        self.trust_metrics = TrustMetrics(self.metrics.registry)
        self.trust_metrics.watch_roster(self.roster)
        self.roster_watch: KeyFileWatch | None = None
        """Reloads the roster file on change and on SIGHUP."""
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
        self._seen_subjects: set[str] = set()  # every subject a replica ever served
        self._skip_log = RateLimited(SKIP_LOG_WINDOW_S)
        self.skipped: dict[str, str] = {}
        """Subjects the last pass could not heal, and why (``SKIP_REASONS``)."""
        self.replicas_found = 0
        """Replica services (of this namespace) the last pass discovered."""
        self._unbacked: set[str] = set()  # sources refused during the heal running now

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
        s.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # its key: owner only
        s.state_dir.chmod(0o700)  # one that existed already too
        self.signer = load_identity(s.node_id, s.key_path(), s.roster_file, self.roster,
                                    role="healer")
        if s.roster_file is not None:
            self.roster_watch = roster_watch(
                self.roster, s.roster_file, s.node_id, self.signer.public_key,
                read=read_roster_entries, role="healer", metrics=self.trust_metrics,
                interval_s=s.key_reload_interval_s)
        self.secret = read_cluster_secret(s.cluster_secret_file)
        if self.transport is None:
            self.transport = s.connect_options(s.node_id, signing_key=s.key_path()).transport(
                name=s.node_id, observer=ConnectionLog(s.node_id, log))
        await self.transport.start()
        warning = open_server_warning(self.transport, acknowledged=s.nats_insecure)
        if warning is not None:
            log.warning("%s: %s", s.node_id, warning)
        self.codec = WireCodec(max_payload=self.transport.max_payload)
        self._metrics_http.start(s.metrics_host, s.metrics_port, self.metrics.registry)
        self._running = True
        self._task = asyncio.create_task(self._loop(), name="healer")
        if self.roster_watch is not None:
            self.roster_watch.start()

    async def stop(self) -> None:
        """Stop the loop (a heal in progress is cancelled; replicas stay consistent: every
        repair is a join). Idempotent."""
        if not self._running:
            return
        self._running = False
        await complete_despite_cancel(self._teardown())

    async def _teardown(self) -> None:
        if self.roster_watch is not None:
            await self.roster_watch.stop()
            self.roster_watch = None
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
                    membership = frozenset((m[0], m[1]) for m in members)
                    self._log_membership(self._membership, membership, members)
                    self._membership = membership
                    outcomes, failed = await self.heal_pass(members)
                    self.failed_subjects = failed
                    # A failed heal, or one still moving, is retried soon, not an interval later.
                    settled = not failed and not any(o.retry_soon for o in outcomes)
                    next_heal = time.monotonic() + (s.interval_s if settled else s.retry_s)
            except WorknodeError as exc:
                self.metrics.loop_errors.inc()
                next_heal = min(next_heal, time.monotonic() + s.retry_s)
                log.warning(event("heal_loop_error", error=exc))
            except Exception:  # a bug must not end healing for good: logged, counted, retried
                self.metrics.loop_errors.inc()
                next_heal = min(next_heal, time.monotonic() + s.retry_s)
                log.exception(event("heal_loop_error", error="unexpected error"))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(s.membership_poll_s):
                    await self._wake.wait()
            self._wake.clear()

    def _log_membership(
        self, old: frozenset[tuple[str, str]], new: frozenset[tuple[str, str]],
        members: list[tuple[str, str, list[str]]],
    ) -> None:
        """One INFO line per replica that appeared or disappeared since the last pass."""
        served = {(node, sid): subjects for node, sid, subjects in members}
        for node, sid in sorted(new - old):
            log.info(event("replica_appeared", node=node, service_id=sid,
                           subjects=",".join(served.get((node, sid), [])),
                           replicas=len(new)))
        for node, sid in sorted(old - new):
            log.info(event("replica_disappeared", node=node, service_id=sid,
                           replicas=len(new)))

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
        by_subject = subjects_to_heal(
            ((node, subjects) for node, _, subjects in members), self.settings.subjects
        )
        self.replicas_found = len(members)
        # A subject whose replicas all vanished is still reported (0 replicas, skipped), not
        # left at its last count: the configured ones, and every one a replica ever served.
        self._seen_subjects.update(by_subject)
        outcomes: list[HealOutcome] = []
        failed: list[str] = []
        skipped: dict[str, str] = {}
        for subject in sorted(set(self.settings.subjects) | self._seen_subjects):
            nodes = by_subject.get(subject, [])
            self.metrics.replicas.labels(self.metrics.label(subject)).set(len(nodes))
            if len(nodes) < 2:
                skipped[subject] = self._skip(subject, nodes)
                continue
            try:
                outcomes.append(await self.heal_subject(subject, nodes))
            except Exception as exc:  # counted, logged; the loop retries after retry_s
                failed.append(subject)
                label = self.metrics.label(subject)
                self.metrics.failures.labels(label).inc()
                self.metrics.heals.labels(label, "failed").inc()
                if isinstance(exc, WorknodeError):
                    log.warning(event("heal", subject=subject, outcome="failed",
                                      replicas=len(nodes), error=exc))
                else:
                    log.exception(event("heal", subject=subject, outcome="failed",
                                        replicas=len(nodes), error="unexpected error"))
        self.skipped = skipped
        return outcomes, failed

    def _skip(self, subject: str, nodes: list[str]) -> str:
        """Count and log (rate-limited) a subject not healed: fewer than two replicas."""
        reason = "no_replicas" if not nodes else "one_replica"
        label = self.metrics.label(subject)
        self.metrics.heals.labels(label, "skipped").inc()
        self.metrics.skipped.labels(label, reason).inc()
        self._skip_log(log, logging.WARNING, (subject, reason), "heal_skipped",
                       subject=subject, reason=reason, replicas=",".join(nodes) or "none",
                       namespace=self.settings.namespace)
        return reason

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
            on_unverified=self._unverified,
        )

    def _unverified(self, subject: str, node: str, verb: str) -> None:
        """A reply from ``node`` failed verification: counted and logged."""
        self.metrics.unverified.labels(self.metrics.label(subject), verb).inc()
        log.warning(event("heal_reply_unverified", subject=subject, node=node, verb=verb))

    async def heal_subject(self, subject: str, nodes: list[str]) -> HealOutcome:
        """Heal one subject among ``nodes`` (see module doc). Heals of one healer never
        overlap (the loop and explicit calls share a lock); heals by several healers at
        once are safe too, only wasteful: every repair is a join of consistent snapshots."""
        async with self._lock:
            return await self._heal_subject(subject, nodes)

    def _policy(self) -> HealPolicy:
        s = self.settings
        return HealPolicy(
            max_rounds=s.max_rounds, hash_bytes=s.hash_bytes, item_bytes=s.item_bytes,
            root_levels=ROOT_LEVELS,
        )

    async def _roots(
        self, client: HealClient, subject: str, ask: AskRoots, phases: dict[str, float]
    ) -> tuple[dict[str, RootView], set[str]]:
        """The verified root views, and the replicas whose reply failed verification."""
        t0 = time.monotonic()
        views = await asyncio.gather(
            *(client.root(subject, n, levels=ask.levels, width=ask.width, unless=ask.unless)
              for n in ask.nodes),
            return_exceptions=True,
        )
        phases["roots"] += time.monotonic() - t0
        good: dict[str, RootView] = {}
        bad: set[str] = set()
        for node, view in zip(ask.nodes, views, strict=True):
            if isinstance(view, SignatureError):
                bad.add(node)
            elif isinstance(view, BaseException):
                raise view
            else:
                good[node] = view
        return good, bad

    async def _heal_subject(self, subject: str, nodes: list[str]) -> HealOutcome:
        t0 = time.monotonic()
        client = self._client()
        label = self.metrics.label(subject)
        phases = dict.fromkeys(PHASES, 0.0)
        planner = HealPlanner(
            subject, nodes, self._policy(), agreed=self._agreed.get(subject, b"")
        )
        # A replica whose root reply does not verify (another's relayed, an old one replayed)
        # is left out and the heal starts again among the others: it still repairs what it
        # can see, and never reports the unverified replica as converged.
        unverified: set[str] = set()
        self._unbacked = set()
        abandoned: _Abandoned | None = None
        while not planner.done and abandoned is None:
            for action in planner.next_actions():
                if isinstance(action, AskRoots):
                    views, bad = await self._roots(client, subject, action, phases)
                    if bad:
                        unverified |= bad
                        if len(nodes) - len(unverified) < 2:
                            abandoned = _Abandoned(subject, views)
                        else:
                            planner = HealPlanner(
                                subject, [n for n in nodes if n not in unverified],
                                self._policy(), agreed=self._agreed.get(subject, b""),
                            )
                        break
                    planner.receive_roots(views)
                else:
                    if action.index == 0:
                        self.metrics.rounds.labels(label).inc()
                    planner.receive_repair(action, await self._pair(client, action, phases))
        result = abandoned.result() if abandoned is not None else planner.result()
        if unverified:
            result.converged = False
            result.reason = "unverified"
            result.agreed = b""
        unbacked = sorted(self._unbacked)
        if unbacked:
            result.converged = False
            result.reason = result.reason if result.reason == "unverified" else "unbacked"
            result.agreed = b""
        for note in result.mismatches:
            # A rolling upgrade: trees of different schemes cannot be compared. Said once
            # per replica set, not at every retry.
            key = (subject, note.members, note.scheme, note.hub_scheme)
            if key not in self._scheme_warnings:
                self._scheme_warnings.add(key)
                log.warning(
                    "heal of %s: replicas %s use tree scheme %d, the hub %s scheme %d; "
                    "they are healed once they run the same release",
                    subject, list(note.members), note.scheme, note.hub, note.hub_scheme,
                )
        if result.converged:
            self._agreed[subject] = result.agreed
            self._scheme_warnings = {w for w in self._scheme_warnings if w[0] != subject}
        out = HealOutcome(
            subject, list(result.nodes), result.roots_before, result.roots_after,
            divergent_keys=result.divergent_keys, keys_repaired=result.keys_repaired,
            bytes_sent=client.bytes_sent + client.bytes_received, round_trips=result.waves,
            rounds=result.rounds, duration_s=time.monotonic() - t0,
            converged=result.converged, reason=result.reason, retry_soon=result.retry_soon,
            phases=phases, unverified=sorted(unverified), unbacked=unbacked,
        )
        outcome = self._record(out)
        # A heal that found nothing (in_sync, every interval) is DEBUG: INFO stays readable.
        level = (logging.WARNING if not out.converged
                 else logging.INFO if out.rounds else logging.DEBUG)
        why = {"reason": out.reason, "why": _WHY[out.reason]} if out.reason else {}
        if out.unverified:
            why["unverified"] = ",".join(out.unverified)
        if out.unbacked:
            why["unbacked"] = ",".join(out.unbacked)
        log.log(level, event(
            "heal", subject=subject, outcome=outcome, replicas=len(nodes),
            divergent_keys=out.divergent_keys, repaired=out.keys_repaired,
            waves=out.round_trips, bytes=out.bytes_sent,
            duration_ms=round(out.duration_s * 1000),
            **{f"{p}_ms": round(out.phases[p] * 1000) for p in PHASES}, **why,
        ))
        if out.rounds or not out.converged:
            await self._publish_report(out)
        return out

    async def _pair(
        self, client: HealClient, pair: RepairPair, phases: dict[str, float]
    ) -> PairResult:
        """Reconcile ``pair.left`` with ``pair.right``; push the repairs to every member of
        their groups (replicas holding the same items)."""
        t0 = time.monotonic()
        result = await client.identify(
            pair.subject, pair.left, pair.right, self.secret, pair.item_width
        )
        phases["identify"] += time.monotonic() - t0
        await self._throttle(client)
        t0 = time.monotonic()
        try:
            if result.left_items or result.right_items:
                found, pushed, more, owed = await self._repair_items(client, pair, result)
                return PairResult(found, pushed, result.round_trips + more, owed)
            pushed, more, owed = await self._repair_keys(client, pair, list(result.keys))
            return PairResult(len(result.keys), pushed, result.round_trips + more, owed)
        finally:
            phases["repair"] += time.monotonic() - t0

    async def _push(
        self, client: HealClient, pair: RepairPair, to_left: ORMap, to_right: ORMap,
        lefts: list[Voucher], rights: list[Voucher],
    ) -> tuple[int, int]:
        """Push to every member of each side's group the other side's vouchers (its fetch
        replies) that speak for a key whose repair ``to_left``/``to_right`` holds. Returns
        (entries pushed, writers owed: whose dots a receiver drops, its source unable to
        vouch for them, and catches up on instead). A push refused as Byzantine names its
        source (``_suspect``)."""
        pushes: list[tuple[str, Voucher]] = []
        pushed = owed = 0
        for delta, sources, mine, group in (
            (to_left, rights, lefts, pair.left_group),
            (to_right, lefts, rights, pair.right_group),
        ):
            keys = set(delta.store or ())
            needed = [v for v in sources if keys & set(v.document.store or ())]
            if not needed:
                continue
            pushes += [(n, v) for v in needed for n in group]
            pushed += len(keys) * len(group)
            # What the receiver will keep (``relayed``, as it checks the same delta against
            # its own context): writers it drops are owed, not a defect.
            seen = mine[0].document.context
            owed += len(relayed(delta, needed[0].source, seen).stripped)
        if pushes:
            for refusal in await client.push_all(pair.subject, pushes):
                self._suspect(pair.subject, refusal)
        return pushed, owed

    def _suspect(self, subject: str, refusal: Refusal) -> None:
        """A replica refused ``refusal.source``'s voucher as Byzantine: the source served
        state it cannot vouch for. Counted, logged; the heal cannot converge."""
        self._unbacked.add(refusal.source)
        self.metrics.unbacked.labels(self.metrics.label(subject), refusal.source).inc()
        log.warning(event("heal_unbacked_source", subject=subject, source=refusal.source,
                          refused_by=refusal.target, error=refusal.description))

    async def _repair_keys(
        self, client: HealClient, pair: RepairPair, keys: list[str]
    ) -> tuple[int, int, int]:
        """Repair ``keys`` (a whole-values reconciliation names them): fetch both sides'
        entries, push each side's replies to the other group where a repair is needed.
        Returns (entries pushed, waves, writers owed)."""
        pushed = waves = owed = 0
        batch = self.settings.fetch_batch
        subject, left, right = pair.subject, pair.left.node, pair.right.node
        for i in range(0, len(keys), batch):
            chunk = keys[i : i + batch]
            # Ask both sides for every key of the chunk, even one the diff said a side lacks:
            # it may hold it by now, and a side's context is only a valid removal proof
            # together with its entries for the same keys at the same moment (a reply names
            # a key its replica lacks, so it vouches for that key's absence too).
            a, b = await asyncio.gather(
                client.fetch_voucher(subject, left, chunk),
                client.fetch_voucher(subject, right, chunk),
            )
            to_left, to_right = repair_deltas(a.document, b.document, chunk)
            n, o = await self._push(client, pair, to_left, to_right, [a], [b])
            pushed += n
            owed += o
            waves += 2 if to_left.store or to_right.store else 1
            await self._throttle(client)
        return pushed, waves, owed

    async def _repair_items(
        self, client: HealClient, pair: RepairPair, result: Diff
    ) -> tuple[int, int, int, int]:
        """Repair what a digests-only reconciliation found: fetch each side's unmatched items
        (the replica names their keys), then, for a key only one side named, the other
        side's entry by key (so every side's entries and context come from one moment), and
        push each side's replies to the other group. Returns (keys found, keys pushed,
        waves, writers owed)."""
        bits = pair.left.fanout.bit_length() - 1
        width = pair.item_width
        subject, left, right = pair.subject, pair.left.node, pair.right.node

        def index(prefix: tuple[int, ...]) -> int:
            value = 0
            for digit in prefix:
                value = (value << bits) | digit
            return value

        lhs = [(index(p), d) for p, d in result.left_items]
        rhs = [(index(p), d) for p, d in result.right_items]
        found: set[str] = set()
        pushed = waves = owed = 0
        batch = self.settings.fetch_batch
        for i in range(0, max(len(lhs), len(rhs)), batch):
            a1, b1 = await asyncio.gather(
                client.fetch_voucher(subject, left, [], lhs[i : i + batch], width),
                client.fetch_voucher(subject, right, [], rhs[i : i + batch], width),
            )
            waves += 1
            ka, kb = set(a1.document.store or ()), set(b1.document.store or ())
            only_a, only_b = sorted(ka - kb), sorted(kb - ka)
            fetches = [
                client.fetch_voucher(subject, right, only_a) if only_a else _none(),
                client.fetch_voucher(subject, left, only_b) if only_b else _none(),
            ]
            b2, a3 = await asyncio.gather(*fetches)
            if only_a or only_b:
                waves += 1
            to_left, to_right = ORMap(is_delta=True), ORMap(is_delta=True)
            parts = [(a1, b1, sorted(ka & kb)), (a1, b2, only_a), (a3, b1, only_b)]
            for a, b, keys in parts:
                if keys and a is not None and b is not None:
                    dl, dr = repair_deltas(a.document, b.document, keys)
                    to_left.merge(dl)
                    to_right.merge(dr)
            found |= ka | kb
            lefts = [v for v in (a1, a3) if v is not None]
            rights = [v for v in (b1, b2) if v is not None]
            n, o = await self._push(client, pair, to_left, to_right, lefts, rights)
            pushed += n
            owed += o
            waves += 1 if to_left.store or to_right.store else 0
            await self._throttle(client)
        return len(found), pushed, waves, owed

    async def _throttle(self, client: HealClient) -> None:
        moved = client.bytes_sent + client.bytes_received
        started = getattr(client, "_throttle_t0", None)
        if started is None:
            client._throttle_t0 = time.monotonic()  # type: ignore[attr-defined]
            return
        ahead = moved / self.settings.bytes_per_second - (time.monotonic() - started)
        if ahead > 0:
            await asyncio.sleep(ahead)

    def _record(self, out: HealOutcome) -> str:
        """Count ``out`` in the metrics; returns its outcome label."""
        label = self.metrics.label(out.subject)
        m = self.metrics
        m.divergent_keys.labels(label).inc(out.divergent_keys)
        m.divergence.labels(label).set(out.divergent_keys)
        m.repaired.labels(label).inc(out.keys_repaired)
        m.bytes.labels(label).inc(out.bytes_sent)
        m.round_trips.labels(label).inc(out.round_trips)
        m.duration.labels(label).observe(out.duration_s)
        if out.converged:
            outcome = "converged" if out.rounds else "in_sync"
        else:  # "stuck" is a defect to look at; the others wait for writes or a release
            outcome = (out.reason if out.reason in ("stuck", "unverified", "unbacked")
                       else "still_moving")
        m.heals.labels(label, outcome).inc()
        if out.converged:
            m.last_success.labels(label).set(time.time())
        self.reports.append(out)
        del self.reports[:-100]
        return outcome

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
        sealed = seal_heal_report(self.codec, self.signer, r.to_bytes_packed())
        with contextlib.suppress(WorknodeError):
            await self.transport.publish(
                heal_subject(self.settings.namespace, out.subject), sealed
            )
            out.published = True
            self.metrics.last_report.labels(self.metrics.label(out.subject)).set(time.time())
