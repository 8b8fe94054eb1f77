"""The healer endpoints' refusals are observable: ``HealEndpoints.rejected`` is exported as
``worknode_heal_rejected_total{subject, verb, reason}`` (read at each scrape)."""

from __future__ import annotations

from collections import Counter

from prometheus_client import generate_latest

from services.worknode._metrics import ServiceMetrics


def test_heal_rejects_are_exported_by_subject_verb_and_reason() -> None:
    metrics = ServiceMetrics(["orders"], "0", 3)
    counts: Counter[tuple[str, str, str]] = Counter()
    metrics.export_heal_rejects(lambda: counts)
    counts[("orders", "apply", "malformed")] += 3
    counts[("orders", "fetch", "too_large")] += 1
    text = generate_latest(metrics.registry).decode()
    assert ('worknode_heal_rejected_total{reason="malformed",subject="orders",verb="apply"} 3.0'
            in text)
    assert ('worknode_heal_rejected_total{reason="too_large",subject="orders",verb="fetch"} 1.0'
            in text)
    # A restarted service exports its new endpoints' counter, registered once.
    fresh: Counter[tuple[str, str, str]] = Counter({("orders", "root", "malformed"): 2})
    metrics.export_heal_rejects(lambda: fresh)
    text = generate_latest(metrics.registry).decode()
    assert 'verb="root"} 2.0' in text
    assert 'verb="apply"' not in text
