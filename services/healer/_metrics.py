"""Prometheus metrics of the healer (``worknode_heal_*``, and ``worknode_build_info`` with
``service="healer"``). Subject labels: the configured subjects, others counted as ``other``;
with no subjects configured, the subjects replicas serve (bounded by the deployment)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from broker.codec import CURRENT_VERSION, OLDEST_VERSION
from services.worknode._metrics import build_info, package_version, process_metrics

__all__ = ["HEAL_OUTCOMES", "SKIP_REASONS", "HealerMetrics"]

HEAL_OUTCOMES = (
    "converged", "in_sync", "still_moving", "stuck", "unverified", "unbacked", "failed",
    "skipped",
)
"""``worknode_heals_total{outcome}``: ``skipped`` is a subject the healer could not heal
(fewer than two replicas answered), with its reason in ``worknode_heal_skipped_total``;
``unverified``: a replica's reply failed verification (relayed, replayed or forged), so the
heal could not vouch for it and did not converge (``worknode_heal_unverified_replies_total``);
``unbacked``: a replica refused another's fetch reply as Byzantine (state its source cannot
vouch for), so the heal did not converge (``worknode_heal_unbacked_sources_total``)."""
SKIP_REASONS = ("no_replicas", "one_replica")
"""Why a subject was skipped: no replica of it answered discovery, or only one did."""

_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class HealerMetrics:
    """Every series the healer exports, in its own registry."""

    def __init__(self, subjects: list[str], version: str | None = None) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.subjects = frozenset(subjects)
        build_info(r, "healer", version or package_version(), CURRENT_VERSION, OLDEST_VERSION)
        process_metrics(r)
        self.rounds = Counter("worknode_heal_rounds_total", "Reconciliation rounds run.",
                              ["subject"], registry=r)
        self.heals = Counter("worknode_heals_total", "Subjects healed, by outcome.",
                             ["subject", "outcome"], registry=r)
        self.divergent_keys = Counter(
            "worknode_heal_divergent_keys_total", "Keys found different between replicas.",
            ["subject"], registry=r)
        self.repaired = Counter("worknode_heal_keys_repaired_total",
                                "Keys whose state was pushed to a replica.", ["subject"],
                                registry=r)
        self.bytes = Counter("worknode_heal_bytes_total", "Bytes sent and received by the healer.",
                             ["subject"], registry=r)
        self.round_trips = Counter("worknode_heal_round_trips_total",
                                   "Requests the healer made.", ["subject"], registry=r)
        self.duration = Histogram("worknode_heal_duration_seconds", "Time to heal one subject.",
                                  ["subject"], buckets=_BUCKETS, registry=r)
        self.divergence = Gauge("worknode_heal_divergence_keys",
                                "Keys differing at the start of the latest heal.", ["subject"],
                                registry=r)
        self.replicas = Gauge("worknode_heal_replicas", "Replicas discovered per subject.",
                              ["subject"], registry=r)
        self.last_report = Gauge("worknode_heal_last_report_timestamp_seconds",
                                 "When the latest heal report was published.", ["subject"],
                                 registry=r)
        self.last_success = Gauge(
            "worknode_heal_last_success_timestamp_seconds",
            "When a heal of the subject last ended with every replica's root agreeing "
            "(in_sync or converged), Unix seconds.", ["subject"], registry=r)
        self.skipped = Counter(
            "worknode_heal_skipped_total",
            "Heals not run because fewer than two replicas of the subject answered, by reason "
            "(no_replicas, one_replica).", ["subject", "reason"], registry=r)
        self.failures = Counter("worknode_heal_failures_total",
                                "Heals that failed (a replica unreachable, a bad reply).",
                                ["subject"], registry=r)
        self.unverified = Counter(
            "worknode_heal_unverified_replies_total",
            "Replies that failed verification (not signed by the replica asked for that very "
            "request: relayed, replayed or forged), by verb.", ["subject", "verb"], registry=r)
        self.unbacked = Counter(
            "worknode_heal_unbacked_sources_total",
            "Repairs refused as Byzantine by the replica they were pushed to, by the replica "
            "whose signed fetch reply (voucher) held state it cannot vouch for (a roster "
            "node: bounded).", ["subject", "source"], registry=r)
        self.loop_errors = Counter(
            "worknode_heal_loop_errors_total",
            "Heal loop passes that failed outside any subject's heal (discovery); retried.",
            registry=r,
        )
        for s in subjects:  # pre-create series so dashboards see zeros, not gaps
            for outcome in HEAL_OUTCOMES:
                self.heals.labels(s, outcome)
            for reason in SKIP_REASONS:
                self.skipped.labels(s, reason)
            self.replicas.labels(s)  # 0 until a discovery finds replicas
            for counter in (self.failures, self.rounds, self.divergent_keys, self.repaired,
                            self.bytes, self.round_trips):
                counter.labels(s)

    def label(self, subject: str) -> str:
        """The bounded label for ``subject``."""
        return subject if not self.subjects or subject in self.subjects else "other"
