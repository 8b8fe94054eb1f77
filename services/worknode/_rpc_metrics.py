"""Prometheus metrics of the RPC server (names agreed with the dashboards):

- ``worknode_rpc_requests_total{method,code}``: requests by method and final status
  (``code`` is the lowercase status name: ``ok``, ``permission_denied``, ...);
- ``worknode_rpc_request_duration_seconds{method}``: server-side handling time;
- ``worknode_rpc_in_flight{method}``: requests running now;
- ``worknode_rpc_token_verify_seconds``: time to check one token (cache hits included).

``method`` is bounded: the registered methods, and ``other`` for any other name.

Requests are counted into plain ints and bucket lists under one lock, and a collector turns
them into the series when the registry is scraped: the same samples, always current, for a
fraction of what prometheus-client's ``Counter.inc`` and ``Histogram.observe`` cost per call
(a lock per value and a Python loop over the buckets; three of them per request). The lock
keeps a scrape (from the HTTP thread) from seeing a request half counted: every histogram's
``+Inf`` bucket equals its ``_count``, and its ``_sum`` matches.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from broker.rpc import OTHER_METHOD, StatusCode

__all__ = ["RpcMetrics"]

_LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5,
    5, 10, 30,
)
_VERIFY_BUCKETS = (
    0.000002, 0.000005, 0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025,
    0.01,
)
_REQUESTS = ("worknode_rpc_requests_total", "RPC requests handled, by method and status code.")
_DURATION = ("worknode_rpc_request_duration_seconds", "Server-side RPC handling time.")
_VERIFY = ("worknode_rpc_token_verify_seconds", "Time to check one capability token.")


class _Histogram:
    """Observations counted per bucket (not cumulative; the last bucket is ``+Inf``), and,
    for a method's histogram, its requests by status code (indexed by the code)."""

    __slots__ = ("codes", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.codes = [0] * len(StatusCode)
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0


def _buckets(bounds: Sequence[float], counts: Sequence[int]) -> list[tuple[str, float]]:
    out = []
    running = 0
    for le, n in zip([*map(floatToGoString, bounds), "+Inf"], counts, strict=True):
        running += n
        out.append((le, float(running)))
    return out


class RpcMetrics:
    """The RPC series, registered into a service's registry; an ``RpcObserver``."""

    def __init__(self, registry: CollectorRegistry, methods: Iterable[str]) -> None:
        self.methods = frozenset(methods) | {OTHER_METHOD}
        self._lock = threading.Lock()
        self._duration = {m: _Histogram(_LATENCY_BUCKETS) for m in sorted(self.methods)}
        self._other = self._duration[OTHER_METHOD]
        self._verify = _Histogram(_VERIFY_BUCKETS)
        registry.register(_Collector(self))
        self.in_flight_gauge = Gauge(
            "worknode_rpc_in_flight", "RPC requests running now.", ["method"], registry=registry)
        # In-flight counts are plain ints read at scrape time: two locked gauge updates per
        # request cost more than the rest of the bookkeeping.
        self._running = dict.fromkeys(self.methods, 0)
        for m in self.methods:
            self.in_flight_gauge.labels(m).set_function(self._reader(m))

    def _reader(self, method: str) -> Callable[[], float]:
        return lambda: float(self._running[method])

    def request(self, method: str, code: StatusCode, seconds: float) -> None:
        """A request ended."""
        h = self._duration.get(method) or self._other
        bucket = bisect_left(_LATENCY_BUCKETS, seconds)
        lock = self._lock
        lock.acquire()  # not ``with``: half the cost, on every request
        try:
            h.codes[code] += 1
            h.counts[bucket] += 1
            h.total += seconds
        finally:
            lock.release()

    def in_flight(self, method: str, delta: int) -> None:
        """Requests running changed."""
        self._running[method if method in self.methods else OTHER_METHOD] += delta

    def token_verified(self, seconds: float) -> None:
        """A token was checked."""
        h = self._verify
        bucket = bisect_left(_VERIFY_BUCKETS, seconds)
        lock = self._lock
        lock.acquire()
        try:
            h.counts[bucket] += 1
            h.total += seconds
        finally:
            lock.release()

    def collect(self) -> Iterator[Metric]:
        """The counted series, as of now (called by the registry at scrape time)."""
        with self._lock:
            durations = {
                m: (list(h.codes), list(h.counts), h.total) for m, h in self._duration.items()
            }
            verify = (list(self._verify.counts), self._verify.total)
        counter = CounterMetricFamily(*_REQUESTS, labels=["method", "code"])
        for m, (codes, _, _) in durations.items():
            for code in StatusCode:
                counter.add_metric([m, code.label], float(codes[code]))
        yield counter
        duration = HistogramMetricFamily(*_DURATION, labels=["method"])
        for m, (_, counts, total) in durations.items():
            duration.add_metric([m], _buckets(_LATENCY_BUCKETS, counts), total)
        yield duration
        verify_family = HistogramMetricFamily(*_VERIFY)
        verify_family.add_metric([], _buckets(_VERIFY_BUCKETS, verify[0]), verify[1])
        yield verify_family


class _Collector(Collector):
    """Hands ``RpcMetrics``' counts to the registry (kept apart so that the observer itself
    is not a registry collector)."""

    def __init__(self, metrics: RpcMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        return self._metrics.collect()

    def describe(self) -> Iterable[Metric]:
        # Named up front so that registering a second RpcMetrics into one registry fails
        # at once, as it did with prometheus-client's own metric objects.
        yield CounterMetricFamily(*_REQUESTS, labels=["method", "code"])
        yield HistogramMetricFamily(*_DURATION, labels=["method"])
        yield HistogramMetricFamily(*_VERIFY)
