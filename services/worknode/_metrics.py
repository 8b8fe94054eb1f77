"""Prometheus metrics of a worknode service: the replica and transport observers.

Naming follows Prometheus conventions: one ``worknode_`` prefix, base units (seconds, bytes),
counters end in ``_total``, and every label has a bounded value set (configured subjects,
rejection reasons from ``REJECT_REASONS``, wire versions, catch-up outcomes). ``promtool check
metrics`` reports nothing on ``/metrics`` (``tests/observability/``), and ``dashboards/``
queries these names.

Rolling upgrades are watched through two series: ``worknode_build_info{wire_version}`` is the
version a node *writes* (``peer_wire_version`` the oldest it writes for), and
``worknode_deltas_applied_total{wire_version}`` counts what it has *read*, per version.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from broker.codec import CURRENT_VERSION, OLDEST_VERSION
from broker.replica import REFUSE_REASONS, REJECT_REASONS
from broker.replication import BYZANTINE_REASONS
from broker.strong import STRONG_OPS, STRONG_OUTCOMES

__all__ = ["STORE_OPERATIONS", "ServiceMetrics", "build_info", "package_version", "process_metrics"]

# prometheus-client adds a ``*_created`` series beside every counter and histogram; Prometheus
# ingests them as separate gauges, doubling the series count for no dashboard's use.
disable_created_metrics()  # type: ignore[no-untyped-call]

_OPS_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
_BYTES_BUCKETS = (64, 256, 1024, 4096, 16384, 65536, 262144, 1048576)
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
_CATCHUP_OUTCOMES = ("ok", "no_peer", "rejected", "too_large", "retry", "gave_up")
_GATE_OUTCOMES = ("held", "drained", "evicted", "cut")
# Replication lag spans sub-millisecond (same host) to minutes (a node catching up after a
# partition applies deltas sealed long ago): the buckets go up to 10 minutes.
_LAG_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300,
                600)
STORE_OPERATIONS = ("open", "append", "load", "write_snapshot", "get_meta", "set_meta")
"""Store calls whose ``StoreError`` is counted (``worknode_store_errors_total{operation}``)."""


def package_version() -> str:
    """The installed worknode package's version (``0+unknown`` when not installed)."""
    try:
        return version("worknode")
    except PackageNotFoundError:
        return "0+unknown"


def build_info(
    registry: CollectorRegistry, service: str, version: str, wire_version: int,
    peer_version: int,
) -> None:
    """``worknode_build_info{service, version, wire_version, peer_wire_version,
    newest_wire_version} 1``: what runs, and which wire version it writes."""
    Info("worknode_build",
         "Build of this process: package version, the wire version it writes, the oldest "
         "version it writes for (peer_wire_version), the newest it can read.",
         registry=registry).info(
        {"service": service, "version": version, "wire_version": str(wire_version),
         "peer_wire_version": str(peer_version), "newest_wire_version": str(CURRENT_VERSION)}
    )


def process_metrics(registry: CollectorRegistry) -> None:
    """prometheus-client's process collector (``process_resident_memory_bytes``,
    ``process_cpu_seconds_total``, ``process_open_fds``, ...) in ``registry``: services use
    their own registries, which do not get it by default."""
    ProcessCollector(registry=registry)


class ServiceMetrics:
    """Every series a worknode service exports, in its own registry."""

    def __init__(
        self, subjects: list[str], version: str, wire_version: int,
        peer_version: int = OLDEST_VERSION,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.subjects = frozenset(subjects)
        build_info(r, "worknode", version, wire_version, min(peer_version, wire_version))
        process_metrics(r)
        self.ops_committed = Counter(
            "worknode_ops_committed_total", "Local write operations durably committed.",
            ["subject"], registry=r)
        self.commit_seconds = Histogram(
            "worknode_store_commit_seconds", "Durable store commit latency (group commit).",
            ["subject"], buckets=_LATENCY_BUCKETS, registry=r)
        self.batches_published = Counter(
            "worknode_batches_published_total", "Delta batches (envelopes) published.",
            ["subject"], registry=r)
        self.ops_published = Counter(
            "worknode_ops_published_total", "Write operations published in batches.",
            ["subject"], registry=r)
        self.batch_ops = Histogram(
            "worknode_batch_ops", "Operations joined into one published batch.",
            ["subject"], buckets=_OPS_BUCKETS, registry=r)
        self.batch_bytes = Histogram(
            "worknode_batch_bytes", "Bytes of one published envelope.",
            ["subject"], buckets=_BYTES_BUCKETS, registry=r)
        self.flush_seconds = Histogram(
            "worknode_flush_latency_seconds",
            "Time from a batch's first committed write to its publication.",
            ["subject"], buckets=_LATENCY_BUCKETS, registry=r)
        self.publish_failures = Counter(
            "worknode_publish_failures_total", "Publishes that failed and were retried.",
            ["subject"], registry=r)
        self.applied_envelopes = Counter(
            "worknode_deltas_applied_total",
            "Envelopes from peers joined into the state, by the wire version they were written in.",
            ["subject", "wire_version"], registry=r)
        self.applied_bytes = Counter(
            "worknode_applied_bytes_total", "Bytes of envelopes joined into the state.",
            ["subject"], registry=r)
        self.rejected_envelopes = Counter(
            "worknode_deltas_rejected_total", "Envelopes refused, by reason.",
            ["subject", "reason"], registry=r)
        self.byzantine_envelopes = Counter(
            "worknode_byzantine_rejected_total",
            "Envelopes a roster key signed that it cannot have written honestly (a dot of "
            "another replica, a counter or claim out of range, a claim never backed, a removal "
            "on an add-only subject), by reason and signer (a verified roster member: "
            "bounded).",
            ["subject", "reason", "signer"], registry=r)
        self.lag_seconds = Histogram(
            "worknode_replication_lag_seconds",
            "Writer's seal time to local apply (hybrid clock physical part).",
            ["subject"], buckets=_LAG_BUCKETS, registry=r)
        self.gaps = Counter(
            "worknode_sequence_gaps_total", "Batches detected missing from a writer's sequence.",
            ["subject"], registry=r)
        self.catchups = Counter(
            "worknode_catchups_total", "State transfers requested, by outcome.",
            ["subject", "outcome"], registry=r)
        self.catchups_served = Counter(
            "worknode_catchup_served_total",
            "Peers' catch-up requests answered (a full state or \"nothing new\").",
            ["subject"], registry=r)
        self.catchup_served_bytes = Counter(
            "worknode_catchup_served_bytes_total", "Bytes sent answering peers' catch-ups.",
            ["subject"], registry=r)
        self.relay_stripped = Counter(
            "worknode_relay_stripped_total",
            "Relayed states (catch-up answers) that carried other writers' dots this node had "
            "not seen, left out (their writers' own signed batches bring them): the relays.",
            ["subject"], registry=r)
        self.evidence_forwarded = Counter(
            "worknode_evidence_forwarded_total",
            "Other writers' signed batches and states forwarded with catch-up answers.",
            ["subject"], registry=r)
        self.evidence_kept_bytes = Gauge(
            "worknode_evidence_kept_bytes",
            "Bytes of other writers' signed batches and states kept to forward as evidence.",
            ["subject"], registry=r)
        self.catchups_refused = Counter(
            "worknode_catchup_refused_total",
            "Catch-up requests refused unanswered (unsigned, not a served replica, expired, "
            "replayed, over the requester's rate...), by reason.",
            ["subject", "reason"], registry=r)
        self.gated_deltas = Counter(
            "worknode_gated_deltas_total",
            "Peers' deltas the causal gate held (claims ran ahead), drained later, or evicted "
            "from a full hold (left to catch-up).",
            ["subject", "outcome"], registry=r)
        self.snapshot_seconds = Histogram(
            "worknode_snapshot_seconds", "Time to snapshot a subject's state.",
            ["subject"], buckets=_LATENCY_BUCKETS, registry=r)
        self.snapshot_bytes = Gauge(
            "worknode_snapshot_bytes", "Size of the latest snapshot.", ["subject"], registry=r)
        self.keys = Gauge(
            "worknode_keys", "Top-level keys (worknodes) held per subject.", ["subject"],
            registry=r)
        self.pending_ops = Gauge(
            "worknode_pending_ops", "Committed operations not yet published.", ["subject"],
            registry=r)
        self.slow_consumer_events = Counter(
            "worknode_slow_consumer_events_total",
            "Messages NATS dropped for a slow subscription (each triggers catch-up).",
            registry=r)
        self.slow_consumer_dropped = Counter(
            "worknode_slow_consumer_dropped_total", "Messages dropped as a slow consumer.",
            registry=r)
        self.disconnects = Counter(
            "worknode_nats_disconnects_total", "Disconnections from NATS.", registry=r)
        self.reconnects = Counter(
            "worknode_nats_reconnects_total", "Reconnections to NATS.", registry=r)
        self.handler_errors = Counter(
            "worknode_handler_errors_total", "Message handlers that raised (a bug).",
            registry=r)
        self.nats_connected = Gauge(
            "worknode_nats_connected", "1 while connected to NATS.", registry=r)
        self.nats_open = Gauge(
            "worknode_nats_open_connection",
            "1 when the NATS connection lacks authentication or TLS (nats_insecure or not).",
            registry=r)
        self.store_errors = Counter(
            "worknode_store_errors_total",
            "Durable store calls that failed (StoreError), by operation. A failed append "
            "leaves the replica refusing writes until it is restarted.",
            ["operation"], registry=r)
        self.pending_ops_limit = Gauge(
            "worknode_pending_ops_limit",
            "max_pending_ops: past it writers get BackpressureError.", ["subject"], registry=r)
        self.strong_ops = Counter(
            "worknode_strong_ops_total",
            "STRONG operations (write, read, cas: a conditional write), by outcome: ok, "
            "conflict (a compare-and-set lost), unavailable (no quorum in time: not done), "
            "unknown (no answer in time: maybe done).",
            ["subject", "op", "outcome"], registry=r)
        self.strong_seconds = Histogram(
            "worknode_strong_op_seconds",
            "Latency of STRONG operations (acknowledged by the stream's quorum and applied "
            "here; reads: fence, then apply up to it), whatever their outcome.",
            ["subject", "op"], buckets=_LATENCY_BUCKETS, registry=r)
        self._strong_children: dict[tuple[str, str, str], tuple[Any, Any]] = {}
        self.strong_refused_entries = Counter(
            "worknode_strong_entries_refused_total",
            "STRONG log entries refused before the state machine (not a sealed STRONG write of "
            "a node or writer); entries the machine refuses count in "
            "worknode_byzantine_rejected_total / worknode_deltas_rejected_total.",
            ["subject"], registry=r)
        for op in STORE_OPERATIONS:
            self.store_errors.labels(op)
        for s in subjects:  # pre-create series so dashboards see zeros, not gaps
            for reason in REJECT_REASONS:
                self.rejected_envelopes.labels(s, reason)
            for outcome in _CATCHUP_OUTCOMES:
                self.catchups.labels(s, outcome)
            for outcome in _GATE_OUTCOMES:
                self.gated_deltas.labels(s, outcome)
            for reason in REFUSE_REASONS:
                self.catchups_refused.labels(s, reason)
            self.catchups_served.labels(s)
            self.catchup_served_bytes.labels(s)
            for v in range(OLDEST_VERSION, CURRENT_VERSION + 1):
                self.applied_envelopes.labels(s, str(v))
            self.ops_committed.labels(s)
            self.ops_published.labels(s)
            self.batches_published.labels(s)
            self.gaps.labels(s)
            self.publish_failures.labels(s)

    def export_heal_rejects(
        self, source: Callable[[], Mapping[tuple[str, str, str], int]]
    ) -> None:
        """Export ``worknode_heal_rejected_total{subject, verb, reason}``: the healer
        requests this node's endpoints refused, read from ``source()`` (the endpoints'
        ``rejected`` counter) at each scrape. Called again (a restart), it reads the new
        source instead."""
        collector: _HealRejects | None = getattr(self, "_heal_rejects", None)
        if collector is None:
            collector = self._heal_rejects = _HealRejects(source)
            self.registry.register(collector)
        collector.source = source

    def export_strong(self, source: Callable[[], Mapping[str, tuple[bool, int]]]) -> None:
        """Export ``worknode_strong_available{subject}`` (1: the last STRONG operation
        reached a quorum; 0: it did not, the node is in a minority or cut off, STRONG
        refused) and ``worknode_strong_applied_seq{subject}`` (the log sequence applied),
        read from ``source()`` (subject -> (available, applied)) at each scrape. Called
        again (a restart), it reads the new source instead."""
        collector: _StrongState | None = getattr(self, "_strong_state", None)
        if collector is None:
            collector = self._strong_state = _StrongState(source)
            self.registry.register(collector)
        collector.source = source
        for s in source():
            for op in STRONG_OPS:
                self.strong_seconds.labels(s, op)
                for outcome in STRONG_OUTCOMES:
                    self.strong_ops.labels(s, op, outcome)
            self.strong_refused_entries.labels(s)

    def _s(self, subject: str) -> str:
        return subject if subject in self.subjects else "other"

    # -- ReplicaObserver ---------------------------------------------------------------------

    def committed(self, subject: str, ops: int, seconds: float) -> None:
        """A group commit finished."""
        s = self._s(subject)
        self.ops_committed.labels(s).inc(ops)
        self.commit_seconds.labels(s).observe(seconds)

    def published(self, subject: str, ops: int, nbytes: int, seconds: float) -> None:
        """A batch was published."""
        s = self._s(subject)
        self.batches_published.labels(s).inc()
        self.ops_published.labels(s).inc(ops)
        self.batch_ops.labels(s).observe(ops)
        self.batch_bytes.labels(s).observe(nbytes)
        self.flush_seconds.labels(s).observe(seconds)

    def applied(self, subject: str, version: int, nbytes: int, lag_ms: float) -> None:
        """A peer's envelope was joined."""
        s = self._s(subject)
        # Versions this build does not know (read as far as it can) share one label value.
        v = str(version) if version <= CURRENT_VERSION else "newer"
        self.applied_envelopes.labels(s, v).inc()
        self.applied_bytes.labels(s).inc(nbytes)
        self.lag_seconds.labels(s).observe(lag_ms / 1000)

    def rejected(self, subject: str, reason: str, writer: str | None = None) -> None:
        """An envelope was refused (``writer`` is not a label, except on the Byzantine
        reasons: there the machine names the verified signer, a roster member)."""
        self.rejected_series(subject, reason).inc()
        if writer is not None and reason in BYZANTINE_REASONS:
            self.byzantine_envelopes.labels(self._s(subject), reason, writer).inc()

    def rejected_series(self, subject: str, reason: str) -> Counter:
        """The rejection counter child for ``(subject, reason)`` (reason bounded)."""
        return self.rejected_envelopes.labels(
            self._s(subject), reason if reason in REJECT_REASONS else "malformed"
        )

    def gap(self, subject: str, writer: str, missing: int) -> None:
        """Batches were found missing (writer is not a label: unbounded)."""
        self.gaps.labels(self._s(subject)).inc(missing)

    def catchup(self, subject: str, outcome: str) -> None:
        """A catch-up finished."""
        o = outcome if outcome in _CATCHUP_OUTCOMES else "rejected"
        self.catchups.labels(self._s(subject), o).inc()

    def catchup_served(self, subject: str, nbytes: int) -> None:
        """A peer's catch-up request was answered with ``nbytes`` bytes."""
        s = self._s(subject)
        self.catchups_served.labels(s).inc()
        self.catchup_served_bytes.labels(s).inc(nbytes)

    def stripped(self, subject: str, relay: str, owners: int) -> None:
        """A relayed state carried other writers' unseen dots, left out (relay: no label)."""
        self.relay_stripped.labels(self._s(subject)).inc()

    def evidence(self, subject: str, forwarded: int, kept_bytes: int) -> None:
        """Kept batches/states went out with a catch-up answer."""
        s = self._s(subject)
        self.evidence_forwarded.labels(s).inc(forwarded)
        self.evidence_kept_bytes.labels(s).set(kept_bytes)

    def catchup_refused(self, subject: str, reason: str) -> None:
        """A catch-up request was refused (reason bounded)."""
        r = reason if reason in REFUSE_REASONS else "malformed"
        self.catchups_refused.labels(self._s(subject), r).inc()

    def gated(self, subject: str, outcome: str) -> None:
        """The causal gate held, drained or evicted a peer's delta."""
        o = outcome if outcome in _GATE_OUTCOMES else "evicted"
        self.gated_deltas.labels(self._s(subject), o).inc()

    def snapshot(self, subject: str, nbytes: int, seconds: float) -> None:
        """A snapshot was written."""
        s = self._s(subject)
        self.snapshot_seconds.labels(s).observe(seconds)
        self.snapshot_bytes.labels(s).set(nbytes)

    def publish_failed(self, subject: str) -> None:
        """A publish failed; the batch is kept and retried."""
        self.publish_failures.labels(self._s(subject)).inc()

    # -- StrongObserver ----------------------------------------------------------------------

    def strong_op(self, subject: str, op: str, outcome: str, seconds: float) -> None:
        """A STRONG operation ended (op and outcome bounded)."""
        key = (subject, op, outcome)
        children = self._strong_children.get(key)
        if children is None:  # resolved once per (subject, op, outcome): labels() is slow
            s = self._s(subject)
            o = op if op in STRONG_OPS else "write"
            oc = outcome if outcome in STRONG_OUTCOMES else "unknown"
            children = (self.strong_ops.labels(s, o, oc), self.strong_seconds.labels(s, o))
            if len(self._strong_children) < 4096:
                self._strong_children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def strong_refused(self, subject: str, reason: str) -> None:
        """A STRONG log entry was refused before the machine (reason: not a label)."""
        self.strong_refused_entries.labels(self._s(subject)).inc()

    # -- TransportObserver -------------------------------------------------------------------

    def connected(self) -> None:
        """Connected to NATS."""
        self.nats_connected.set(1)

    def disconnected(self) -> None:
        """Lost the NATS connection."""
        self.disconnects.inc()
        self.nats_connected.set(0)

    def reconnected(self) -> None:
        """Reconnected to NATS."""
        self.reconnects.inc()
        self.nats_connected.set(1)

    def slow_consumer(self, subject: str, dropped: int) -> None:
        """NATS dropped messages for a slow subscription."""
        self.slow_consumer_events.inc()
        self.slow_consumer_dropped.inc(dropped)

    def handler_error(self, subject: str, exc: BaseException) -> None:
        """A message handler raised."""
        self.handler_errors.inc()


class _StrongState:
    """A collector over the STRONG modes: available and applied sequence, per subject."""

    def __init__(self, source: Callable[[], Mapping[str, tuple[bool, int]]]) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        """Two gauge families, a sample per subject with a STRONG log."""
        available = GaugeMetricFamily(
            "worknode_strong_available",
            "1 when the last STRONG operation (or the stream's creation) reached a quorum; 0 "
            "when it did not: STRONG writes and reads fail here (LOCAL/EVENTUAL go on).",
            labels=["subject"])
        applied = GaugeMetricFamily(
            "worknode_strong_applied_seq",
            "The STRONG log sequence this replica applied up to.", labels=["subject"])
        state = sorted(self.source().items())
        if not state:  # no STRONG subject here: no family at all
            return
        for subject, (up, seq) in state:
            available.add_metric([subject], 1 if up else 0)
            applied.add_metric([subject], seq)
        yield available
        yield applied


class _HealRejects:
    """A collector over ``HealEndpoints.rejected`` (labels bounded: subjects, five verbs,
    ``REJECT_REASONS``)."""

    def __init__(self, source: Callable[[], Mapping[tuple[str, str, str], int]]) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        """One counter family, a sample per (subject, verb, reason) seen."""
        family = CounterMetricFamily(
            "worknode_heal_rejected",
            "Healer requests (root, nodes, leaves, fetch, apply) refused, by reason.",
            labels=["subject", "verb", "reason"],
        )
        for (subject, verb, reason), n in sorted(self.source().items()):
            family.add_metric([subject, verb, reason], n)
        yield family
