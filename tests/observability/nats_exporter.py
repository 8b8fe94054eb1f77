"""A stand-in for prometheus-nats-exporter, for tests on machines that cannot run it.

prometheus-nats-exporter (a Go binary; ``docker-compose.yml`` runs its image
``natsio/prometheus-nats-exporter`` with ``-varz -healthz -jsz=all
-use_internal_server_name``) is packaged neither on PyPI nor in Debian, so the tests cannot
install it. This class serves the same series from a *real* nats-server's monitoring
endpoint, mapped the way the exporter's collectors map them (``collector/collector.go``,
``healthz.go``, ``jsz.go`` in nats-io/prometheus-nats-exporter):

- ``/varz``: every numeric top-level field ``F`` becomes the gauge ``gnatsd_varz_F{server_id}``
  (counters like ``in_msgs`` are gauges there too); the string fields ``server_id``,
  ``server_name`` and ``version`` become ``gnatsd_varz_F{server_id, value} 1``;
- ``/healthz``: ``gnatsd_healthz_status{server_id}``, 0 when ``status`` is ``ok``, else 1;
- ``/jsz``: ``jetstream_server_{jetstream_disabled, max_memory, max_storage, total_streams,
  total_consumers, total_messages, total_message_bytes}`` with the server labels
  ``server_id, server_name, cluster, domain, meta_leader, is_meta_leader``.

``server_id`` is the server name, as with ``-use_internal_server_name``. The NATS dashboard
queries only these names, so it reads the real exporter in production and this in tests.
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_VARZ_LABEL_FIELDS = ("server_id", "server_name", "version")


def _get(url: str) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            data = resp.read()
    except urllib.error.HTTPError as exc:  # /healthz answers 503 with a JSON body
        data = exc.read()
    result: dict[str, Any] = json.loads(data)
    return result


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(pairs: dict[str, str]) -> str:
    return "{" + ",".join(f'{k}="{_esc(v)}"' for k, v in pairs.items()) + "}"


def render(monitor_url: str) -> str:
    """The exporter's text exposition for the server at ``monitor_url``."""
    varz = _get(f"{monitor_url}/varz")
    server = str(varz.get("server_name") or varz.get("server_id", ""))
    lines: list[str] = []

    def gauge(name: str, labels: dict[str, str], value: float) -> None:
        lines.append(f"# HELP {name} {name.rsplit('_', 1)[-1]}")
        lines.append(f"# TYPE {name} gauge")
        lines.append(f"{name}{_labels(labels)} {float(value)!r}")

    for key, value in sorted(varz.items()):
        if isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            gauge(f"gnatsd_varz_{key}", {"server_id": server}, value)
        elif isinstance(value, str) and key in _VARZ_LABEL_FIELDS:
            gauge(f"gnatsd_varz_{key}", {"server_id": server, "value": value}, 1)

    health = _get(f"{monitor_url}/healthz")
    gauge("gnatsd_healthz_status", {"server_id": server}, 0 if health.get("status") == "ok" else 1)

    jsz = _get(f"{monitor_url}/jsz")
    meta = jsz.get("meta_cluster") or {}
    leader = str(meta.get("leader", ""))
    labels = {
        "server_id": server,
        "server_name": str(varz.get("server_name", "")),
        "cluster": str(meta.get("name", "")),
        "domain": str((jsz.get("config") or {}).get("domain", "")),
        "meta_leader": leader,
        "is_meta_leader": "true" if not meta or leader == varz.get("server_name") else "false",
    }
    config = jsz.get("config") or {}
    for name, value in (
        ("jetstream_disabled", 1 if jsz.get("disabled") else 0),
        ("max_memory", config.get("max_memory", 0)),
        ("max_storage", config.get("max_storage", 0)),
        ("total_streams", jsz.get("streams", 0)),
        ("total_consumers", jsz.get("consumers", 0)),
        ("total_messages", jsz.get("messages", 0)),
        ("total_message_bytes", jsz.get("bytes", 0)),
    ):
        gauge(f"jetstream_server_{name}", labels, value)
    return "\n".join(lines) + "\n"


class NatsExporterStandIn:
    """Serves ``render(monitor_url)`` at ``http://127.0.0.1:<port>/metrics``; stop() it."""

    def __init__(self, monitor_url: str) -> None:
        self.monitor_url = monitor_url
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        """``127.0.0.1:port`` while serving."""
        assert self._server is not None
        return f"127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> None:
        """Serve on a free loopback port (idempotent)."""
        if self._server is not None:
            return
        monitor_url = self.monitor_url

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404)
                    return
                try:
                    body = render(monitor_url).encode()
                except OSError as exc:
                    self.send_error(502, str(exc))
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop serving (idempotent)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
