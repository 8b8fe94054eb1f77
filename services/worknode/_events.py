"""What a worknode service does with its replicas' and its transport's events: metrics
(``ServiceMetrics``) and structured log lines (``services.worknode._logging``).

Logged at the default level (INFO), bounded in rate:

- ``nats_disconnected`` (warning) and ``nats_reconnected`` (info, with how long the node was
  away): every one; there are few;
- ``envelope_rejected`` (warning): subject, reason and writer (``unknown`` until the replica
  reports it), one line per (subject, reason) every 10 s, with the count held back;
- ``catchup`` (info when it succeeded or no peer answered, warning when it failed): one line
  per (subject, outcome) every 10 s;
- ``slow_consumer`` (warning): messages NATS dropped, one line per subscription every 10 s;
- ``sequence_gap`` (info): batches missing from a writer, one line per (subject, writer)
  every 10 s.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from services.worknode._logging import RateLimited, event
from services.worknode._metrics import ServiceMetrics

if TYPE_CHECKING:
    from services.worknode._service import WorknodeService

__all__ = ["LOG_WINDOW_S", "ConnectionLog", "ReplicaEvents", "TransportEvents"]

log = logging.getLogger("services.worknode")

LOG_WINDOW_S = 10.0
"""Seconds between two lines of one rate-limited kind (per subject and reason/outcome)."""
# A lone node (the first of a cluster) finds no peer: not worth a warning.
_CATCHUP_OK = ("ok", "no_peer")
_CATCHUP_QUIET = ("retry",)  # reported beside every failure, which is the line worth reading


class ReplicaEvents:
    """A ``ReplicaObserver``: every event counted in ``metrics``; rejections, catch-ups and
    gaps logged (rate-limited)."""

    def __init__(self, metrics: ServiceMetrics, node_id: str,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.metrics = metrics
        self.node_id = node_id
        self._limit = RateLimited(LOG_WINDOW_S, clock)

    def committed(self, subject: str, ops: int, seconds: float) -> None:
        """A group commit finished."""
        self.metrics.committed(subject, ops, seconds)

    def published(self, subject: str, ops: int, nbytes: int, seconds: float) -> None:
        """A batch was published."""
        self.metrics.published(subject, ops, nbytes, seconds)

    def applied(self, subject: str, version: int, nbytes: int, lag_ms: float) -> None:
        """A peer's envelope was joined."""
        self.metrics.applied(subject, version, nbytes, lag_ms)

    def rejected(self, subject: str, reason: str, writer: str | None = None) -> None:
        """An envelope was refused: counted, and logged with its writer when the replica
        names it (the verified writer, or the one an unverifiable envelope's header claims;
        "unknown" for a catch-up answer or request that did not open)."""
        self.metrics.rejected(subject, reason, writer)
        self._limit(log, logging.WARNING, ("rejected", subject, reason), "envelope_rejected",
                    node=self.node_id, subject=subject, reason=reason,
                    writer=writer or "unknown")

    def gap(self, subject: str, writer: str, missing: int) -> None:
        """Batches were found missing from ``writer``'s sequence (catch-up follows)."""
        self.metrics.gap(subject, writer, missing)
        self._limit(log, logging.INFO, ("gap", subject, writer), "sequence_gap",
                    node=self.node_id, subject=subject, writer=writer, missing=missing)

    def catchup(self, subject: str, outcome: str) -> None:
        """A catch-up finished with ``outcome``."""
        self.metrics.catchup(subject, outcome)
        if outcome in _CATCHUP_QUIET:
            return
        level = logging.INFO if outcome in _CATCHUP_OK else logging.WARNING
        self._limit(log, level, ("catchup", subject, outcome), "catchup",
                    node=self.node_id, subject=subject, outcome=outcome)

    def gated(self, subject: str, outcome: str) -> None:
        """The causal gate held, drained or evicted a peer's delta."""
        self.metrics.gated(subject, outcome)

    def catchup_served(self, subject: str, nbytes: int) -> None:
        """A peer's catch-up request was answered."""
        self.metrics.catchup_served(subject, nbytes)

    def catchup_refused(self, subject: str, reason: str) -> None:
        """A catch-up request was refused: counted, logged (rate-limited)."""
        self.metrics.catchup_refused(subject, reason)
        self._limit(log, logging.WARNING, ("catchup_refused", subject, reason),
                    "catchup_refused", node=self.node_id, subject=subject, reason=reason)

    def stripped(self, subject: str, relay: str, owners: int) -> None:
        """A relayed state carried other writers' unseen dots: left out, counted, logged
        (rate-limited); their writers' own signed batches or states bring them."""
        self.metrics.stripped(subject, relay, owners)
        self._limit(log, logging.INFO, ("stripped", subject, relay),
                    "relay_stripped", node=self.node_id, subject=subject, relay=relay,
                    owners=owners)

    def evidence(self, subject: str, forwarded: int, kept_bytes: int) -> None:
        """Kept batches/states of other writers went out with a catch-up answer."""
        self.metrics.evidence(subject, forwarded, kept_bytes)

    def snapshot(self, subject: str, nbytes: int, seconds: float) -> None:
        """A snapshot was written."""
        self.metrics.snapshot(subject, nbytes, seconds)

    def publish_failed(self, subject: str) -> None:
        """A publish failed (``broker.replica`` logs it); the batch is retried."""
        self.metrics.publish_failed(subject)


class TransportEvents:
    """A ``TransportObserver``: counts transport events, logs disconnects and reconnects and,
    after a reconnect, has every replica catch up and announce itself: whatever was missed
    while away is fetched, both ways."""

    def __init__(self, metrics: ServiceMetrics, service: WorknodeService,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.metrics = metrics
        self.service = service
        self._clock = clock
        self._down_since: float | None = None
        self._limit = RateLimited(LOG_WINDOW_S, clock)

    def connected(self) -> None:
        """Connected."""
        self.metrics.connected()

    def disconnected(self) -> None:
        """Disconnected: logged (warning), the time noted for the reconnect's line."""
        self.metrics.disconnected()
        if self._down_since is None:
            self._down_since = self._clock()
        log.warning(event("nats_disconnected", node=self.service.settings.node_id))

    def reconnected(self) -> None:
        """Reconnected: logged with how long the node was away; catch up and announce."""
        self.metrics.reconnected()
        down = None if self._down_since is None else self._clock() - self._down_since
        self._down_since = None
        log.info(event("nats_reconnected", node=self.service.settings.node_id,
                       down_s=round(down, 3) if down is not None else "unknown"))
        for replica in self.service.replicas.values():
            replica.reconnected()

    def slow_consumer(self, subject: str, dropped: int) -> None:
        """Dropped messages (the subscription's callback triggers catch-up): counted, logged
        (rate-limited)."""
        self.metrics.slow_consumer(subject, dropped)
        self._limit(log, logging.WARNING, ("slow_consumer", subject), "slow_consumer",
                    node=self.service.settings.node_id, subject=subject, dropped=dropped)

    def handler_error(self, subject: str, exc: BaseException) -> None:
        """A handler raised (a bug): logged with its traceback, counted."""
        log.error(event("handler_error", node=self.service.settings.node_id,
                        subject=subject), exc_info=exc)
        self.metrics.handler_error(subject, exc)


class ConnectionLog:
    """A ``TransportObserver`` for a process without replicas (the healer): logs NATS
    disconnects (warning) and reconnects (info, with how long it was away), and handler
    errors, like ``TransportEvents``."""

    def __init__(self, name: str, logger: logging.Logger,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.log = logger
        self._clock = clock
        self._down_since: float | None = None

    def connected(self) -> None:
        """Connected (the service says so itself)."""

    def disconnected(self) -> None:
        """Disconnected: logged."""
        if self._down_since is None:
            self._down_since = self._clock()
        self.log.warning(event("nats_disconnected", node=self.name))

    def reconnected(self) -> None:
        """Reconnected: logged with how long it was away."""
        down = None if self._down_since is None else self._clock() - self._down_since
        self._down_since = None
        self.log.info(event("nats_reconnected", node=self.name,
                            down_s=round(down, 3) if down is not None else "unknown"))

    def slow_consumer(self, subject: str, dropped: int) -> None:
        """Dropped messages: logged (the healer's requests are retried by the next heal)."""
        self.log.warning(event("slow_consumer", node=self.name, subject=subject,
                               dropped=dropped))

    def handler_error(self, subject: str, exc: BaseException) -> None:
        """A handler raised (a bug): logged with its traceback."""
        self.log.error(event("handler_error", node=self.name, subject=subject), exc_info=exc)
