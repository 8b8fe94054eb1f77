"""Prometheus metrics of the RPC server (names agreed with the dashboards):

- ``worknode_rpc_requests_total{method,code}``: requests by method and final status
  (``code`` is the lowercase status name: ``ok``, ``permission_denied``, ...);
- ``worknode_rpc_request_duration_seconds{method}``: server-side handling time;
- ``worknode_rpc_in_flight{method}``: requests running now;
- ``worknode_rpc_token_verify_seconds``: time to check one token (cache hits included).

``method`` is bounded: the registered methods, and ``other`` for any other name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

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


class RpcMetrics:
    """The RPC series, registered into a service's registry; an ``RpcObserver``."""

    def __init__(self, registry: CollectorRegistry, methods: Iterable[str]) -> None:
        self.methods = frozenset(methods) | {OTHER_METHOD}
        r = registry
        self.requests = Counter(
            "worknode_rpc_requests_total", "RPC requests handled, by method and status code.",
            ["method", "code"], registry=r)
        self.duration = Histogram(
            "worknode_rpc_request_duration_seconds", "Server-side RPC handling time.",
            ["method"], buckets=_LATENCY_BUCKETS, registry=r)
        self.in_flight_gauge = Gauge(
            "worknode_rpc_in_flight", "RPC requests running now.", ["method"], registry=r)
        self.verify = Histogram(
            "worknode_rpc_token_verify_seconds", "Time to check one capability token.",
            buckets=_VERIFY_BUCKETS, registry=r)
        # Children resolved once: labels() costs more than the update itself.
        self._requests = {
            (m, code): self.requests.labels(m, code.label)
            for m in self.methods for code in StatusCode
        }
        self._duration = {m: self.duration.labels(m) for m in self.methods}
        # In-flight counts are plain ints read at scrape time: two locked gauge updates per
        # request cost more than the rest of the bookkeeping.
        self._running = dict.fromkeys(self.methods, 0)
        for m in self.methods:
            self.in_flight_gauge.labels(m).set_function(self._reader(m))

    def _reader(self, method: str) -> Callable[[], float]:
        return lambda: float(self._running[method])

    def request(self, method: str, code: StatusCode, seconds: float) -> None:
        """A request ended."""
        m = method if method in self.methods else OTHER_METHOD
        self._requests[m, code].inc()
        self._duration[m].observe(seconds)

    def in_flight(self, method: str, delta: int) -> None:
        """Requests running changed."""
        self._running[method if method in self.methods else OTHER_METHOD] += delta

    def token_verified(self, seconds: float) -> None:
        """A token was checked."""
        self.verify.observe(seconds)
